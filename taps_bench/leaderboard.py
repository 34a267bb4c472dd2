"""The static HTML leaderboard: boards (one per target and temperature) computed from the store's raw counters,
rendered with Jinja2 (autoescape on) into self-contained pages (inline CSS, JS and SVG; nothing fetched).

What is shown is declared in `leaderboard/schema.yaml` (metrics with their definitions, the main table's columns,
the drafter pages' columns); published numbers come from `leaderboard/published.yaml` and are always labelled as
such. A row is one proposer with one set of settings (tree, max_new_tokens, checkpoints): runs of the same row on a
task (repeats, or a later larger --limit) are pooled, each paired with its own autoregressive baseline.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import shutil
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from pydantic import BaseModel, ConfigDict

from taps_bench import charts
from taps_bench.combiners import oracle_samples
from taps_bench.metrics import acceptance_by_depth, compare_outputs, speedup, summarize
from taps_bench.registry import PACKAGE_DIR, Registry
from taps_bench.runner import BASELINE_KEYS, decisions
from taps_bench.store import Store, canonical_json

TEMPLATES = PACKAGE_DIR / "templates"


# -- the schema --------------------------------------------------------------------------------------------------


class Metric(BaseModel):
    model_config = ConfigDict(extra="forbid")
    label: str
    compute: str  # a key of metrics.summarize's result, or "speedup"
    better: str  # higher | lower | none
    digits: int = 2
    percent: bool = False
    suffix: str = ""
    definition: str

    def format(self, value: float | None) -> str:
        if value is None:
            return "–"
        if self.percent:
            return f"{100 * value:.{self.digits}f}%"
        return f"{value:.{self.digits}f}{self.suffix}"


class Column(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    label: str
    metric: str
    task: str | None = None  # a task id, or "all" (every task pooled)
    mean_of: list[str] = []  # or: the mean of these columns (None unless all are present)


class Schema(BaseModel):
    model_config = ConfigDict(extra="forbid")
    metrics: dict[str, Metric]
    tasks: list[dict[str, str]]
    columns: list[Column]
    detail_columns: list[str]


def data_dir() -> Path:
    packaged = PACKAGE_DIR / "cards" / "leaderboard"
    return packaged if packaged.is_dir() else PACKAGE_DIR.parent / "leaderboard"


def load_schema() -> Schema:
    schema = Schema.model_validate(yaml.safe_load((data_dir() / "schema.yaml").read_text()))
    for col in schema.columns:
        if col.metric not in schema.metrics:
            raise ValueError(f"schema column {col.id}: unknown metric {col.metric}")
    return schema


# -- boards from the store ---------------------------------------------------------------------------------------


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


@dataclass
class Row:
    name: str
    kind: str  # drafter | combiner | oracle | published
    settings: dict[str, Any]
    tasks: dict[str, TaskResult] = field(default_factory=dict)
    provenance: list[dict[str, Any]] = field(default_factory=list)
    card: dict[str, Any] | None = None
    source: str | None = None  # published rows: where the numbers come from
    published: dict[str, float] = field(default_factory=dict)
    values: dict[str, float | None] = field(default_factory=dict)
    slug: str = ""
    note: str = ""


@dataclass
class Board:
    target: str
    temperature: float
    rows: list[Row]
    published: list[Row]
    hardware: list[str]
    settings: list[str]

    @property
    def slug(self) -> str:
        return slugify(f"{self.target}-T{self.temperature:g}")


def slugify(text: str) -> str:
    """A file-name-safe slug; a short hash keeps names that differ only in punctuation (or markup) apart."""
    base = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48] or "x"
    return f"{base}-{hashlib.sha256(text.encode()).hexdigest()[:6]}"


def _variant(settings: dict[str, Any]) -> dict[str, Any]:
    """What identifies a row beside its proposer: every setting except those shared with the baseline and the
    sampling seed (repeats pool), keeping max_new_tokens (it changes tau)."""
    out = {k: v for k, v in settings.items() if k not in BASELINE_KEYS}
    out["max_new_tokens"] = settings.get("max_new_tokens")
    return out


def _rekey(samples: list[dict[str, Any]], run_id: int) -> list[dict[str, Any]]:
    # Samples of different runs (repeats) are different measurements of the same question: keep them apart.
    return [{**s, "example_id": f"{run_id}:{s['example_id']}"} for s in samples]


def _pool_nodes(samples: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Confidence/entropy of accepted vs rejected draft tokens, pooled over samples (weighted by token counts)."""
    sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])
    for s in samples:
        for key, v in ((s.get("extra") or {}).get("nodes") or {}).items():
            acc = sums[key]
            acc[0] += v["n"]
            acc[1] += v["n"] * v["confidence"]
            acc[2] += v["n"] * v["entropy"]
    return {k: {"n": n, "confidence": c / n, "entropy": e / n} for k, (n, c, e) in sorted(sums.items()) if n}


def _task_result(pairs: list[tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]],
                 greedy: bool) -> TaskResult:
    spec = [s for run, ss, _ in pairs for s in _rekey(ss, run["id"])]
    base = [s for run, _, bs in pairs for s in _rekey(bs, run["id"])]
    summary = summarize(spec)
    if greedy:
        summary["lossless_rate"] = compare_outputs(spec, base)["rate"]
    return TaskResult(summary=summary, speedup=speedup(spec, base), by_depth=acceptance_by_depth(spec),
                      decisions=decisions(spec), nodes=_pool_nodes(spec), runs=[run["id"] for run, _, _ in pairs],
                      samples=spec, baseline=base)


def _drafter_card(reg: Registry | None, name: str, settings: dict[str, Any],
                  provenance: list[dict[str, Any]]) -> dict[str, Any] | None:
    """What the leaderboard knows about a proposer: a submitted card, the model store's card, the registry's."""
    for prov in provenance:
        if prov.get("drafter_card"):
            return dict(prov["drafter_card"])
    checkpoint = str(settings.get("drafter_checkpoint") or "")
    where = Path(checkpoint.split(":", 1)[1]) if checkpoint.startswith(("path:", "built:")) else None
    if where is not None and (where / "card.yaml").is_file():  # a built drafter's card: corpus, steps, losses
        card = yaml.safe_load((where / "card.yaml").read_text())
        return card if isinstance(card, dict) else None
    if reg is not None and name in reg.cards["drafter"]:
        return reg.cards["drafter"][name].model_dump(exclude={"origin"}, mode="json")
    return None


def collect(store: Store, reg: Registry | None = None) -> list[Board]:
    """Every (target, temperature) board with its rows, computed from the stored samples."""
    runs = store.runs()
    baselines = [r for r in runs if r["kind"] == "baseline"]
    groups: dict[tuple[str, float], dict[tuple[str, str], dict[str, list]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list)))
    info: dict[tuple[str, float, str, str], tuple[dict[str, Any], list[dict[str, Any]]]] = {}
    for run in runs:
        if run["kind"] != "speculative" or run["n_samples"] == 0:
            continue
        base = next((b for b in baselines if b["target"] == run["target"] and b["task"] == run["task"]
                     and b["temperature"] == run["temperature"]
                     and all(b["settings"].get(k) == run["settings"].get(k) for k in BASELINE_KEYS)), None)
        variant = canonical_json(_variant(run["settings"]))
        board = (run["target"], run["temperature"])
        groups[board][(run["proposer"], variant)][run["task"]].append(
            (run, store.samples(run["id"]), store.samples(base["id"]) if base else []))
        settings, provs = info.setdefault((*board, run["proposer"], variant), (_variant(run["settings"]), []))
        provs.append(run["provenance"])
    schema = load_schema()
    published = _published()
    boards = []
    for (target, temperature), rows_by_key in sorted(groups.items()):
        rows = []
        labels: dict[str, int] = defaultdict(int)
        for proposer, _ in rows_by_key:
            labels[proposer] += 1
        declared = {t["id"] for t in schema.tasks}
        # Rows with nothing in the declared tasks (e.g. `taps-bench lm-eval` runs, stored as lm-eval:<task>) have
        # no cell in the board; they stay in the database and its exports.
        rows_by_key = {k: v for k, v in rows_by_key.items() if declared & set(v)}
        if not rows_by_key:
            continue
        for (proposer, variant), per_task in rows_by_key.items():
            settings, provs = info[(target, temperature, proposer, variant)]
            row = Row(name=proposer, kind="combiner" if "combiner" in settings else "drafter", settings=settings,
                      provenance=provs, tasks={t: _task_result(p, temperature == 0) for t, p in per_task.items()})
            row.card = _drafter_card(reg, proposer, settings, provs)
            if labels[proposer] > 1:  # one proposer under several settings: say which is which
                row.note = _settings_line(settings)
            rows.append(row)
        rows += _oracle_rows(rows, rows_by_key, temperature)
        for row in rows:
            row.slug = slugify(f"{target}|{temperature}|{row.name}|{row.note}")
            row.values = _values(schema, row)
        provs = [p for r in rows for p in r.provenance]
        hardware = sorted({f"{p.get('device_name', p.get('device', '?'))}, {p.get('threads', '?')} threads, "
                           f"{p.get('dtype', '?')}" for p in provs})
        shown = sorted({_settings_line(r.settings) for r in rows if r.kind != "oracle"})
        pub = [p for p in published if p.name.startswith(f"{target}|{temperature:g}|")]
        boards.append(Board(target, temperature, rows, pub, hardware, shown))
    measured = {(b.target, b.temperature) for b in boards}
    for key, pub in _published_boards(published).items():  # published numbers with nothing measured beside them
        if key not in measured:
            boards.append(Board(key[0], key[1], [], pub, [], []))
    for b in boards:
        for p in b.published:
            p.values = _values(schema, p)
    return boards


def _settings_line(settings: dict[str, Any]) -> str:
    tree = settings.get("tree") or {}
    parts = [f"tree {tree.get('total_tokens')}/{tree.get('depth')}/{tree.get('top_k')}"] if tree else []
    parts.append(f"max {settings.get('max_new_tokens')} new tokens")
    if settings.get("budget"):
        parts.append(f"budget {settings['budget']}")
    return ", ".join(parts)


def _oracle_rows(rows: list[Row], rows_by_key: dict, temperature: float) -> list[Row]:
    """Per question, the best single drafter (analysis only: it needs the answer to choose), over the single
    drafters that share tree and length settings."""
    singles: dict[str, list[tuple[Row, dict[str, list]]]] = defaultdict(list)
    for row, per_task in zip(rows, rows_by_key.values(), strict=True):
        if row.kind == "drafter":
            shared = {k: row.settings.get(k) for k in ("tree", "max_new_tokens", "draft_head_dtype")}
            singles[canonical_json(shared)].append((row, per_task))
    out = []
    for members in singles.values():
        if len(members) < 2:
            continue
        names = [r.name for r, _ in members]
        oracle = Row(name=f"oracle({','.join(names)})", kind="oracle", settings=members[0][0].settings,
                     note="analysis only: picks the best drafter per question after the fact")
        common = set.intersection(*(set(per_task) for _, per_task in members))
        for task in sorted(common):
            chosen, _ = oracle_samples({r.name: [s for run, ss, _ in per_task[task] for s in _rekey(ss, 0)]
                                        for r, per_task in members})
            summary = summarize(chosen)
            oracle.tasks[task] = TaskResult(summary=summary, speedup={"ratio_of_sums": None, "mean_of_ratios": None},
                                            by_depth=acceptance_by_depth(chosen), decisions={}, nodes={}, runs=[])
        if oracle.tasks:
            out.append(oracle)
    return out


def _metric_value(metric: Metric, result: TaskResult) -> float | None:
    if metric.compute == "speedup":
        return result.speedup.get("ratio_of_sums")
    return result.summary.get(metric.compute)


def _values(schema: Schema, row: Row) -> dict[str, float | None]:
    values: dict[str, float | None] = {}
    for col in schema.columns:
        metric = schema.metrics[col.metric]
        if col.mean_of:
            parts = [values.get(c) for c in col.mean_of]
            values[col.id] = sum(parts) / len(parts) if all(p is not None for p in parts) else None  # type: ignore
        elif row.kind == "published":
            values[col.id] = row.published.get(col.task or "") if col.metric == "tau" else None
        elif col.task == "all":
            values[col.id] = _pooled(metric, row) if row.kind != "oracle" or col.metric == "tau" else None
        else:
            result = row.tasks.get(col.task or "")
            values[col.id] = _metric_value(metric, result) if result else None
    return values


def _pooled(metric: Metric, row: Row) -> float | None:
    """A metric over every task of the row at once (speedup: ratio of sums over all matched samples)."""
    if not row.tasks:
        return None
    if metric.compute == "speedup":  # ratio of sums over every matched sample of every task
        spec = [x for r in row.tasks.values() for x in r.samples]
        base = [x for r in row.tasks.values() for x in r.baseline]
        return speedup(spec, base)["ratio_of_sums"] if base else None
    graded = [(r.summary.get(metric.compute), r.summary) for r in row.tasks.values()]
    if metric.compute == "accuracy":
        n = sum(s["n_graded"] for _, s in graded)
        return sum((v or 0) * s["n_graded"] for v, s in graded) / n if n else None
    if metric.compute == "lossless_rate":
        n = sum(s["n_lossless_checked"] for _, s in graded)
        return sum((v or 0) * s["n_lossless_checked"] for v, s in graded) / n if n else None
    return None


# -- published numbers -------------------------------------------------------------------------------------------


def _published() -> list[Row]:
    rows = []
    for table in yaml.safe_load((data_dir() / "published.yaml").read_text()) or []:
        for r in table["rows"]:
            numbers = {k: float(v) for k, v in r.items() if k not in ("name", "drafter")}
            row = Row(name=f"{table['target']}|{float(table['temperature']):g}|{r['name']}", kind="published",
                      settings={}, source=table["source"], published=numbers)
            row.slug = slugify(row.name)
            rows.append(row)
    return rows


def _published_boards(rows: list[Row]) -> dict[tuple[str, float], list[Row]]:
    out: dict[tuple[str, float], list[Row]] = defaultdict(list)
    for row in rows:
        target, temperature, _ = row.name.split("|", 2)
        out[(target, float(temperature))].append(row)
    return out


# -- rendering ---------------------------------------------------------------------------------------------------


def best(schema: Schema, rows: list[Row]) -> dict[str, float]:
    """The best measured value per column (published rows are never compared with measured ones)."""
    out = {}
    for col in schema.columns:
        metric = schema.metrics[col.metric]
        values = [r.values[col.id] for r in rows if r.values.get(col.id) is not None and r.kind != "oracle"]
        # A tie between every row marks nothing (a column of bold 1.00s says nothing about who is best).
        if len(set(values)) > 1 and metric.better in ("higher", "lower") and col.metric not in ("lossless",):
            out[col.id] = max(values) if metric.better == "higher" else min(values)
    return out


def _table_records(schema: Schema, board: Board) -> list[dict[str, Any]]:
    records = []
    for row in [*board.rows, *board.published]:
        name = row.name.split("|", 2)[2] if row.kind == "published" else row.name
        rec = {"target": board.target, "temperature": board.temperature, "name": name, "kind": row.kind,
               "settings": "" if row.kind == "published" else _settings_line(row.settings),
               "source": row.source or "measured"}
        rec |= {c.id: row.values.get(c.id) for c in schema.columns}
        records.append(rec)
    return records


def _detail_records(schema: Schema, board: Board, row: Row) -> list[dict[str, Any]]:
    out = []
    for task, result in sorted(row.tasks.items()):
        rec: dict[str, Any] = {"target": board.target, "temperature": board.temperature, "name": row.name,
                               "task": task}
        for m in schema.detail_columns:
            rec[m] = _metric_value(schema.metrics[m], result)
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


def _charts(schema: Schema, board: Board) -> dict[str, Any]:
    tasks = [t["id"] for t in schema.tasks]
    label = {t["id"]: t["label"] for t in schema.tasks}
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
        pooled = _pool_nodes([{"extra": {"nodes": t.nodes}} for t in r.tasks.values()])
        for drafter in sorted({k.rsplit("/", 1)[0] for k in pooled}):
            group = f"{drafter} in {r.name}" if r.kind == "combiner" else drafter
            for what in ("confidence", "entropy"):
                nodes[what][group] = tuple(pooled.get(f"{drafter}/{s}", {}).get(what)  # type: ignore[assignment]
                                           for s in ("accepted", "rejected"))
    node_charts = [charts.paired_bars(f"Mean draft {what} of accepted vs rejected tokens", groups,
                                      "nats" if what == "entropy" else "")
                   for what, groups in nodes.items() if groups]
    return {"depth": depth, "heatmap": heat, "routing": routing, "nodes": node_charts}


def build(store: Store, out: Path, reg: Registry | None = None, title: str = "taps-bench leaderboard") -> dict:
    """Render the site into `out` (written to a sibling temporary directory, then swapped in: a failed build never
    leaves a half-written site). Returns counts for the CLI."""
    from taps_bench import __version__

    schema = load_schema()
    boards = collect(store, reg)
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=True, undefined=StrictUndefined,
                      trim_blocks=True, lstrip_blocks=True)
    tmp = out.with_name(out.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "drafters").mkdir(parents=True)
    built = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    common = {"schema": schema, "title": title, "built": built, "version": __version__,
              "db": store.url.render_as_string(hide_password=True)}
    views = []
    for board in boards:
        downloads = _write_downloads(tmp / "data", f"board-{board.slug}", _table_records(schema, board))
        views.append({"board": board, "best": best(schema, board.rows), "downloads": downloads,
                      "charts": _charts(schema, board)})
        for row in board.rows:
            details = _write_downloads(tmp / "data", f"drafter-{row.slug}", _detail_records(schema, board, row))
            page = env.get_template("drafter.html").render(
                **common, root="../", board=board, row=row, downloads=details,
                depth=charts.depth_lines("Acceptance by depth, per task", {
                    t: [d["conditional"] for d in r.by_depth] for t, r in sorted(row.tasks.items())}),
                card_yaml=yaml.safe_dump(row.card, sort_keys=False, allow_unicode=True) if row.card else None,
                provenance_json=json.dumps(_unique(row.provenance), indent=1, default=str))
            (tmp / "drafters" / f"{row.slug}.html").write_text(page)
    (tmp / "index.html").write_text(env.get_template("index.html").render(**common, root="", views=views))
    (tmp / "methodology.html").write_text(env.get_template("methodology.html").render(**common, root=""))
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)
    return {"boards": len(boards), "rows": sum(len(b.rows) for b in boards), "out": str(out)}


def _unique(provs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen, out = set(), []
    for p in provs:
        key = canonical_json({k: v for k, v in p.items() if k != "drafter_card"})
        if key not in seen:
            seen.add(key)
            out.append({k: v for k, v in p.items() if k != "drafter_card"})
    return out
