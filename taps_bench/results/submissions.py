"""Imported submissions in the store: each bundle is one `submissions` row that owns its runs, written in one
transaction, and later the maintainer's verification of it.

Why a namespace: a bundle is a set of claims by somebody else. Its runs get identity keys that include the bundle's
sha256 (`schema.run_key(..., submission=...)`), so no bundle can add samples to a run measured here or imported
from another bundle, and its speculative runs pair only with its own baselines (`pairing.is_baseline_of`).
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import select

from taps_bench.results.schema import (
    SUBMISSION_COLUMNS,
    Run,
    Sample,
    Submission,
    canonical_json,
    normalise_sample,
    run_key,
    to_dict,
)
from taps_bench.results.store import Store


def submissions(store: Store) -> list[dict[str, Any]]:
    """Every imported submission, oldest first, as dicts with every column."""
    with store.session() as s:
        return [to_dict(row, SUBMISSION_COLUMNS) for row in s.scalars(select(Submission).order_by(Submission.id))]


def by_hash(store: Store, bundle_sha256: str) -> dict[str, Any] | None:
    with store.session() as s:
        row = s.scalars(select(Submission).where(Submission.bundle_sha256 == bundle_sha256)).one_or_none()
        return to_dict(row, SUBMISSION_COLUMNS) if row is not None else None


def by_name(store: Store, name: str) -> list[dict[str, Any]]:
    with store.session() as s:
        rows = s.scalars(select(Submission).where(Submission.name == name).order_by(Submission.id))
        return [to_dict(row, SUBMISSION_COLUMNS) for row in rows]


def insert(store: Store, bundle_sha256: str, card: dict[str, Any], provenance: dict[str, Any],
           runs: list[dict[str, Any]]) -> int:
    """Store one checked bundle (its submission row, runs and samples) in ONE transaction: a failure anywhere leaves
    the database as it was. `runs` are bundle run records (see `results.bundle`). Returns the submission's id."""
    with store.session() as s, s.begin():
        sub = Submission(bundle_sha256=bundle_sha256, name=str(card["name"]), target=str(card["target"]),
                         card=json.loads(canonical_json(card)), provenance=json.loads(canonical_json(provenance)),
                         verification=None)
        s.add(sub)
        s.flush()
        for run in runs:
            settings = json.loads(canonical_json(run["settings"]))
            row = Run(key=run_key(run["kind"], run["target"], run["task"], run["proposer"], run["temperature"],
                                  settings, submission=bundle_sha256),
                      kind=run["kind"], target=run["target"], task=run["task"], proposer=run["proposer"],
                      temperature=float(run["temperature"]), settings=settings,
                      provenance=json.loads(canonical_json(run["provenance"])), submission_id=sub.id)
            s.add(row)
            s.flush()
            for sample in run["samples"]:
                s.add(Sample(run_id=row.id, **normalise_sample(sample)))
        return sub.id


def record_verification(store: Store, submission_id: int, result: dict[str, Any]) -> None:
    """Keep the newest `taps-bench verify` result with its submission (with the time it was checked)."""
    result = json.loads(canonical_json({**result, "at": datetime.now(timezone.utc).isoformat()}))
    with store.session() as s, s.begin():
        row = s.get(Submission, submission_id)
        if row is None:
            raise ValueError(f"no submission with id {submission_id}")
        row.verification = result


def verified_label(submission: dict[str, Any] | None) -> str:
    """How the leaderboard names a row's standing: measured here, or a submission verified / failed / unverified."""
    if submission is None:
        return "measured"
    check = submission.get("verification")
    if not check:
        return "unverified"
    if not check.get("passed"):
        return "verification failed"
    return f"verified ({check.get('prompts_rerun', 0)} prompts re-run)"
