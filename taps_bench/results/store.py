"""The results store: every run and every sample, in one SQLAlchemy database (a SQLite file by default).

Only raw counters are stored (see `taps_bench.results.metrics` for everything derived from them), so a change in
how a metric is computed never needs a re-run. The tables and the sample rules are in `taps_bench.results.schema`.

Resumability: each sample (one prompt x turn) is inserted and committed in its own transaction the moment it
finishes. A run killed half-way keeps every finished sample; re-running the same command finds the same run (by its
identity key) and `done()` tells it which samples to skip. A sample is never half-written: it is one row, one
transaction.

Run identity: a run's `key` is the sha256 of the canonical JSON of
`{kind, target, task, proposer, temperature, settings}`. Anything that changes the numbers (tree shape,
max_new_tokens, dtype if the caller puts it in settings, ...) belongs in `settings`; anything that only describes
where and how the numbers were produced (versions, git commit, device name, thread count) belongs in `provenance`
and does not split a run.

Schema: versioned Alembic migrations (`taps_bench.results.migrations`) that `Store` applies whenever it opens a
database: a fresh one is created at the newest revision, an older one (including one written before migrations
existed) is upgraded in place, and one migrated by a newer taps-bench is refused. SQLite and PostgreSQL both work.

Concurrency: several processes may write one database. Each write that can race (creating a run, adding a sample,
recording a cell) is its own transaction; when a concurrent writer wins (IntegrityError on a unique key), the loser
reads the winner's row in a new transaction, never in the failed one (PostgreSQL refuses every statement in a
transaction after an error).

Provenance policy: a run keeps the provenance of the session that created it. When a later session resumes the run
with a different provenance (another commit, another machine), that provenance is appended to the list
`provenance["later_sessions"]` rather than overwriting the first, so mixed-session runs remain visible.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    create_engine,
    event,
    func,
    inspect,
    select,
)
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, NoSuchModuleError, SQLAlchemyError
from sqlalchemy.orm import sessionmaker

from taps_bench.errors import UserError
from taps_bench.paths import home as taps_bench_home
from taps_bench.results import migrations
from taps_bench.results.pairing import is_baseline_of
from taps_bench.results.schema import (
    CELL_COLUMNS,
    CELL_STATUSES,
    RUN_COLUMNS,
    RUN_KINDS,
    SAMPLE_COLUMNS,
    STORE_OWNED,
    Cell,
    Meta,
    Run,
    Sample,
    canonical_json,
    check_tables,
    normalise_sample,
    run_key,
    to_dict,
)
from taps_bench.results.sqlite import (
    prepare_sqlite_path,
    readonly_mode,
    sqlite_file,
    sqlite_on_connect,
    sqlite_on_connect_readonly,
)

# The `meta.schema_version` row that releases from before migrations check (they refuse any other value). Schema
# changes are Alembic revisions now; a revision raises this only when those releases can no longer use the tables.
SCHEMA_VERSION = 1

_ENV_DB = "TAPS_BENCH_DB"


def default_db_url() -> str:
    """`$TAPS_BENCH_DB` if set, else `sqlite:///<taps_bench_home()>/results.sqlite`."""
    env = os.environ.get(_ENV_DB)
    if env:
        return as_url(env)
    return f"sqlite:///{(taps_bench_home() / 'results.sqlite').resolve()}"


def as_url(db: str) -> str:
    """A SQLAlchemy URL as given, or a plain file path turned into a SQLite URL."""
    return db if "://" in db else f"sqlite:///{Path(db).expanduser().resolve()}"


class Store:
    """The results database. `Store(url)` opens (and if needed creates) it; any SQLAlchemy URL is accepted."""

    def __init__(self, url: str, readonly: bool = False) -> None:
        """`readonly`: for commands that only read (show, export, leaderboard build): the database must exist
        (nothing is created at a mistyped path), is opened read-only (so a read-only file works) and is never
        migrated."""
        try:
            parsed = make_url(url)
        except (ArgumentError, ValueError) as exc:
            raise UserError(f"cannot parse the database URL {url!r}: {exc}; pass --db with a path or URL") from exc
        self.path = sqlite_file(parsed)
        self.readonly = readonly
        if self.path is not None and readonly:
            if not self.path.is_file():
                raise UserError(f"no database at {self.path}: this command only reads; pass --db with the path of "
                                "an existing results database (`taps-bench run` or `import` create one)")
            parsed = parsed.set(database=f"file:{self.path.resolve()}?{readonly_mode(self.path)}",
                                query={"uri": "true"})
        elif self.path is not None:
            prepare_sqlite_path(self.path)
            parsed = parsed.set(database=str(self.path))
        self.url = parsed
        shown = parsed.render_as_string(hide_password=True)
        try:
            self.engine: Engine = create_engine(parsed)
        except (NoSuchModuleError, ArgumentError) as exc:
            raise UserError(f"cannot use the database URL {shown}: {exc}") from exc
        except ImportError as exc:
            raise UserError(f"cannot use the database URL {shown}: its driver is not installed ({exc})") from exc
        if parsed.get_backend_name() == "sqlite":
            event.listen(self.engine, "connect", sqlite_on_connect_readonly if readonly else sqlite_on_connect)
        self._session = sessionmaker(self.engine, expire_on_commit=False)
        where = str(self.path) if self.path is not None else shown
        try:
            self._open_schema(where)
        except SQLAlchemyError as exc:
            self.engine.dispose()
            reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
            raise UserError(
                f"cannot open the database {where}: {reason}; pass --db with a writable path or URL"
            ) from exc
        except BaseException:
            self.engine.dispose()
            raise

    def __repr__(self) -> str:
        return f"Store({self.shown!r})"

    @property
    def shown(self) -> str:
        """The database's URL as a user may see it (printed, stored in a site): any password hidden."""
        if self.path is not None:
            return f"sqlite:///{self.path}"
        return str(self.url.render_as_string(hide_password=True))

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the connections (the data is already committed)."""
        self.engine.dispose()

    def _open_schema(self, where: str) -> None:
        """Check the database's schema revision and migrate it to head if needed (see `results.migrations`)."""
        # Nearly every open finds the database at head: look without the lock first, so that opening never waits
        # for another process's write transaction when there is nothing to migrate.
        with self.engine.connect() as conn:
            revisions = migrations.current(conn, where)
            if revisions == (migrations.head(),):
                self._check_schema_version(conn)
                check_tables(conn, where)
                return
            if self.readonly:
                found = ", ".join(revisions) or "none"
                raise UserError(f"the database {where} is at an older schema revision ({found}) and this command "
                                "only reads; run `taps-bench import` or `run` on it once to upgrade it, or pass --db "
                                "with another path")
        with migrations.exclusive(self.engine) as conn:
            # Again under the lock: a process that opened the database at the same time may have migrated it.
            revisions = migrations.current(conn, where)
            self._check_schema_version(conn)
            if revisions != (migrations.head(),):
                migrations.upgrade(conn, revisions)
            check_tables(conn, where)

    def session(self) -> Any:
        """A new ORM session (for `results.submissions`, which keeps its transactions next to the store's)."""
        return self._session()

    def _check_schema_version(self, conn: Connection) -> None:
        # Before migrating, so that a database some future release marked as unusable for us is left untouched.
        if not inspect(conn).has_table(Meta.__tablename__):
            return
        value = conn.scalar(select(Meta.value).where(Meta.key == "schema_version"))
        if value is not None and not (value.isdigit() and int(value) <= SCHEMA_VERSION):
            raise UserError(
                f"the database {self} has schema version {value}, this taps-bench uses {SCHEMA_VERSION}; "
                "pass --db with another path or export the old results with the version that wrote them"
            )

    # ----------------------------------------------------------------------------------------------------- runs

    def get_or_create_run(
        self,
        kind: str,
        target: str,
        task: str,
        proposer: str,
        temperature: float,
        settings: dict[str, Any],
        provenance: dict[str, Any],
    ) -> int:
        """The id of the run with this identity, created if new (see the module docstring for identity/provenance)."""
        if kind not in RUN_KINDS:
            raise ValueError(f"run kind must be one of {', '.join(RUN_KINDS)}, got {kind!r}")
        # Store exactly what was hashed (tuples become lists, Paths strings), so the key can be recomputed from it.
        settings = json.loads(canonical_json(settings))
        provenance = json.loads(canonical_json(provenance))
        key = run_key(kind, target, task, proposer, temperature, settings)
        with self._session() as s, s.begin():
            run = s.scalars(select(Run).where(Run.key == key)).one_or_none()
            if run is not None:
                self._note_session(run, provenance)
                return run.id
        try:
            with self._session() as s, s.begin():
                run = Run(
                    key=key,
                    kind=kind,
                    target=target,
                    task=task,
                    proposer=proposer,
                    temperature=float(temperature),
                    settings=settings,
                    provenance=provenance,
                )
                s.add(run)
                s.flush()
                return run.id
        except IntegrityError:
            # Another process created the same run between our select and insert: use theirs.
            with self._session() as s, s.begin():
                run = s.scalars(select(Run).where(Run.key == key)).one()
                self._note_session(run, provenance)
                return run.id

    @staticmethod
    def _note_session(run: Run, provenance: dict[str, Any]) -> None:
        first = {k: v for k, v in run.provenance.items() if k != "later_sessions"}
        later: list[dict[str, Any]] = list(run.provenance.get("later_sessions", []))
        if provenance in (first, *later[-1:]):
            return
        # A new dict (not in-place mutation) so that SQLAlchemy sees the JSON column change.
        run.provenance = {**run.provenance, "later_sessions": [*later, provenance]}

    def get_run(self, run_id: int) -> dict[str, Any] | None:
        """One run as a dict (every column plus `n_samples`), or None."""
        found = self._runs(select(Run).where(Run.id == run_id))
        return found[0] if found else None

    def runs(self) -> list[dict[str, Any]]:
        """Every run, oldest first, as dicts with every column plus `n_samples`."""
        return self._runs(select(Run))

    def find_runs(self, settings: dict[str, Any] | None = None, **filters: Any) -> list[dict[str, Any]]:
        """Runs whose columns equal the given filters, e.g. `find_runs(kind="baseline", target="smollm2-135m")`.

        A filter whose value is None is ignored (so CLI options that were not given can be passed through).
        `settings={...}` keeps runs whose settings contain every given item.
        """
        unknown = set(filters) - set(RUN_COLUMNS)
        if unknown:
            raise UserError(f"unknown run filter {', '.join(sorted(unknown))}: known: {', '.join(RUN_COLUMNS)}")
        stmt = select(Run)
        by_value: dict[str, Any] = {}
        for name, value in filters.items():
            if value is None:
                continue
            if isinstance(Run.__table__.c[name].type, JSON):
                # PostgreSQL has no equality on json; compare the stored (canonical) values here instead.
                by_value[name] = json.loads(canonical_json(value))
            else:
                stmt = stmt.where(getattr(Run, name) == value)
        rows = [r for r in self._runs(stmt) if all(r[k] == v for k, v in by_value.items())]
        if settings:
            wanted = json.loads(canonical_json(settings))
            rows = [r for r in rows if all(k in r["settings"] and r["settings"][k] == v for k, v in wanted.items())]
        return rows

    def baseline_for(self, run: dict[str, Any]) -> dict[str, Any] | None:
        """The autoregressive run that `run` (a stored speculative run) is measured against: same target, task and
        temperature, and equal `results.pairing.BASELINE_KEYS` settings; None when none is stored."""
        candidates = self.find_runs(kind="baseline", target=run["target"], task=run["task"],
                                    temperature=float(run["temperature"]))
        return next((b for b in candidates if is_baseline_of(b, run)), None)

    def _runs(self, stmt: Any) -> list[dict[str, Any]]:
        counts_q = select(Sample.run_id, func.count(Sample.id)).group_by(Sample.run_id)
        with self._session() as s:
            counts: dict[int, int] = {run_id: n for run_id, n in s.execute(counts_q)}
            return [
                {**to_dict(run, RUN_COLUMNS), "n_samples": counts.get(run.id, 0)}
                for run in s.scalars(stmt.order_by(Run.id))
            ]

    # -------------------------------------------------------------------------------------------------- samples

    def add_sample(self, run_id: int, sample: dict[str, Any]) -> None:
        """Insert one finished sample and commit it at once. Adding a sample that already exists does nothing.

        `sample` holds the Sample columns except id/run_id/created_at. Required: example_id, turn, output_ids,
        steps, total_s, stop_reason. Defaults: new_tokens = len(output_ids), output_hash computed from output_ids,
        counter lists [], prefill/draft/verify times 0.0, extra {}, everything else None.
        """
        owned = [k for k in STORE_OWNED if k in sample]
        if owned:
            raise ValueError(f"sample fields set by the store, not the caller: {', '.join(owned)}")
        row = normalise_sample(sample)
        where = (Sample.run_id == run_id, Sample.example_id == row["example_id"], Sample.turn == row["turn"])
        try:
            with self._session() as s, s.begin():
                # The pre-check keeps the common resume case free of IntegrityError noise.
                if s.scalars(select(Sample.id).where(*where)).first() is not None:
                    return
                if s.get(Run, run_id) is None:
                    raise ValueError(f"no run with id {run_id}")
                s.add(Sample(run_id=run_id, **row))
        except IntegrityError:
            # A concurrent writer stored the same sample first: that is the idempotent case. Anything else (the row
            # still not being there) is a real error.
            with self._session() as s:
                if s.scalars(select(Sample.id).where(*where)).first() is None:
                    raise

    def sample(self, run_id: int, example_id: str, turn: int) -> dict[str, Any] | None:
        """One stored sample, or None."""
        stmt = select(Sample).where(Sample.run_id == run_id, Sample.example_id == str(example_id),
                                    Sample.turn == int(turn))
        with self._session() as s:
            row = s.scalars(stmt).first()
            return to_dict(row, SAMPLE_COLUMNS) if row is not None else None

    def done(self, run_id: int) -> dict[tuple[str, int], dict[str, Any]]:
        """The stored samples of a run, keyed by (example_id, turn); example ids are strings."""
        return {(d["example_id"], d["turn"]): d for d in self.samples(run_id)}

    def samples(self, run_id: int) -> list[dict[str, Any]]:
        """The stored samples of a run in the order they were stored, as dicts with every column."""
        stmt = select(Sample).where(Sample.run_id == run_id).order_by(Sample.id)
        with self._session() as s:
            return [to_dict(x, SAMPLE_COLUMNS) for x in s.scalars(stmt)]

    # ---------------------------------------------------------------------------------------------- matrix cells

    def record_cell(self, key: str, matrix: str, cell: dict[str, Any], status: str, error: str | None = None,
                    run_id: int | None = None, baseline_run_id: int | None = None) -> None:
        """Record a matrix cell's outcome (one row per cell key, updated in place; attempts counts the records)."""
        if status not in CELL_STATUSES:
            raise ValueError(f"cell status must be one of {', '.join(CELL_STATUSES)}, got {status!r}")
        cell = json.loads(canonical_json(cell))
        for retry in (False, True):
            try:
                with self._session() as s, s.begin():
                    row = s.scalars(select(Cell).where(Cell.key == key)).one_or_none()
                    if row is None:
                        row = Cell(key=key, matrix=matrix, cell=cell, attempts=1)
                        s.add(row)
                    else:
                        # Incremented by the database (SET attempts = attempts + 1), so that concurrent records of
                        # one cell each count instead of overwriting the count they all read.
                        row.attempts = Cell.attempts + 1  # type: ignore[assignment]
                    row.status, row.error = status, error
                    row.run_id, row.baseline_run_id = run_id, baseline_run_id
                return
            except IntegrityError:
                # Another process inserted this cell between our select and insert. The failed transaction is
                # gone (PostgreSQL refuses every statement after an error until rollback), so the retry starts a
                # new one and finds their row to update.
                if retry:
                    raise

    def cell(self, key: str) -> dict[str, Any] | None:
        with self._session() as s:
            row = s.scalars(select(Cell).where(Cell.key == key)).one_or_none()
            return to_dict(row, CELL_COLUMNS) if row is not None else None

    def cells(self, matrix: str | None = None) -> list[dict[str, Any]]:
        """Every recorded cell (of one matrix when given), oldest first."""
        stmt = select(Cell).order_by(Cell.id)
        if matrix is not None:
            stmt = stmt.where(Cell.matrix == matrix)
        with self._session() as s:
            return [to_dict(row, CELL_COLUMNS) for row in s.scalars(stmt)]
