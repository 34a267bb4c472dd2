"""Schema migrations (Alembic) on SQLite and PostgreSQL: a fresh database is created at head with exactly the
models' schema, a database written by the release before migrations (schema_version 1) and one at an older revision
are upgraded in place keeping every row, a failed migration leaves nothing behind, and a database migrated by a
newer taps-bench is refused with one line."""

from __future__ import annotations

import multiprocessing
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, insert, inspect, text
from test_store import PROV, SETTINGS, new_run, sample

from taps_bench.errors import UserError
from taps_bench.results import migrations
from taps_bench.results.schema import Base, Run, Sample, run_key
from taps_bench.results.store import Store

# The DDL of the release before migrations (commit 6acace7, `Base.metadata.create_all` over meta, runs and samples),
# written out so that later model changes cannot change what "an old database" means here.
V1_SQLITE = [
    'CREATE TABLE meta ("key" VARCHAR(64) NOT NULL, value TEXT NOT NULL, PRIMARY KEY ("key"))',
    'CREATE TABLE runs (id INTEGER NOT NULL, "key" VARCHAR(64) NOT NULL, kind VARCHAR(16) NOT NULL, '
    "target VARCHAR(255) NOT NULL, task VARCHAR(255) NOT NULL, proposer VARCHAR(255) NOT NULL, "
    "temperature FLOAT NOT NULL, settings JSON NOT NULL, provenance JSON NOT NULL, created_at DATETIME NOT NULL, "
    "updated_at DATETIME NOT NULL, PRIMARY KEY (id))",
    'CREATE UNIQUE INDEX ix_runs_key ON runs ("key")',
    "CREATE INDEX ix_runs_target ON runs (target)",
    "CREATE INDEX ix_runs_task ON runs (task)",
    "CREATE TABLE samples (id INTEGER NOT NULL, run_id INTEGER NOT NULL, example_id VARCHAR(255) NOT NULL, "
    "turn INTEGER NOT NULL, prompt_hash VARCHAR(64), prompt_tokens INTEGER, output_ids JSON NOT NULL, "
    "output_hash VARCHAR(64) NOT NULL, output_text TEXT, new_tokens INTEGER NOT NULL, steps INTEGER NOT NULL, "
    "accept_lengths JSON NOT NULL, drafted_by_depth JSON NOT NULL, accepted_by_depth JSON NOT NULL, "
    "tree_sizes JSON NOT NULL, prefill_s FLOAT NOT NULL, draft_s FLOAT NOT NULL, verify_s FLOAT NOT NULL, "
    "total_s FLOAT NOT NULL, stop_reason VARCHAR(32) NOT NULL, extracted TEXT, gold TEXT, correct BOOLEAN, "
    "lossless BOOLEAN, extra JSON NOT NULL, created_at DATETIME NOT NULL, PRIMARY KEY (id), "
    "CONSTRAINT uq_sample_run_example_turn UNIQUE (run_id, example_id, turn), "
    "FOREIGN KEY(run_id) REFERENCES runs (id) ON DELETE CASCADE)",
    "CREATE INDEX ix_samples_run_id ON samples (run_id)",
]
# PostgreSQL: the same, with SERIAL keys and TIMESTAMP WITH TIME ZONE.
V1_POSTGRESQL = [
    stmt.replace("id INTEGER NOT NULL, ", "id SERIAL NOT NULL, ", 1)
    .replace("DATETIME", "TIMESTAMP WITH TIME ZONE")
    .replace('"key"', "key")
    for stmt in V1_SQLITE
]


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'results.sqlite'}"
    return request.getfixturevalue("fresh_postgres_url")


def _execute(url: str, statements: list[str]) -> None:
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            for stmt in statements:
                conn.execute(text(stmt))
    finally:
        engine.dispose()


def make_release_one_database(url: str, schema_version: str = "1") -> int:
    """A database as the release before migrations left it: its DDL, its meta row, one run with two samples (the
    rows written through the same column types its ORM used). Returns the run id."""
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            for stmt in V1_POSTGRESQL if engine.dialect.name == "postgresql" else V1_SQLITE:
                conn.execute(text(stmt))
            conn.execute(text("INSERT INTO meta (key, value) VALUES ('schema_version', :v)"), {"v": schema_version})
            when = datetime(2026, 11, 1, 12, 0, tzinfo=timezone.utc)
            rid = conn.execute(insert(Run.__table__).returning(Run.__table__.c.id).values(
                key=run_key("speculative", "smollm2-135m", "gsm8k", "mathinstruct-hass", 0.0, SETTINGS),
                kind="speculative", target="smollm2-135m", task="gsm8k", proposer="mathinstruct-hass",
                temperature=0.0, settings=SETTINGS, provenance=PROV, created_at=when, updated_at=when,
            )).scalar_one()
            for ex in ("q1", "q2"):
                conn.execute(insert(Sample.__table__).values(
                    run_id=rid, example_id=ex, turn=0, output_ids=[5, 6], output_hash="h" * 64, new_tokens=2,
                    steps=1, accept_lengths=[2], drafted_by_depth=[1], accepted_by_depth=[1], tree_sizes=[3],
                    prefill_s=0.1, draft_s=0.2, verify_s=0.3, total_s=0.6, stop_reason="stop_token",
                    correct=True, extra={"k": [1]}, created_at=when,
                ))
        return rid
    finally:
        engine.dispose()


def dump(url: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table, to compare a database before and after."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return {t: [tuple(r) for r in conn.execute(text(f'SELECT * FROM "{t}" ORDER BY 1'))]
                    for t in sorted(inspect(conn).get_table_names())}
    finally:
        engine.dispose()


def unchanged(before: dict[str, list[tuple[Any, ...]]], after: dict[str, list[tuple[Any, ...]]]) -> bool:
    """Every old row is still there, unchanged; columns added by later revisions (at the end) are empty."""
    def old_part(rows: list[tuple[Any, ...]], width: int) -> list[tuple[Any, ...]]:
        assert all(v is None for r in rows for v in r[width:]), rows
        return [r[:width] for r in rows]

    return all(old_part(after[t], len(rows[0]) if rows else 0) == rows for t, rows in before.items())


def schema_differences(url: str) -> list[Any]:
    """What alembic's comparison finds between the database and the models (nothing when the migrations match)."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return compare_metadata(MigrationContext.configure(conn), Base.metadata)
    finally:
        engine.dispose()


def test_fresh_database_is_at_head_with_the_models_schema(url: str) -> None:
    Store(url).close()
    rows = dump(url)
    assert rows["alembic_version"] == [(migrations.head(),)]
    assert rows["meta"] == [("schema_version", "1")]
    assert set(rows) == {"alembic_version", "meta", "runs", "samples", "matrix_cells", "submissions"}
    assert schema_differences(url) == []


def test_sqlite_foreign_keys_stay_on_after_migrating(tmp_path: Path) -> None:
    # The migration turns them off on its connection; the pooled connection must get them back.
    for db in (f"sqlite:///{tmp_path / 'r.sqlite'}", "sqlite://"):
        with Store(db) as store, store.engine.connect() as conn:
            assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1


def test_release_one_database_is_upgraded_in_place(url: str) -> None:
    rid = make_release_one_database(url)
    before = dump(url)
    assert "alembic_version" not in before and "matrix_cells" not in before

    with Store(url) as store:
        assert new_run(store) == rid  # the same run identity as the old release computed
        assert list(store.done(rid)) == [("q1", 0), ("q2", 0)]
        assert store.cells() == []  # matrix_cells exists now
    after = dump(url)
    assert after["alembic_version"] == [(migrations.head(),)]
    assert after["matrix_cells"] == []
    assert unchanged(before, after)  # every old row, unchanged
    assert schema_differences(url) == []

    Store(url).close()
    assert dump(url) == after  # opening again changes nothing

    with Store(url) as store:  # and the upgraded database takes new rows
        store.add_sample(rid, sample("q3"))
        store.record_cell("c", "m", {}, "done", run_id=rid)
        assert len(store.done(rid)) == 3 and len(store.cells()) == 1


def test_development_database_with_matrix_cells_is_adopted(tmp_path: Path) -> None:
    """A database created by a development build between the release and migrations (create_all over all four
    tables) is stamped 0002, not upgraded over its existing matrix_cells."""
    db = f"sqlite:///{tmp_path / 'dev.sqlite'}"
    engine = create_engine(db)
    with engine.begin() as conn:  # the four tables as they were then (revision 0002's), with no alembic stamp
        command.upgrade(migrations.config(conn), "0002")
        conn.execute(text("DROP TABLE alembic_version"))
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO matrix_cells (key, matrix, cell, status, attempts, updated_at) "
                          "VALUES ('c', 'm', '{}', 'done', 1, '2026-11-01 00:00:00')"))
    engine.dispose()
    with Store(db) as store:
        assert [c["key"] for c in store.cells()] == ["c"]
    assert dump(db)["alembic_version"] == [(migrations.head(),)]


def test_older_revision_is_upgraded(url: str) -> None:
    with Store(url) as store:
        rid = new_run(store)
        store.add_sample(rid, sample())
        with store.engine.connect() as conn:
            if conn.dialect.name == "sqlite":
                # As Store's own migrations do (migrations.exclusive): a batch rebuild of `runs` with foreign keys
                # on would cascade-delete its samples. The pragma only takes effect outside a transaction.
                conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
                conn.commit()
            with conn.begin():
                command.downgrade(migrations.config(conn), "0001")
    assert dump(url)["alembic_version"] == [("0001",)]
    with Store(url) as store:
        assert len(store.done(rid)) == 1 and store.cells() == []
    assert dump(url)["alembic_version"] == [(migrations.head(),)]


def test_database_from_a_newer_taps_bench_is_refused(url: str) -> None:
    Store(url).close()
    _execute(url, ["UPDATE alembic_version SET version_num = '0042_future'"])
    before = dump(url)
    with pytest.raises(UserError) as err:
        Store(url)
    message = str(err.value)
    assert "\n" not in message
    assert "schema revision 0042_future" in message and "newer taps-bench" in message
    assert "pass --db with another path or upgrade taps-bench" in message
    assert dump(url) == before


def test_release_one_database_of_another_schema_version_is_left_alone(url: str) -> None:
    make_release_one_database(url, schema_version="7")
    before = dump(url)
    with pytest.raises(UserError, match="schema version 7, this taps-bench uses 1"):
        Store(url)
    assert dump(url) == before  # not stamped, no matrix_cells


def test_failed_migration_leaves_the_database_as_it_was(url: str) -> None:
    # An index already named like the one 0002 creates (index names are per schema on both backends) makes 0002
    # fail after it created its table: the whole upgrade, stamp included, must roll back.
    make_release_one_database(url)
    _execute(url, ["CREATE INDEX ix_matrix_cells_matrix ON runs (target)"])
    before = dump(url)
    with pytest.raises(UserError, match="cannot open the database"):
        Store(url)
    assert dump(url) == before


def _opener(url: str, barrier: Any, results: Any) -> None:
    try:
        barrier.wait()
        with Store(url) as store:
            results.put(len(store.runs()))
    except BaseException:
        results.put(traceback.format_exc())
        raise


@pytest.mark.slow
def test_concurrent_upgrade_of_a_release_one_database(url: str) -> None:
    make_release_one_database(url)
    before = dump(url)
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=_opener, args=(url, barrier, results)) for _ in range(3)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=240) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert outcomes == [1, 1, 1], outcomes
    after = dump(url)
    assert after["alembic_version"] == [(migrations.head(),)]
    assert unchanged(before, after)
