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

import hashlib
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from taps_bench.catalog.registry import read_yaml_mapping, validate_yaml
from taps_bench.catalog.submission import SubmissionCard
from taps_bench.errors import UserError
from taps_bench.paths import write_atomic
from taps_bench.results.claims import (
    SPEEDUP_SLACK,
    SPEEDUP_SLACK_UNTIMED,
    TIMED_S,
    ClaimError,
    check_run,
    is_number,
)
from taps_bench.results.metrics import speedup, summarize
from taps_bench.results.pairing import is_baseline_of
from taps_bench.results.schema import RUN_KINDS, SAMPLE_COLUMNS, STORE_OWNED, normalise_sample, run_key
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
    "method": "write one of `method: eagle2`, `method: hass`, `method: eagle3`, `method: other`",
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

MAX_BUNDLE_BYTES = 256 << 20
MAX_NESTING = 32  # deeper JSON is refused before Python's recursion limit can be reached anywhere downstream


def _strict_json(text: str) -> Any:
    """JSON as RFC 8259 defines it: no NaN/Infinity (Python's json accepts them; SQLite's json functions and strict
    readers do not) and no duplicate keys (which would make two readers see two different bundles)."""
    def refuse_constant(name: str) -> Any:
        raise ValueError(f"{name} is not a JSON number")

    def refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in pairs]
        if len(set(keys)) != len(keys):
            raise ValueError(f"duplicate key {next(k for k in keys if keys.count(k) > 1)!r:.40}")
        return dict(pairs)

    return json.loads(text, parse_constant=refuse_constant, object_pairs_hook=refuse_duplicates)


def _nesting(value: Any) -> int:
    """How deeply containers nest in a parsed JSON value (iteratively: no recursion to exhaust)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            deepest = max(deepest, depth)
            if depth > MAX_NESTING:
                return depth
            stack.extend((v, depth + 1) for v in (node.values() if isinstance(node, dict) else node))
    return deepest


def bundle_sha256(raw: bytes) -> str:
    """A bundle's identity: the sha256 of its bytes as submitted."""
    return hashlib.sha256(raw).hexdigest()


def read_bundle(path: Path) -> tuple[dict[str, Any], str]:
    """Load and check one bundle: its format, every field's type, and every claim its counters make about each
    other (`results.claims`, `check_pairs`). Returns (bundle, sha256 of its bytes). Any problem is one UserError
    naming the file and the first failure; nothing is read from any path the bundle names."""

    def bad(what: str) -> UserError:
        return UserError(f"bundle {path}: {what}; nothing was imported")

    try:
        if path.stat().st_size > MAX_BUNDLE_BYTES:
            raise bad(f"larger than {MAX_BUNDLE_BYTES >> 20} MB")
        raw = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read bundle {path}: {exc.strerror or exc}") from None
    try:
        data = _strict_json(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as exc:
        raise bad(f"not valid JSON ({str(exc).splitlines()[0]})") from None
    except RecursionError:
        raise bad(f"nested more than {MAX_NESTING} levels deep") from None
    if _nesting(data) > MAX_NESTING:
        raise bad(f"nested more than {MAX_NESTING} levels deep")
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise bad(f"not a taps-bench result bundle (no \"format\": \"{FORMAT}\")")
    if data.get("version") != VERSION:
        raise bad(f"format version {data.get('version')!r:.40}, this taps-bench reads version {VERSION} (upgrade "
                  "taps-bench, or regenerate the bundle with `taps-bench submit`)")
    try:
        SubmissionCard.model_validate(data.get("submission"))
    except ValidationError as exc:
        err = exc.errors()[0]
        raise bad(f"submission.{'.'.join(map(str, err['loc'])) or '(card)'}: {err['msg']}") from None
    if not isinstance(data.get("provenance"), dict):
        raise bad("`provenance` must be an object")
    runs = data.get("runs")
    if not isinstance(runs, list) or not runs:
        raise bad("`runs` must be a non-empty list")
    for i, run in enumerate(runs):
        try:
            check_run_record(run)
        except (ClaimError, ValueError, TypeError) as exc:
            msg = " ".join(str(exc).split())  # one line, whatever the message
            sep = "" if msg.startswith(".") else "." if msg.startswith("samples[") else ": "
            raise bad(f"runs[{i}]{sep}{msg}") from None
    try:
        check_pairs(runs)
        check_summary(data.get("summary"), runs)
    except ClaimError as exc:
        raise bad(str(exc)) from None
    return data, bundle_sha256(raw)


def check_run_record(run: Any) -> None:
    """One run of a bundle: its fields and types, then its counters (`claims.check_run`)."""
    if not isinstance(run, dict):
        raise ClaimError("is not an object")
    unknown = sorted(set(run) - set(_RUN_FIELDS))
    if unknown:
        raise ClaimError(f"unknown field `{unknown[0]:.40}`")
    for name, kind in _RUN_FIELDS.items():
        if name not in run:
            raise ClaimError(f"missing field `{name}`")
        if not isinstance(run[name], kind) or isinstance(run[name], bool):
            raise ClaimError(f".{name}: expected {getattr(kind, '__name__', 'a number')}, got "
                             f"{type(run[name]).__name__}")
    if run["kind"] not in RUN_KINDS:
        raise ClaimError(f".kind must be one of {', '.join(RUN_KINDS)} (got {run['kind']!r:.40})")
    for name in ("target", "task", "proposer"):
        if not 0 < len(run[name]) <= 255:
            raise ClaimError(f".{name} must be 1 to 255 characters")
    for j, sample in enumerate(run["samples"]):
        if not isinstance(sample, dict):
            raise ClaimError(f"samples[{j}] is not an object")
        owned = [k for k in STORE_OWNED if k in sample]
        if owned:
            raise ClaimError(f"samples[{j}]: fields set by the store, not a bundle: {', '.join(owned)}")
        unknown = sorted(set(sample) - set(SAMPLE_COLUMNS))
        if unknown:
            raise ClaimError(f"samples[{j}]: unknown field `{unknown[0]:.40}`")
        try:
            normalise_sample(sample)  # what the insert will do, so that it cannot fail half-way
        except (ValueError, TypeError) as exc:
            raise ClaimError(f"samples[{j}]: {exc}") from None
    check_run(run)


def check_pairs(runs: list[dict[str, Any]]) -> None:
    """Across runs: each identity once; every speculative run with its baseline in the same bundle, sample for
    sample on the same prompts; at temperature 0 the lossless flags recomputed (and required: `submit` refuses a
    bundle that is not lossless); the speedup within what tau allows."""
    identities = Counter(run_key(r["kind"], r["target"], r["task"], r["proposer"], r["temperature"], r["settings"])
                         for r in runs)
    if max(identities.values()) > 1:
        raise ClaimError("two runs with the same identity (kind, target, task, proposer, temperature, settings)")
    for i, run in enumerate(runs):
        if run["kind"] != "speculative":
            continue
        base = next((b for b in runs if is_baseline_of(b, run)), None)
        if base is None:
            raise ClaimError(f"runs[{i}] (speculative, {run['task']:.40}) has no autoregressive baseline in the "
                             "bundle with the same target, task, temperature and shared settings")
        by_key = {(s["example_id"], s["turn"]): s for s in base["samples"]}
        for j, s in enumerate(run["samples"]):
            ref = by_key.get((s["example_id"], s["turn"]))
            where = f"runs[{i}].samples[{j}]"
            if ref is None:
                raise ClaimError(f"{where}: no baseline sample for example {s['example_id']!r:.40} turn {s['turn']}")
            if (s["prompt_hash"], s["prompt_tokens"]) != (ref["prompt_hash"], ref["prompt_tokens"]):
                raise ClaimError(f"{where}: its prompt differs from the baseline's (prompt_hash/prompt_tokens)")
            if run["temperature"] == 0:
                same = s["output_ids"] == ref["output_ids"]
                if s.get("lossless") is not same:
                    raise ClaimError(f"{where}: lossless is {s.get('lossless')} but the outputs are "
                                     f"{'equal' if same else 'different'}")
                if not same:
                    raise ClaimError(f"{where}: not lossless at temperature 0 (`submit` refuses such a bundle)")
        check_speedup(run, base, f"runs[{i}]")


def check_speedup(run: dict[str, Any], base: dict[str, Any], where: str) -> None:
    tau = summarize(run["samples"])["tau"]
    ratio = speedup(run["samples"], base["samples"])["ratio_of_sums"]
    timed = sum(s["total_s"] for s in base["samples"]) >= TIMED_S
    slack = SPEEDUP_SLACK if timed else SPEEDUP_SLACK_UNTIMED
    if tau is not None and ratio is not None and ratio > tau * slack:
        raise ClaimError(f"{where}: a speedup of {ratio:.3g}x at tau {tau:.3g} is not possible (a verify step "
                         f"costs at least one target forward; allowed up to tau x {slack:g})")


def check_summary(summary: Any, runs: list[dict[str, Any]]) -> None:
    """The bundle's summary is for readers, never imported; still it must say what the counters say."""
    if summary is None:
        return
    if not isinstance(summary, list) or not all(isinstance(r, dict) for r in summary):
        raise ClaimError("`summary` must be a list of objects")
    spec = {r["task"]: r for r in runs if r["kind"] == "speculative"}
    for row in summary:
        run = spec.get(row["task"]) if isinstance(row.get("task"), str) else None
        if run is None:
            raise ClaimError(f"summary row for task {row.get('task')!r:.40} has no speculative run")
        want = summarize(run["samples"])["tau"]
        got = row.get("tau")
        if not (is_number(got) and want is not None and math.isclose(got, want, rel_tol=1e-9)):
            raise ClaimError(f"summary: tau {got!r:.20} for {row['task']:.40} but its counters give {want}")
