"""What a leaderboard is made of: boards (one per target and temperature), their rows and each row's per-task
results, as plain data (`board` computes them from the store; `labels`, `cards` and `render` read them)."""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from typing import Any

from taps_bench.site.schema import Column, Metric, RowLabel, Task


def finite_number(value: Any) -> float | None:
    """A finite real number from stored data, else None (a bool, a string or a NaN is not a count)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def node_counts(sample: Any) -> list[tuple[str, float, float, float]]:
    """A sample's `extra.nodes` (per drafter, its accepted and its rejected draft tokens: "NAME/accepted") as (key,
    n, mean confidence, mean entropy); malformed entries (stored data comes from bundles too) are left out rather
    than allowed to stop a build."""
    extra = sample.get("extra") if isinstance(sample, dict) else None
    nodes = extra.get("nodes") if isinstance(extra, dict) else None
    out = []
    for key, v in (nodes.items() if isinstance(nodes, dict) else ()):
        n, c, e = (finite_number(v.get(f)) if isinstance(v, dict) else None for f in ("n", "confidence", "entropy"))
        if isinstance(key, str) and n is not None and n > 0 and c is not None and e is not None:
            out.append((key, n, c, e))
    return out


def slugify(text: str) -> str:
    """A file-name-safe slug; a short hash keeps names that differ only in punctuation (or markup) apart."""
    base = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48] or "x"
    return f"{base}-{hashlib.sha256(text.encode()).hexdigest()[:6]}"


@dataclass
class TaskResult:
    summary: dict[str, Any]
    speedup: dict[str, Any]
    by_depth: list[dict[str, Any]]
    decisions: dict[str, float]
    nodes: dict[str, dict[str, float]]
    runs: list[int]
    samples: list[dict[str, Any]] = field(default_factory=list, repr=False)  # rekeyed per run (see _rekey)
    baseline: list[dict[str, Any]] = field(default_factory=list, repr=False)
    # How each of its runs was launched, as far as its stored settings say (site.reproduce rebuilds the command):
    # {"sampling", "device", "dtype", "limit" (the questions it holds)}, one per distinct launch.
    launches: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Row:
    name: str
    kind: str  # drafter | combiner | oracle | published
    settings: dict[str, Any]
    tasks: dict[str, TaskResult] = field(default_factory=dict)
    provenance: list[dict[str, Any]] = field(default_factory=list)
    source: str | None = None  # published rows: where the numbers come from
    published: dict[str, float] = field(default_factory=dict)
    published_metric: str = ""  # the metric the published numbers are of
    published_family: list[str] = field(default_factory=list)  # published rows: their drafters' families, as declared
    values: dict[str, float | RowLabel | None] = field(default_factory=dict)  # RowLabel: the schema's row labels
    intervals: dict[str, list[float] | None] = field(default_factory=dict)  # per column: 95% bootstrap CI, if any
    counts: dict[str, int | None] = field(default_factory=dict)  # per column: the questions its value is from
    slower: bool = False  # a speedup column's whole interval lies below 1.0 (summaries.slower_than_plain)
    slug: str = ""
    note: str = ""
    submission: dict[str, Any] | None = None  # the submissions-table row that owns the row's runs; None: measured here
    standing: str = "measured"  # results.submissions.verified_label of `submission`

    @property
    def ranked_standing(self) -> bool:
        """Whether the row may win a best mark: measured here or verified; a claim nobody re-ran competes with
        nothing."""
        return self.standing == "measured" or self.standing.startswith("verified")


@dataclass
class Board:
    target: str
    temperature: float
    rows: list[Row]
    published: list[Row]
    hardware: list[str]
    settings: list[str]
    columns: list[Column]  # the schema's, plus one per undeclared task of this board's rows
    tasks: list[Task]  # the declared tasks, then the undeclared ones shown

    @property
    def slug(self) -> str:
        return slugify(f"{self.target}-T{self.temperature:g}")


def metric_value(metric: Metric, result: TaskResult) -> float | None:
    """A per-task metric's value in one task's result (the ratio-of-sums speedup, or a key of its summary)."""
    return result.speedup.get("ratio_of_sums") if metric.compute == "speedup" else result.summary.get(metric.compute)


def cell_interval(metric: Metric, result: TaskResult) -> tuple[int | None, list[float] | None]:
    """(n, 95% interval) of a per-task metric's value in one result: the questions it is computed from (a speedup:
    those both arms have) and the bootstrap interval `results.summaries` gave it (`<compute>_ci95` of the summary,
    the speedup's `ci95`), None where it gave none."""
    if metric.compute == "speedup":
        n, ci = result.speedup.get("n"), result.speedup.get("ci95")
    else:
        n, ci = result.summary.get("n_questions"), result.summary.get(f"{metric.compute}_ci95")
    count = finite_number(n)
    bounds = [finite_number(v) for v in ci] if isinstance(ci, (list, tuple)) and len(ci) == 2 else [None]
    interval = [b for b in bounds if b is not None]
    return (int(count) if count is not None and count >= 0 else None), (interval if len(interval) == 2 else None)
