"""The leaderboard's boards (one per target and temperature), computed from the store's raw counters only.

What is shown, and by which rules, is declared in `leaderboard/schema.yaml` (metrics, how each pools over tasks and
is marked best, columns, which row kinds are ranked, what splits rows, which tasks are left out): this module only
interprets it. Published numbers (`leaderboard/published.yaml`) are always labelled as such. Runs of one row on a
task (repeats, or a later larger --limit) are pooled, each paired with its own autoregressive baseline. Row labels
(`of: row` in the schema: drafter family, draft vocabulary) come from each row's stored settings and card."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from typing import Any

import yaml

from taps_bench.catalog.registry import Registry
from taps_bench.results.metrics import acceptance_by_depth, summarize
from taps_bench.results.oracle import oracle_samples
from taps_bench.results.pairing import BASELINE_KEYS
from taps_bench.results.schema import canonical_json
from taps_bench.results.store import Store
from taps_bench.results.submissions import submissions, verified_label
from taps_bench.results.summaries import summarize_pair, tau_interval
from taps_bench.site.labels import row_labels
from taps_bench.site.rows import (
    Board,
    Row,
    TaskResult,
    cell_interval,
    metric_value,
    node_counts,
    slugify,
)
from taps_bench.site.schema import (  # noqa: F401  (re-exported: callers import the schema from here)
    KINDS,
    Column,
    Metric,
    RowLabel,
    Schema,
    Task,
    data_dir,
    load_schema,
)
from taps_bench.site.stats import derive, mean_interval


def row_identity(schema: Schema, settings: dict[str, Any]) -> dict[str, Any]:
    """What tells runs of one proposer apart: all settings but the baseline's (seeds pool), plus `rows.keep`."""
    out = {k: v for k, v in settings.items() if k not in BASELINE_KEYS}
    return out | {k: settings.get(k) for k in schema.rows.keep}


# -- boards from the store ---------------------------------------------------------------------------------------


def _rekey(samples: list[dict[str, Any]], run_id: int) -> list[dict[str, Any]]:
    # Samples of different runs (repeats) are different measurements of the same question: keep them apart.
    return [{**s, "example_id": f"{run_id}:{s['example_id']}"} for s in samples]


def pool_nodes(samples: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Confidence/entropy of accepted vs rejected draft tokens, pooled over samples (weighted by token counts)."""
    sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])
    for s in samples:
        for key, n, c, e in node_counts(s):
            acc = sums[key]
            acc[0] += n
            acc[1] += n * c
            acc[2] += n * e
    pooled = {k: {"n": n, "confidence": c / n, "entropy": e / n} for k, (n, c, e) in sorted(sums.items()) if n}
    return {k: v for k, v in pooled.items() if all(math.isfinite(x) for x in v.values())}  # sums may overflow


def _task_result(pairs: list[tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]],
                 greedy: bool) -> TaskResult:
    spec = [s for run, ss, _ in pairs for s in _rekey(ss, run["id"])]
    base = [s for run, _, bs in pairs for s in _rekey(bs, run["id"])]
    pair = summarize_pair(spec, base, greedy)
    return TaskResult(summary=pair.speculative, speedup=pair.speedup, by_depth=acceptance_by_depth(spec),
                      decisions=pair.decisions, nodes=pool_nodes(spec), runs=[run["id"] for run, _, _ in pairs],
                      samples=spec, baseline=base, launches=_launches(pairs))


def _launches(pairs: list[tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    """How the row's runs of one task were launched, as their stored settings say (one entry per distinct launch):
    sampling, device, dtype, and `limit`, the questions a run holds (--limit takes the first N)."""
    seen: dict[str, dict[str, Any]] = {}
    for run, ss, _ in pairs:
        settings = run["settings"]
        launch = {k: settings.get(k) for k in ("sampling", "device", "dtype")}
        launch["limit"] = len({str(s.get("example_id")) for s in ss})
        seen.setdefault(canonical_json(launch), launch)
    return [seen[k] for k in sorted(seen)]


def collect(store: Store, schema: Schema | None = None, reg: Registry | None = None) -> list[Board]:
    """Every (target, temperature) board with its rows, computed from the stored samples. `reg`: where the family of
    a registered drafter's rows is read when its runs recorded no card (see `row_labels`)."""
    schema = schema or load_schema()
    groups: dict[tuple[str, float], dict[tuple[str, str], dict[str, list]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list)))
    info: dict[tuple[str, float, str, str], tuple[dict[str, Any], list[dict[str, Any]]]] = {}
    subs = {s["id"]: s for s in submissions(store)}
    for run in store.runs():
        # Excluded tasks (e.g. lm-eval:<task>) stay in the database and its exports, but on no board.
        if run["kind"] != "speculative" or run["n_samples"] == 0 or schema.other_tasks.excluded(run["task"]):
            continue
        if not isinstance(run["settings"], dict):  # stored by hand or by a bundle: nothing to pair or show it by
            continue
        sid = run.get("submission_id")
        if sid is not None and not schema.rows.show_unverified and not _verified(subs.get(sid)):
            continue
        base = store.baseline_for(run)
        identity = row_identity(schema, run["settings"])
        # A submitted run is a claim of its submission: it never pools with runs measured here or in another one.
        key = canonical_json([identity, sid])
        board = (run["target"], run["temperature"])
        groups[board][(run["proposer"], key)][run["task"]].append(
            (run, store.samples(run["id"]), store.samples(base["id"]) if base else []))
        prov = run["provenance"] if isinstance(run["provenance"], dict) else {}
        info.setdefault((*board, run["proposer"], key), (identity, []))[1].append(prov)
    published = _published(schema)
    boards = []
    for (target, temperature), rows_by_key in sorted(groups.items()):
        rows = []
        labels = Counter(proposer for proposer, _ in rows_by_key)
        for (proposer, key), per_task in rows_by_key.items():
            settings, provs = info[(target, temperature, proposer, key)]
            row = Row(name=proposer, kind="combiner" if "combiner" in settings else "drafter", settings=settings,
                      provenance=provs, tasks={t: _task_result(p, temperature == 0) for t, p in per_task.items()})
            sid = next(p for p in per_task.values())[0][0].get("submission_id")
            if sid is not None:
                row.submission = subs.get(sid) or {"id": sid}
                row.standing = verified_label(_readable(row.submission))
            if labels[proposer] > 1:  # one proposer under several settings: say which is which
                row.note = settings_line(settings)
            rows.append(row)
        rows += _oracle_rows(rows, rows_by_key, temperature)
        columns, tasks = schema.columns_for({t for r in rows for t in r.tasks})
        for row in rows:
            owner = f"|submission {row.submission.get('id')}" if row.submission is not None else ""
            row.slug = slugify(f"{target}|{temperature}|{row.name}|{row.note}{owner}")
            row.values = _values(schema, columns, row, temperature == 0, row_labels(row, reg))
        derive(schema, columns, rows, reg)  # ranks, gaps, regrets: once every row's measured columns are there
        provs = [p for r in rows for p in r.provenance]
        hardware = sorted({f"{p.get('device_name', p.get('device', '?'))}, {p.get('threads', '?')} threads, "
                           f"{p.get('dtype', '?')}" for p in provs})
        shown = sorted({settings_line(r.settings) for r in rows if r.kind != "oracle"})
        pub = [p for p in published if p.name.startswith(f"{target}|{temperature:g}|")]
        boards.append(Board(target, temperature, rows, pub, hardware, shown, columns, tasks))
    measured = {(b.target, b.temperature) for b in boards}
    for key, pub in _published_boards(published).items():  # published numbers with nothing measured beside them
        if key not in measured:
            boards.append(Board(key[0], key[1], [], pub, [], [], *schema.columns_for(set())))
    for b in boards:
        for p in b.published:
            p.values = _values(schema, b.columns, p, b.temperature == 0, row_labels(p, reg))
    return boards


def _readable(submission: dict[str, Any]) -> dict[str, Any]:
    """The submission with a verification that `verified_label` can read (a malformed one reads as none)."""
    check = submission.get("verification")
    return {**submission, "verification": check if isinstance(check, dict) else None}


def _verified(submission: dict[str, Any] | None) -> bool:
    return submission is not None and verified_label(_readable(submission)).startswith("verified")


def settings_line(settings: dict[str, Any]) -> str:
    tree = settings.get("tree")
    parts = [f"tree {tree.get('total_tokens')}/{tree.get('depth')}/{tree.get('top_k')}"] if isinstance(tree, dict) \
        and tree else []
    parts.append(f"max {settings.get('max_new_tokens')} new tokens")
    if settings.get("budget"):
        parts.append(f"budget {settings['budget']}")
    return ", ".join(parts)


def _oracle_rows(rows: list[Row], rows_by_key: dict, temperature: float) -> list[Row]:
    """Per question, the best single drafter (analysis only: it needs the answer to choose), over the single
    drafters measured here that share tree and length settings (a submission's prompts are its own)."""
    singles: dict[str, list[tuple[Row, dict[str, list]]]] = defaultdict(list)
    for row, per_task in zip(rows, rows_by_key.values(), strict=True):
        if row.kind == "drafter" and row.submission is None:
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
            summary = summarize(chosen) | {"tau_ci95": tau_interval(chosen)}
            oracle.tasks[task] = TaskResult(summary=summary, speedup={"ratio_of_sums": None, "mean_of_ratios": None},
                                            by_depth=acceptance_by_depth(chosen), decisions={}, nodes={}, runs=[],
                                            samples=chosen)  # no baseline: it is never timed
        if oracle.tasks:
            out.append(oracle)
    return out


def _values(schema: Schema, columns: list[Column], row: Row, greedy: bool,
            labels: dict[str, RowLabel | None]) -> dict[str, float | RowLabel | None]:
    values: dict[str, float | RowLabel | None] = {}
    whole: TaskResult | None = None  # the row's tasks as one, built on first use (it summarizes every sample again)
    for col in columns:
        metric = schema.metrics[col.metric]
        values[col.id], result = None, None  # `result`: the one summary the cell reads, if it reads one
        if metric.of == "row":
            values[col.id] = labels.get(metric.compute)
        elif metric.of == "board":  # site.stats.derive fills it, from every row of the board
            pass
        elif col.mean_of:
            parts = [values.get(c) for c in col.mean_of]
            values[col.id] = sum(parts) / len(parts) if all(p is not None for p in parts) else None  # type: ignore
            counts = [row.counts.get(c) for c in col.mean_of]
            if values[col.id] is not None and row.kind != "published":
                row.counts[col.id] = sum(counts) if None not in counts else None  # type: ignore[arg-type]
                row.intervals[col.id] = mean_interval(schema, columns, row, col)
        elif row.kind == "published":  # numbers copied from a paper: only its metric, per task
            values[col.id] = row.published.get(col.task or "") if col.metric == row.published_metric else None
        elif col.task == "all":
            pool = metric.pool if row.tasks and schema.shows_pooled(row.kind, col.metric) else None
            if pool is not None and pool.over == "samples":
                result = whole = whole or _as_one(row, greedy)
            elif pool is not None:
                weights = [(metric_value(metric, r), r.summary.get(pool.weighted_by or "") or 0)
                           for r in row.tasks.values()]
                n = sum(w for _, w in weights)
                values[col.id] = sum((v or 0) * w for v, w in weights) / n if n else None
                row.counts[col.id] = sum(int(r.summary.get("n_questions") or 0) for r in row.tasks.values()
                                         if r.summary.get(pool.weighted_by or "")) if n else None
        else:
            result = row.tasks.get(col.task or "")
        if result is not None:
            values[col.id] = metric_value(metric, result)
            row.counts[col.id], row.intervals[col.id] = cell_interval(metric, result)
            if metric.compute == "speedup":  # the flag summaries derives from its interval
                row.slower |= bool(result.speedup.get("slower_than_plain"))
    return values


def _as_one(row: Row, greedy: bool) -> TaskResult:
    """Every task of a row summarized as if it were one task (samples are rekeyed per run, so none collide)."""
    spec = [x for r in row.tasks.values() for x in r.samples]
    base = [x for r in row.tasks.values() for x in r.baseline]
    pair = summarize_pair(spec, base, greedy)
    return TaskResult(summary=pair.speculative, speedup=pair.speedup, by_depth=[], decisions=pair.decisions,
                      nodes={}, runs=[])


# -- published numbers -------------------------------------------------------------------------------------------


def _published(schema: Schema) -> list[Row]:
    rows = []
    for table in yaml.safe_load((data_dir() / "published.yaml").read_text()) or []:
        if table["metric"] not in schema.metrics:
            raise ValueError(f"published.yaml ({table['source']}): unknown metric {table['metric']}")
        for r in table["rows"]:
            numbers = {k: float(v) for k, v in r.items() if k not in ("name", "drafter", "family")}
            family = r.get("family") or []  # one drafter's family id, or a list of them (a combination)
            row = Row(name=f"{table['target']}|{float(table['temperature']):g}|{r['name']}", kind="published",
                      settings={}, source=table["source"], published=numbers, published_metric=table["metric"],
                      published_family=[family] if isinstance(family, str) else list(family))
            row.slug = slugify(row.name)
            rows.append(row)
    return rows


def _published_boards(rows: list[Row]) -> dict[tuple[str, float], list[Row]]:
    out: dict[tuple[str, float], list[Row]] = defaultdict(list)
    for row in rows:
        target, temperature, _ = row.name.split("|", 2)
        out[(target, float(temperature))].append(row)
    return out


# -- row labels ---------------------------------------------------------------------------------------------------

