"""Result bundles: what `taps-bench submit` (`measure.submission`) writes and `taps-bench import` merges into a
results database.

Why bundles: a contributor measures on their own machine and sends a pull request; maintainers must be able to read
exactly what was measured and merge it into their database. A bundle therefore carries raw samples (never derived
numbers, which `taps_bench.results.metrics` recomputes) under the same run identity the store uses, so importing it
recreates the runs `submit` stored, and importing it again adds nothing.

Format (JSON; `version` is bumped whenever a reader of the old version would misread the new one):

    {"format": "taps-bench-bundle", "version": 1, "created_at": ISO-8601,
     "submission": {the submission card}, "provenance": {provenance.collect()},
     "smoke": {"tasks", "limit", "max_new_tokens", "temperature", "tree"},  # how it was measured, for readers
     "summary": [{"task", "samples", "tau", "speedup", "lossless"}, ...],  # informative only, never imported
     "runs": [{"kind", "target", "task", "proposer", "temperature", "settings", "provenance",
               "samples": [{every Sample column except id, run_id, created_at}, ...]}, ...]}

Each speculative run's provenance holds the submission card under "drafter_card", so that a leaderboard built from
the database can show who submitted the drafter and under which license (provenance never changes a run's identity).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from taps_bench.catalog.cards import SubmissionCard
from taps_bench.catalog.registry import read_yaml_mapping, validate_yaml
from taps_bench.errors import UserError
from taps_bench.paths import write_atomic
from taps_bench.results.schema import RUN_KINDS, STORE_OWNED, normalise_sample, run_key
from taps_bench.results.store import Store

FORMAT = "taps-bench-bundle"
VERSION = 1
_RUN_FIELDS: dict[str, type | tuple[type, ...]] = {
    "kind": str, "target": str, "task": str, "proposer": str, "temperature": (int, float), "settings": dict,
    "provenance": dict, "samples": list,
}

# How to fix each field of a submission card: appended to the one-line error, so nobody has to open the docs.
_CARD_FIXES = {
    "name": "write e.g. `name: my-math-hass` (letters, digits, '.', '_', '-')",
    "method": "write one of `method: eagle2`, `method: hass`, `method: other`",
    "target": "write a registered target, e.g. `target: smollm2-135m-instruct` (see `taps-bench list targets`)",
    "checkpoint": "write `checkpoint: {path: DIR}` (relative to the card) or `checkpoint: {hub: OWNER/REPO}`",
    "training_data": "write e.g. `training_data: MathInstruct, 70k conversations, 20 epochs`",
    "license": "write e.g. `license: Apache-2.0`",
    "authors": "write e.g. `authors: [Ada Lovelace]` (at least one)",
    "links": "write e.g. `links: [https://huggingface.co/OWNER/REPO]`",
    "description": "write one line of text, e.g. `description: HASS drafter for math`",
}


def read_card(path: Path) -> SubmissionCard:
    """Parse and validate a submission card; any problem is one line naming the file, line, field and fix."""
    data, text = read_yaml_mapping(path, "submission card")

    def explain(err: dict[str, Any]) -> str:
        msg = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "missing":
            msg = "missing required field"
        elif err["type"] == "extra_forbidden":
            msg = f"unknown field (known: {', '.join(SubmissionCard.model_fields)})"
        fix = _CARD_FIXES.get(str(err["loc"][0]) if err["loc"] else "", "")
        return msg + (f"; {fix}" if fix else "")

    return validate_yaml(SubmissionCard, data, path, text, "submission card", explain)


def card_json(card: SubmissionCard) -> dict[str, Any]:
    """The card as stored in a bundle (JSON types, unset optional fields left out)."""
    return card.model_dump(mode="json", exclude_none=True)


def run_record(store: Store, run_id: int, drafter_card: dict[str, Any] | None) -> dict[str, Any]:
    run = store.get_run(run_id)
    assert run is not None
    provenance = run["provenance"] | ({"drafter_card": drafter_card} if drafter_card is not None else {})
    samples = [{k: v for k, v in s.items() if k not in STORE_OWNED} for s in store.samples(run_id)]
    return {"kind": run["kind"], "target": run["target"], "task": run["task"], "proposer": run["proposer"],
            "temperature": run["temperature"], "settings": run["settings"], "provenance": provenance,
            "samples": samples}


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write NAME.part, then rename: a killed `submit` never leaves a half-written bundle that looks complete."""
    try:
        write_atomic(path, json.dumps(data, indent=1, ensure_ascii=False, default=str) + "\n")
    except OSError as exc:
        raise UserError(f"cannot write the bundle {path}: {exc.strerror or exc}; pass --out with a writable "
                        "path") from None


# -- import -------------------------------------------------------------------------------------------------------


def read_bundle(path: Path) -> dict[str, Any]:
    """Load and fully validate one bundle. Any problem is one UserError naming the file and where it is wrong."""

    def bad(what: str) -> UserError:
        return UserError(f"bundle {path}: {what}; nothing was imported")

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UserError(f"cannot read bundle {path}: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad(f"not valid JSON ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise bad(f"not a taps-bench result bundle (no \"format\": \"{FORMAT}\")")
    if data.get("version") != VERSION:
        raise bad(f"format version {data.get('version')!r}, this taps-bench reads version {VERSION} (upgrade "
                  "taps-bench, or regenerate the bundle with `taps-bench submit`)")
    try:
        SubmissionCard.model_validate(data.get("submission"))
    except ValidationError as exc:
        err = exc.errors()[0]
        raise bad(f"submission.{'.'.join(map(str, err['loc'])) or '(card)'}: {err['msg']}") from None
    runs = data.get("runs")
    if not isinstance(runs, list) or not runs:
        raise bad("`runs` must be a non-empty list")
    for i, run in enumerate(runs):
        if not isinstance(run, dict):
            raise bad(f"runs[{i}] is not an object")
        unknown = sorted(set(run) - set(_RUN_FIELDS))
        if unknown:
            raise bad(f"runs[{i}]: unknown field `{unknown[0]}`")
        for name, kind in _RUN_FIELDS.items():
            if name not in run:
                raise bad(f"runs[{i}]: missing field `{name}`")
            if not isinstance(run[name], kind) or isinstance(run[name], bool):
                raise bad(f"runs[{i}].{name}: expected {getattr(kind, '__name__', 'a number')}, got "
                          f"{type(run[name]).__name__}")
        if run["kind"] not in RUN_KINDS:
            raise bad(f"runs[{i}].kind must be one of {', '.join(RUN_KINDS)} (got {run['kind']!r})")
        for j, sample in enumerate(run["samples"]):
            if not isinstance(sample, dict):
                raise bad(f"runs[{i}].samples[{j}] is not an object")
            owned = [k for k in STORE_OWNED if k in sample]
            try:
                if owned:
                    raise ValueError(f"fields set by the store, not a bundle: {', '.join(owned)}")
                normalise_sample(sample)  # exactly what store.add_sample will check, so the merge cannot fail half-way
            except (ValueError, TypeError) as exc:
                reason = " ".join(str(exc).split())  # one line, whatever the message
                raise bad(f"runs[{i}].samples[{j}]: {reason}") from None
    return data


@dataclass
class ImportCounts:
    bundles: int = 0
    runs_new: int = 0
    runs_existing: int = 0
    samples_added: int = 0
    samples_present: int = 0


def merge_bundles(store: Store, bundles: list[dict[str, Any]]) -> ImportCounts:
    """Merge already validated bundles (see `read_bundle`): same run identity, idempotent sample inserts."""
    counts = ImportCounts(bundles=len(bundles))
    known = {r["key"] for r in store.runs()}
    for data in bundles:
        for run in data["runs"]:
            identity = (run["kind"], run["target"], run["task"], run["proposer"], run["temperature"], run["settings"])
            key = run_key(*identity)
            if key in known:
                counts.runs_existing += 1
            else:
                counts.runs_new += 1
                known.add(key)
            run_id = store.get_or_create_run(*identity, run["provenance"])
            done = set(store.done(run_id))
            for sample in run["samples"]:
                at = (str(sample["example_id"]), int(sample["turn"]))
                if at in done:
                    counts.samples_present += 1
                    continue
                store.add_sample(run_id, sample)
                done.add(at)
                counts.samples_added += 1
    return counts
