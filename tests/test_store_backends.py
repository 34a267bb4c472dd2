"""The results store on SQLite and on a real PostgreSQL server (started by the `postgres_url` fixture): the same
behaviours on both, and concurrent writers (separate processes) that create the same run and add the same samples."""

from __future__ import annotations

import multiprocessing
import traceback
from pathlib import Path
from typing import Any

import pytest
from test_store import PROV, SETTINGS, new_run, sample

from taps_bench.results.store import Store

BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(params=BACKENDS)
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database: a SQLite file that does not exist yet, or a new PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'results.sqlite'}"
    return request.getfixturevalue("fresh_postgres_url")


def test_core_behaviours(url: str) -> None:
    with Store(url) as store:
        rid = new_run(store)
        assert new_run(store, settings={"tree": SETTINGS["tree"], "max_new_tokens": 64}, temperature=0) == rid
        base = new_run(store, kind="baseline", proposer="autoregressive", provenance={**PROV, "git": "def"})
        new_run(store, provenance={**PROV, "git": "def"})  # a later session of the first run

        store.add_sample(rid, sample("q1", 0))
        store.add_sample(rid, sample("q1", 0, output_ids=[9]))  # already there: kept as it was
        store.add_sample(rid, sample(7, 1, correct=None, extra={"route": [1, 2], "nested": {"a": [0.5]}}))
        assert list(store.done(rid)) == [("q1", 0), ("7", 1)]
        first, second = store.samples(rid)
        assert first["output_ids"] == [5, 6, 7, 2] and first["correct"] is True
        assert second["extra"] == {"route": [1, 2], "nested": {"a": [0.5]}} and second["correct"] is None
        assert first["created_at"].endswith("+00:00")  # UTC text on both backends
        with pytest.raises(ValueError, match="no run with id"):
            store.add_sample(rid + 99, sample("q2"))

    with Store(url) as store:  # reopening finds everything
        run = store.get_run(rid)
        assert run is not None and run["n_samples"] == 2 and run["settings"] == SETTINGS
        assert run["provenance"]["later_sessions"] == [{**PROV, "git": "def"}]
        assert [r["id"] for r in store.runs()] == [rid, base]
        assert [r["id"] for r in store.find_runs(kind="baseline")] == [base]
        assert [r["id"] for r in store.find_runs(task="gsm8k", temperature=0.0)] == [rid, base]
        assert [r["id"] for r in store.find_runs(settings={"max_new_tokens": 64})] == [rid, base]
        assert [r["id"] for r in store.find_runs(provenance={**PROV, "git": "def"})] == [base]  # a JSON column

        store.record_cell("c1", "m", {"task": "gsm8k", "repeat": 0}, "failed", error="boom")
        store.record_cell("c1", "m", {"task": "gsm8k", "repeat": 0}, "done", run_id=rid, baseline_run_id=base)
        store.record_cell("c2", "other", {"task": "svamp"}, "done")
        (cell,) = store.cells("m")
        assert (cell["status"], cell["error"], cell["attempts"], cell["run_id"]) == ("done", None, 2, rid)
        assert cell["cell"] == {"task": "gsm8k", "repeat": 0}
        assert [c["key"] for c in store.cells()] == ["c1", "c2"]
        assert store.cell("c2") is not None and store.cell("nope") is None


def _writer(url: str, barrier: Any, worker: int, results: Any) -> None:
    """One concurrent writer: open the (possibly fresh) database, create the shared run, add all 30 samples."""
    try:
        barrier.wait()  # all open the database at once: the first-open migration races too
        with Store(url) as store:
            rid = new_run(store)
            order = list(range(30))
            order = order[worker * 7 % 30:] + order[: worker * 7 % 30]  # overlapping, in a different order each
            for i in order:
                store.add_sample(rid, sample(f"q{i}", i % 2))
            store.record_cell("shared-cell", "m", {"i": 0}, "done", run_id=rid)
        results.put((worker, rid, None))
    except BaseException:
        results.put((worker, None, traceback.format_exc()))
        raise


@pytest.mark.slow
def test_concurrent_writers_on_a_fresh_database(url: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    n = 4
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(url, barrier, w, results)) for w in range(n)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=240) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    errors = [err for _, _, err in outcomes if err]
    assert not errors, errors[0]
    assert [p.exitcode for p in procs] == [0] * n
    with Store(url) as store:
        (run,) = store.runs()
        assert {rid for _, rid, _ in outcomes} == {run["id"]}
        assert run["n_samples"] == 30
        assert len(store.done(run["id"])) == 30
        (cell,) = store.cells()
        assert cell["attempts"] == n
