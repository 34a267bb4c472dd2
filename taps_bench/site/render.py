"""The static HTML leaderboard: the boards of `site.board` rendered with Jinja2 (autoescape on) into
self-contained pages (inline CSS, JS and SVG; nothing fetched), with CSV and JSON downloads of every table."""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml
from jinja2 import Environment, FileSystemLoader, StrictUndefined

from taps_bench.catalog.registry import Registry
from taps_bench.results.report import spreadsheet_safe
from taps_bench.results.schema import canonical_json
from taps_bench.results.store import Store
from taps_bench.site import charts
from taps_bench.site.board import (
    Board,
    Row,
    RowLabel,
    Schema,
    collect,
    load_schema,
    metric_value,
    pool_nodes,
    settings_line,
)
from taps_bench.site.cards import drafter_card
from taps_bench.site.drilldown import (
    board_aids,
    calibration_charts,
    chart_name,
    column_stats,
    commands,
    filter_keys,
    filters,
    task_pages,
    task_records,
    task_view,
)
from taps_bench.site.publish import SiteFiles, publish
from taps_bench.site.redact import redact, redact_text
from taps_bench.site.reproduce import row_commands
from taps_bench.site.rows import slugify

TEMPLATES = Path(__file__).resolve().parent / "templates"
MAX_SHOWN_JSON = 50_000  # characters of stored settings or provenance shown on a page


# -- rendering ---------------------------------------------------------------------------------------------------


def best(schema: Schema, board: Board) -> dict[str, float]:
    """The best value per column, over the rows of the kinds the schema ranks (they compete with each other only),
    for the metrics it marks."""
    ranked = [r for r in [*board.rows, *board.published] if schema.rows.kinds[r.kind].ranked and r.ranked_standing]
    out = {}
    for col in board.columns:
        metric = schema.metrics[col.metric]
        values = [v for r in ranked if (v := r.values.get(col.id)) is not None]
        if not values or not metric.mark_best or metric.better == "none":
            continue
        if len(set(values)) > 1 or schema.ranking.mark_all_equal:
            out[col.id] = max(values) if metric.better == "higher" else min(values)
    return out


def _table_records(schema: Schema, board: Board, reg: Registry | None = None) -> list[dict[str, Any]]:
    records = []
    measured = [c for c in board.columns if schema.metrics[c.metric].of != "row"]
    for row in [*board.rows, *board.published]:
        name = row.name.split("|", 2)[2] if row.kind == "published" else row.name
        rec = {"target": board.target, "temperature": board.temperature, "name": name, "kind": row.kind,
               "settings": "" if row.kind == "published" else settings_line(row.settings),
               "source": row.source or "measured", "standing": "published" if row.kind == "published"
               else row.standing}
        rec |= {c.id: _cell(row.values.get(c.id)) for c in board.columns}
        rec |= column_stats(measured, row)  # each number's n and 95% interval
        rec["reproduce"] = "\n".join(row_commands(row, board.target, reg))
        records.append(rec)
    return records


def _cell(value: float | RowLabel | None) -> float | str | None:
    """A table cell as the downloads hold it: a row label as the text the page shows, a number as it is."""
    return value.text if isinstance(value, RowLabel) else value


def _detail_records(schema: Schema, board: Board, row: Row) -> list[dict[str, Any]]:
    out = []
    for task, result in sorted(row.tasks.items()):
        rec: dict[str, Any] = {"target": board.target, "temperature": board.temperature, "name": row.name,
                               "standing": row.standing, "task": task}
        for m in schema.detail_columns:
            rec[m] = metric_value(schema.metrics[m], result)
        rec["speedup_mean_of_ratios"] = result.speedup.get("mean_of_ratios")
        rec["runs"] = ",".join(map(str, result.runs))
        out.append(rec)
    return out


def _write_downloads(files: SiteFiles, stem: str, records: list[dict[str, Any]]) -> dict[str, str]:
    files.write(f"data/{stem}.json", json.dumps(records, indent=1, default=str))
    buf = io.StringIO()
    if records:
        writer = csv.DictWriter(buf, fieldnames=list(records[0]))
        writer.writeheader()
        # Names and settings come from anybody's bundle: no cell may open as a spreadsheet formula.
        writer.writerows({k: spreadsheet_safe(v) for k, v in rec.items()} for rec in records)
    files.write(f"data/{stem}.csv", buf.getvalue())
    return {"csv": f"data/{stem}.csv", "json": f"data/{stem}.json"}


def _shown_json(value: Any) -> str:
    """Stored JSON for a <pre>: any value survives (default=str), and a huge one is cut rather than published."""
    text = json.dumps(value, indent=1, default=str, ensure_ascii=False)
    return text if len(text) <= MAX_SHOWN_JSON else text[:MAX_SHOWN_JSON] + "\n… (cut: over 50,000 characters)"


def _charts(board: Board) -> dict[str, Any]:
    tasks = [t.id for t in board.tasks]
    label = {t.id: t.label for t in board.tasks}
    measured = [r for r in board.rows if r.kind != "oracle"]
    depth = [charts.depth_lines(f"{label.get(t, t)}: acceptance by depth", {
        chart_name(r): [d["conditional"] for d in r.tasks[t].by_depth] for r in measured if t in r.tasks})
        for t in tasks if any(t in r.tasks for r in measured)]
    heat = charts.heatmap("τ by drafter and task", [chart_name(r) for r in board.rows], [label[t] for t in tasks],
                          {(chart_name(r), label[t]): r.tasks[t].summary["tau"] for r in board.rows for t in tasks
                           if t in r.tasks})
    routing = []
    for r in board.rows:
        bars = {label.get(t, t): r.tasks[t].decisions for t in tasks if t in r.tasks and r.tasks[t].decisions}
        if bars:
            names = sorted({str(n) for shares in bars.values() for n in shares})
            routing.append(charts.stacked_shares(f"{chart_name(r)}: share of steps per drafter", bars, names))
    calib = calibration_charts({chart_name(r): [s for t in r.tasks.values() for s in t.samples]
                                for r in board.rows if r.kind != "oracle"})
    return {"depth": depth, "heatmap": heat, "routing": routing, "nodes": _node_charts(board), "calibration": calib}


def _node_charts(board: Board) -> list[Any]:
    nodes: dict[str, dict[str, tuple[float | None, float | None]]] = {"confidence": {}, "entropy": {}}
    for r in board.rows:
        pooled = pool_nodes([{"extra": {"nodes": t.nodes}} for t in r.tasks.values()])
        for drafter in sorted({k.rsplit("/", 1)[0] for k in pooled}):
            plain = r.kind == "drafter" and chart_name(r) == r.name
            group = drafter if plain else f"{drafter} in {chart_name(r)}"
            for what in ("confidence", "entropy"):
                nodes[what][group] = tuple(pooled.get(f"{drafter}/{s}", {}).get(what)  # type: ignore[assignment]
                                           for s in ("accepted", "rejected"))
    return [charts.paired_bars(f"Mean draft {what} of accepted vs rejected tokens", groups,
                               "nats" if what == "entropy" else "")
            for what, groups in nodes.items() if groups]


def build(store: Store, out: Path, reg: Registry | None = None, title: str = "taps-bench leaderboard",
          schema: Schema | None = None, warn: Callable[[str], None] | None = None,
          studies: dict[str, str] | None = None) -> dict:
    """Render the site into `out` (see `site.publish`: into a temporary directory first, then swapped in; a
    directory that is not an earlier site is refused; a failed build leaves the previous site as it was). Returns
    counts for the CLI. `schema`: the shipped one unless given. `warn`: where a row's unavailable card is reported
    (one line each; stderr unless given). `studies`: finished pages (a matrix's name -> the HTML of its
    `taps-bench report`), published as `studies/<slug>.html` and linked from every page's header."""
    schema = schema or load_schema()
    boards: list[Board] = []

    def render(files: SiteFiles) -> None:
        boards.extend(collect(store, schema, reg))
        _render(files, boards, schema, reg, title, warn or _stderr, studies or {})

    publish(out, render)
    return {"boards": len(boards), "rows": sum(len(b.rows) for b in boards), "out": str(out)}


def _stderr(message: str) -> None:
    print(f"taps-bench: warning: {message}", file=sys.stderr)


def _render(files: SiteFiles, boards: list[Board], schema: Schema, reg: Registry | None, title: str,
            warn: Callable[[str], None], studies: dict[str, str]) -> None:
    from taps_bench import __version__

    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=True, undefined=StrictUndefined,
                      trim_blocks=True, lstrip_blocks=True)
    built = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    # No database URL and no local path on any page (the site is published): stored data is shown redacted.
    pages = [(name, f"studies/{slugify(name)}.html") for name in sorted(studies)]
    for name, path in pages:
        files.write(path, studies[name])  # rendered and escaped by the report's own template
    common = {"schema": schema, "value": metric_value, "title": title, "built": built, "version": __version__,
              "studies": pages}
    views = []
    for board in boards:
        downloads = _write_downloads(files, f"board-{board.slug}", _table_records(schema, board, reg))
        view = {"board": board, "best": best(schema, board), "downloads": downloads, "charts": _charts(board),
                "aids": board_aids(schema, board), "commands": commands(board, reg), "pages": task_pages(board),
                "hardware": [redact_text(h) for h in board.hardware],
                "filter": {r.slug: filter_keys(r, reg) for r in [*board.rows, *board.published]}}
        views.append(view)
        for row in board.rows:
            card, unavailable = drafter_card(reg, row)
            if unavailable:
                warn(f"{board.target}, T={board.temperature:g}, row {row.name!r}: card unavailable: {unavailable}")
            card = redact(card) if card else card
            details = _write_downloads(files, f"drafter-{row.slug}", _detail_records(schema, board, row))
            page = env.get_template("drafter.html").render(
                **common, root="../", board=board, row=row, downloads=details, commands=view["commands"][row.slug],
                pages=view["pages"], depth=charts.depth_lines("Acceptance by depth, per task", {
                    t: [d["conditional"] for d in r.by_depth] for t, r in sorted(row.tasks.items())}),
                card=card, card_unavailable=bool(unavailable),
                card_yaml=yaml.safe_dump(card, sort_keys=False, allow_unicode=True) if card else None,
                settings_json=_shown_json(redact(row.settings)),
                provenance_json=_shown_json(redact(_unique(row.provenance))))
            files.write(f"drafters/{row.slug}.html", page)
        for task, path in view["pages"].items():
            tv = task_view(schema, board, task, reg)
            stem = path.removeprefix("tasks/").removesuffix(".html")
            page = env.get_template("task.html").render(
                **common, root="../", board=board, view=view, tv=tv,
                downloads=_write_downloads(files, f"task-{stem}", task_records(schema, board, tv)))
            files.write(path, page)
    files.write("index.html", env.get_template("index.html").render(**common, root="", views=views,
                                                                     filters=filters(views)))
    files.write("methodology.html", env.get_template("methodology.html").render(**common, root=""))


def _unique(provs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen, out = set(), []
    for p in provs:
        key = canonical_json({k: v for k, v in p.items() if k != "drafter_card"})
        if key not in seen:
            seen.add(key)
            out.append({k: v for k, v in p.items() if k != "drafter_card"})
    return out
