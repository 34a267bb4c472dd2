"""`taps-bench matrix`: spec validation, cell planning, a whole small matrix, resume after a kill, failure isolation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO

from taps_bench.catalog.proposers import ProposerSpec as Entry
from taps_bench.catalog.registry import Registry
from taps_bench.cli import main
from taps_bench.matrix.spec import MatrixSpec, find_spec, load_spec, plan
from taps_bench.results.store import Store, as_url

pytestmark = pytest.mark.usefixtures("one_thread")

TASKS = {"mt-bench": 1, "gsm8k": 1, "math500": 1, "svamp": 1}


def write_spec(path: Path, **fields: Any) -> Path:
    path.write_text(yaml.safe_dump(fields, sort_keys=False))
    return path


def drafters(root: Path, tiny_smol: Path) -> tuple[Path, Path]:
    """Two random drafters for tiny-smol (saved once per directory)."""
    from transformers import AutoConfig

    from taps_bench.models.drafter import random_drafter, save_drafter

    config = AutoConfig.from_pretrained(tiny_smol / "model")
    a, b = root / "math-rand", root / "chat-rand"
    for seed, where in enumerate((a, b)):
        if not where.is_dir():
            save_drafter(random_drafter(config, seed, std=0.5), where)
    return a, b


def small_spec(path: Path, a: Path, b: Path, **over: Any) -> Path:
    fields = {"name": "small", "targets": ["tiny-smol"],
              "proposers": [{"drafter": str(a)}, {"drafter": str(b)},
                            {"combiner": "confidence", "drafters": [str(a), str(b)]},
                            {"combiner": "merged-tree", "drafters": [str(a), str(b)]}],
              "tasks": TASKS, "temperatures": [0, 1], "max_new_tokens": 5} | over
    return write_spec(path, **fields)


def invoke(capsys: pytest.CaptureFixture[str], *args: Any) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def sample_keys(db: Path) -> list[tuple[str, str, str, float, str, int]]:
    store = Store(as_url(str(db)))
    keys = [(r["kind"], r["proposer"], r["task"], r["temperature"], s["example_id"], s["turn"])
            for r in store.runs() for s in store.samples(r["id"])]
    store.close()
    return keys


def outputs(db: Path) -> dict[tuple[Any, ...], list[int]]:
    store = Store(as_url(str(db)))
    out = {(r["kind"], r["proposer"], r["task"], r["temperature"], s["example_id"], s["turn"]): s["output_ids"]
           for r in store.runs() for s in store.samples(r["id"])}
    store.close()
    return out


# -- spec and plan (no models) -----------------------------------------------------------------------------------


def test_plan_order_and_greedy_repeats_collapse() -> None:
    spec = MatrixSpec(name="m", targets=["t"], proposers=[Entry(drafter="a"), Entry(drafter="b")],
                      tasks={"gsm8k": 2, "svamp": None}, temperatures=[0, 1], repeats=3, seed=10)
    cells = plan(spec)
    # 2 proposers x 2 tasks x (1 greedy + 3 sampled repeats)
    assert len(cells) == 2 * 2 * 4
    assert [c.entry.drafter for c in cells[:8]] == ["a"] * 8  # a proposer's cells are contiguous (built once)
    assert [(c.temperature, c.repeat, c.seed) for c in cells[:4]] == [(0, 0, 10), (1, 0, 10), (1, 1, 11), (1, 2, 12)]
    assert cells[0].limit == 2 and cells[4].limit is None
    assert len({c.key(spec) for c in cells}) == len(cells)


def test_shipped_specs_validate_against_the_registry() -> None:
    from taps_bench.matrix.spec import check

    reg = Registry.load()
    for path in sorted((REPO / "matrices").glob("*.yaml")):
        spec = load_spec(path)
        check(spec, reg)
        assert len(plan(spec)) >= 2 * 4, path.name
    cpu = load_spec(find_spec("cpu-small"))
    assert {e.combiner for e in cpu.proposers if e.combiner} >= {"confidence", "merged-tree"}
    assert cpu.temperatures == [0.0, 1.0] and set(cpu.tasks) == {"mt-bench", "gsm8k", "math500", "svamp"}


def test_the_study_matrix_covers_the_papers_design() -> None:
    """taps-cpu: math, chat and mixed drafters of every trained method, each name known to the registry for the
    target, the paper's combiners, PLD, both temperatures, all four tasks, and averaging over both initialisations."""
    from taps_bench.matrix.spec import check
    from taps_bench.training.build import recipe_settings

    reg = Registry.load()
    spec = check(load_spec(find_spec("taps-cpu")), reg)
    (target,) = spec.targets
    singles = [e.drafter for e in spec.proposers if e.drafter]
    for method in ("eagle2", "hass", "eagle3"):
        assert {f"{d}-{method}" for d in ("mathinstruct", "sharegpt", "mixed")} <= set(singles), method
    for name in {n for e in spec.proposers for n in e.names()}:  # a model-free drafter (pld) runs on any target
        assert reg.drafter(name).model_free is not None or target in reg.drafter(name).targets, name
    combos = {(e.combiner, dict(e.options).get("granularity") or dict(e.options).get("budget"), e.drafters)
              for e in spec.proposers if e.combiner}
    pair = ("mathinstruct-hass", "sharegpt-hass")
    for kind in (("confidence", "step"), ("confidence", "prompt"), ("entropy", "step"), ("entropy", "prompt"),
                 ("merged-tree", "full"), ("merged-tree", "equal")):
        assert (*kind, pair) in combos, kind
    averaged = [e.drafters for e in spec.proposers if e.combiner == "average"]
    assert set(averaged) == {pair, ("mathinstruct-hass", "sharegpt-hass-shared-init")}
    seeds = {n: recipe_settings(reg.recipe(n)).initial_seed for n in {n for d in averaged for n in d}}
    assert seeds["mathinstruct-hass"] == seeds["sharegpt-hass-shared-init"] != seeds["sharegpt-hass"]
    assert "pld" in singles
    assert spec.temperatures == [0.0, 1.0] and set(spec.tasks) == {"mt-bench", "gsm8k", "math500", "svamp"}
    assert spec.baseline


@pytest.mark.parametrize(("fields", "expected"), [
    ({"tasks": {"gsm8k": 0}}, "tasks"),
    ({"temperatures": [-1]}, "temperatures"),
    ({"proposers": [{"drafter": "a", "colour": "red"}]}, "proposers.0: a single drafter takes no combiner options (got "
                                                         "colour)"),
    ({"repeats": 0}, "repeats"),
])
def test_bad_spec_is_one_line_with_file_and_field(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                  fields: dict[str, Any], expected: str) -> None:
    spec = {"name": "m", "targets": ["smollm2-135m-instruct"], "proposers": [{"drafter": "a"}],
            "tasks": {"gsm8k": 1}} | fields
    path = write_spec(tmp_path / "m.yaml", **spec)
    rc, out, err = invoke(capsys, "matrix", path, "--db", tmp_path / "r.db")
    assert rc == 2 and out == ""
    line = err.strip()
    assert "\n" not in line and "Traceback" not in line
    assert str(path) in line and expected in line
    assert not (tmp_path / "r.db").exists()


def test_unknown_names_and_specs(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = write_spec(tmp_path / "m.yaml", name="m", targets=["smollm2-135m-instruct"],
                      proposers=[{"combiner": "confidense", "drafters": ["a", "b"]}], tasks={"gsm8k": 1})
    rc, _, err = invoke(capsys, "matrix", path, "--db", tmp_path / "r.db")
    assert rc == 2 and "did you mean confidence" in err and err.count("\n") == 1
    rc, _, err = invoke(capsys, "matrix", "cpu-smal", "--db", tmp_path / "r.db")
    assert rc == 2 and "cpu-small" in err and err.count("\n") == 1
    path = write_spec(tmp_path / "m.yaml", name="m", targets=["smollm2-135m-instruct"],
                      proposers=[{"drafter": "a"}], tasks={"gsm8k": 1})
    rc, _, err = invoke(capsys, "matrix", path, "--executor", "slurm", "--db", tmp_path / "r.db")
    assert rc == 2 and "--executor" in err
    assert not (tmp_path / "r.db").exists()


# -- whole matrices on tiny-smol ---------------------------------------------------------------------------------


@pytest.mark.smollm
def test_small_matrix_runs_every_cell_and_a_rerun_computes_nothing(capsys: pytest.CaptureFixture[str],
                                                                   tmp_path: Path, tiny_smol: Path,
                                                                   data_dir: Path) -> None:
    a, b = drafters(tmp_path, tiny_smol)
    spec = small_spec(tmp_path / "m.yaml", a, b)
    db = tmp_path / "r.db"
    rc, out, _ = invoke(capsys, "--include", tiny_smol, "matrix", spec, "--db", db, "--no-progress", "--json",
                        "--data-dir", data_dir)
    assert rc == 0, out
    result = json.loads(out.strip().splitlines()[-1])
    cells = result["cells"]
    assert len(cells) == 4 * 4 * 2 and {c["status"] for c in cells} == {"done"}
    for c in cells:
        assert c["result"]["n_samples"] == (2 if c["task"] == "mt-bench" else 1)
        if c["temperature"] == 0:
            assert c["result"]["lossless_rate"] == 1.0
    routed = [c for c in cells if c["entry"]["combiner"] == "confidence"]
    assert all(abs(sum(c["result"]["decisions"].values()) - 1) < 1e-9 for c in routed)
    keys = sample_keys(db)
    assert len(keys) == len(set(keys))
    # 4 proposers x (1 + 1 + 1 + 2 turns) x 2 temperatures, plus the baselines shared by all proposers
    assert len(keys) == 4 * 5 * 2 + 5 * 2
    rc, out, _ = invoke(capsys, "--include", tiny_smol, "matrix", spec, "--db", db, "--no-progress", "--json",
                        "--data-dir", data_dir)
    assert rc == 0
    again = json.loads(out.strip().splitlines()[-1])["cells"]
    assert {c["status"] for c in again} == {"skipped"}
    assert [c["result"]["tau"] for c in again] == [c["result"]["tau"] for c in cells]
    assert sample_keys(db) == keys


@pytest.mark.smollm
@pytest.mark.slow
def test_killed_matrix_resumes_without_recomputing_or_duplicating(tmp_path: Path, tiny_smol: Path,
                                                                  data_dir: Path) -> None:
    a, b = drafters(tmp_path, tiny_smol)
    spec = small_spec(tmp_path / "m.yaml", a, b, max_new_tokens=12)
    db, clean = tmp_path / "killed.db", tmp_path / "clean.db"
    cmd = [sys.executable, "-m", "taps_bench.cli", "--include", str(tiny_smol), "matrix", str(spec),
           "--no-progress", "--data-dir", str(data_dir)]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([*cmd, "--db", str(db)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
        if db.exists() and len(sample_keys(db)) >= 15:
            break
    assert proc.poll() is None, "the matrix finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = outputs(db)
    assert 15 <= len(before) < 50
    done = subprocess.run([*cmd, "--db", str(db)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    after = outputs(db)
    keys = sample_keys(db)
    assert len(keys) == len(set(keys)) == 50
    assert all(after[k] == v for k, v in before.items())  # nothing stored before the kill was recomputed
    subprocess.run([*cmd, "--db", str(clean)], env=env, check=True, capture_output=True)
    assert outputs(clean) == after  # resumed == uninterrupted, sampled cells included


@pytest.mark.smollm
def test_a_failing_cell_is_recorded_and_the_others_go_on(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                         tiny_smol: Path, data_dir: Path) -> None:
    a, _ = drafters(tmp_path, tiny_smol)
    missing = tmp_path / "not-built-yet"
    spec = write_spec(tmp_path / "m.yaml", name="iso", targets=["tiny-smol"],
                      proposers=[{"drafter": str(missing)}, {"drafter": str(a)}],
                      tasks={"gsm8k": 1, "svamp": 1}, max_new_tokens=4)
    db = tmp_path / "r.db"
    rc, out, err = invoke(capsys, "--include", tiny_smol, "matrix", spec, "--db", db, "--no-progress", "--json",
                          "--data-dir", data_dir)
    assert rc == 1
    cells = json.loads(out.strip().splitlines()[-1])["cells"]
    assert [c["status"] for c in cells] == ["failed", "failed", "done", "done"]
    assert "not-built-yet" in cells[0]["error"] and "failed" in err
    store = Store(as_url(str(db)))
    recorded = {c["cell"]["proposer"]["drafter"]: c for c in store.cells("iso")}
    assert recorded[str(missing)]["status"] == "failed" and "not-built-yet" in recorded[str(missing)]["error"]
    store.close()
    # The missing drafter appears; a re-run retries only the failed cells.
    import shutil

    shutil.copytree(a, missing)
    rc, out, _ = invoke(capsys, "--include", tiny_smol, "matrix", spec, "--db", db, "--no-progress", "--json",
                        "--data-dir", data_dir)
    assert rc == 0
    assert [c["status"] for c in json.loads(out.strip().splitlines()[-1])["cells"]] == ["done", "done", "skipped",
                                                                                       "skipped"]
    store = Store(as_url(str(db)))
    assert {c["status"] for c in store.cells("iso")} == {"done"}
    assert max(c["attempts"] for c in store.cells("iso")) == 2
    store.close()
