"""Reading aids of the leaderboard's pages: every cell's n and 95% interval (hover text and a whisker), what the
filters read off each row, the reproduce commands, and the per-task drill-down pages (one per task of a board:
every row on that task with the per-task metrics, a rank on it, its charts and its commands)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from markupsafe import Markup

from taps_bench.catalog.registry import Registry
from taps_bench.site import calibration, charts
from taps_bench.site.labels import row_labels
from taps_bench.site.reproduce import row_commands, task_commands
from taps_bench.site.rows import Board, Row, cell_interval, finite_number, metric_value, slugify
from taps_bench.site.schema import Column, Metric, RowLabel, Schema
from taps_bench.site.stats import interval_ranks, rank_label, training_corpora


@dataclass(frozen=True)
class Aid:
    """What a cell shows beside its value: the hover text (n and interval) and the whisker."""

    title: str
    whisker: Markup


def chart_name(row: Row) -> str:
    """A row's name as charts show it: unique on its board (a submitted row may share its name with a measured
    one, and one proposer may run under several settings)."""
    name = f"{row.name} [{row.note}]" if row.note and row.kind != "oracle" else row.name
    return f"{name} (submission {row.submission.get('id')})" if row.submission is not None else name


def aid_title(metric: Metric, n: int | None, ci: list[float] | None) -> str | None:
    """"n=12, 95% CI [2.10, 2.45]"; "n=12" where there is no interval; None where neither is known."""
    if n is None and ci is None:
        return None
    text = f"n={n if n is not None else '?'}"
    if ci is not None:
        text += f", 95% CI [{metric.number(ci[0])}, {metric.number(ci[1])}]"
    elif metric.compute in ("tau", "speedup") or metric.of == "board":
        text += ", no interval (it needs at least 2 questions per task)"
    return text


def cell_aids(metrics: dict[str, Metric], cells: dict[tuple[str, str], tuple[Any, int | None, list[float] | None]]
              ) -> dict[tuple[str, str], Aid]:
    """The aid of every (row slug, column) cell from its (value, n, interval); `metrics[column]`: its metric. A
    column's whiskers share one scale: the lowest to the highest bound or value of its cells."""
    scale: dict[str, tuple[float, float]] = {}
    for (_, col), (value, _, ci) in cells.items():
        if ci is not None and (v := finite_number(value)) is not None:
            lo, hi = scale.get(col, (min(ci[0], v), max(ci[1], v)))
            scale[col] = (min(lo, ci[0], v), max(hi, ci[1], v))
    out = {}
    for (slug, col), (value, n, ci) in cells.items():
        metric = metrics[col]
        if metric.compute == "rank":
            if isinstance(value, RowLabel):
                out[(slug, col)] = Aid(f"rank {value.text} of {n} ranked rows: rows whose 95% intervals overlap "
                                       "share a rank", Markup(""))
            continue
        if value is None or (title := aid_title(metric, n, ci)) is None:
            continue
        low, high = scale.get(col, (0.0, 1.0))
        out[(slug, col)] = Aid(title, charts.whisker(finite_number(value), ci, low, high))
    return out


def board_aids(schema: Schema, board: Board) -> dict[tuple[str, str], Aid]:
    metrics = {c.id: schema.metrics[c.metric] for c in board.columns}
    cells = {(r.slug, c.id): (r.values.get(c.id), r.counts.get(c.id), r.intervals.get(c.id))
             for r in board.rows for c in board.columns if schema.metrics[c.metric].of != "row"}
    return cell_aids(metrics, cells)


def filter_keys(row: Row, reg: Registry | None) -> dict[str, str]:
    """What the page's filters match a row by: its drafters' families and training corpora ("|"-joined)."""
    family = row_labels(row, reg)["family"]
    families = family.text.split(" + ") if family is not None else []
    return {"family": "|".join(dict.fromkeys(families)), "training": "|".join(training_corpora(row, reg))}


def filters(views: list[dict[str, Any]]) -> dict[str, list[str]]:
    """The choices of each filter, over every board of the site."""
    keys = [k for v in views for k in v["filter"].values()]
    return {"family": sorted({f for k in keys for f in k["family"].split("|") if f}),
            "training": sorted({t for k in keys for t in k["training"].split("|") if t}),
            "temperature": [str(t) for t in sorted({v["board"].temperature for v in views})]}


def commands(board: Board, reg: Registry | None) -> dict[str, list[str]]:
    return {r.slug: row_commands(r, board.target, reg) for r in board.rows}


# -- the per-task pages -------------------------------------------------------------------------------------------


def task_page(board: Board, task: str) -> str:
    """Where a board's page of one task lives, relative to the site's root."""
    return f"tasks/{slugify(f'{board.target}|{board.temperature}|{task}')}.html"


def task_pages(board: Board) -> dict[str, str]:
    """The tasks of a board that a row measured or published: each gets its page."""
    shown = {t for r in board.rows for t in r.tasks} | {t for p in board.published for t in p.published}
    return {t.id: task_page(board, t.id) for t in board.tasks if t.id in shown}


def task_view(schema: Schema, board: Board, task: str, reg: Registry | None) -> dict[str, Any]:
    """Everything a task page shows: its rows (measured, oracle, then published), each with its per-task values,
    their aids, its rank on the task and its commands; and the task's charts."""
    metrics = {m: schema.metrics[m] for m in schema.detail_columns}
    rows = [r for r in board.rows if task in r.tasks]
    values: dict[tuple[str, str], Any] = {}
    cells: dict[tuple[str, str], tuple[Any, int | None, list[float] | None]] = {}
    for r in rows:
        for m, metric in metrics.items():
            value = metric_value(metric, r.tasks[task])
            n, ci = cell_interval(metric, r.tasks[task])
            values[(r.slug, m)], cells[(r.slug, m)] = value, (value, n, ci)
    ranks = _task_ranks(schema, rows, task)
    published = [(p, p.published[task]) for p in board.published if task in p.published]
    label = next((t.label for t in board.tasks if t.id == task), task)
    return {"task": task, "label": label, "rows": rows, "values": values, "aids": cell_aids(metrics, cells),
            "ranks": ranks, "published": published,
            "commands": {r.slug: task_commands(r, board.target, task, r.tasks[task], reg) for r in rows},
            "charts": _task_charts(rows, task, label)}


def _task_ranks(schema: Schema, rows: list[Row], task: str) -> dict[str, RowLabel]:
    """Each ranked row's rank on this task by its τ and τ's interval (the rank rule of the schema's `rank`)."""
    tau = Metric(label="τ", compute="tau", better="higher", definition="")
    competing = [(r, v, cell_interval(tau, r.tasks[task])[1]) for r in rows
                 if schema.rows.kinds[r.kind].ranked and r.ranked_standing
                 and (v := finite_number(metric_value(tau, r.tasks[task]))) is not None]
    ranks = interval_ranks([(v, ci) for _, v, ci in competing])
    return {r.slug: rank_label(best, worst) for (r, _, _), (best, worst) in zip(competing, ranks, strict=True)}


def _task_charts(rows: list[Row], task: str, label: str) -> dict[str, Any]:
    measured = [r for r in rows if r.kind != "oracle"]
    depth = charts.depth_lines(f"{label}: acceptance by depth", {
        chart_name(r): [d["conditional"] for d in r.tasks[task].by_depth] for r in measured})
    bars = {chart_name(r): r.tasks[task].decisions for r in rows if r.tasks[task].decisions}
    names = sorted({str(n) for shares in bars.values() for n in shares})
    routing = charts.stacked_shares(f"{label}: share of steps per drafter", bars, names) if bars else None
    return {"depth": depth, "routing": routing,
            "calibration": calibration_charts({chart_name(r): r.tasks[task].samples for r in rows})}


def calibration_charts(samples: dict[str, list[dict[str, Any]]]) -> list[Markup]:
    """Acceptance against binned confidence, and against binned entropy, one line per row with stored draft-node
    statistics (the routing combiners and merged trees)."""
    series = {name: pts for name, ss in samples.items() if (pts := calibration.points(ss))}
    if not series:
        return []
    out = []
    for signal, diagonal in (("confidence", True), ("entropy", False)):
        bins, top = calibration.calibration(series, signal)
        out.append(charts.calibration_lines(f"Acceptance vs draft {signal}", bins, top,
                                            f"mean draft {signal}" + (" (nats)" if signal == "entropy" else ""),
                                            diagonal=diagonal))
    return out


def task_records(schema: Schema, board: Board, view: dict[str, Any]) -> list[dict[str, Any]]:
    """A task page's table as its downloads hold it: every value with its n and interval, and the commands."""
    out = []
    for r in view["rows"]:
        rec: dict[str, Any] = {"target": board.target, "temperature": board.temperature, "task": view["task"],
                               "name": r.name, "kind": r.kind, "standing": r.standing,
                               "rank": view["ranks"][r.slug].text if r.slug in view["ranks"] else None}
        for m in schema.detail_columns:
            n, ci = cell_interval(schema.metrics[m], r.tasks[view["task"]])
            rec |= {m: view["values"][(r.slug, m)], f"{m}_n": n, f"{m}_ci_low": ci[0] if ci else None,
                    f"{m}_ci_high": ci[1] if ci else None}
        rec["reproduce"] = "\n".join(view["commands"][r.slug])
        out.append(rec)
    return out


def column_stats(columns: list[Column], row: Row) -> dict[str, Any]:
    """A board row's n and interval per measured column, as the board's downloads hold them."""
    out: dict[str, Any] = {}
    for c in columns:
        ci = row.intervals.get(c.id)
        out |= {f"{c.id}_n": row.counts.get(c.id), f"{c.id}_ci_low": ci[0] if ci else None,
                f"{c.id}_ci_high": ci[1] if ci else None}
    return out
