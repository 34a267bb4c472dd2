"""The drafter submission flow: `taps-bench submit CARD` checks a submission and writes a result bundle;
`taps-bench import BUNDLE...` merges bundles into a database, idempotently, and refuses a bad bundle whole.

Everything runs on a self-contained tiny target (a random 2-layer Llama with a byte-level tokenizer built here), so
no model is downloaded and a whole submission takes seconds.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from byte_target import write_byte_target
from conftest import DATA

from taps_bench.cli import main
from taps_bench.errors import UserError
from taps_bench.measure.submission import check_lossless
from taps_bench.models.drafter import random_drafter, save_drafter
from taps_bench.results.bundle import FORMAT, VERSION
from taps_bench.results.store import Store

pytestmark = pytest.mark.usefixtures("one_thread")

TARGET = "tiny-bytes"
CARD = {
    "name": "tiny-hass",
    "method": "hass",
    "target": TARGET,
    "checkpoint": {"path": "drafter"},
    "training_data": "none: random weights (a test)",
    "license": "Apache-2.0",
    "authors": ["Test Author"],
    "links": ["https://example.org/tiny-hass"],
    "description": "a random drafter for the tiny test target",
}
FAST = ("--limit", "1", "--max-new-tokens", "4", "--no-progress")


@pytest.fixture(scope="module")
def include(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An --include directory registering the target `tiny-bytes`; its model directory holds config and weights."""
    root = tmp_path_factory.mktemp("tiny-bytes")
    write_byte_target(root, TARGET, pin_checkpoint=True)
    return root


def target_config(include: Path) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig.from_pretrained(include / "model")


def write_card(directory: Path, drop: tuple[str, ...] = (), **fields: Any) -> Path:
    """A submission card (YAML is a superset of JSON) with some fields replaced or dropped."""
    card = {k: v for k, v in {**CARD, **fields}.items() if k not in drop}
    path = directory / "card.yaml"
    path.write_text(json.dumps(card, indent=1))
    return path


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TAPS_BENCH_DB", f"sqlite:///{tmp_path / 'default.sqlite'}")
    monkeypatch.setenv("TAPS_BENCH_DATA", str(DATA))


def fails(capsys: pytest.CaptureFixture[str], *args: Any) -> str:
    """Exit 2, exactly one line on stderr (nothing before it), no traceback; returns the message."""
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert rc == 2, (rc, out, err)
    assert "Traceback" not in out + err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("taps-bench: error: "), err
    return lines[0]


# -- the card ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("drop", "fields", "says"), [
    (("authors",), {}, ["authors: missing required field", "authors: [Ada Lovelace]"]),
    (("checkpoint",), {}, ["checkpoint: missing required field", "{path: DIR}"]),
    ((), {"authors": []}, ["authors", "at least 1", "at least one"]),
    ((), {"authors": [" "]}, ["authors", "every author needs a name"]),
    ((), {"method": "medusa"}, ["method", "eagle2", "hass", "other"]),
    ((), {"links": ["example.org"]}, ["links", "not an http(s) URL"]),
    ((), {"checkpoint": {"path": "d", "hub": "a/b"}}, ["checkpoint", "exactly one of path or hub (got path and hub)"]),
    ((), {"checkpoint": {}}, ["checkpoint", "got neither", "{hub: OWNER/REPO}"]),
    ((), {"checkpoint": {"wheel": "x==1", "file": "f"}}, ["checkpoint", "for targets, not drafters"]),
    ((), {"checkpoint": {"path": "d", "revision": "main"}}, ["checkpoint", "revision"]),
    ((), {"name": "bad name!"}, ["name", "letters, digits"]),
    ((), {"licence": "MIT"}, ["licence", "unknown field", "license"]),
    ((), {"target": "tiny-byte"}, ["unknown target 'tiny-byte'", f"did you mean {TARGET}"]),
])
def test_bad_card_is_one_line_naming_the_field(capsys, tmp_path, include, drop, fields, says):
    card = write_card(tmp_path, drop, **fields)
    line = fails(capsys, "--include", include, "submit", card, *FAST)
    for s in says:
        assert s in line, line
    assert not list(tmp_path.glob("*.bundle.json*"))


def test_card_that_is_not_yaml(capsys, tmp_path, include):
    card = tmp_path / "card.yaml"
    card.write_text("name: [unclosed\n")
    assert f"malformed submission card {card}" in fails(capsys, "--include", include, "submit", card, *FAST)
    assert "cannot read submission card" in fails(capsys, "submit", tmp_path / "nowhere.yaml")


# -- the checkpoint ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["other-target", "weights-vs-config"])
def test_checkpoint_of_the_wrong_shape(capsys, tmp_path, include, how):
    from transformers import LlamaConfig

    config = target_config(include)
    if how == "other-target":
        other = LlamaConfig(**{**config.to_dict(), "hidden_size": 48, "intermediate_size": 96})
        save_drafter(random_drafter(other, 1), tmp_path / "drafter")
        says = ["hidden_size 48 != target's 32"]
    else:
        save_drafter(random_drafter(config, 1), tmp_path / "drafter")
        cfg = json.loads((tmp_path / "drafter" / "config.json").read_text())
        (tmp_path / "drafter" / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 80}))
        says = ["layers.0.mlp", "expected"]
    line = fails(capsys, "--include", include, "submit", write_card(tmp_path), *FAST)
    for s in says:
        assert s in line, line
    assert not list(tmp_path.glob("*.bundle.json*"))


def test_unreachable_hub_repo(capsys, tmp_path, include, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    card = write_card(tmp_path, checkpoint={"hub": "nobody/no-such-drafter", "revision": "v1"})
    line = fails(capsys, "--include", include, "submit", card, *FAST)
    assert "cannot download drafter nobody/no-such-drafter from the hub" in line


def test_missing_checkpoint_directory(capsys, tmp_path, include):
    line = fails(capsys, "--include", include, "submit", write_card(tmp_path, checkpoint={"path": "not-there"}),
                 *FAST)
    assert f"checkpoint directory {tmp_path / 'not-there'}" in line and "does not exist" in line


def test_pickle_checkpoint_is_refused(capsys, tmp_path, include):
    drafter = random_drafter(target_config(include), 1)
    save_drafter(drafter, tmp_path / "drafter")
    (tmp_path / "drafter" / "model.safetensors").unlink()
    torch.save(drafter.state_for_saving(), tmp_path / "drafter" / "pytorch_model.bin")
    line = fails(capsys, "--include", include, "submit", write_card(tmp_path), *FAST)
    assert "pytorch_model.bin is a pickle checkpoint" in line and "must be safetensors" in line


def test_lossless_failure_is_a_clear_error():
    spec = [{"example_id": "3", "turn": 0, "output_ids": [1, 2]}, {"example_id": "4", "turn": 0, "output_ids": [5]}]
    base = [{"example_id": "3", "turn": 0, "output_ids": [1, 3]}, {"example_id": "4", "turn": 0, "output_ids": [5]}]
    check_lossless("gsm8k", spec[1:], base)
    with pytest.raises(UserError, match=r"not lossless at temperature 0 on gsm8k: 1 of 2 .*example 3, turn 0"):
        check_lossless("gsm8k", spec, base)


# -- a good submission, then import --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def submitted(include: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One real submission of a random (but correctly shaped) drafter, shared by the tests below."""
    root = tmp_path_factory.mktemp("submission")
    save_drafter(random_drafter(target_config(include), 1, std=0.5), root / "drafter")
    card = write_card(root)
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        mp.setenv("TAPS_BENCH_DATA", str(DATA))
        mp.setenv("TAPS_BENCH_HOME", str(root / "home"))
        rc = main(["--include", str(include), "submit", str(card), *FAST, "--json"])
    return {"rc": rc, "out": out.getvalue(), "err": err.getvalue(), "card": card,
            "bundle": root / "tiny-hass.bundle.json"}


def test_good_submission_writes_a_complete_bundle(submitted):
    assert submitted["rc"] == 0, submitted["err"]
    out = submitted["out"]
    assert "lossless" in out and "bundle written to " + str(submitted["bundle"]) in out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["bundle"] == str(submitted["bundle"]) and result["target"] == TARGET
    assert [r["task"] for r in result["tasks"]] == ["gsm8k", "math500", "mt-bench", "svamp"]
    assert all(r["lossless"] is True and r["tau"] >= 1.0 for r in result["tasks"])

    path = submitted["bundle"]
    assert path.is_file() and not path.with_name(path.name + ".part").exists()
    bundle = json.loads(path.read_text())
    assert bundle["format"] == FORMAT and bundle["version"] == VERSION
    assert bundle["submission"] == CARD
    assert bundle["provenance"]["versions"]["torch"] and bundle["provenance"]["dtype"] == "float32"
    runs = bundle["runs"]
    assert sorted((r["kind"], r["task"]) for r in runs) == sorted(
        (k, t) for k in ("baseline", "speculative") for t in ("gsm8k", "math500", "mt-bench", "svamp"))
    for run in runs:
        assert run["target"] == TARGET and run["temperature"] == 0.0
        assert run["settings"]["max_new_tokens"] == 4
        n = 2 if run["task"] == "mt-bench" else 1  # MT-Bench: --limit 1 is one question of two turns
        assert len(run["samples"]) == n
        assert all("id" not in s and "run_id" not in s and "created_at" not in s for s in run["samples"])
        assert all(s["output_ids"] and s["steps"] >= 1 for s in run["samples"])
        if run["kind"] == "speculative":
            assert run["proposer"] == "tiny-hass" and run["provenance"]["drafter_card"] == CARD
            assert run["settings"]["drafter_checkpoint"] == "path:drafter"  # portable: as the card says
            assert run["settings"]["tree"] == {"total_tokens": 4, "depth": 1, "top_k": 2}
            assert all(s["lossless"] is True for s in run["samples"])
        else:
            assert run["proposer"] == "autoregressive" and "drafter_card" not in run["provenance"]


def counts(db: Path) -> tuple[int, int, list[dict[str, Any]]]:
    with Store(f"sqlite:///{db}") as store:
        runs = store.runs()
        return len(runs), sum(r["n_samples"] for r in runs), runs


def test_import_twice_adds_nothing_the_second_time(capsys, tmp_path, submitted, include):
    bundle = json.loads(submitted["bundle"].read_text())
    n_samples = sum(len(r["samples"]) for r in bundle["runs"])
    db = tmp_path / "fresh.sqlite"
    assert main(["--include", str(include), "import", str(submitted["bundle"]), "--db", str(db)]) == 0
    assert f"1 new (8 runs, {n_samples} samples), 0 already there" in capsys.readouterr().out
    n_runs, stored, runs = counts(db)
    assert (n_runs, stored) == (8, n_samples)
    spec = [r for r in runs if r["kind"] == "speculative"]
    assert all(r["provenance"]["drafter_card"] == CARD for r in spec)

    assert main(["--include", str(include), "import", str(submitted["bundle"]), "--db", str(db)]) == 0
    assert "0 new (0 runs, 0 samples), 1 already there" in capsys.readouterr().out
    again = counts(db)
    assert again[:2] == (8, n_samples)
    assert again[2] == runs  # provenance untouched: an identical import is not a "later session"

    # The submission appears on the rebuilt leaderboard, once, with its card.
    site = tmp_path / "site"
    assert main(["leaderboard", "build", "--db", str(db), "--out", str(site)]) == 0
    index = (site / "index.html").read_text()
    assert index.count('data-name="tiny-hass"') == 1
    page = next(p for p in (site / "drafters").glob("*.html") if "tiny-hass" in p.name)
    assert CARD["license"] in page.read_text() and CARD["authors"][0] in page.read_text()


def _truncate(b: dict[str, Any]) -> str:
    return json.dumps(b)[:-40]


def _set(path: tuple[Any, ...], value: Any) -> Any:
    def corrupt(b: dict[str, Any]) -> str:
        node = b
        for key in path[:-1]:
            node = node[key]
        if value is _DELETE:
            del node[path[-1]]
        else:
            node[path[-1]] = value
        return json.dumps(b)
    return corrupt


_DELETE = object()


@pytest.mark.parametrize(("corrupt", "says"), [
    (_truncate, "not valid JSON"),
    (_set(("format",), "something-else"), "not a taps-bench result bundle"),
    (_set(("version",), 99), "format version 99"),
    (_set(("submission", "authors"), []), "submission.authors"),
    (_set(("runs",), []), "`runs` must be a non-empty list"),
    (_set(("runs", 1, "settings"), _DELETE), "runs[1]: missing field `settings`"),
    (_set(("runs", 0, "kind"), "oracle"), "runs[0].kind must be one of baseline, speculative"),
    (_set(("runs", 0, "samples", 0, "output_ids"), _DELETE), "runs[0].samples[0]: sample is missing required fields"),
    (_set(("runs", 0, "samples", 0, "output_ids"), [1, 2, 3]), "output_hash does not match output_ids"),
])
def test_corrupt_bundle_is_rejected_and_the_db_untouched(capsys, tmp_path, submitted, include, corrupt, says):
    db = tmp_path / "kept.sqlite"
    assert main(["--include", str(include), "import", str(submitted["bundle"]), "--db", str(db)]) == 0
    capsys.readouterr()
    before, data = counts(db), db.read_bytes()
    bad = tmp_path / "bad.bundle.json"
    bad.write_text(corrupt(json.loads(submitted["bundle"].read_text())))

    line = fails(capsys, "--include", include, "import", bad, "--db", db)
    assert f"bundle {bad}" in line and says in line, line
    assert db.read_bytes() == data and counts(db) == before

    fresh = tmp_path / "fresh.sqlite"  # a good bundle before a bad one: nothing at all is written
    fails(capsys, "--include", include, "import", submitted["bundle"], bad, "--db", fresh)
    assert not fresh.exists()
