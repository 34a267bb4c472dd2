"""The leaderboard's schema (`leaderboard/schema.yaml`) as validated pydantic models: metrics, tasks, columns,
row rules and ranking. `site.board` interprets it; a misspelt field or an unknown name is refused when loading."""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, model_validator

from taps_bench.paths import shipped_dir

KINDS = ("drafter", "combiner", "oracle", "published")  # the rows collect() makes; the schema says how each is treated
ROW_LABELS = ("family", "draft_vocab")  # what a row label (`of: row`) may compute: see site.board.row_labels
# What a board statistic (`of: board`) may compute, from the values and samples of the board's rows: see site.stats.
BOARD_STATS = ("rank", "specialisation_gap", "router_regret")


@dataclass(frozen=True)
class RowLabel:
    """A row label's cell: the text shown, and the number its column sorts by (None: sorts last).

    The board page writes str() of every cell's value into `data-value`, which its sorting script reads as a number
    (text in it would sort nothing), so str() is the sort key here and `Metric.format` shows the text."""

    text: str
    sort: float | None = None

    def __str__(self) -> str:
        if self.sort is None:
            return ""
        return "Infinity" if self.sort == math.inf else repr(self.sort)  # what JavaScript's parseFloat reads


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field in the schema is an error, not a silent default


class Pool(Strict):  # how a metric is computed over every task of a row at once (the `task: all` columns)
    over: Literal["samples"] | None = None  # once over every sample of every task, as if they were one task
    weighted_by: str | None = None  # or: the per-task values' mean, weighted by this counter of each task's summary

    @model_validator(mode="after")
    def _one_way(self) -> Pool:
        if (self.over is None) == (self.weighted_by is None):
            raise ValueError("a pool is either `over: samples` or `weighted_by: <summary counter>`")
        return self


class Metric(Strict):
    label: str
    compute: str  # a key of metrics.summarize's result, or "speedup"; ROW_LABELS of a row label; BOARD_STATS of `board`
    # "samples": computed from a task's stored samples; "row": a label of the row's proposer (its drafter family, its
    # draft vocabulary), read from the row's stored settings and card, the same on every task; "board": a statistic
    # of the row among the board's rows (its rank, its specialisation gap, its router regret; see site.stats), whose
    # column names with `by` what it is computed from.
    of: Literal["samples", "row", "board"] = "samples"
    better: Literal["higher", "lower", "none"]
    digits: int = 2
    percent: bool = False
    signed: bool = False  # shown with its sign (+0.52): a difference
    suffix: str = ""
    pool: Pool | None = None  # None: not shown on `task: all` columns
    mark_best: bool = True  # only where `better` is higher or lower
    definition: str

    @model_validator(mode="after")
    def _label(self) -> Metric:
        if self.of == "row":
            if self.compute not in ROW_LABELS:
                raise ValueError(f"a row label computes one of {', '.join(ROW_LABELS)}, not {self.compute}")
            if self.better != "none" or self.pool is not None:
                raise ValueError(f"row label {self.compute} is no measure: it takes `better: none` and no pool")
        if self.of == "board":
            if self.compute not in BOARD_STATS:
                raise ValueError(f"a board statistic computes one of {', '.join(BOARD_STATS)}, not {self.compute}")
            if self.pool is not None:
                raise ValueError(f"board statistic {self.compute} is no per-task metric: it takes no pool")
        return self

    def format(self, value: float | RowLabel | None) -> str:
        if value is None:
            return "–"
        if isinstance(value, RowLabel):
            return value.text
        if self.percent:
            return f"{100 * value:.{self.digits}f}%"
        return f"{value:{'+' if self.signed else ''}.{self.digits}f}{self.suffix}"

    def number(self, value: float) -> str:
        """A number in this metric's digits and scale, without suffix or sign (an interval's bounds)."""
        return f"{100 * value:.{self.digits}f}" if self.percent else f"{value:.{self.digits}f}"


class Task(Strict):
    id: str
    label: str
    domain: str | None = None  # the training domain whose task it is (the specialisation gap), e.g. math or chat


class Column(Strict):
    id: str
    label: str
    metric: str
    task: str | None = None  # a task id, or "all" (every task pooled); neither this nor mean_of for a row label
    mean_of: list[str] = []  # or: the mean of these columns (None unless all are present)
    # A board statistic's source: for `rank`, an earlier measured column (rows are ranked by it); for
    # `specialisation_gap` and `router_regret`, the per-task metric they compare.
    by: str | None = None


class OtherTasks(Strict):  # tasks in the store that the schema does not declare: a column of `metric` each
    metric: str
    exclude: list[str] = []  # shell-style patterns of tasks no board shows

    def excluded(self, task: str) -> bool:
        return any(fnmatch.fnmatchcase(task, pattern) for pattern in self.exclude)


class RowKind(Strict):
    ranked: bool  # whether its values compete for the best marks
    pooled: list[str] | None = None  # metrics shown on `task: all` columns (None: all); published rows show none


class Rows(Strict):
    keep: list[str]  # settings shared with the baseline that still tell rows apart
    kinds: dict[str, RowKind]
    # false: rows of submitted runs show only once `taps-bench verify` passed them (failed ones are hidden too)
    show_unverified: bool = True


class Ranking(Strict):
    mark_all_equal: bool  # whether a column where every ranked row holds the same value marks them all


class Schema(Strict):
    metrics: dict[str, Metric]
    tasks: list[Task]
    other_tasks: OtherTasks
    rows: Rows
    ranking: Ranking
    columns: list[Column]
    detail_columns: list[str]
    # A training corpus's domain where the registry has no card of it (a corpus card's `domain` wins): with the tasks'
    # `domain`, it says which tasks are a drafter's own (the specialisation gap).
    corpus_domains: dict[str, str] = {}

    @model_validator(mode="after")
    def _consistent(self) -> Schema:
        # A typo in the schema would otherwise show up as a silently empty column (or a KeyError mid-build).
        tasks, seen = {t.id for t in self.tasks}, set()
        for col in self.columns:
            if col.metric not in self.metrics:
                raise ValueError(f"schema column {col.id}: unknown metric {col.metric}")
            metric = self.metrics[col.metric]
            if metric.of != "board" and col.by is not None:
                raise ValueError(f"schema column {col.id}: only a board statistic takes `by`")
            if metric.of == "row":  # one value per row: there is no task to read or average
                if col.task is not None or col.mean_of:
                    raise ValueError(f"schema column {col.id}: row label {col.metric} takes no task and no mean_of")
                continue  # and is no column a mean may average (`seen` holds the measured ones)
            if metric.of == "board":
                self._board_stat(col, metric, seen)
                continue
            if col.task is not None and col.task != "all" and col.task not in tasks:
                raise ValueError(f"schema column {col.id}: unknown task {col.task}")
            if bool(col.mean_of) == (col.task is not None) or not set(col.mean_of) <= seen:
                raise ValueError(f"schema column {col.id}: needs a task or the mean of earlier columns")
            seen.add(col.id)
        if set(self.rows.kinds) != set(KINDS):
            raise ValueError(f"schema rows.kinds: must declare exactly {', '.join(KINDS)}")
        named = [*self.detail_columns, self.other_tasks.metric, *(m for k in self.rows.kinds.values()
                                                                   for m in k.pooled or [])]
        if unknown := sorted(set(named) - set(self.metrics)):
            raise ValueError(f"schema: unknown metrics {', '.join(unknown)}")
        # Those are computed per task from samples; a row label has no per-task value.
        for of, what in (("row", "row labels"), ("board", "board statistics")):
            if labels := sorted({m for m in named if self.metrics[m].of == of}):
                raise ValueError(f"schema: {what} {', '.join(labels)} are no per-task metric (detail_columns, "
                                 "other_tasks, pooled)")
        return self

    def _board_stat(self, col: Column, metric: Metric, seen: set[str]) -> None:
        if col.task is not None or col.mean_of or col.by is None:
            raise ValueError(f"schema column {col.id}: board statistic {col.metric} takes `by` and no task or mean_of")
        if metric.compute == "rank":
            ranked = next((c for c in self.columns if c.id == col.by), None)
            if col.by not in seen or ranked is None or self.metrics[ranked.metric].better == "none":
                raise ValueError(f"schema column {col.id}: ranks by an earlier measured column with a `better` "
                                 f"direction, not {col.by}")
        elif col.by not in self.metrics or self.metrics[col.by].of != "samples":
            raise ValueError(f"schema column {col.id}: {metric.compute} compares a per-task metric, not {col.by}")

    def shows_pooled(self, kind: str, metric: str) -> bool:
        """Whether rows of this kind show this metric on the `task: all` columns (where the metric has a pool)."""
        shown = self.rows.kinds[kind].pooled
        return shown is None or metric in shown

    def columns_for(self, tasks: set[str]) -> tuple[list[Column], list[Task]]:
        """A board's columns and charts' tasks: the declared ones, plus one per undeclared task of its rows."""
        declared = [t.id for t in self.tasks]
        others = sorted(t for t in tasks if t not in declared and not self.other_tasks.excluded(t))
        taken, extra = {c.id for c in self.columns}, []
        for task in others:
            cid = f"{self.other_tasks.metric}_{task}"
            while cid in taken:  # a task named like a column (e.g. "avg"): its values must not overwrite that one's
                cid += "_"
            taken.add(cid)
            extra.append(Column(id=cid, label=task, metric=self.other_tasks.metric, task=task))
        at = max((i + 1 for i, c in enumerate(self.columns) if c.task in declared), default=0)
        return self.columns[:at] + extra + self.columns[at:], self.tasks + [Task(id=t, label=t) for t in others]


def data_dir() -> Path:
    return shipped_dir("leaderboard")


def load_schema(path: Path | None = None) -> Schema:
    """The shipped schema, or the one at `path` (validated either way)."""
    return Schema.model_validate(yaml.safe_load((path or data_dir() / "schema.yaml").read_text()))
