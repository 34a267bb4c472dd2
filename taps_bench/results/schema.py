"""The tables of the results store and the rules for what goes in them: run identity keys and sample records.

Only raw counters are stored (see `taps_bench.results.metrics` for everything derived from them), so a change in
how a metric is computed never needs a re-run. Schema changes are Alembic revisions (`results/migrations`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import JSON, Boolean, DateTime, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

RUN_KINDS = ("baseline", "speculative")
# stop_string: a text stop sequence (lm-eval's `until`) completed, which no token id expresses.
STOP_REASONS = ("stop_token", "stop_string", "max_new_tokens", "context")


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def canonical_json(obj: Any) -> str:
    """Stable JSON text (sorted keys, no whitespace) so that equal settings always hash equal.

    `default=str` lets callers pass values such as `Path`; they are hashed (and stored) as their string form.
    """
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def run_key(kind: str, target: str, task: str, proposer: str, temperature: float, settings: dict[str, Any],
            submission: str | None = None) -> str:
    """The identity key of a run (sha256 hex of the canonical JSON of its identity fields). `submission`: the
    sha256 of the bundle an imported run came from, so that it can never be the same run as one measured here or
    in another bundle."""
    identity = {
        "kind": kind,
        "target": target,
        "task": task,
        "proposer": proposer,
        # float() so that temperature 0 and 0.0 are the same run.
        "temperature": float(temperature),
        "settings": settings,
    } | ({"submission": submission} if submission is not None else {})
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


class Submission(Base):
    """One imported result bundle: who submitted which drafter, the bundle's sha256, and the maintainer's
    verification of it (`taps-bench verify`; None until then). Its runs (`Run.submission_id`) belong to it alone."""

    __tablename__ = "submissions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    bundle_sha256: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    name: Mapped[str] = mapped_column(String(255), index=True)
    target: Mapped[str] = mapped_column(String(255))
    card: Mapped[dict[str, Any]] = mapped_column(JSON)
    provenance: Mapped[dict[str, Any]] = mapped_column(JSON)
    verification: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    imported_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_utcnow)


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
    # None: measured here. Else the imported bundle it came from; such a run never takes samples from elsewhere.
    submission_id: Mapped[int | None] = mapped_column(ForeignKey("submissions.id"), index=True)
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
SUBMISSION_COLUMNS: tuple[str, ...] = tuple(c.key for c in Submission.__table__.columns)

# What a caller must give `add_sample`; everything else has a default (see `normalise_sample`).
_REQUIRED_SAMPLE_KEYS = ("example_id", "turn", "output_ids", "steps", "total_s", "stop_reason")
# Filled in by the store, not by the caller.
STORE_OWNED = ("id", "run_id", "created_at")


def check_tables(conn: Any, where: str) -> None:
    """Every table of the schema is there: a database whose revision says head but lacks one was damaged by hand."""
    from sqlalchemy import inspect

    from taps_bench.errors import UserError

    missing = sorted(set(Base.metadata.tables) - set(inspect(conn).get_table_names()))
    if missing:
        raise UserError(f"the database {where} is damaged: its table `{missing[0]}` is missing; restore it from a "
                        "backup, or pass --db with another path")


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    # SQLite drops the timezone on the way back; every timestamp we write is UTC. PostgreSQL returns it in the
    # session's time zone, hence the conversion, so that both backends give the same text.
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc).isoformat()


def to_dict(obj: Base, columns: Sequence[str]) -> dict[str, Any]:
    out = {name: getattr(obj, name) for name in columns}
    for name in ("created_at", "updated_at", "imported_at"):
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


