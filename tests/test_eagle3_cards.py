"""The registry's EAGLE-3 drafter cards and the drafter card `tree`.

The published checkpoints cannot be downloaded here, so each card's hub name is checked to be in a format the loaders
read by writing a small checkpoint of that format (test_eagle3's writers: the same config fields and key names) and
resolving the card's name to it through the registry, with the hub fetch replaced by a local copy. The tree a run
uses is the target card's, with the drafter card's `tree` over it and the command line over that: checked in
`tree_settings` and through each front end that calls it (`run`, a matrix cell, lm-eval's model).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from byte_target import write_byte_target
from test_cli import fails, invoke
from test_eagle3 import VOCAB, H, make_config, random_state, write_safeailab, write_speculators
from test_eagle3_decoding import drafter_parts

from taps_bench.catalog.cards import DrafterCard, TreeOverride, TreeSettings
from taps_bench.catalog.proposers import ProposerSpec
from taps_bench.catalog.registry import Registry
from taps_bench.errors import UserError
from taps_bench.measure import resolve
from taps_bench.measure.resolve import drafter_location, load_any, tree_settings
from taps_bench.models.eagle3 import Eagle3Drafter
from taps_bench.models.eagle3_format import check_eagle3_against_target, detect_format
from taps_bench.models.forward import SUPPORTED
from taps_bench.models.targets import Target

pytestmark = pytest.mark.usefixtures("one_thread")

# The layout of every published EAGLE-3 hub name the registry names, as its card's comment says: a card naming a hub
# checkpoint must be listed here, so that its layout is one the test below writes and loads.
PUBLISHED_FORMATS = {
    "yuhuili/EAGLE3-LLaMA3.1-Instruct-8B": "eagle3",  # SafeAILab
    "RedHatAI/Llama-3.1-8B-Instruct-speculator.eagle3": "speculators-eagle3",
    "AngelSlim/Qwen3-1.7B_eagle3": "eagle3",
    "AngelSlim/Qwen3-4B_eagle3": "eagle3",
}
# Target families the decoding engine runs: the architectures of models/forward.py by family name.
FAMILIES = {arch.removesuffix("ForCausalLM").lower(): arch for arch in SUPPORTED}
MAX_LEVELS = 16  # the engine's attention window: a tree may have at most this many drafted levels (depth + 1)


def stub(reg: Registry, name: str) -> Target:
    """What `tree_settings` and `drafter_location` read of a loaded target (its name and card), without its weights."""
    return cast(Target, SimpleNamespace(name=name, card=reg.target(name)))


def eagle3_cards(reg: Registry) -> list[DrafterCard]:
    return [c for c in reg.cards["drafter"].values() if isinstance(c, DrafterCard) and c.method == "eagle3"]


def hub_entries(reg: Registry) -> list[tuple[DrafterCard, str, str]]:
    """(card, target, hub name) of every published EAGLE-3 checkpoint the registry names."""
    return [(c, t, e.source.hub) for c in eagle3_cards(reg) for t, e in sorted(c.targets.items())
            if e.source is not None and e.source.hub]


# -- the registry's cards -------------------------------------------------------------------------------------------


def test_every_eagle3_card_parses_and_fits_a_registered_target() -> None:
    reg = Registry.load()  # parses every card: a malformed one fails here
    cards = eagle3_cards(reg)
    assert {"eagle3-llama3.1-instruct-8b", "speculators-eagle3-llama3.1-8b", "angelslim-eagle3-qwen3"} <= \
        {c.name for c in cards}
    for card in cards:
        for target_name, entry in card.targets.items():
            target = reg.target(target_name)  # an unknown name raises, naming the close ones
            assert target.family in FAMILIES, f"{card.name}: target {target_name} is a {target.family} model"
            if entry.source is not None and entry.source.hub:
                assert PUBLISHED_FORMATS.get(entry.source.hub), f"{card.name}: add {entry.source.hub} to the table"
                assert entry.confirmed, f"{card.name}: every listed hub name was seen in a public source"
            elif entry.source is None:  # built here by a recipe, in a layout taps-bench writes itself
                recipe = reg.recipe(entry.recipe or "")
                assert recipe.method == "eagle3" and recipe.target == target_name, card.name
            # The card's tree fits over its target's and within what the engine verifies.
            shape = tree_settings(stub(reg, target_name), None, reg, ProposerSpec(drafter=card.name))
            assert shape == "auto" or shape.depth + 1 <= MAX_LEVELS


def test_published_eagle3_trees_are_the_eagle_repositorys_defaults() -> None:
    reg = Registry.load()
    deep = TreeSettings(total_tokens=60, depth=7, top_k=10)  # SafeAILab EaModel.from_pretrained's defaults
    qwen3 = TreeSettings(total_tokens=32, depth=8, top_k=4)  # SafeAILab gen_ea_answer_qwen3.py's defaults
    for name, target, tree in (("eagle3-llama3.1-instruct-8b", "llama3.1-8b-instruct", deep),
                               ("speculators-eagle3-llama3.1-8b", "llama3.1-8b-instruct", deep),
                               ("angelslim-eagle3-qwen3", "qwen3-1.7b", qwen3),
                               ("angelslim-eagle3-qwen3", "qwen3-4b", qwen3)):
        assert tree_settings(stub(reg, target), None, reg, ProposerSpec(drafter=name)) == tree, name
    # The target card itself keeps the paper's tree: an EAGLE-2 drafter on it is not made deeper.
    assert tree_settings(stub(reg, "llama3.1-8b-instruct")) == TreeSettings(total_tokens=60, depth=5, top_k=10)
    card = reg.target("llama3.1-8b-instruct")
    assert card.source.hub == "meta-llama/Llama-3.1-8B-Instruct" and card.checkpoint_sha256 is None
    assert card.stop_tokens == ["<|eot_id|>", "<|end_of_text|>", "<|eom_id|>"] and card.default_on is None


def _write(fmt: str, family: str, directory: Path) -> Path:
    """A small checkpoint in `fmt` for a target of `family`: speculators builds a Qwen3 layer (q/k norms) for Qwen3
    verifiers, SafeAILab's layer is Llama's whatever the target."""
    if fmt == "speculators-eagle3":
        config = make_config(qk_norm=family == "qwen3")
        return write_speculators(directory, config, random_state(config))
    config = make_config()
    return write_safeailab(directory, config, random_state(config))


def _target_config(family: str) -> Any:
    """A target config of `family` with the small drafters' width and vocabulary and enough layers to tap."""
    from transformers import LlamaConfig, Qwen3Config

    common = {"vocab_size": VOCAB, "hidden_size": H, "intermediate_size": 2 * H, "num_hidden_layers": 8,
              "num_attention_heads": 4, "num_key_value_heads": 2}
    return LlamaConfig(**common) if family == "llama" else Qwen3Config(head_dim=H // 4, **common)


@pytest.mark.parametrize("hub", sorted(PUBLISHED_FORMATS))
def test_each_published_name_resolves_to_a_format_the_loaders_read(hub: str, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    reg = Registry.load()
    card, target_name, _ = next(e for e in hub_entries(reg) if e[2] == hub)
    family, fmt = reg.target(target_name).family, PUBLISHED_FORMATS[hub]
    directory = _write(fmt, family, tmp_path / "ckpt")
    fetched: list[str] = []
    monkeypatch.setattr(resolve, "fetch_from_hub", lambda repo, revision=None: fetched.append(repo) or directory)
    where, described, found = drafter_location(reg, card.name, stub(reg, target_name))
    assert fetched == [hub] and described == f"hub:{hub}" and found is card
    assert detect_format(where) == fmt
    drafter, _ = load_any(where)
    assert isinstance(drafter, Eagle3Drafter) and drafter.config.qk_norm == (fmt != "eagle3" and family == "qwen3")
    check_eagle3_against_target(drafter, _target_config(family), card.name)


# -- the drafter card's tree ----------------------------------------------------------------------------------------


@pytest.fixture
def layered(tmp_path: Path) -> Registry:
    """Targets with a fixed (60/5/10) and an "auto" tree; a drafter whose card prefers depth 8, top-k 4; one
    without a tree."""
    for kind in ("targets", "drafters"):
        (tmp_path / kind).mkdir()
    for name, tree in (("t-fixed", {"total_tokens": 60, "depth": 5, "top_k": 10}), ("t-auto", "auto")):
        (tmp_path / "targets" / f"{name}.yaml").write_text(json.dumps({
            "name": name, "description": "a target card (tests only)", "family": "llama",
            "source": {"path": "model"}, "tree": tree}))
    for name, tree in (("deep", {"depth": 8, "top_k": 4}), ("plain", None)):
        (tmp_path / "drafters" / f"{name}.yaml").write_text(json.dumps({
            "name": name, "description": "a drafter card (tests only)", "method": "eagle3", "corpus": "x",
            "targets": {t: {"source": {"path": "ckpt"}} for t in ("t-fixed", "t-auto")},
            **({"tree": tree} if tree else {})}))
    return Registry.load(include=[tmp_path])


DEEP = ProposerSpec(drafter="deep")


@pytest.mark.parametrize(("target", "spec", "override", "expected"), [
    ("t-fixed", None, None, (60, 5, 10)),  # no drafter named: the target card's tree
    ("t-fixed", DEEP, None, (60, 8, 4)),  # the drafter card over it
    ("t-fixed", ProposerSpec(drafter="plain"), None, (60, 5, 10)),  # a card without a tree changes nothing
    ("t-fixed", DEEP, TreeOverride(depth=3), (60, 3, 4)),  # the command line over the drafter card
    ("t-fixed", DEEP, TreeOverride(total_tokens=20, top_k=2), (20, 8, 2)),
    ("t-fixed", DEEP, TreeOverride(preset="paper"), (60, 5, 10)),  # the paper's tree means the paper's
    ("t-fixed", DEEP, TreeOverride(preset="auto"), "auto"),
    ("t-fixed", ProposerSpec(combiner="confidence", drafters=("deep", "plain")), None, (60, 5, 10)),
    ("t-auto", DEEP, None, "auto"),  # a device-chosen tree stays device-chosen...
    ("t-auto", DEEP, TreeOverride(total_tokens=20), (20, 8, 4)),  # ...unless the user fixes a shape
    ("t-auto", DEEP, TreeOverride(preset="paper", depth=2), (60, 2, 10)),
])
def test_target_tree_under_drafter_card_under_command_line(layered: Registry, target: str, spec: Any,
                                                           override: Any, expected: Any) -> None:
    shape = tree_settings(stub(layered, target), override, layered, spec)
    assert (shape if shape == "auto" else (shape.total_tokens, shape.depth, shape.top_k)) == expected


def test_a_checkpoint_directory_keeps_the_target_tree(layered: Registry, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # A name that is a directory is that checkpoint, not the registered drafter of the same name (check_drafter).
    monkeypatch.chdir(tmp_path)
    (tmp_path / "deep").mkdir()
    assert tree_settings(stub(layered, "t-fixed"), None, layered, DEEP) == TreeSettings()


def test_a_card_tree_that_does_not_fit_its_target_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "targets").mkdir()
    (tmp_path / "drafters").mkdir()
    (tmp_path / "targets" / "small.yaml").write_text(json.dumps({
        "name": "small", "description": "a 4-token tree", "family": "llama", "source": {"path": "m"},
        "tree": {"total_tokens": 4, "depth": 1, "top_k": 2}}))
    (tmp_path / "drafters" / "wide.yaml").write_text(json.dumps({
        "name": "wide", "description": "top-k 8", "method": "eagle3", "corpus": "x", "tree": {"top_k": 8},
        "targets": {"small": {"source": {"path": "ckpt"}}}}))
    reg = Registry.load(include=[tmp_path])
    with pytest.raises(UserError) as exc:
        tree_settings(stub(reg, "small"), None, reg, ProposerSpec(drafter="wide"))
    message = str(exc.value)
    assert "drafter card wide" in message and "wide.yaml" in message and "top_k 8 is more than total_tokens 4" \
        in message and "\n" not in message


@pytest.mark.parametrize(("tree", "says"), [
    ({"top_k": 8, "total_tokens": 4}, "tree: top_k 8 is more than total_tokens 4"),
    ({"depth": 16}, "tree.depth: Input should be less than or equal to 15"),
    ({"depht": 3}, "tree.depht: Extra inputs are not permitted"),
    ({"preset": "auto"}, "tree: a drafter card's tree gives sizes only"),
    ("deep", "tree: Input should be a valid dictionary"),
])
def test_a_bad_tree_in_a_drafter_card_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                  tree: Any, says: str) -> None:
    (tmp_path / "drafters").mkdir()
    (tmp_path / "drafters" / "bad.yaml").write_text(json.dumps({
        "name": "bad", "description": "a bad tree", "method": "eagle3", "corpus": "x", "tree": tree,
        "targets": {"llama3.1-8b-instruct": {"source": {"hub": "someone/bad"}}}}, indent=1))
    line = fails(capsys, "--include", tmp_path, "list", "drafters")
    assert "bad.yaml:" in line and says in line, line


# -- through the front ends ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 8-layer Llama with a byte tokenizer (tree 8/3/2) and a registered EAGLE-3 drafter for it whose card
    prefers depth 4 and top-k 1."""
    root = tmp_path_factory.mktemp("eagle3-cards")
    config = write_byte_target(root, "tiny-bytes8", layers=8, tree={"total_tokens": 8, "depth": 3, "top_k": 2})
    write_safeailab(root / "eagle3", *drafter_parts(config, 3, 100))
    (root / "drafters").mkdir()
    (root / "drafters" / "tiny-eagle3.yaml").write_text(json.dumps({
        "name": "tiny-eagle3", "description": "a random EAGLE-3 drafter (tests only)", "method": "eagle3",
        "corpus": "x", "tree": {"depth": 4, "top_k": 1},
        "targets": {"tiny-bytes8": {"source": {"path": str(root / "eagle3")}}}}))
    return root


CARD_TREE = {"total_tokens": 8, "depth": 4, "top_k": 1}  # the drafter card's depth and top-k over the target's 8


@pytest.mark.parametrize(("flags", "tree"), [((), CARD_TREE), (("--top-k", "2"), {**CARD_TREE, "top_k": 2})])
def test_run_uses_the_drafter_cards_tree(capsys: pytest.CaptureFixture[str], tmp_path: Path, tiny: Path,
                                         data_dir: Path, flags: tuple[str, ...], tree: dict[str, int]) -> None:
    rc, out, err = invoke(capsys, "--include", tiny, "run", "--target", "tiny-bytes8", "--drafter", "tiny-eagle3",
                          "--task", "gsm8k", "--limit", "1", "--max-new-tokens", "4", "--db", tmp_path / "r.sqlite",
                          "--data-dir", data_dir, "--no-progress", "--json", *flags)
    assert rc == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["tree"] == tree and result["lossless_rate"] == 1.0


def test_a_matrix_cell_uses_the_drafter_cards_tree(tiny: Path, data_dir: Path) -> None:
    from taps_bench.matrix.local import Workbench
    from taps_bench.matrix.spec import MatrixSpec, plan

    reg = Registry.load(include=[tiny])
    for override, tree in ((TreeOverride(), CARD_TREE), (TreeOverride(depth=2), {**CARD_TREE, "depth": 2})):
        spec = MatrixSpec(name="m", targets=["tiny-bytes8"], proposers=[ProposerSpec(drafter="tiny-eagle3")],
                          tasks={"gsm8k": 1}, tree=override)
        prepared = Workbench(reg, data_dir).prepare(spec, plan(spec)[0])
        assert prepared.arm.settings["tree"] == tree


def test_a_matrix_chooses_the_auto_tree_per_task_whatever_cell_runs_first(
        tiny: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--tree auto` in a matrix is calibrated on each cell's own task, as `taps-bench run` does, so that a cell's
    tree does not depend on which cell ran first (a resumed matrix, or a Ray worker, starts anywhere); a fixed tree
    builds the proposer once for every task."""
    from taps_bench.matrix import local
    from taps_bench.matrix.spec import MatrixSpec, plan

    shapes = {"gsm8k": TreeSettings(total_tokens=6, depth=2, top_k=2),
              "svamp": TreeSettings(total_tokens=4, depth=1, top_k=1)}
    calibrated: list[str] = []

    def fake_auto_tree(reg: Any, entry: Any, target: Any, shape: Any, task: Any, *a: Any, **k: Any) -> Any:
        calibrated.append(task.name)
        return (shapes[task.name], {"tree_choice": "auto", "task": task.name}) if shape == "auto" else (shape, {})

    monkeypatch.setattr(local, "auto_tree", fake_auto_tree)
    reg = Registry.load(include=[tiny])
    spec = MatrixSpec(name="m", targets=["tiny-bytes8"], proposers=[ProposerSpec(drafter="tiny-eagle3")],
                      tasks={"gsm8k": 1, "svamp": 1})
    cells = {c.task: c for c in plan(spec)}
    for order in (["gsm8k", "svamp"], ["svamp", "gsm8k"]):
        monkeypatch.setattr(local, "tree_settings", lambda *a, **k: "auto")
        bench = local.Workbench(reg, data_dir)
        for task in order:
            prepared = bench.prepare(spec, cells[task])
            assert prepared.arm.settings["tree"] == shapes[task].model_dump()
            assert prepared.provenance["tree_auto"]["task"] == task  # how it was chosen, kept with the run
        assert calibrated[-2:] == order
    monkeypatch.undo()
    bench = local.Workbench(reg, data_dir)
    first, second = (bench.prepare(spec, cells[t]) for t in ("gsm8k", "svamp"))
    assert first.proposer is second.proposer and first.arm.settings["tree"] == CARD_TREE
    assert "tree_auto" not in first.provenance


def test_lm_eval_uses_the_drafter_cards_tree(tiny: Path) -> None:
    pytest.importorskip("lm_eval")
    from taps_bench.evaluation.model import TapsLM

    reg = Registry.load(include=[tiny])
    assert TapsLM(target="tiny-bytes8", drafter="tiny-eagle3", registry=reg).settings["tree"] == CARD_TREE
    assert TapsLM(target="tiny-bytes8", drafter="tiny-eagle3", registry=reg,
                  total_tokens=6).settings["tree"] == {**CARD_TREE, "total_tokens": 6}
