"""`taps-bench matrix --executor ray` on a real local Ray cluster with two workers: the same samples as the local
executor (timings aside), and a worker killed mid-run loses nothing; and the local executor runs a matrix where Ray
cannot be imported at all."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from test_matrix import drafters, small_spec

from taps_bench.cli import main
from taps_bench.results.store import Store, as_url

pytestmark = [pytest.mark.smollm, pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

TIMINGS = ("prefill_s", "draft_s", "verify_s", "total_s")
IGNORED = ("id", "run_id", "created_at", *TIMINGS)


def samples(db: Path) -> dict[tuple[Any, ...], dict[str, Any]]:
    """Every stored sample keyed by its run identity and (example, turn), timings and row ids dropped."""
    store = Store(as_url(str(db)))
    out = {}
    for r in store.runs():
        for s in store.samples(r["id"]):
            key = (r["key"], r["kind"], r["proposer"], r["task"], r["temperature"], s["example_id"], s["turn"])
            assert key not in out
            out[key] = {k: v for k, v in s.items() if k not in IGNORED}
    store.close()
    return out


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster with two worker slots (two CPUs), shut down after the module. Only the tests that use it
    need Ray installed: the local executor's test below must run exactly where Ray is missing."""
    ray = pytest.importorskip("ray", reason="Ray is in the [ray] extra: pip install ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def matrix(db: Path, spec: Path, tiny_smol: Path, data_dir: Path, *extra: str) -> int:
    return main(["--include", str(tiny_smol), "matrix", str(spec), "--db", str(db), "--no-progress",
                 "--data-dir", str(data_dir), *extra])


def test_ray_gives_the_same_samples_as_local(cluster, tmp_path: Path, tiny_smol: Path, data_dir: Path) -> None:
    a, b = drafters(tmp_path, tiny_smol)
    spec = small_spec(tmp_path / "m.yaml", a, b, max_new_tokens=6)
    assert matrix(tmp_path / "local.db", spec, tiny_smol, data_dir) == 0
    assert matrix(tmp_path / "ray.db", spec, tiny_smol, data_dir, "--executor", "ray") == 0
    local, remote = samples(tmp_path / "local.db"), samples(tmp_path / "ray.db")
    assert len(local) == 4 * 5 * 2 + 5 * 2
    assert remote == local
    store = Store(as_url(str(tmp_path / "ray.db")))
    assert {c["status"] for c in store.cells("small")} == {"done"} and len(store.cells("small")) == 32
    store.close()
    # A re-run finds every cell finished and computes nothing.
    assert matrix(tmp_path / "ray.db", spec, tiny_smol, data_dir, "--executor", "ray") == 0
    assert samples(tmp_path / "ray.db") == local


def worker_pids() -> list[int]:
    found = subprocess.run(["pgrep", "-f", "ray::decode_cell"], capture_output=True, text=True).stdout.split()
    return [int(p) for p in found if int(p) != os.getpid()]


def test_a_killed_worker_loses_nothing(cluster, tmp_path: Path, tiny_smol: Path, data_dir: Path) -> None:
    a, b = drafters(tmp_path, tiny_smol)
    spec = small_spec(tmp_path / "m.yaml", a, b, max_new_tokens=24)
    db = tmp_path / "ray.db"
    killed: list[int] = []

    def killer() -> None:
        deadline = time.time() + 240
        while time.time() < deadline and not killed:
            time.sleep(0.3)
            pids = worker_pids()
            if pids and db.exists() and len(samples(db)) >= 12:
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    assert matrix(db, spec, tiny_smol, data_dir, "--executor", "ray", "--retries", "3") == 0
    thread.join(timeout=1)
    assert killed, "no worker was killed: the matrix ended first"
    assert matrix(tmp_path / "local.db", spec, tiny_smol, data_dir) == 0
    assert samples(db) == samples(tmp_path / "local.db")  # nothing missing, nothing duplicated


# Run as a script in a fresh interpreter: Ray is installed in the test environment, so a meta-path finder answers
# every import of `ray` (or a submodule) as an uninstalled package would, before taps_bench is imported at all.
NO_RAY = """
import sys


class NoRay:
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, NoRay())
try:
    import ray
except ModuleNotFoundError:
    pass
else:
    sys.exit("the finder did not block ray")

from taps_bench.cli import main

rc = main(sys.argv[1:])
assert "ray" not in sys.modules, "something imported ray past the finder"
sys.exit(rc)
"""


def test_ray_is_optional_for_the_local_executor(tmp_path: Path, tiny_smol: Path, data_dir: Path) -> None:
    a, b = drafters(tmp_path, tiny_smol)
    spec = small_spec(tmp_path / "m.yaml", a, b, proposers=[{"drafter": str(a)},
                                                          {"combiner": "confidence", "drafters": [str(a), str(b)]}],
                      tasks={"gsm8k": 1}, temperatures=[0], max_new_tokens=4)
    script = tmp_path / "no_ray.py"
    script.write_text(NO_RAY)
    db = tmp_path / "local.db"
    done = subprocess.run([sys.executable, str(script), "--include", str(tiny_smol), "matrix", str(spec), "--db",
                           str(db), "--no-progress", "--data-dir", str(data_dir)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    store = Store(as_url(str(db)))
    cells = store.cells("small")
    store.close()
    # 2 proposers x 1 task x 1 temperature, all finished; their samples and the baseline's are stored.
    assert len(cells) == 2 and {c["status"] for c in cells} == {"done"}, cells
    assert len(samples(db)) == 2 + 1
