"""`run` builds a registered-but-unbuilt drafter on the way (announced, with progress), and `--no-build` refuses;
two processes needing the same unbuilt drafter build it once."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import DATA

from taps_bench.cli import main

CARDS = {
    "recipes/tiny-math-eagle2.yaml": """
name: tiny-math-eagle2
description: A very small recipe for tests.
target: {target}
corpus: "mathinstruct:6"
method: eagle2
max_len: 96
epochs: 1
batch_tokens: 512
""",
    "drafters/tiny-math-eagle2.yaml": """
name: tiny-math-eagle2
description: Built by the tiny recipe.
method: eagle2
corpus: mathinstruct
targets:
  {target}: {{recipe: tiny-math-eagle2}}
""",
}


def write_cards(root: Path, target: str) -> None:
    """The tiny recipe and its drafter card, for `target`."""
    for rel, text in CARDS.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text.format(target=target))


@pytest.fixture
def include(tmp_path: Path) -> Path:
    write_cards(tmp_path, "smollm2-135m-instruct")
    return tmp_path


@pytest.mark.smollm
@pytest.mark.slow
def test_run_builds_a_missing_drafter_then_reuses_it(include: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                     monkeypatch: pytest.MonkeyPatch, isolated_home: Path) -> None:
    monkeypatch.setenv("TAPS_BENCH_DATA", str(DATA))
    args = ["--include", str(include), "run", "--drafter", "tiny-math-eagle2", "--task", "gsm8k", "--limit", "1",
            "--max-new-tokens", "8", "--total-tokens", "4", "--depth", "1", "--top-k", "2", "--json",
            "--db", str(tmp_path / "r.sqlite"), "--no-progress"]
    assert main([*args, "--no-build"]) == 2
    assert "has not been built yet (--no-build)" in capsys.readouterr().err

    assert main(args) == 0
    out, err = capsys.readouterr()
    assert "is not built yet: building it now with the recipe 'tiny-math-eagle2'" in err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["lossless_rate"] == 1.0 and result["drafter"] == "tiny-math-eagle2"
    built = isolated_home / "drafters" / "smollm2-135m-instruct" / "tiny-math-eagle2"
    assert (built / "card.yaml").is_file() and (built / "model.safetensors").is_file()
    assert result["proposer_settings"]["drafter_checkpoint"] == f"built:{built}"

    assert main(args) == 0  # second time: found in the model store, nothing is built
    assert "building it now" not in capsys.readouterr().err

    # --no-baseline decodes only the speculative arm: tau without speedup or lossless check on a fresh database
    fresh = [a if a != str(tmp_path / "r.sqlite") else str(tmp_path / "fresh.sqlite") for a in args]
    assert main([*fresh, "--no-baseline"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["tau"] >= 1.0 and result["speedup"] is None and result["lossless_rate"] is None
    # ... and uses a baseline once one is stored
    assert main(args) == 0 and main([*args, "--no-baseline"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["speedup"] is not None and result["lossless_rate"] == 1.0


# One matrix worker, as a script: it needs the recipe drafter, builds it if it must (the real build: extraction and
# training), then loads it and prints where from. A worker that starts building notes it in the events file and holds
# the store's lock until told to go on, so that the other worker is sure to meet the lock: with a tiny target the
# build takes a second, less than the spread of two interpreters' start-up.
WORKER = """
import json
import sys
import time
from pathlib import Path

from taps_bench.catalog.proposers import ProposerSpec
from taps_bench.catalog.registry import Registry
from taps_bench.measure.resolve import build_proposer, build_recipes, check_proposer, tree_settings
from taps_bench.models.targets import load_target
from taps_bench.training import build

role, events, go, data_dir, *include = sys.argv[1:]
real_build = build._build


def announced_build(*args, **kwargs):
    with open(events, "a") as fh:
        fh.write(f"{role} builds\\n")
    deadline = time.monotonic() + 120
    while not Path(go).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return real_build(*args, **kwargs)


build._build = announced_build
reg = Registry.load(include=[Path(p) for p in include])
target = load_target(reg.target("tiny-smol"))
spec, recipes = check_proposer(reg, ProposerSpec(drafter="tiny-math-eagle2"), target.card)
build_recipes(reg, recipes, target, Path(data_dir), show_progress=False)
_, _, settings = build_proposer(reg, spec, target, tree_settings(target))
print(json.dumps({"checkpoint": settings["drafter_checkpoint"], "sha256": settings["drafter_sha256"]}))
"""


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.mark.smollm
@pytest.mark.slow
def test_two_processes_needing_one_recipe_drafter_build_it_once(tmp_path: Path, tiny_smol: Path, data_dir: Path,
                                                                isolated_home: Path) -> None:
    """Two matrix workers (real processes) reaching an unbuilt recipe drafter at once: one builds it, the other
    waits on the store's lock and then loads the drafter the first built."""
    include = tmp_path / "cards"
    write_cards(include, "tiny-smol")
    script, events, go = tmp_path / "worker.py", tmp_path / "events", tmp_path / "go"
    script.write_text(WORKER)
    roles = ("a", "b")
    out = {role: tmp_path / f"{role}.out" for role in roles}
    err = {role: tmp_path / f"{role}.err" for role in roles}
    workers: dict[str, subprocess.Popen[bytes]] = {}

    def builders() -> list[str]:
        """The workers that started a build, in order."""
        return [line.split()[0] for line in events.read_text().splitlines()] if events.exists() else []

    waiting = "another process is building drafter 'tiny-math-eagle2' for tiny-smol; waiting for it"

    def settled() -> bool:
        """Someone waits on the lock, or (were there no lock) both build, or a worker is gone."""
        return (any(waiting in err[r].read_text() for r in roles) or len(builders()) == 2
                or any(w.poll() is not None for w in workers.values()))

    try:
        for role in roles:
            with out[role].open("wb") as stdout, err[role].open("wb") as stderr:  # the child keeps its own handles
                workers[role] = subprocess.Popen([sys.executable, str(script), role, str(events), str(go),
                                                  str(data_dir), str(tiny_smol), str(include)], stdout=stdout,
                                                 stderr=stderr)
        wait_for(settled, "a worker to build and the other to wait")
        go.touch()
        for worker in workers.values():
            worker.wait(timeout=300)
    finally:
        for worker in workers.values():
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    logs = {role: err[role].read_text() for role in roles}
    assert {role: w.returncode for role, w in workers.items()} == {"a": 0, "b": 0}, logs
    assert len(builders()) == 1, logs  # one build ...
    builder = builders()[0]
    other = next(r for r in roles if r != builder)
    assert waiting in logs[other] and waiting not in logs[builder]  # ... while the other waited for it
    built = isolated_home / "drafters" / "tiny-smol" / "tiny-math-eagle2"
    assert len((built / "train" / "log.jsonl").read_text().splitlines()) == 1  # one epoch, trained once
    loaded = {role: json.loads(out[role].read_text().strip().splitlines()[-1]) for role in roles}
    assert loaded[other] == loaded[builder]  # the waiting worker loaded the very checkpoint the builder wrote
    assert loaded[other]["checkpoint"] == f"built:{built}"
