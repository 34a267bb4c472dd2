"""The static HTML leaderboard: the boards of `site.board` rendered with Jinja2 (autoescape on) into
self-contained pages (inline CSS, JS and SVG; nothing fetched), with CSV and JSON downloads of every table."""

from __future__ import annotations

import csv
import io
import json
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml
from jinja2 import Environment, FileSystemLoader, StrictUndefined

from taps_bench.catalog.registry import Registry
from taps_bench.results.schema import canonical_json
from taps_bench.results.store import Store
from taps_bench.site import charts
from taps_bench.site.board import Board, Row, Schema, collect, load_schema, metric_value, pool_nodes, settings_line

TEMPLATES = Path(__file__).resolve().parent / "templates"


# -- rendering ---------------------------------------------------------------------------------------------------


def best(schema: Schema, board: Board) -> dict[str, float]:
    """The best value per column, over the rows of the kinds the schema ranks (they compete with each other only),
    for the metrics it marks."""
    ranked = [r for r in [*board.rows, *board.published] if schema.rows.kinds[r.kind].ranked]
    out = {}
    for col in board.columns:
        metric = schema.metrics[col.metric]
        values = [v for r in ranked if (v := r.values.get(col.id)) is not None]
        if not values or not metric.mark_best or metric.better == "none":
            continue
        if len(set(values)) > 1 or schema.ranking.mark_all_equal:
            out[col.id] = max(values) if metric.better == "higher" else min(values)
    return out


def _table_records(schema: Schema, board: Board) -> list[dict[str, Any]]:
    records = []
    for row in [*board.rows, *board.published]:
        name = row.name.split("|", 2)[2] if row.kind == "published" else row.name
        rec = {"target": board.target, "temperature": board.temperature, "name": name, "kind": row.kind,
               "settings": "" if row.kind == "published" else settings_line(row.settings),
               "source": row.source or "measured"}
        rec |= {c.id: row.values.get(c.id) for c in board.columns}
        records.append(rec)
    return records


def _detail_records(schema: Schema, board: Board, row: Row) -> list[dict[str, Any]]:
    out = []
    for task, result in sorted(row.tasks.items()):
        rec: dict[str, Any] = {"target": board.target, "temperature": board.temperature, "name": row.name,
                               "task": task}
        for m in schema.detail_columns:
            rec[m] = metric_value(schema.metrics[m], result)
        rec["speedup_mean_of_ratios"] = result.speedup.get("mean_of_ratios")
        rec["runs"] = ",".join(map(str, result.runs))
        out.append(rec)
    return out


def _write_downloads(directory: Path, stem: str, records: list[dict[str, Any]]) -> dict[str, str]:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{stem}.json").write_text(json.dumps(records, indent=1, default=str))
    buf = io.StringIO()
    if records:
        writer = csv.DictWriter(buf, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    (directory / f"{stem}.csv").write_text(buf.getvalue())
    return {"csv": f"data/{stem}.csv", "json": f"data/{stem}.json"}


def _charts(board: Board) -> dict[str, Any]:
    tasks = [t.id for t in board.tasks]
    label = {t.id: t.label for t in board.tasks}
    measured = [r for r in board.rows if r.kind != "oracle"]
    depth = [charts.depth_lines(f"{label.get(t, t)}: acceptance by depth", {
        r.name: [d["conditional"] for d in r.tasks[t].by_depth] for r in measured if t in r.tasks})
        for t in tasks if any(t in r.tasks for r in measured)]
    heat = charts.heatmap("τ by drafter and task", [r.name for r in board.rows], [label[t] for t in tasks],
                          {(r.name, label[t]): r.tasks[t].summary["tau"] for r in board.rows for t in tasks
                           if t in r.tasks})
    routing = []
    for r in board.rows:
        bars = {label.get(t, t): r.tasks[t].decisions for t in tasks if t in r.tasks and r.tasks[t].decisions}
        if bars:
            names = sorted({n for shares in bars.values() for n in shares})
            routing.append(charts.stacked_shares(f"{r.name}: share of steps per drafter", bars, names))
    nodes: dict[str, dict[str, tuple[float | None, float | None]]] = {"confidence": {}, "entropy": {}}
    for r in board.rows:
        pooled = pool_nodes([{"extra": {"nodes": t.nodes}} for t in r.tasks.values()])
        for drafter in sorted({k.rsplit("/", 1)[0] for k in pooled}):
            group = f"{drafter} in {r.name}" if r.kind == "combiner" else drafter
            for what in ("confidence", "entropy"):
                nodes[what][group] = tuple(pooled.get(f"{drafter}/{s}", {}).get(what)  # type: ignore[assignment]
                                           for s in ("accepted", "rejected"))
    node_charts = [charts.paired_bars(f"Mean draft {what} of accepted vs rejected tokens", groups,
                                      "nats" if what == "entropy" else "")
                   for what, groups in nodes.items() if groups]
    return {"depth": depth, "heatmap": heat, "routing": routing, "nodes": node_charts}


def build(store: Store, out: Path, reg: Registry | None = None, title: str = "taps-bench leaderboard",
          schema: Schema | None = None) -> dict:
    """Render the site into `out` (written to a sibling temporary directory, then swapped in: a failed build never
    leaves a half-written site). Returns counts for the CLI. `schema`: the shipped one unless given."""
    from taps_bench import __version__

    schema = schema or load_schema()
    boards = collect(store, schema)
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=True, undefined=StrictUndefined,
                      trim_blocks=True, lstrip_blocks=True)
    tmp = out.with_name(out.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "drafters").mkdir(parents=True)
    built = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    common = {"schema": schema, "value": metric_value, "title": title, "built": built, "version": __version__,
              "db": store.shown}
    views = []
    for board in boards:
        downloads = _write_downloads(tmp / "data", f"board-{board.slug}", _table_records(schema, board))
        views.append({"board": board, "best": best(schema, board), "downloads": downloads,
                      "charts": _charts(board)})
        for row in board.rows:
            card = drafter_card(reg, row)
            details = _write_downloads(tmp / "data", f"drafter-{row.slug}", _detail_records(schema, board, row))
            page = env.get_template("drafter.html").render(
                **common, root="../", board=board, row=row, downloads=details,
                depth=charts.depth_lines("Acceptance by depth, per task", {
                    t: [d["conditional"] for d in r.by_depth] for t, r in sorted(row.tasks.items())}),
                card=card, card_yaml=yaml.safe_dump(card, sort_keys=False, allow_unicode=True) if card else None,
                provenance_json=json.dumps(_unique(row.provenance), indent=1, default=str))
            (tmp / "drafters" / f"{row.slug}.html").write_text(page)
    (tmp / "index.html").write_text(env.get_template("index.html").render(**common, root="", views=views))
    (tmp / "methodology.html").write_text(env.get_template("methodology.html").render(**common, root=""))
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)
    return {"boards": len(boards), "rows": sum(len(b.rows) for b in boards), "out": str(out)}


def drafter_card(reg: Registry | None, row: Row) -> dict[str, Any] | None:
    """What the leaderboard knows about a row's proposer: a submitted card, the model store's card, the registry's.
    Rows with no runs of their own (oracles, published numbers) have no proposer, so no card."""
    if not row.provenance:
        return None
    for prov in row.provenance:
        if prov.get("drafter_card"):
            return dict(prov["drafter_card"])
    checkpoint = str(row.settings.get("drafter_checkpoint") or "")
    where = Path(checkpoint.split(":", 1)[1]) if checkpoint.startswith(("path:", "built:")) else None
    if where is not None and (where / "card.yaml").is_file():  # a built drafter's card: corpus, steps, losses
        card = yaml.safe_load((where / "card.yaml").read_text())
        return card if isinstance(card, dict) else None
    if reg is not None and row.name in reg.cards["drafter"]:
        return reg.cards["drafter"][row.name].model_dump(exclude={"origin"}, mode="json")
    return None


def _unique(provs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen, out = set(), []
    for p in provs:
        key = canonical_json({k: v for k, v in p.items() if k != "drafter_card"})
        if key not in seen:
            seen.add(key)
            out.append({k: v for k, v in p.items() if k != "drafter_card"})
    return out
