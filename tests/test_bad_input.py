"""Every bad input is refused cleanly (issue 16): exit 2, one line on stderr saying what is wrong and how to fix it,
no traceback, no run row in the results database, the database intact.

Runs on the self-contained tiny target of test_submit.py (a random 2-layer Llama with a byte-level tokenizer), so no
model is downloaded and nothing here decodes more than a few tokens.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sqlite3
import tempfile
from pathlib import Path
from typing import Any

import pytest
from byte_target import write_byte_target
from conftest import DATA
from test_cli import fails
from test_submit import CARD

from taps_bench.catalog.registry import Registry
from taps_bench.catalog.submission import SubmissionCard
from taps_bench.cli import main
from taps_bench.decoding.sampling import Sampling
from taps_bench.errors import UserError
from taps_bench.measure.runner import Arm, check_arm
from taps_bench.measure.submission import refuse_official_name
from taps_bench.models.drafter import load_drafter, random_drafter, save_drafter
from taps_bench.results.store import Store

pytestmark = pytest.mark.usefixtures("one_thread")

TARGET, SMALL = "tiny-bytes", "tiny-small-vocab"
SMALL_VOCAB = 32  # below the tree's top-k bound (64), so a legal --top-k can exceed it
FAST = ("--limit", "1", "--max-new-tokens", "2", "--no-progress")
LONG = "x" * 5000


@pytest.fixture(scope="module")
def include(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Targets `tiny-bytes` (tree 4/1/2) and `tiny-small-vocab` (32 tokens: only its config matters here, the
    vocabulary check refuses it before a token is decoded), and a random drafter for each."""
    root = tmp_path_factory.mktemp("bad-input")
    for name, vocab in ((TARGET, None), (SMALL, SMALL_VOCAB)):
        config = write_byte_target(root, name, model_dir=name, vocab=vocab)
        save_drafter(random_drafter(config, 1, std=0.5), root / f"{name}-drafter")
    return root


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TAPS_BENCH_DB", f"sqlite:///{tmp_path / 'default.sqlite'}")
    monkeypatch.setenv("TAPS_BENCH_DATA", str(DATA))


def run_rows(db: Path) -> int:
    """Runs stored in the SQLite file `db` (0 when the file was never created)."""
    if not db.exists():
        return 0
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT count(*) FROM runs").fetchone()[0]


def run_args(include: Path, db: Path, *extra: Any, target: str = TARGET) -> tuple[Any, ...]:
    return ("--include", include, "run", "--drafter", include / f"{target}-drafter", "--task", "gsm8k",
            "--target", target, *FAST, "--db", db, *extra)


# -- 1. tree settings ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("flags", "says"), [
    (("--depth", "100000"), ["--depth 100000", "0 to 15"]),
    (("--depth", "-1"), ["--depth -1"]),
    (("--total-tokens", "513"), ["--total-tokens 513", "512"]),
    (("--top-k", "65"), ["--top-k 65", "64"]),
    (("--top-k", "20", "--total-tokens", "10"), ["--top-k 20", "more than --total-tokens 10"]),
    (("--top-k", "20"), ["tree.top_k", "top_k 20 is more than total_tokens 4"]),  # over the card's 4/1/2 tree
])
def test_tree_settings_name_the_field_and_store_nothing(capsys, tmp_path, include, flags, says):
    db = tmp_path / "t.sqlite"
    line = fails(capsys, *run_args(include, db, *flags))
    for s in says:
        assert s in line, line
    assert run_rows(db) == 0


def test_tree_card_whose_top_k_exceeds_its_size(capsys, tmp_path, include):
    card = json.loads((include / "targets" / f"{TARGET}.yaml").read_text())
    (tmp_path / "targets").mkdir()
    (tmp_path / "targets" / "t.yaml").write_text(json.dumps({**card, "name": "bad-tree",
                                                             "tree": {"total_tokens": 4, "top_k": 8}}, indent=1))
    line = fails(capsys, "--include", tmp_path, "list", "targets")
    assert "t.yaml" in line and "tree.top_k: top_k 8 is more than total_tokens 4" in line


def test_top_k_beyond_the_target_vocabulary(capsys, tmp_path, include):
    db = tmp_path / "t.sqlite"
    line = fails(capsys, *run_args(include, db, "--top-k", "40", "--total-tokens", "60", target=SMALL), strict=False)
    assert "tree.top_k 40" in line and f"{SMALL_VOCAB} tokens of target {SMALL}" in line
    assert run_rows(db) == 0


# -- 2. non-finite numbers -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("flags", "says"), [
    (("--temperature", "inf"), "'--temperature': 'inf' is not a finite number"),
    (("--temperature", "nan"), "'--temperature': 'nan' is not a finite number"),
    (("--temperature=-inf",), "'--temperature': '-inf' is not a finite number"),
    (("--top-p", "nan"), "'--top-p': 'nan' is not a finite number"),
    (("--top-p", "inf"), "'--top-p': 'inf' is not a finite number"),
])
def test_non_finite_flags(capsys, tmp_path, include, flags, says):
    db = tmp_path / "t.sqlite"
    assert says in fails(capsys, *run_args(include, db, *flags))
    assert says in fails(capsys, "--include", include, "baseline", "--task", "gsm8k", "--target", TARGET, *FAST,
                         "--db", db, *flags)
    assert run_rows(db) == 0


@pytest.mark.parametrize(("flags", "says"), [
    (("--alpha", "nan"), "'--alpha': 'nan' is not a finite number"),
    (("--option", "alpha=.inf"), "--option alpha=.inf: not a finite number"),
])
def test_non_finite_combiner_options(capsys, tmp_path, include, flags, says):
    db = tmp_path / "t.sqlite"
    drafters = f"{include / (TARGET + '-drafter')},{include / (SMALL + '-drafter')}"
    line = fails(capsys, "--include", include, "run", "--combiner", "average", "--drafters", drafters, "--task",
                 "gsm8k", "--target", TARGET, "--db", db, *flags)
    assert says in line
    line = fails(capsys, "--include", include, "sweep-alpha", "--drafters", drafters, "--alphas", "0,nan",
                 "--task", "gsm8k", "--target", TARGET, "--db", db)
    assert "--alphas must be comma-separated finite numbers" in line
    assert run_rows(db) == 0


def test_nothing_non_finite_reaches_stored_settings():
    """Matrix specs and lm-eval build arms without the CLI's flags: the runner refuses before a run row exists."""
    with pytest.raises(UserError, match=r"^sampling\.temperature: not a finite number"):
        check_arm(None, Arm(kind="baseline", proposer="autoregressive", sampling=Sampling(temperature=math.inf),
                            max_new_tokens=4))
    with pytest.raises(UserError, match=r"^drafters\.1\.weight: not a finite number"):
        check_arm(None, Arm(kind="speculative", proposer="p", sampling=Sampling(), max_new_tokens=4,
                            settings={"drafters": [{"weight": 1.0}, {"weight": math.nan}]}))


# -- 3. files that are not UTF-8 -------------------------------------------------------------------------------


@pytest.mark.parametrize(("task", "rel", "content"), [
    ("gsm8k", "gsm8k/test.jsonl", b'{"question": "1 + 1", "answer": "#### 2"}\n'
                                  b'{"question": "caf\xe9", "answer": "#### 3"}\n'),
    ("svamp", "svamp/SVAMP.json", b'[\n{"ID": "a", "Body": "b", "Question": "caf\xe9 \xff", "Answer": 1}\n]\n'),
])
def test_data_file_that_is_not_utf8(capsys, tmp_path, include, task, rel, content):
    data = tmp_path / "data"
    (data / rel).parent.mkdir(parents=True)
    (data / rel).write_bytes(content)
    db = tmp_path / "t.sqlite"
    line = fails(capsys, "--include", include, "baseline", "--task", task, "--target", TARGET, *FAST, "--data-dir",
                 data, "--db", db)
    assert f"data file {data / rel}:2: not UTF-8 text (byte 0xe9); save the file as UTF-8" in line
    assert run_rows(db) == 0


@pytest.mark.parametrize("kind", ["tasks", "targets", "drafters"])
def test_card_that_is_not_utf8(capsys, tmp_path, kind):
    (tmp_path / kind).mkdir()
    card = tmp_path / kind / "bad.yaml"
    card.write_bytes(b"name: bad\ndescription: caf\xe9\n")
    line = fails(capsys, "--include", tmp_path, "list", kind)
    assert f"cannot read card {card}:2: not UTF-8 text (byte 0xe9); save the file as UTF-8" in line


# -- 4, 5. task cards ------------------------------------------------------------------------------------------


def write_task(directory: Path, **fields: Any) -> Path:
    card = {"name": "mine", "description": "a local task", "source": {"local": "gsm8k/test.jsonl"},
            "fields": {"turns": ["question"], "gold": "answer"}, "scorer": "number"}
    for key, value in fields.items():
        if key == "gold_pattern":
            card["fields"] = {**card["fields"], key: value}  # type: ignore[dict-item]
        else:
            card[key] = value
    (directory / "tasks").mkdir(exist_ok=True)
    path = directory / "tasks" / "mine.yaml"
    path.write_text(json.dumps(card, indent=1))
    return path


@pytest.mark.parametrize(("fields", "says"), [
    ({"gold_pattern": "####(["}, "fields.gold_pattern: not a valid regular expression"),
    ({"gold_pattern": "####.*"}, "fields.gold_pattern: has no capture group"),
    ({"description": ""}, "description: must not be empty"),
    ({"description": "  \n "}, "description: must not be empty"),
])
def test_task_card_refused_at_load(capsys, tmp_path, fields, says):
    card = write_task(tmp_path, **fields)
    line = fails(capsys, "--include", tmp_path, "list", "tasks")
    assert f"malformed card {card}:" in line and says in line


# -- 6. absurdly long names ------------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [
    ("run", "--drafter", LONG, "--task", "gsm8k", "--target", TARGET),
    ("run", "--combiner", "average", "--drafters", f"a,{LONG}", "--task", "gsm8k", "--target", TARGET),
    ("run", "--drafter", "mathinstruct-hass", "--task", LONG, "--target", TARGET),
    ("baseline", "--task", "gsm8k", "--target", LONG),
    ("baseline", "--task", "gsm8k", "--target", TARGET, "--data-dir", LONG),
    ("list", LONG),
])
def test_long_names_are_cut_in_messages(capsys, tmp_path, include, args):
    db = tmp_path / "t.sqlite"
    line = fails(capsys, "--include", include, *args, "--db", db) if args[0] != "list" else \
        fails(capsys, "--include", include, *args)
    # The name is cut to 200 characters; the rest of the line is the message and the registry's known names.
    assert len(line) < 600 and "5000 characters" in line and "x" * 201 not in line, line[:600]
    assert run_rows(db) == 0


def test_long_include_directory(capsys):
    line = fails(capsys, "--include", LONG, "list", "tasks")
    assert len(line) < 400 and "not a directory" in line


# -- 7. a damaged database -------------------------------------------------------------------------------------


def stored_run(db: Path) -> Path:
    with Store(f"sqlite:///{db}") as store:
        store.get_or_create_run("baseline", TARGET, "gsm8k", "autoregressive", 0.0, {"max_new_tokens": 8}, {})
    return db


def test_show_and_export_on_a_database_missing_a_table(capsys, tmp_path):
    db = stored_run(tmp_path / "damaged.sqlite")
    with sqlite3.connect(db) as conn:
        conn.execute("DROP TABLE samples")
    for args in (("show",), ("export",), ("export", "--what", "samples")):
        line = fails(capsys, *args, "--db", db)
        assert "damaged" in line or "not a taps-bench database" in line, line
    assert run_rows(db) == 1  # refused, not repaired or emptied


# -- 8. export into a directory that cannot take the file ------------------------------------------------------


def test_export_into_a_missing_directory(capsys, tmp_path):
    out = tmp_path / "nowhere" / "runs.csv"
    line = fails(capsys, "export", "--db", stored_run(tmp_path / "r.sqlite"), "--out", out)
    assert f"cannot write {out}" in line and "existing, writable directory" in line
    assert not (tmp_path / "nowhere").exists()


def test_export_into_a_read_only_directory(capsys, tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.geteuid() == 0:  # root writes anyway: make the write fail the way a read-only directory does
        def refuse(self: Path, *args: Any, **kwargs: Any) -> None:
            raise PermissionError(13, "Permission denied", str(self))

        monkeypatch.setattr(Path, "write_text", refuse)
    line = fails(capsys, "export", "--db", stored_run(tmp_path / "r.sqlite"), "--out", ro / "runs.csv")
    assert f"cannot write {ro / 'runs.csv'}: Permission denied" in line
    assert list(ro.iterdir()) == []  # no .part left behind
    ro.chmod(0o755)


# -- 9. drafters with NaN or infinite weights ------------------------------------------------------------------


def broken_drafter(include: Path, directory: Path, value: float) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(include / f"{TARGET}-drafter", directory)
    state = load_file(directory / "model.safetensors")
    state["layers.0.mlp.up_proj.weight"][0, 0] = value
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    return directory


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_drafter_weights(capsys, tmp_path, include, value):
    drafter = broken_drafter(include, tmp_path / "drafter", value)
    says = f"{drafter / 'model.safetensors'}: tensor `layers.0.mlp.up_proj.weight` holds 1 NaN or infinite"
    with pytest.raises(UserError, match="holds 1 NaN or infinite"):
        load_drafter(drafter)
    db = tmp_path / "t.sqlite"
    assert says in fails(capsys, "--include", include, "run", "--drafter", drafter, "--task", "gsm8k", "--target",
                         TARGET, *FAST, "--db", db)
    assert run_rows(db) == 0
    card = tmp_path / "card.yaml"
    card.write_text(json.dumps({**CARD, "target": TARGET}))
    assert says in fails(capsys, "--include", include, "submit", card, *FAST)
    assert not list(tmp_path.glob("*.bundle.json*"))


# -- 10. submission cards --------------------------------------------------------------------------------------


@pytest.mark.parametrize("char", ["\u200b", "\u202e", "\u2066", "\u2069", "\ufeff"])
@pytest.mark.parametrize(("field", "value"), [
    ("authors", ["Ada {c}Lovelace"]),
    ("description", "a drafter{c} for math"),
    ("training_data", "MathInstruct{c}"),
    ("license", "MIT{c}"),
    ("target", f"{TARGET}{{c}}"),
    ("checkpoint", {"path": "drafter{c}"}),
])
def test_submission_card_refuses_invisible_characters(capsys, tmp_path, include, char, field, value):
    filled = json.loads(json.dumps(value).replace("{c}", json.dumps(char)[1:-1]))
    card = tmp_path / "card.yaml"
    card.write_text(json.dumps({**CARD, "target": TARGET, field: filled}))
    line = fails(capsys, "--include", include, "submit", card, *FAST)
    assert f"{field}: contains U+{ord(char):04X}" in line and "remove it" in line


def test_submission_name_with_invisible_characters_is_refused():
    with pytest.raises(ValueError, match=r"name\n.*contains U\+202E"):
        SubmissionCard.model_validate({**CARD, "name": "tiny\u202ehass"})


def test_submission_may_not_take_an_official_name(capsys, tmp_path, include):
    card = tmp_path / "card.yaml"
    card.write_text(json.dumps({**CARD, "target": TARGET, "name": "mathinstruct-hass"}))
    line = fails(capsys, "--include", include, "submit", card, *FAST)
    assert "name: the name mathinstruct-hass belongs to an official drafter; choose another" in line
    reg = Registry.load()
    recipe = next(iter(reg.cards["recipe"].values()))
    reg.cards["recipe"]["only-a-recipe"] = recipe.model_copy(update={"name": "only-a-recipe"})
    with pytest.raises(UserError, match="the name only-a-recipe belongs to an official drafter"):
        refuse_official_name(SubmissionCard.model_validate({**CARD, "name": "only-a-recipe"}), card, reg)


# -- 11. an interrupted submit ---------------------------------------------------------------------------------


def test_interrupted_submit_says_it_starts_from_scratch(capsys, tmp_path, include, monkeypatch):
    import taps_bench.measure.runner as runner

    save_drafter(random_drafter(json_config(include), 1), tmp_path / "drafter")
    card = tmp_path / "card.yaml"
    card.write_text(json.dumps({**CARD, "target": TARGET}))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    seen: list[Path] = []

    def interrupted(store: Store, *args: Any, **kwargs: Any) -> None:
        seen.extend(scratch.glob("taps-bench-submit-*"))  # the temporary store exists while measuring
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "measure", interrupted)
    rc = main(["--include", str(include), "submit", str(card), *FAST])
    err = capsys.readouterr().err
    assert rc == 130, err
    assert "resume" not in err and "submit always starts from scratch" in err and "re-run" in err
    assert seen and not list(scratch.iterdir())  # the temporary store was removed
    assert not list(tmp_path.glob("*.bundle.json*"))


def json_config(include: Path) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig.from_pretrained(include / TARGET)
