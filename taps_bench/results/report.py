"""Text output for the CLI: aligned tables (`taps-bench show`) and CSV / JSON exports of the store."""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Iterable, Sequence
from typing import Any

from taps_bench.errors import UserError
from taps_bench.results.metrics import summarize
from taps_bench.results.store import Store

EXPORT_FORMATS = ("csv", "json")
EXPORT_WHAT = ("runs", "samples")

# Cells that read as numbers are right-aligned even when preformatted as text (e.g. "85.3%").
_NUMERIC = re.compile(r"^[-+]?(\d[\d,]*)?(\.\d+)?(e[-+]?\d+)?%?x?$", re.IGNORECASE)


def format_value(value: Any) -> str:
    """One table cell: None -> "-", floats with precision that suits their size, everything else str()."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        size = abs(value)
        if size >= 1000:
            return f"{value:.0f}"
        if size >= 100:
            return f"{value:.1f}"
        if 0 < size < 0.01:
            # Two significant digits rather than a misleading "0.00".
            return f"{value:.2g}"
        return f"{value:.2f}"
    return str(value)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A plain aligned text table. `columns` is [(row key, header)]; numbers right-aligned, text left-aligned."""
    headers = [header for _, header in columns]
    cells = [[format_value(row.get(key)) for key, _ in columns] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    right = [bool(cells) and all(r[i] == "-" or _NUMERIC.match(r[i]) for r in cells) for i in range(len(columns))]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if r else v.ljust(w) for v, w, r in zip(values, widths, right, strict=True)]
        return "  ".join(parts).rstrip()

    out = [line(headers), line(["-" * w for w in widths])]
    out += [line(r) for r in cells]
    return "\n".join(out)


def runs_table(store: Store) -> str:
    """`taps-bench show`: one line per run with its headline metrics."""
    runs = store.runs()
    if not runs:
        return f"no runs yet in {store.shown}"
    rows = []
    for run in runs:
        summary = summarize(store.samples(run["id"]))
        accuracy = summary["accuracy"]
        rows.append(
            {
                **run,
                "n": run["n_samples"],
                "tau": summary["tau"],
                "tokens_per_s": summary["tokens_per_s"],
                # A percentage reads better than 0.85 next to tau's 2.90.
                "accuracy": None if accuracy is None else f"{100 * accuracy:.1f}%",
            }
        )
    columns = [
        ("id", "id"),
        ("kind", "kind"),
        ("target", "target"),
        ("task", "task"),
        ("proposer", "proposer"),
        ("temperature", "T"),
        ("n", "samples"),
        ("tau", "tau"),
        ("tokens_per_s", "tok/s"),
        ("accuracy", "accuracy"),
    ]
    return format_table(rows, columns)


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
    """Nested dicts become dotted columns; lists (and empty dicts) become JSON text, which a CSV cell can hold."""
    if isinstance(value, dict) and value:
        for k, v in value.items():
            _flatten(v, f"{prefix}.{k}", out)
    elif isinstance(value, (dict, list, tuple)):
        out[prefix] = json.dumps(value, ensure_ascii=False)
    else:
        out[prefix] = value


def _flat_run(run: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for k, v in run.items():
        if k in ("settings", "provenance"):
            _flatten(v, k, row)
        else:
            row[k] = v
    for k, v in summary.items():
        if k == "acceptance_by_depth":
            # One column per depth and rate, which spreadsheets and pandas can plot directly.
            for d in v:
                row[f"acceptance.d{d['depth']}.conditional"] = d["conditional"]
                row[f"acceptance.d{d['depth']}.unconditional"] = d["unconditional"]
        else:
            _flatten(v, k, row)
    return row


_RUN_FIELDS_IN_SAMPLES = ("key", "kind", "target", "task", "proposer", "temperature", "settings")


def _flat_sample(sample: dict[str, Any], run: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for k, v in sample.items():
        if k == "extra":
            # Proposer diagnostics vary per proposer; one JSON cell keeps the column set stable across runs.
            row[k] = json.dumps(v, ensure_ascii=False)
        else:
            _flatten(v, k, row)
    for k in _RUN_FIELDS_IN_SAMPLES:
        _flatten(run[k], f"run_{k}", row)
    return row


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(value: Any) -> Any:
    """A CSV cell that no spreadsheet runs as a formula (OWASP's CSV injection rule): text starting with = + - @, a
    tab or a carriage return gets a leading single quote. Numbers stay numbers, negative ones too: only text can
    carry a formula, and stored names and settings come from anybody's bundle."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def _to_csv(rows: Iterable[dict[str, Any]]) -> str:
    rows = list(rows)
    # Union of the keys in first-seen order: runs with different settings have different columns.
    fields: dict[str, None] = {}
    for row in rows:
        fields.update(dict.fromkeys(row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(fields), restval="", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if v is None else spreadsheet_safe(v) for k, v in row.items()})
    return buf.getvalue()


def export(store: Store, fmt: str, what: str = "runs", run_ids: Sequence[int] | None = None) -> str:
    """The store as CSV or JSON text.

    what="runs": one record per run, with its summary metrics (JSON: nested under "summary"; CSV: flattened, with
    settings.* / provenance.* / acceptance.d<N>.* columns). what="samples": one record per sample with every
    column (JSON: the run's identity nested under "run"; CSV: run_* columns, list fields as JSON text).
    `run_ids` limits the export to those runs.
    """
    if fmt not in EXPORT_FORMATS:
        raise UserError(f"unknown export format '{fmt}': use one of {', '.join(EXPORT_FORMATS)}")
    if what not in EXPORT_WHAT:
        raise UserError(f"unknown export table '{what}': use one of {', '.join(EXPORT_WHAT)}")
    runs = store.runs()
    if run_ids is not None:
        wanted = set(run_ids)
        missing = wanted - {r["id"] for r in runs}
        if missing:
            raise UserError(f"no run with id {', '.join(map(str, sorted(missing)))} in {store.shown}")
        runs = [r for r in runs if r["id"] in wanted]
    records: list[dict[str, Any]] = []
    for run in runs:
        samples = store.samples(run["id"])
        if what == "runs":
            summary = summarize(samples)
            records.append(_flat_run(run, summary) if fmt == "csv" else {**run, "summary": summary})
        else:
            for s in samples:
                if fmt == "csv":
                    records.append(_flat_sample(s, run))
                else:
                    records.append({**s, "run": {k: run[k] for k in _RUN_FIELDS_IN_SAMPLES}})
    if fmt == "csv":
        return _to_csv(records)
    return json.dumps(records, indent=2, ensure_ascii=False) + "\n"
