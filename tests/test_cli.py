"""The command line: every bad input is one line on stderr and exit code 2; good input runs, stores and resumes."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import DATA, REPO

from taps_bench.cli import main
from taps_bench.errors import UserError
from taps_bench.results.store import Store

CPU = "smollm2-135m-instruct"
# Every command that takes the common options, with everything valid except what a test changes.
OPTS = ("--task", "gsm8k", "--target", CPU)
GOOD = ("baseline", *OPTS)


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Never touch the user's default database; find the shared data like CI does."""
    monkeypatch.setenv("TAPS_BENCH_DB", f"sqlite:///{tmp_path / 'default.sqlite'}")
    monkeypatch.setenv("TAPS_BENCH_DATA", str(DATA))


def invoke(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def fails(capsys: pytest.CaptureFixture[str], *args: str, strict: bool = True) -> str:
    """Run a command that must fail: exit 2, exactly one line on stderr, no traceback. Returns the error line.

    strict=False, for errors that can only be found after work has started (a checkpoint that does not fit the
    loaded target): the "[taps-bench] ..." progress lines printed before the failure are allowed, but the error is
    still exactly one line, the last.
    """
    rc, out, err = invoke(capsys, *args)
    assert rc == 2, (rc, out, err)
    assert "Traceback" not in out + err
    lines = err.splitlines()
    if strict:
        assert len(lines) == 1, err
    else:
        assert lines and all(line.startswith("[taps-bench] ") for line in lines[:-1]), err
    assert lines[-1].startswith("taps-bench: error: "), err
    return lines[-1]


def last_json(out: str) -> dict[str, Any]:
    return json.loads(out.strip().splitlines()[-1])


def console_script() -> list[str]:
    script = Path(sys.executable).with_name("taps-bench")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from taps_bench.cli import main; sys.exit(main())"]


def sample(example_id: str, **over: Any) -> dict[str, Any]:
    base = {"example_id": example_id, "turn": 0, "output_ids": [5, 6, 7], "output_text": "five six seven",
            "steps": 3, "total_s": 0.5, "stop_reason": "stop_token"}
    return {**base, **over}


# -- names ---------------------------------------------------------------------------------------------------------


def test_unknown_target_suggests_close_names(capsys: pytest.CaptureFixture[str]) -> None:
    line = fails(capsys, "baseline", "--task", "gsm8k", "--target", "smollm2")
    assert "unknown target 'smollm2'" in line and CPU in line and "did you mean" in line


def test_unknown_task_suggests_close_names(capsys: pytest.CaptureFixture[str]) -> None:
    line = fails(capsys, "baseline", "--task", "gsm8", "--target", CPU)
    assert "unknown task 'gsm8'" in line and "gsm8k" in line


def test_unknown_drafter_suggests_close_names(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    line = fails(capsys, "run", "--drafter", "mathinstruct-has", *OPTS, "--db", tmp_path / "r.sqlite")
    assert "unknown drafter 'mathinstruct-has'" in line and "mathinstruct-hass" in line


def test_unknown_drafter_writes_nothing(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """cli._prepare promises that bad input 'fails in a second with nothing written'; the drafter name is checked
    only after _prepare has created the database."""
    fails(capsys, "run", "--drafter", "no-such-drafter", *OPTS, "--db", tmp_path / "new.sqlite", strict=False)
    assert not (tmp_path / "new.sqlite").exists()


def test_drafter_without_entry_for_target_fails_before_loading_the_model(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """averaged-hass exists only for Llama-3-8B: that is known from the cards, no model needs to be loaded."""
    import taps_bench.models.targets

    def no_load(*args: Any, **kwargs: Any) -> Any:
        pytest.fail("the target model was loaded before the drafter was found not to fit it")

    monkeypatch.setattr(taps_bench.models.targets, "load_target", no_load)
    line = fails(capsys, "run", "--drafter", "averaged-hass", *OPTS, "--db", tmp_path / "r.sqlite", strict=False)
    assert "llama3-8b-instruct" in line


# -- data ----------------------------------------------------------------------------------------------------------


def test_data_file_missing(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    line = fails(capsys, *GOOD, "--data-dir", empty)
    assert str(empty / "gsm8k" / "test.jsonl") in line  # where it looked
    assert "--data-dir" in line and "TAPS_BENCH_DATA" in line  # how to point at the data
    assert not (tmp_path / "default.sqlite").exists()


def test_data_dir_does_not_exist(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    line = fails(capsys, *GOOD, "--data-dir", tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in line


def test_no_data_dir_at_all(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TAPS_BENCH_DATA")
    line = fails(capsys, *GOOD)
    assert "TAPS_BENCH_DATA" in line and "--data-dir" in line


def test_default_target_note_does_not_precede_an_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """Without --target, a bad input must still be one line: the '[taps-bench] using the default target' note is
    printed before the data and database are validated."""
    fails(capsys, "baseline", "--task", "gsm8k", "--data-dir", tmp_path / "nowhere")


# -- cards ---------------------------------------------------------------------------------------------------------


def test_malformed_yaml_card(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "tasks").mkdir()
    card = tmp_path / "tasks" / "broken.yaml"
    card.write_text("name: broken\ndescription: a broken card\nsource: [unclosed\nscorer: number\n")
    for args in (("list", "tasks"), GOOD):
        line = fails(capsys, "--include", tmp_path, *args)
        assert f"{card}:" in line
        location = line.split(f"{card}:")[1].split(":")[0]
        assert location.isdigit() and 3 <= int(location) <= 5, line


TASK_CARD = """\
name: badtype
description: a task card with a field of the wrong type
source:
  hub: openai/gsm8k
  local: gsm8k/test.jsonl
fields:
  turns: {fields_turns}
scorer: number
turns: {turns}
"""


@pytest.mark.parametrize("fields_turns, turns, field, line_no", [
    ("[question]", "many", "turns", 9),
    ("question", "1", "fields.turns", 7),
])
def test_card_with_wrong_field_type(capsys: pytest.CaptureFixture[str], tmp_path: Path, fields_turns: str,
                                    turns: str, field: str, line_no: int) -> None:
    (tmp_path / "tasks").mkdir()
    card = tmp_path / "tasks" / "badtype.yaml"
    card.write_text(TASK_CARD.format(fields_turns=fields_turns, turns=turns))
    line = fails(capsys, "--include", tmp_path, *GOOD)
    assert f"{card}:{line_no}: {field}:" in line


def test_drafter_card_with_wrong_field_type(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "drafters").mkdir()
    card = tmp_path / "drafters" / "d.yaml"
    card.write_text("name: d\ndescription: a drafter\nmethod: hass\ncorpus: sharegpt\ntargets:\n"
                    f"  {CPU}:\n    recipe: d\n    confirmed: perhaps\n")
    line = fails(capsys, "--include", tmp_path, "list", "drafters")
    assert f"{card}:8: targets.{CPU}.confirmed:" in line


def test_include_not_a_directory(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    line = fails(capsys, "--include", tmp_path / "nowhere", "list", "tasks")
    assert "--include" in line


# -- options -------------------------------------------------------------------------------------------------------


# Flags the command line checks itself are named as flags; sampling, device and dtype are checked where they are
# used (also from matrix specs and lm-eval), so the message names the setting.
@pytest.mark.parametrize("option, value, words", [
    ("--limit", "0", "--limit"),
    ("--limit", "-3", "--limit"),
    ("--limit", "abc", "--limit"),
    ("--temperature", "-1", "temperature must be >= 0"),
    ("--top-p", "0", "top_p must be in (0, 1]"),
    ("--top-p", "1.5", "top_p must be in (0, 1]"),
    ("--max-new-tokens", "0", "--max-new-tokens"),
    ("--max-new-tokens", "-5", "--max-new-tokens"),
    ("--sample-top-k", "-1", "sampling top_k must be >= 0"),  # the sampling cut, not the tree's top-k
    ("--device", "nonsense", "device nonsense: not a torch device"),
    ("--dtype", "float8", "dtype float8: unknown"),
])
def test_bad_option_values(capsys: pytest.CaptureFixture[str], tmp_path: Path, option: str, value: str,
                           words: str) -> None:
    line = fails(capsys, *GOOD, "--db", tmp_path / "o.sqlite", option, value)
    assert words in line and value in line
    assert not (tmp_path / "o.sqlite").exists()


def test_bad_tree_settings(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    for args in (("--total-tokens", "x"), ("--top-k", "1.5")):
        fails(capsys, "run", "--drafter", "mathinstruct-hass", *OPTS, *args)


def test_missing_required_option(capsys: pytest.CaptureFixture[str]) -> None:
    line = fails(capsys, "baseline", "--target", CPU)
    assert "--task" in line


def test_unknown_command(capsys: pytest.CaptureFixture[str]) -> None:
    fails(capsys, "benchmark", "--task", "gsm8k")


def test_database_path_cannot_be_written(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    regular = tmp_path / "file"
    regular.write_text("not a directory")
    db = regular / "under" / "x.sqlite"
    line = fails(capsys, *GOOD, "--db", db)
    assert str(db) in line and "--db" in line
    assert regular.read_text() == "not a directory"


def test_database_url_cannot_be_parsed(capsys: pytest.CaptureFixture[str]) -> None:
    fails(capsys, *GOOD, "--db", "nosuchdialect://x/y")


def test_db_env_var_takes_a_plain_path(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                       tmp_path: Path) -> None:
    """--db takes 'SQLAlchemy URL or SQLite file' and defaults to $TAPS_BENCH_DB, so the variable should take a
    plain file path too (it is handed to the store unconverted and fails to parse as a URL)."""
    monkeypatch.setenv("TAPS_BENCH_DB", str(tmp_path / "env.sqlite"))
    rc, _, err = invoke(capsys, "show")  # reading only: the plain path is understood, and nothing is created there
    assert rc == 2 and f"no database at {tmp_path / 'env.sqlite'}" in err
    Store(f"sqlite:///{tmp_path / 'env.sqlite'}").close()
    rc, _, err = invoke(capsys, "show")
    assert rc == 0, err


def test_debug_shows_the_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(UserError, match="gsm8k"):
        main(["--debug", "baseline", "--task", "gsm8", "--target", CPU])
    with pytest.raises(UserError, match="--limit"):
        main(["--debug", *GOOD, "--limit", "0"])
    with pytest.raises(Exception, match="task"):  # a usage error propagates too
        main(["--debug", "baseline", "--target", CPU])


def test_console_script_one_line_exit_2(tmp_path: Path) -> None:
    env = {**os.environ, "TAPS_BENCH_DATA": str(DATA), "TAPS_BENCH_DB": f"sqlite:///{tmp_path / 'x.sqlite'}"}
    done = subprocess.run([*console_script(), "baseline", "--task", "gsm8", "--target", CPU], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done
    assert done.stdout == ""
    assert "Traceback" not in done.stderr
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert done.stderr.startswith("taps-bench: error: unknown task 'gsm8'") and "gsm8k" in done.stderr


def test_failure_leaves_an_existing_database_intact(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "existing.sqlite"
    with Store(f"sqlite:///{path}") as store:
        run_id = store.get_or_create_run("baseline", CPU, "gsm8k", "autoregressive", 0.0, {"max_new_tokens": 8},
                                         {"git": "x"})
        store.add_sample(run_id, sample("0"))
        before_runs, before = store.runs(), store.samples(run_id)
    assert len(before) == 1
    bad = [
        (*GOOD, "--limit", "0"),
        ("baseline", "--task", "gsm8", "--target", CPU),
        (*GOOD, "--data-dir", tmp_path / "nowhere"),
        (*GOOD, "--temperature", "-1"),
        ("run", "--drafter", "no-such-drafter", *OPTS),
        ("run", "--drafter", "averaged-hass", "--task", "gsm8k", "--target", "smollm2"),
        ("export", "--format", "xml"),
        ("export", "--what", "everything"),
    ]
    for args in bad:
        fails(capsys, *args, "--db", path, strict=False)  # strictness is other tests' business
    with Store(f"sqlite:///{path}") as store:
        assert store.runs() == before_runs
        assert store.samples(run_id) == before


# -- list, show, export without a model ----------------------------------------------------------------------------


# The repository's card directories (each named as `list` names the kind), read here with plain YAML rather than
# through the registry under test.
CARD_DIRS = ("targets", "tasks", "drafters", "corpora", "recipes")
BUILTIN_COMBINERS = ("average", "confidence", "entropy", "merged-tree")


def drafter_suffix(card: dict[str, Any]) -> str:
    """Where a drafter resolves per target, as `list drafters` documents it: hub, path or recipe, and unconfirmed
    hub names flagged; a model-free drafter (prompt lookup) resolves to itself on any target."""
    if card.get("model_free") is not None:
        return " [model-free: any target]"
    where = []
    for target, entry in sorted(card["targets"].items()):
        source = entry.get("source")
        kind = "hub" if source and source.get("hub") else "path" if source else "recipe"
        where.append(f"{target} ({kind}{'' if entry.get('confirmed', True) else ', unconfirmed'})")
    return f" [{'; '.join(where)}]"


def expected_cards(kind: str) -> list[tuple[str, str]]:
    """(name, description line) of every card file under the repository's `kind` directory, sorted by name."""
    rows = []
    for path in sorted((REPO / kind).glob("*.yaml")):
        card = yaml.safe_load(path.read_text())
        line = card["description"].strip().splitlines()[0]
        rows.append((card["name"], line + (drafter_suffix(card) if kind == "drafters" else "")))
    return sorted(rows)


def expected_combiners() -> list[tuple[str, str]]:
    """The four built-in combiners, described by the first docstring line of the class their entry point names
    (the installed package's metadata, i.e. pyproject.toml, not the registry)."""
    declared = {ep.name: ep for ep in metadata.entry_points(group="taps_bench.combiners")}
    assert sorted(declared) == sorted(BUILTIN_COMBINERS)
    rows = []
    for name in BUILTIN_COMBINERS:
        doc = (declared[name].load().__doc__ or "").strip()
        rows.append((name, doc.splitlines()[0] if doc else ""))
    return rows


@pytest.mark.parametrize("kind", [*CARD_DIRS, "combiners"])
def test_list(capsys: pytest.CaptureFixture[str], kind: str) -> None:
    rc, out, err = invoke(capsys, "list", kind)
    assert rc == 0, err
    expected = expected_combiners() if kind == "combiners" else expected_cards(kind)
    assert expected and all(description for _, description in expected), "nothing to compare against"
    # One line per entry, sorted by name: the name padded to the longest name, two spaces, the description.
    width = max(len(name) for name, _ in expected)
    assert out.splitlines() == [f"{name:<{width}}  {description}" for name, description in expected]


def test_list_known_names(capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = invoke(capsys, "list", "targets")
    assert {CPU, "llama3-8b-instruct"} <= {line.split()[0] for line in out.splitlines()}
    _, out, _ = invoke(capsys, "list", "tasks")
    assert {"gsm8k", "math500", "mt-bench", "svamp"} <= {line.split()[0] for line in out.splitlines()}
    _, out, _ = invoke(capsys, "list", "drafters")
    names = {line.split()[0] for line in out.splitlines()}
    assert {"mathinstruct-hass", "sharegpt-hass", "averaged-hass", "mixed-35k-eagle2", "mixed-eagle2"} <= names


def test_list_bogus(capsys: pytest.CaptureFixture[str]) -> None:
    line = fails(capsys, "list", "bogus")
    assert "targets" in line and "corpora" in line
    fails(capsys, "list", "drafter-s")


def test_list_with_include(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "drafters").mkdir()
    (tmp_path / "drafters" / "mine.yaml").write_text(
        f"name: my-drafter\ndescription: my own drafter\nmethod: eagle2\ncorpus: sharegpt\n"
        f"targets:\n  {CPU}:\n    source: {{path: ckpt}}\n")
    rc, out, _ = invoke(capsys, "--include", tmp_path, "list", "drafters")
    assert rc == 0
    assert any(line.split()[0] == "my-drafter" and "my own drafter" in line for line in out.splitlines())


def test_show_and_export_from_the_store(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    rc, _, err = invoke(capsys, "show", "--db", path)
    assert rc == 2 and "no database at" in err and not path.exists()  # show reads; it creates nothing
    Store(f"sqlite:///{path}").close()
    rc, out, _ = invoke(capsys, "show", "--db", path)
    assert rc == 0 and "no runs" in out
    with Store(f"sqlite:///{path}") as store:
        run_id = store.get_or_create_run("baseline", CPU, "gsm8k", "autoregressive", 0.0, {}, {})
        store.add_sample(run_id, sample("0", gold="7", correct=True))
        store.add_sample(run_id, sample("1", gold="8", correct=False))
    rc, out, _ = invoke(capsys, "show", "--db", path)
    assert rc == 0 and any("baseline" in line and "gsm8k" in line for line in out.splitlines())
    rc, out, _ = invoke(capsys, "export", "--db", path, "--format", "json", "--what", "samples")
    assert rc == 0 and [s["example_id"] for s in json.loads(out)] == ["0", "1"]
    rc, out, _ = invoke(capsys, "export", "--db", path)
    rows = list(csv.DictReader(io.StringIO(out)))
    assert rc == 0 and len(rows) == 1 and rows[0]["target"] == CPU
    rc, _, _ = invoke(capsys, "export", "--db", path, "--what", "samples", "--out", tmp_path / "s.csv")
    assert rc == 0 and len(list(csv.DictReader((tmp_path / "s.csv").open()))) == 2
    assert not (tmp_path / "s.csv.part").exists()


# -- end to end on the real CPU target ------------------------------------------------------------------------------


@pytest.mark.smollm
@pytest.mark.slow
def test_end_to_end(capsys: pytest.CaptureFixture[str], tmp_path: Path, smollm: Any) -> None:
    from taps_bench.models.drafter import random_drafter, save_drafter

    db = tmp_path / "e2e.sqlite"
    common = ("--task", "gsm8k", "--target", CPU, "--limit", "2", "--max-new-tokens", "16", "--json",
              "--no-progress", "--db", db)

    rc, out, err = invoke(capsys, "baseline", *common)
    assert rc == 0, err
    first = last_json(out)
    for key in ("target", "task", "temperature", "n_samples", "new_tokens", "tokens_per_s", "accuracy"):
        assert key in first, key
    assert first["target"] == CPU and first["task"] == "gsm8k" and first["temperature"] == 0.0
    assert first["n_samples"] == 2
    assert 2 <= first["new_tokens"] <= 32 and first["tokens_per_s"] > 0
    with Store(f"sqlite:///{db}") as store:
        stored = store.samples(first["run_id"])
    assert len(stored) == 2

    # The same command again computes nothing new: same run, same stored samples, the same numbers.
    rc, out, err = invoke(capsys, "baseline", *common)
    assert rc == 0, err
    again = last_json(out)
    assert again == first
    with Store(f"sqlite:///{db}") as store:
        assert store.samples(first["run_id"]) == stored
        assert len(store.runs()) == 1

    rc, out, _ = invoke(capsys, "show", "--db", db)
    assert rc == 0
    assert any("baseline" in line and "gsm8k" in line and CPU in line for line in out.splitlines())
    rc, out, _ = invoke(capsys, "export", "--db", db, "--format", "json", "--what", "samples")
    assert rc == 0 and len(json.loads(out)) == 2
    rc, out, _ = invoke(capsys, "export", "--db", db, "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert rc == 0 and len(rows) == 1 and rows[0]["kind"] == "baseline"
    rc, out, _ = invoke(capsys, "export", "--db", db, "--format", "csv", "--what", "samples")
    assert rc == 0 and len(list(csv.DictReader(io.StringIO(out)))) == 2

    drafter_dir = tmp_path / "random-drafter"
    save_drafter(random_drafter(smollm.model.config, seed=0), drafter_dir)
    # A small tree keeps this quick on two cores (a random drafter's drafts are rejected anyway).
    tree = ("--total-tokens", "6", "--depth", "2", "--top-k", "2")
    rc, out, err = invoke(capsys, "run", "--drafter", drafter_dir, *tree, *common)
    assert rc == 0, err
    result = last_json(out)
    for key in ("target", "drafter", "task", "temperature", "n_samples", "tau", "tau_macro", "speedup",
                "tokens_per_s", "baseline_tokens_per_s", "lossless_rate", "accuracy", "acceptance_by_depth"):
        assert key in result, key
    assert result["target"] == CPU and result["drafter"] == "random-drafter" and result["task"] == "gsm8k"
    assert result["n_samples"] == 2
    assert result["lossless_rate"] == 1.0
    assert result["tau"] >= 1.0 and result["speedup"] > 0 and result["tokens_per_s"] > 0
    assert isinstance(result["acceptance_by_depth"], list) and result["acceptance_by_depth"]
    assert result["tree"] == {"total_tokens": 6, "depth": 2, "top_k": 2}
    # The stored baseline is reused, not recomputed.
    assert result["baseline_run_id"] == first["run_id"]
    assert result["baseline_tokens_per_s"] == first["tokens_per_s"]
    with Store(f"sqlite:///{db}") as store:
        assert store.samples(first["run_id"]) == stored
        assert len(store.samples(result["run_id"])) == 2
        assert len(store.runs()) == 2

    broken = tmp_path / "broken-drafter"
    broken.mkdir()
    from safetensors.torch import load_file, save_file

    state = load_file(str(drafter_dir / "model.safetensors"))
    del state["layers.0.mlp.gate_proj.weight"]
    save_file(state, str(broken / "model.safetensors"))
    (broken / "config.json").write_text((drafter_dir / "config.json").read_text())
    line = fails(capsys, "run", "--drafter", broken, *tree, *common, strict=False)
    assert "layers.0.mlp.gate_proj.weight" in line


@pytest.mark.smollm
@pytest.mark.slow
def test_resume_after_kill(tmp_path: Path, smollm: Any) -> None:
    db = tmp_path / "resume.sqlite"
    url = f"sqlite:///{db}"
    Store(url).close()  # create the schema first, so the poller and the run never race to create it
    env = {**os.environ, "TAPS_BENCH_DATA": str(DATA)}
    args = [*console_script(), "baseline", "--task", "gsm8k", "--target", CPU, "--limit", "3", "--max-new-tokens",
            "24", "--no-progress", "--db", str(db)]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    kept: list[dict[str, Any]] = []
    try:
        with Store(url) as store:
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline and proc.poll() is None:
                runs = store.runs()
                if runs and runs[0]["n_samples"] >= 1:
                    break
                time.sleep(0.2)
            assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()!r}"
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
            runs = store.runs()
            assert len(runs) == 1
            kept = store.samples(runs[0]["id"])
        assert 1 <= len(kept) < 3, "killed too late to test resuming"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()

    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    with Store(url) as store:
        runs = store.runs()
        assert len(runs) == 1
        final = store.samples(runs[0]["id"])
    assert len(final) == 3
    assert sorted((s["example_id"], s["turn"]) for s in final) == [("0", 0), ("1", 0), ("2", 0)]
    # The samples stored before the kill were kept as they were, not decoded again.
    assert final[: len(kept)] == kept
