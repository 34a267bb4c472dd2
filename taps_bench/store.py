"""The results store: every run and every sample, in one SQLAlchemy database (a SQLite file by default).

Only raw counters are stored (see `taps_bench.metrics` for everything derived from them), so a change in how a metric
is computed never needs a re-run.

Resumability: each sample (one prompt x turn) is inserted and committed in its own transaction the moment it
finishes. A run killed half-way keeps every finished sample; re-running the same command finds the same run (by its
identity key) and `done()` tells it which samples to skip. A sample is never half-written: it is one row, one
transaction.

Run identity: a run's `key` is the sha256 of the canonical JSON of
`{kind, target, task, proposer, temperature, settings}`. Anything that changes the numbers (tree shape,
max_new_tokens, dtype if the caller puts it in settings, ...) belongs in `settings`; anything that only describes
where and how the numbers were produced (versions, git commit, device name, thread count) belongs in `provenance`
and does not split a run.

Schema: versioned Alembic migrations (`taps_bench.migrations`) that `Store` applies whenever it opens a database: a
fresh one is created at the newest revision, an older one (including one written before migrations existed) is
upgraded in place, and one migrated by a newer taps-bench is refused. SQLite and PostgreSQL are both supported.

Concurrency: several processes may write one database. Each write that can race (creating a run, adding a sample,
recording a cell) is its own transaction; when a concurrent writer wins (IntegrityError on a unique key), the loser
reads the winner's row in a new transaction, never in the failed one (PostgreSQL refuses every statement in a
transaction after an error).

Provenance policy: a run keeps the provenance of the session that created it. When a later session resumes the run
with a different provenance (another commit, another machine), that provenance is appended to the list
`provenance["later_sessions"]` rather than overwriting the first, so mixed-session runs remain visible.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    func,
    inspect,
    select,
)
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, NoSuchModuleError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from taps_bench import migrations
from taps_bench.errors import UserError
from taps_bench.paths import home as taps_bench_home

# The `meta.schema_version` row that releases from before migrations check (they refuse any other value). Schema
# changes are Alembic revisions now; a revision raises this only when those releases can no longer use the tables.
SCHEMA_VERSION = 1

RUN_KINDS = ("baseline", "speculative")
STOP_REASONS = ("stop_token", "max_new_tokens", "context")

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


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def canonical_json(obj: Any) -> str:
    """Stable JSON text (sorted keys, no whitespace) so that equal settings always hash equal.

    `default=str` lets callers pass values such as `Path`; they are hashed (and stored) as their string form.
    """
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def run_key(kind: str, target: str, task: str, proposer: str, temperature: float, settings: dict[str, Any]) -> str:
    """The identity key of a run (sha256 hex of the canonical JSON of its identity fields)."""
    identity = {
        "kind": kind,
        "target": target,
        "task": task,
        "proposer": proposer,
        # float() so that temperature 0 and 0.0 are the same run.
        "temperature": float(temperature),
        "settings": settings,
    }
    return hashlib.sha256(canonical_json(identity).encode("utf-8")).hexdigest()


def output_hash(output_ids: Iterable[int]) -> str:
    """sha256 hex of the generated token ids (comma-separated decimal), to compare outputs across runs cheaply."""
    return hashlib.sha256(",".join(str(int(t)) for t in output_ids).encode("ascii")).hexdigest()


class Base(DeclarativeBase):
    pass


class Meta(Base):
    """Key/value facts about the database itself (the schema version)."""

    __tablename__ = "meta"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class Run(Base):
    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    kind: Mapped[str] = mapped_column(String(16))
    target: Mapped[str] = mapped_column(String(255), index=True)
    task: Mapped[str] = mapped_column(String(255), index=True)
    proposer: Mapped[str] = mapped_column(String(255))
    temperature: Mapped[float] = mapped_column(Float)
    settings: Mapped[dict[str, Any]] = mapped_column(JSON)
    provenance: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_utcnow, onupdate=_utcnow)


class Sample(Base):
    __tablename__ = "samples"
    __table_args__ = (UniqueConstraint("run_id", "example_id", "turn", name="uq_sample_run_example_turn"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    example_id: Mapped[str] = mapped_column(String(255))
    turn: Mapped[int] = mapped_column(Integer)
    prompt_hash: Mapped[str | None] = mapped_column(String(64))
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    output_ids: Mapped[list[int]] = mapped_column(JSON)
    output_hash: Mapped[str] = mapped_column(String(64))
    output_text: Mapped[str | None] = mapped_column(Text)
    new_tokens: Mapped[int] = mapped_column(Integer)
    steps: Mapped[int] = mapped_column(Integer)
    accept_lengths: Mapped[list[int]] = mapped_column(JSON)
    drafted_by_depth: Mapped[list[int]] = mapped_column(JSON)
    accepted_by_depth: Mapped[list[int]] = mapped_column(JSON)
    tree_sizes: Mapped[list[int]] = mapped_column(JSON)
    prefill_s: Mapped[float] = mapped_column(Float)
    draft_s: Mapped[float] = mapped_column(Float)
    verify_s: Mapped[float] = mapped_column(Float)
    total_s: Mapped[float] = mapped_column(Float)
    stop_reason: Mapped[str] = mapped_column(String(32))
    extracted: Mapped[str | None] = mapped_column(Text)
    gold: Mapped[str | None] = mapped_column(Text)
    correct: Mapped[bool | None] = mapped_column(Boolean)
    lossless: Mapped[bool | None] = mapped_column(Boolean)
    extra: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_utcnow)


class Cell(Base):
    """One cell of a matrix (target x proposer x task x temperature x repeat): its last outcome.

    Samples stay in `samples`; a cell row only says whether the cell finished or failed (and why), so that a failing
    cell is visible and a restarted matrix can skip the finished ones without loading their models.
    """

    __tablename__ = "matrix_cells"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    matrix: Mapped[str] = mapped_column(String(255), index=True)
    cell: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16))
    error: Mapped[str | None] = mapped_column(Text)
    run_id: Mapped[int | None] = mapped_column(Integer)
    baseline_run_id: Mapped[int | None] = mapped_column(Integer)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_utcnow, onupdate=_utcnow)


CELL_STATUSES = ("done", "failed")
RUN_COLUMNS: tuple[str, ...] = tuple(c.key for c in Run.__table__.columns)
SAMPLE_COLUMNS: tuple[str, ...] = tuple(c.key for c in Sample.__table__.columns)
CELL_COLUMNS: tuple[str, ...] = tuple(c.key for c in Cell.__table__.columns)

# What a caller must give `add_sample`; everything else has a default (see `normalise_sample`).
_REQUIRED_SAMPLE_KEYS = ("example_id", "turn", "output_ids", "steps", "total_s", "stop_reason")
# Filled in by the store, not by the caller.
STORE_OWNED = ("id", "run_id", "created_at")


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    # SQLite drops the timezone on the way back; every timestamp we write is UTC. PostgreSQL returns it in the
    # session's time zone, hence the conversion, so that both backends give the same text.
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc).isoformat()


def _to_dict(obj: Base, columns: Sequence[str]) -> dict[str, Any]:
    out = {name: getattr(obj, name) for name in columns}
    for name in ("created_at", "updated_at"):
        if name in out:
            out[name] = _iso(out[name])
    return out


def _int_list(values: Iterable[Any] | None) -> list[int]:
    # int() accepts numpy and 0-d torch integers, which the JSON encoder would reject.
    return [int(v) for v in values] if values is not None else []


def _opt(value: Any, conv: type) -> Any:
    return None if value is None else conv(value)


def normalise_sample(sample: dict[str, Any]) -> dict[str, Any]:
    """Validate a caller's sample dict and convert it to plain Python values for the row."""
    unknown = set(sample) - set(SAMPLE_COLUMNS)
    if unknown:
        raise ValueError(f"unknown sample fields: {', '.join(sorted(unknown))} (known: {', '.join(SAMPLE_COLUMNS)})")
    missing = [k for k in _REQUIRED_SAMPLE_KEYS if sample.get(k) is None]
    if missing:
        raise ValueError(f"sample is missing required fields: {', '.join(missing)}")
    if sample["stop_reason"] not in STOP_REASONS:
        raise ValueError(f"stop_reason must be one of {', '.join(STOP_REASONS)}, got {sample['stop_reason']!r}")
    ids = _int_list(sample["output_ids"])
    digest = output_hash(ids)
    if sample.get("output_hash") not in (None, digest):
        raise ValueError("output_hash does not match output_ids")
    extra = sample.get("extra") or {}
    if not isinstance(extra, dict):
        raise ValueError(f"extra must be a dict, got {type(extra).__name__}")
    # Fail here, with the field named, rather than deep inside the flush.
    try:
        json.dumps(extra)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"sample extra is not JSON-serialisable: {exc}") from exc
    return {
        # Keys are strings so that done() lookups do not depend on whether a task's ids are ints or strings.
        "example_id": str(sample["example_id"]),
        "turn": int(sample["turn"]),
        "prompt_hash": _opt(sample.get("prompt_hash"), str),
        "prompt_tokens": _opt(sample.get("prompt_tokens"), int),
        "output_ids": ids,
        "output_hash": digest,
        "output_text": _opt(sample.get("output_text"), str),
        "new_tokens": int(sample["new_tokens"]) if sample.get("new_tokens") is not None else len(ids),
        "steps": int(sample["steps"]),
        "accept_lengths": _int_list(sample.get("accept_lengths")),
        "drafted_by_depth": _int_list(sample.get("drafted_by_depth")),
        "accepted_by_depth": _int_list(sample.get("accepted_by_depth")),
        "tree_sizes": _int_list(sample.get("tree_sizes")),
        "prefill_s": float(sample.get("prefill_s") or 0.0),
        "draft_s": float(sample.get("draft_s") or 0.0),
        "verify_s": float(sample.get("verify_s") or 0.0),
        "total_s": float(sample["total_s"]),
        "stop_reason": str(sample["stop_reason"]),
        "extracted": _opt(sample.get("extracted"), str),
        "gold": _opt(sample.get("gold"), str),
        "correct": _opt(sample.get("correct"), bool),
        "lossless": _opt(sample.get("lossless"), bool),
        "extra": extra,
    }


def _cannot_write(path: Path, reason: str) -> UserError:
    return UserError(f"cannot write the database {path}: {reason}; pass --db with a writable path or URL")


def _sqlite_file(url: URL) -> Path | None:
    """The file behind a SQLite URL, or None for in-memory and URI-mode (`file:...`) databases."""
    if url.get_backend_name() != "sqlite":
        return None
    db = url.database
    if not db or db == ":memory:" or db.startswith("file:") or str(url.query.get("uri", "")).lower() == "true":
        return None
    return Path(db).expanduser()


def _prepare_sqlite_path(path: Path) -> None:
    """Check that `path` can be written, then create its parent directory. Nothing is created if a check fails."""
    if path.exists():
        if path.is_dir():
            raise _cannot_write(path, "it is a directory")
        if not os.access(path, os.R_OK | os.W_OK):
            raise _cannot_write(path, "permission denied")
        # SQLite (WAL mode) creates <db>-wal and <db>-shm next to the file.
        if not os.access(path.parent, os.W_OK | os.X_OK):
            raise _cannot_write(path, f"its directory {path.parent} is not writable")
        return
    ancestor = path.parent
    # Path(".").parent == Path("."), and "/" exists, so this terminates.
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise _cannot_write(path, f"{ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise _cannot_write(path, f"{ancestor} is not writable")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _cannot_write(path, exc.strerror or str(exc)) from exc


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        # First, so that the pragmas below (switching to WAL takes a lock) wait for a concurrent opener too.
        cursor.execute("PRAGMA busy_timeout=30000")
        # WAL: a reader (`taps-bench show`, the leaderboard) does not block the run that is writing, and vice versa.
        cursor.execute("PRAGMA journal_mode=WAL")
        # SQLite ignores foreign keys unless asked, per connection.
        cursor.execute("PRAGMA foreign_keys=ON")
    finally:
        cursor.close()


class Store:
    """The results database. `Store(url)` opens (and if needed creates) it; any SQLAlchemy URL is accepted."""

    def __init__(self, url: str) -> None:
        try:
            parsed = make_url(url)
        except (ArgumentError, ValueError) as exc:
            raise UserError(f"cannot parse the database URL {url!r}: {exc}; pass --db with a path or URL") from exc
        self.path = _sqlite_file(parsed)
        if self.path is not None:
            _prepare_sqlite_path(self.path)
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
            event.listen(self.engine, "connect", _sqlite_on_connect)
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
        return f"Store({self.url.render_as_string(hide_password=True)!r})"

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the connections (the data is already committed)."""
        self.engine.dispose()

    def _open_schema(self, where: str) -> None:
        """Check the database's schema revision and migrate it to head if needed (see `taps_bench.migrations`)."""
        # Nearly every open finds the database at head: look without the lock first, so that opening never waits
        # for another process's write transaction when there is nothing to migrate.
        with self.engine.connect() as conn:
            if migrations.current(conn, where) == (migrations.head(),):
                self._check_schema_version(conn)
                return
        with migrations.exclusive(self.engine) as conn:
            # Again under the lock: a process that opened the database at the same time may have migrated it.
            revisions = migrations.current(conn, where)
            self._check_schema_version(conn)
            if revisions != (migrations.head(),):
                migrations.upgrade(conn, revisions)

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

    def _runs(self, stmt: Any) -> list[dict[str, Any]]:
        counts_q = select(Sample.run_id, func.count(Sample.id)).group_by(Sample.run_id)
        with self._session() as s:
            counts: dict[int, int] = {run_id: n for run_id, n in s.execute(counts_q)}
            return [
                {**_to_dict(run, RUN_COLUMNS), "n_samples": counts.get(run.id, 0)}
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
            return _to_dict(row, SAMPLE_COLUMNS) if row is not None else None

    def done(self, run_id: int) -> dict[tuple[str, int], dict[str, Any]]:
        """The stored samples of a run, keyed by (example_id, turn); example ids are strings."""
        return {(d["example_id"], d["turn"]): d for d in self.samples(run_id)}

    def samples(self, run_id: int) -> list[dict[str, Any]]:
        """The stored samples of a run in the order they were stored, as dicts with every column."""
        stmt = select(Sample).where(Sample.run_id == run_id).order_by(Sample.id)
        with self._session() as s:
            return [_to_dict(x, SAMPLE_COLUMNS) for x in s.scalars(stmt)]

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
            return _to_dict(row, CELL_COLUMNS) if row is not None else None

    def cells(self, matrix: str | None = None) -> list[dict[str, Any]]:
        """Every recorded cell (of one matrix when given), oldest first."""
        stmt = select(Cell).order_by(Cell.id)
        if matrix is not None:
            stmt = stmt.where(Cell.matrix == matrix)
        with self._session() as s:
            return [_to_dict(row, CELL_COLUMNS) for row in s.scalars(stmt)]
