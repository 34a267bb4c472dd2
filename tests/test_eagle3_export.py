"""Writing EAGLE-3 drafters: the SafeAILab and speculators writers are the loaders' exact inverse, refuse what a
layout cannot express without leaving anything behind, and `taps-bench export-drafter` packages a drafter for
other tools."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from test_eagle3 import make_config, random_state, run_two_depths

from taps_bench.errors import UserError
from taps_bench.models import eagle3_format
from taps_bench.models.eagle3 import Eagle3Config, Eagle3Drafter, load_state
from taps_bench.models.eagle3_format import (
    detect_format,
    load_eagle3,
    load_safeailab,
    load_speculators,
    save_safeailab,
    save_speculators,
)

pytestmark = pytest.mark.usefixtures("one_thread")
AUX = (1, 3, 5)  # HF hidden-state indices (the states entering layers 1, 3 and 5)


def drafter_of(config: Eagle3Config, seed: int = 0) -> Eagle3Drafter:
    drafter = Eagle3Drafter(config)
    load_state(drafter, random_state(config, seed))
    return drafter.eval()


def assert_same(a: Eagle3Drafter, b: Eagle3Drafter) -> None:
    """The same config, the same tensors (dtype included) and the same logits at both depths."""
    assert a.config == b.config
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key
    for x, y in zip(run_two_depths(a), run_two_depths(b), strict=True):
        assert torch.equal(x, y)


def config_json(directory: Path) -> dict[str, Any]:
    return json.loads((directory / "config.json").read_text())


# -- the writers: exact round trips ------------------------------------------------------------------------------

SAFEAILAB_CASES = {
    "draft-vocab": make_config(),
    "full-vocab": make_config(reduced=False),
    "draft-vocab-aux": make_config(aux_layers=AUX),
    "full-vocab-aux-embed": make_config(reduced=False, aux_layers=AUX, with_embedding=True),
}


@pytest.mark.parametrize("case", list(SAFEAILAB_CASES))
def test_safeailab_round_trip(tmp_path: Path, case: str) -> None:
    drafter = drafter_of(SAFEAILAB_CASES[case])
    weights = save_safeailab(drafter, tmp_path / "out", extra_config={"note": "kept"})
    assert weights == tmp_path / "out" / "model.safetensors"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]
    assert detect_format(tmp_path / "out") == "eagle3"
    for loader in (load_safeailab, load_eagle3):
        loaded, path = loader(tmp_path / "out")
        assert path == weights
        assert_same(drafter, loaded)
    raw = config_json(tmp_path / "out")
    assert raw["architectures"] == ["LlamaForCausalLMEagle3"] and raw["note"] == "kept"
    assert raw["head_dim"] == drafter.config.head_dim and raw["torch_dtype"] == "float32"
    if drafter.config.aux_layers:  # SGLang/SpecForge ids count layer outputs: one less than the HF index
        assert raw["eagle_config"] == {"eagle_aux_hidden_state_layer_ids": [0, 2, 4], "use_aux_hidden_state": True}
    else:
        assert "eagle_config" not in raw
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as f:
        keys = set(f.keys())
    assert ("d2t" in keys) == ("t2d" in keys) == drafter.config.reduced
    assert not any(k.startswith("layers.") for k in keys) and "midlayer.mlp.up_proj.weight" in keys


SPECULATORS_CASES = {
    "draft-vocab": make_config(),
    "full-vocab": make_config(reduced=False),
    "draft-vocab-aux": make_config(aux_layers=AUX),
    "qwen3-options": make_config(qk_norm=True, norm_before_residual=True, fc_norm=True, norm_output=True,
                                 aux_layers=(0, 2, 4)),
    "norm-before-fc-embed": make_config(reduced=False, norm_before_fc=True, with_embedding=True),
    "wide-heads": replace(make_config(qk_norm=True), head_dim=16),
}


@pytest.mark.parametrize("case", list(SPECULATORS_CASES))
def test_speculators_round_trip(tmp_path: Path, case: str) -> None:
    drafter = drafter_of(SPECULATORS_CASES[case])
    c = drafter.config
    weights = save_speculators(drafter, tmp_path / "out", "org/tiny-target", ["Qwen3ForCausalLM"],
                               speculative_tokens=3)
    assert detect_format(tmp_path / "out") == "speculators-eagle3"
    for loader in (load_speculators, load_eagle3):
        loaded, path = loader(tmp_path / "out")
        assert path == weights
        assert_same(drafter, loaded)
    raw = config_json(tmp_path / "out")
    sc = raw["speculators_config"]
    assert raw["architectures"] == ["Eagle3Speculator"] and raw["speculators_model_type"] == "eagle3"
    assert sc["verifier"] == {"name_or_path": "org/tiny-target", "architectures": ["Qwen3ForCausalLM"]}
    assert sc["algorithm"] == "eagle3" and sc["default_proposal_method"] == "greedy"
    assert sc["proposal_methods"][0]["proposal_type"] == "greedy"
    assert sc["proposal_methods"][0]["speculative_tokens"] == 3
    assert raw["transformer_layer_config"]["model_type"] == ("qwen3" if c.qk_norm else "llama")
    assert raw["transformer_layer_config"]["head_dim"] == c.head_dim
    assert raw.get("eagle_aux_hidden_state_layer_ids") == (list(c.aux_layers) if c.aux_layers else None)
    assert [raw[k] for k in eagle3_format.SPECULATORS_OPTIONS] == [
        c.norm_before_residual, c.norm_before_fc, c.fc_norm, c.norm_output]
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as f:
        keys = set(f.keys())
    assert "layers.0.mlp.up_proj.weight" in keys and not any(k.startswith("midlayer.") for k in keys)
    assert ("d2t" in keys) == c.reduced


def test_speculators_refuses_a_bad_token_count(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="speculative_tokens"):
        save_speculators(drafter_of(make_config()), tmp_path / "out", "t", [], speculative_tokens=0)
    assert not (tmp_path / "out").exists()


# -- what the SafeAILab layout cannot express: refused, nothing written ----------------------------------------

@pytest.mark.parametrize(("config", "named"), [
    (make_config(qk_norm=True), "qk_norm"),
    (make_config(norm_before_residual=True), "norm_before_residual"),
    (make_config(norm_before_fc=True), "norm_before_fc"),
    (make_config(fc_norm=True), "fc_norm"),
    (make_config(norm_output=True), "norm_output"),
    (replace(make_config(), head_dim=16), "head_dim 16"),
    (make_config(aux_layers=(0, 2, 4)), "hidden state 0"),
], ids=["qk_norm", "norm_before_residual", "norm_before_fc", "fc_norm", "norm_output", "head_dim", "aux-0"])
def test_safeailab_refuses_speculators_only_options(tmp_path: Path, config: Eagle3Config, named: str) -> None:
    drafter = drafter_of(config)
    with pytest.raises(UserError, match=named) as info:
        save_safeailab(drafter, tmp_path / "new")
    assert "\n" not in str(info.value) and "speculators" in str(info.value)
    assert not (tmp_path / "new").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=named):
        save_safeailab(drafter, tmp_path / "empty")
    assert list((tmp_path / "empty").iterdir()) == []


def test_a_failed_weights_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors.torch

    def full_disk(state: dict[str, torch.Tensor], filename: str, metadata: dict[str, str] | None = None) -> None:
        Path(filename).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    for save in (lambda d: save_safeailab(drafter_of(make_config()), d),
                 lambda d: save_speculators(drafter_of(make_config()), d, "t", [])):
        out = tmp_path / "out"
        with pytest.raises(UserError, match="No space left on device"):
            save(out)
        assert list(out.iterdir()) == []  # no .part, no weights, and above all no config.json
        out.rmdir()


# -- `taps-bench export-drafter` ---------------------------------------------------------------------------------

TARGET = "tiny-bytes8"


@pytest.fixture(scope="module")
def bytes8(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An --include directory with target `tiny-bytes8`: a random 8-layer Llama (EAGLE-3's default taps 2, 4, 5
    exist) of width 32 (what test_eagle3's `run_two_depths` feeds) with the byte tokenizer of test_submit."""
    from byte_target import write_byte_target

    root = tmp_path_factory.mktemp("bytes8")
    write_byte_target(root, TARGET, layers=8, tree={"total_tokens": 8, "depth": 3, "top_k": 2})
    return root


def eagle3_for(bytes8: Path, seed: int = 3, draft_vocab: int | None = 100, **options: Any) -> Eagle3Drafter:
    """A random EAGLE-3 drafter shaped for tiny-bytes8."""
    from test_eagle3_decoding import drafter_parts
    from transformers import LlamaConfig

    shape, state = drafter_parts(LlamaConfig.from_pretrained(bytes8 / "model"), seed, draft_vocab)
    drafter = Eagle3Drafter(replace(shape, **options))
    load_state(drafter, {**state, **{k: v for k, v in random_state(drafter.config).items() if k not in state}}
               if options else state)
    return drafter.eval()


def export(capsys: pytest.CaptureFixture[str], bytes8: Path, *args: Any) -> str:
    from taps_bench.cli import main

    rc = main(["--include", str(bytes8), "export-drafter", *map(str, args)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return out


def fails(capsys: pytest.CaptureFixture[str], bytes8: Path, *args: Any) -> str:
    from test_cli import fails as one_line

    return one_line(capsys, "--include", str(bytes8), "export-drafter", *map(str, args))


def siblings(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_export_to_speculators_is_the_same_drafter(capsys, tmp_path, bytes8):
    from safetensors.torch import load_file

    from taps_bench.models.targets import sha256_file

    drafter = eagle3_for(bytes8)
    save_safeailab(drafter, tmp_path / "safe")
    out = export(capsys, bytes8, tmp_path / "safe", "--format", "speculators", "--out", tmp_path / "exp",
                 "--target", TARGET)
    assert f"exported drafter 'safe' (eagle3) for {TARGET} in the speculators format" in out
    assert siblings(tmp_path) == ["exp", "safe"]  # the temporary sibling is gone
    assert siblings(tmp_path / "exp") == ["README.md", "config.json", "model.safetensors"]  # no card.yaml to copy
    loaded, weights = load_speculators(tmp_path / "exp")
    assert_same(drafter, loaded)
    assert load_file(str(weights)).keys() == {("layers.0." + k[9:] if k.startswith("midlayer.") else k)
                                              for k in drafter.state_dict()}
    verifier = config_json(tmp_path / "exp")["speculators_config"]["verifier"]
    assert verifier == {"name_or_path": TARGET, "architectures": ["LlamaForCausalLM"]}  # a path card: no hub id
    readme = (tmp_path / "exp" / "README.md").read_text()
    import taps_bench

    for fact in ("drafter: safe", "method: eagle3", f"target: {TARGET}", "format: speculators",
                 f"sha256 {sha256_file(weights)}", f"taps-bench version: {taps_bench.__version__}"):
        assert fact in readme, fact


def test_export_of_a_built_drafter_by_name_carries_its_card(capsys, tmp_path, bytes8):
    import yaml

    from taps_bench.training.build import store_dir

    drafter = eagle3_for(bytes8, seed=4)
    store = store_dir(TARGET, "my-eagle3")
    save_safeailab(drafter, store)
    card = {"name": "my-eagle3", "description": "a random EAGLE-3 drafter (a test)", "method": "eagle3",
            "corpus": "none", "targets": {TARGET: {"source": {"path": "."}}}, "training": {"steps": 0}}
    (store / "card.yaml").write_text(yaml.safe_dump(card, sort_keys=False))
    (tmp_path / "exp").mkdir()  # an empty directory is taken
    out = export(capsys, bytes8, "my-eagle3", "--format", "eagle", "--out", tmp_path / "exp", "--target", TARGET)
    assert "SafeAILab EAGLE-3 layout" in out
    assert (tmp_path / "exp" / "card.yaml").read_bytes() == (store / "card.yaml").read_bytes()
    assert detect_format(tmp_path / "exp") == "eagle3"
    assert_same(drafter, load_safeailab(tmp_path / "exp")[0])
    assert "drafter: my-eagle3" in (tmp_path / "exp" / "README.md").read_text()


def test_export_of_an_eagle2_drafter(capsys, tmp_path, bytes8):
    from transformers import LlamaConfig

    from taps_bench.models.drafter import load_drafter, random_drafter, save_drafter

    drafter = random_drafter(LlamaConfig.from_pretrained(bytes8 / "model"), 2)
    save_drafter(drafter, tmp_path / "hass")
    (tmp_path / "hass" / "card.yaml").write_text("method: hass\n")
    out = export(capsys, bytes8, tmp_path / "hass", "--format", "eagle", "--out", tmp_path / "exp",
                 "--target", TARGET)
    assert "'hass' (hass)" in out and "EAGLE format" in out
    loaded, _ = load_drafter(tmp_path / "exp")
    a, b = drafter.state_for_saving(), loaded.state_for_saving()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "exp" / "card.yaml").read_text() == "method: hass\n"

    # ... but not in the speculators format, which is for EAGLE-3 drafters here: one line, nothing written
    line = fails(capsys, bytes8, tmp_path / "hass", "--format", "speculators", "--out", tmp_path / "spec",
                 "--target", TARGET)
    assert "speculators export is for EAGLE-3 drafters here" in line and "--format eagle" in line
    assert siblings(tmp_path) == ["exp", "hass"]


def test_export_refusals_touch_nothing(capsys, tmp_path, bytes8, monkeypatch):
    save_safeailab(eagle3_for(bytes8), tmp_path / "safe")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("keep")
    (tmp_path / "file").write_text("keep")
    for taken in ("full", "file"):
        line = fails(capsys, bytes8, tmp_path / "safe", "--format", "speculators", "--out", tmp_path / taken,
                     "--target", TARGET)
        assert f"--out {tmp_path / taken}" in line and "pass a new path" in line
    assert (tmp_path / "full" / "mine.txt").read_text() == "keep" and (tmp_path / "file").read_text() == "keep"
    assert siblings(tmp_path / "full") == ["mine.txt"]

    # a speculators-only option cannot go to the SafeAILab layout: refused before anything is written
    from taps_bench.models.eagle3_format import save_speculators as write_spec

    write_spec(eagle3_for(bytes8, qk_norm=True), tmp_path / "qwen", "t", [])
    line = fails(capsys, bytes8, tmp_path / "qwen", "--format", "eagle", "--out", tmp_path / "new" / "exp",
                 "--target", TARGET)
    assert "qk_norm" in line and "--format speculators" in line and ".part" not in line
    assert line.count("\n") == 0 and not (tmp_path / "new").exists()

    # a failure while writing leaves neither the export, nor its temporary sibling, nor the parents it made
    def broken(*args: Any, **kwargs: Any) -> Path:
        Path(args[1], "model.safetensors").write_bytes(b"half")
        raise UserError("disk on fire")

    monkeypatch.setattr(eagle3_format, "save_speculators", broken)
    line = fails(capsys, bytes8, tmp_path / "safe", "--format", "speculators", "--out", tmp_path / "a" / "b" / "exp",
                 "--target", TARGET)
    assert "disk on fire" in line
    assert siblings(tmp_path) == ["file", "full", "qwen", "safe"]

    line = fails(capsys, bytes8, tmp_path / "nowhere", "--format", "eagle", "--out", tmp_path / "x",
                 "--target", TARGET)
    assert "unknown drafter" in line or "nowhere" in line
    assert "Invalid value" in fails(capsys, bytes8, tmp_path / "safe", "--format", "gguf", "--out", tmp_path / "x")


def test_run_decodes_alike_with_the_exported_drafter(capsys, tmp_path, bytes8, monkeypatch):
    """`taps-bench run --drafter DIR` with the speculators export drafts exactly as with the original directory."""
    from conftest import DATA

    from taps_bench.cli import main
    from taps_bench.results.store import Store

    save_safeailab(eagle3_for(bytes8), tmp_path / "safe")
    export(capsys, bytes8, tmp_path / "safe", "--format", "speculators", "--out", tmp_path / "spec",
           "--target", TARGET)
    monkeypatch.setenv("TAPS_BENCH_DATA", str(DATA))
    db = tmp_path / "r.sqlite"
    for directory in ("safe", "spec"):
        rc = main(["--include", str(bytes8), "run", "--target", TARGET, "--drafter", str(tmp_path / directory),
                   "--task", "gsm8k", "--limit", "1", "--max-new-tokens", "48", "--total-tokens", "40", "--depth", "2",
                   "--top-k", "20", "--db", str(db), "--no-progress"])
        assert rc == 0, capsys.readouterr().err
    with Store(f"sqlite:///{db}") as store:
        runs = store.find_runs(kind="speculative")
        assert len(runs) == 2 and runs[0]["settings"]["drafter_sha256"] != runs[1]["settings"]["drafter_sha256"]
        (a,), (b,) = (store.samples(r["id"]) for r in runs)
    for key in ("output_ids", "accept_lengths", "drafted_by_depth", "accepted_by_depth", "tree_sizes"):
        assert a[key] == b[key], key
    assert sum(a["accept_lengths"]) > 0  # some drafts accepted: what was drafted shows in the comparison
