"""The results store: identity keys, idempotent per-sample commits, resume, and refusing unusable databases."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from taps_bench.errors import UserError
from taps_bench.results.schema import output_hash
from taps_bench.results.store import SCHEMA_VERSION, Store, default_db_url, taps_bench_home


def sample(example_id: str = "q1", turn: int = 0, **over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "example_id": example_id,
        "turn": turn,
        "prompt_hash": "p" * 64,
        "prompt_tokens": 12,
        "output_ids": [5, 6, 7, 2],
        "output_text": "five six seven",
        "steps": 3,
        "accept_lengths": [1, 1],
        "drafted_by_depth": [4, 2],
        "accepted_by_depth": [2],
        "tree_sizes": [5, 5],
        "prefill_s": 0.1,
        "draft_s": 0.2,
        "verify_s": 0.3,
        "total_s": 0.7,
        "stop_reason": "stop_token",
        "extracted": "7",
        "gold": "7",
        "correct": True,
        "lossless": None,
        "extra": {"route": ["math", "math"]},
    }
    base.update(over)
    return base


SETTINGS = {"max_new_tokens": 64, "tree": {"depth": 3, "top_k": 4, "total_tokens": 8}}
PROV = {"git": "abc", "device": "cpu", "threads": 2}


def new_run(store: Store, **over: Any) -> int:
    args: dict[str, Any] = {
        "kind": "speculative",
        "target": "smollm2-135m",
        "task": "gsm8k",
        "proposer": "mathinstruct-hass",
        "temperature": 0.0,
        "settings": SETTINGS,
        "provenance": PROV,
    }
    args.update(over)
    return store.get_or_create_run(**args)


@pytest.fixture
def db(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'results.sqlite'}"


def test_sample_round_trip(db: str) -> None:
    store = Store(db)
    rid = new_run(store)
    store.add_sample(rid, sample(example_id=17))  # type: ignore[arg-type]
    (got,) = store.samples(rid)
    assert got["example_id"] == "17"  # ids are strings, so done() keys do not depend on the task's id type
    assert got["new_tokens"] == 4  # defaults to len(output_ids)
    assert got["output_hash"] == output_hash([5, 6, 7, 2])
    assert got["extra"] == {"route": ["math", "math"]}
    assert got["correct"] is True and got["lossless"] is None
    assert got["run_id"] == rid and got["created_at"]
    assert store.done(rid).keys() == {("17", 0)}


def test_add_sample_is_idempotent(db: str) -> None:
    store = Store(db)
    rid = new_run(store)
    store.add_sample(rid, sample())
    store.add_sample(rid, sample())
    # A re-run that produced a different output for the same (example, turn) does not overwrite the stored one.
    store.add_sample(rid, sample(output_ids=[9, 9]))
    (got,) = store.samples(rid)
    assert got["output_ids"] == [5, 6, 7, 2]


def test_resume_after_reopen(db: str) -> None:
    store = Store(db)
    rid = new_run(store)
    store.add_sample(rid, sample("q1", 0))
    store.add_sample(rid, sample("q1", 1))
    store.close()

    again = Store(db)
    assert new_run(again) == rid
    done = again.done(rid)
    assert set(done) == {("q1", 0), ("q1", 1)}
    assert done[("q1", 1)]["turn"] == 1


def test_run_identity(db: str) -> None:
    store = Store(db)
    rid = new_run(store)
    # Same identity: key order and int-vs-float temperature do not matter.
    reordered = {"tree": {"total_tokens": 8, "top_k": 4, "depth": 3}, "max_new_tokens": 64}
    assert new_run(store, settings=reordered, temperature=0) == rid
    assert new_run(store, temperature=1.0) != rid
    assert new_run(store, settings={**SETTINGS, "max_new_tokens": 128}) != rid
    assert new_run(store, proposer="sharegpt-hass") != rid
    assert new_run(store, kind="baseline", proposer="autoregressive") != rid
    assert len(store.runs()) == 5


def test_provenance_keeps_first_and_appends_later_sessions(db: str) -> None:
    store = Store(db)
    rid = new_run(store)
    new_run(store)  # same provenance: nothing recorded
    new_run(store, provenance={**PROV, "git": "def"})
    run = store.get_run(rid)
    assert run is not None
    assert run["provenance"]["git"] == "abc"
    assert run["provenance"]["later_sessions"] == [{**PROV, "git": "def"}]


def test_runs_and_find_runs(db: str) -> None:
    store = Store(db)
    a = new_run(store)
    b = new_run(store, kind="baseline", proposer="autoregressive")
    store.add_sample(a, sample())
    runs = {r["id"]: r for r in store.runs()}
    assert runs[a]["n_samples"] == 1 and runs[b]["n_samples"] == 0
    assert runs[a]["settings"] == SETTINGS and len(runs[a]["key"]) == 64
    assert [r["id"] for r in store.find_runs(kind="baseline")] == [b]
    assert [r["id"] for r in store.find_runs(kind=None, task="gsm8k")] == [a, b]
    assert store.find_runs(settings={"max_new_tokens": 64, "tree": SETTINGS["tree"]}) != []
    assert store.find_runs(settings={"max_new_tokens": 65}) == []
    with pytest.raises(UserError, match="unknown run filter"):
        store.find_runs(colour="red")


def test_invalid_samples_leave_nothing_behind(db: str) -> None:
    store = Store(db)
    rid = new_run(store)
    store.add_sample(rid, sample("q1"))
    with pytest.raises(ValueError, match="missing required fields: steps"):
        store.add_sample(rid, sample("q2", steps=None))
    with pytest.raises(ValueError, match="stop_reason"):
        store.add_sample(rid, sample("q2", stop_reason="eos"))
    with pytest.raises(ValueError, match="unknown sample fields: colour"):
        store.add_sample(rid, sample("q2", colour="red"))
    with pytest.raises(ValueError, match="no run with id"):
        store.add_sample(rid + 99, sample("q2"))
    with pytest.raises(ValueError, match="not JSON"):
        store.add_sample(rid, sample("q2", extra={"x": object()}))
    assert list(store.done(rid)) == [("q1", 0)]


def test_uses_wal(db: str) -> None:
    store = Store(db)
    with store.engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"


def test_creates_parent_directories(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "r.sqlite"
    Store(f"sqlite:///{path}")
    assert path.is_file()


def test_parent_is_a_file(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(UserError, match=r"cannot write the database .*blocker.*pass --db"):
        Store(f"sqlite:///{blocker / 'sub' / 'r.sqlite'}")
    assert sorted(tmp_path.rglob("*")) == before
    assert blocker.read_text() == "not a directory"


def test_path_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="it is a directory"):
        Store(f"sqlite:///{tmp_path}")


def test_existing_non_database_file_is_refused_and_untouched(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n" * 200)
    with pytest.raises(UserError, match="cannot open the database"):
        Store(f"sqlite:///{notes}")
    assert notes.read_text() == "my notes\n" * 200
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("url", ["::not a url::", "nosuchdialect://host/db"])
def test_bad_url(url: str) -> None:
    with pytest.raises(UserError, match="database URL"):
        Store(url)


def test_password_is_not_shown(tmp_path: Path) -> None:
    with pytest.raises(UserError) as err:
        Store("nosuchdialect://user:s3cret@host/db")
    assert "s3cret" not in str(err.value)


def test_existing_database_survives_failed_attempts(db: str, tmp_path: Path) -> None:
    store = Store(db)
    rid = new_run(store)
    store.add_sample(rid, sample("q1"))
    store.add_sample(rid, sample("q2"))
    store.close()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for bad in (f"sqlite:///{blocker}/r.sqlite", "::bad::"):
        with pytest.raises(UserError):
            Store(bad)
    assert len(Store(db).done(rid)) == 2


def test_schema_version_mismatch(db: str) -> None:
    store = Store(db)
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE meta SET value = '999' WHERE key = 'schema_version'"))
    store.close()
    with pytest.raises(UserError, match=f"schema version 999, this taps-bench uses {SCHEMA_VERSION}"):
        Store(db)


def test_in_memory_url() -> None:
    store = Store("sqlite://")
    rid = new_run(store)
    store.add_sample(rid, sample())
    assert len(store.samples(rid)) == 1


def test_default_db_url(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("TAPS_BENCH_DB", raising=False)
    monkeypatch.setenv("TAPS_BENCH_HOME", str(tmp_path / "home"))
    assert taps_bench_home() == tmp_path / "home"
    assert default_db_url() == f"sqlite:///{(tmp_path / 'home' / 'results.sqlite').resolve()}"
    monkeypatch.setenv("TAPS_BENCH_DB", "sqlite:///elsewhere.sqlite")
    assert default_db_url() == "sqlite:///elsewhere.sqlite"
    monkeypatch.delenv("TAPS_BENCH_HOME")
    assert taps_bench_home().name == "taps-bench"
