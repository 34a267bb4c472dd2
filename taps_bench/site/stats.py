"""The board statistics of the schema (`of: board`): a row's rank with intervals, a drafter's specialisation gap and
a combiner's router regret, plus the intervals of means over tasks. Each is a function of the board's rows (their
values, intervals and samples), never of anything stored about it; the intervals are results.summaries'
bootstrap, stratified by task (`stratified_ratio_interval`).

The rules, as the schema's definitions state them:
- rank: a row's best rank is 1 + the rows whose interval lies entirely above its own, its worst rank the number of
  rows less those whose interval lies entirely below; overlapping intervals share the places between ("1–3").
- specialisation gap: mean τ on the tasks of the drafter's training domain minus mean τ on the other domains' tasks.
- router regret: the oracle's τ (per question, the best of the combiner's own drafters as single rows) minus the
  combiner's τ, averaged over the tasks both have.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from taps_bench.catalog.registry import Registry
from taps_bench.results.metrics import summarize
from taps_bench.results.oracle import oracle_samples
from taps_bench.results.summaries import Stratum, example_counters, stratified_ratio_interval
from taps_bench.site.cards import drafter_card
from taps_bench.site.rows import Row, finite_number, metric_value
from taps_bench.site.schema import Column, Metric, RowLabel, Schema

Interval = Sequence[float] | None
Stat = tuple[float | None, list[float] | None, int | None]  # value, 95% interval, n (questions)
MAX_CORPORA = 8  # corpus names read from one card (cards come from bundles too)
SHARED = ("tree", "max_new_tokens", "draft_head_dtype")  # what a combiner's single-drafter rows must share with it


# -- rank ---------------------------------------------------------------------------------------------------------


def interval_ranks(entries: Sequence[tuple[float, Interval]], higher: bool = True) -> list[tuple[int, int]]:
    """(best, worst) rank of each (value, interval) entry: best = 1 + the entries whose interval lies entirely
    above (better than) its own, worst = the number of entries less those whose interval lies entirely below.
    An entry without an interval counts as the point [value, value]. `higher`: whether a higher value is better."""
    spans = [(ci[0], ci[1]) if ci is not None else (v, v) for v, ci in entries]
    if not higher:  # the same rule on the negated values
        spans = [(-hi, -lo) for lo, hi in spans]
    out = []
    for lo, hi in spans:
        above = sum(1 for other_lo, _ in spans if other_lo > hi)
        below = sum(1 for _, other_hi in spans if other_hi < lo)
        out.append((1 + above, len(spans) - below))
    return out


def rank_label(best: int, worst: int) -> RowLabel:
    """"2", or "1–3" where intervals overlap; sorts by best rank, then worst."""
    return RowLabel(str(best) if best == worst else f"{best}–{worst}", best + worst / 1000)


def _ranks(schema: Schema, col: Column, rows: list[Row]) -> None:
    by = next(c for c in schema.columns if c.id == col.by)
    competing = [r for r in rows if schema.rows.kinds[r.kind].ranked and r.ranked_standing
                 and isinstance(r.values.get(by.id), (int, float))]
    entries = [(float(r.values[by.id]), r.intervals.get(by.id)) for r in competing]  # type: ignore[arg-type]
    ranks = interval_ranks(entries, higher=schema.metrics[by.metric].better == "higher")
    for row in rows:
        row.values[col.id] = row.counts[col.id] = None
    for row, (best, worst) in zip(competing, ranks, strict=True):
        row.values[col.id] = rank_label(best, worst)
        row.counts[col.id] = len(competing)


# -- means over tasks ---------------------------------------------------------------------------------------------


def weighted_tau_interval(row: Row, weights: dict[str, float]) -> list[float] | None:
    """The interval of sum_t w_t * τ_t over the row's tasks, each task's questions resampled on their own."""
    strata: list[Stratum] = [([w], example_counters(row.tasks[t].samples)) for t, w in weights.items()]
    return stratified_ratio_interval(strata) if all(rows for _, rows in strata) else None


def mean_interval(schema: Schema, columns: list[Column], row: Row, col: Column) -> list[float] | None:
    """The interval of a `mean_of` column of τ (Avg τ): the mean of its task columns, stratified by task."""
    parts = [next((c for c in columns if c.id == part), None) for part in col.mean_of]
    tasks = [c.task for c in parts if c is not None and c.task not in (None, "all")]
    if len(tasks) != len(col.mean_of) or schema.metrics[col.metric].compute != "tau" or len(set(tasks)) != len(tasks):
        return None
    if not all(t in row.tasks for t in tasks):
        return None
    return weighted_tau_interval(row, {t: 1 / len(tasks) for t in tasks if t is not None})


# -- specialisation gap -------------------------------------------------------------------------------------------


def specialisation_gap(values: dict[str, float], domain: str, task_domains: dict[str, str]) -> float | None:
    """Mean value on the tasks of `domain` minus mean value on the tasks of other domains (tasks without a domain
    do not count); None unless both sides have a task."""
    own = [v for t, v in values.items() if task_domains.get(t) == domain]
    off = [v for t, v in values.items() if task_domains.get(t) not in (None, domain)]
    return sum(own) / len(own) - sum(off) / len(off) if own and off else None


def corpora(corpus: Any) -> list[str]:
    """The corpus names of a card's corpus spec ("sharegpt:600+mathinstruct:600" -> sharegpt, mathinstruct)."""
    if not isinstance(corpus, str):
        return []
    names = [part.split(":", 1)[0].strip()[:60] for part in corpus.split("+")]
    return [n for n in names if n][:MAX_CORPORA]


def training_corpora(row: Row, reg: Registry | None) -> list[str]:
    """The corpora the row's drafters were trained on, as their cards name them: a single drafter's shown card
    (site.cards), a measured combiner's members' registry cards; [] where nothing says."""
    if row.kind == "drafter":
        card, _ = drafter_card(reg, row)
        return corpora(card.get("corpus")) if card else []
    members = row.settings.get("drafters")
    if row.kind != "combiner" or row.submission is not None or reg is None or not isinstance(members, list):
        return []
    out: list[str] = []
    for m in members:
        name = m.get("name") if isinstance(m, dict) else None
        card = reg.cards["drafter"].get(name) if isinstance(name, str) else None
        out += [c for c in corpora(getattr(card, "corpus", None)) if c not in out]
    return out


def corpus_domain(name: str, schema: Schema, reg: Registry | None) -> str | None:
    card = reg.cards["corpus"].get(name) if reg is not None else None
    return getattr(card, "domain", None) if card is not None else schema.corpus_domains.get(name)


def training_domain(row: Row, schema: Schema, reg: Registry | None) -> str | None:
    """A single drafter's training domain: the one domain of every corpus its card names, if that is a domain of
    the schema's tasks; None for a mixture, a combiner or a card naming no corpus."""
    if row.kind != "drafter":
        return None
    domains = {corpus_domain(c, schema, reg) for c in training_corpora(row, reg)}
    task_domains = {t.domain for t in schema.tasks if t.domain}
    return next(iter(domains)) if len(domains) == 1 and domains <= task_domains else None


def _gap(schema: Schema, metric: Metric, row: Row, reg: Registry | None) -> Stat:
    domain = training_domain(row, schema, reg)
    task_domains = {t.id: t.domain for t in schema.tasks if t.domain}
    values = {t: v for t, r in row.tasks.items() if t in task_domains
              and (v := finite_number(metric_value(metric, r))) is not None}
    gap = specialisation_gap(values, domain, task_domains) if domain else None
    if gap is None:
        return None, None, None
    own = [t for t in values if task_domains[t] == domain]
    off = [t for t in values if task_domains[t] != domain]
    weights = {t: 1 / len(own) for t in own} | {t: -1 / len(off) for t in off}
    ci = weighted_tau_interval(row, weights) if metric.compute == "tau" else None
    return gap, ci, sum(int(row.tasks[t].summary.get("n_questions") or 0) for t in values)


# -- router regret ------------------------------------------------------------------------------------------------


def questions(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Samples keyed by their question again (the board keys them by run: "RUN:QUESTION"), so that the samples of
    different drafters' runs of one question meet."""
    return [{**s, "example_id": str(s["example_id"]).split(":", 1)[-1]} for s in samples]


def member_rows(row: Row, rows: list[Row]) -> list[Row] | None:
    """The single-drafter rows measured here that are the combiner's members (same name and checkpoint, same
    tree, length and head dtype), one per member; None unless every member has exactly one."""
    members = row.settings.get("drafters")
    if row.kind != "combiner" or row.submission is not None or not isinstance(members, list) or len(members) < 2:
        return None
    shared = {k: row.settings.get(k) for k in SHARED}
    out = []
    for m in members:
        if not isinstance(m, dict):
            return None
        found = [r for r in rows if r.kind == "drafter" and r.submission is None and r.name == m.get("name")
                 and {k: r.settings.get(k) for k in SHARED} == shared
                 and m.get("sha256") in (None, r.settings.get("drafter_sha256"))]
        if len(found) != 1 or found[0] in out:
            return None
        out.append(found[0])
    return out


def router_regret(oracle_values: dict[str, float], values: dict[str, float]) -> float | None:
    """Mean over the tasks both have of the oracle's value minus the combiner's; None when they share none."""
    common = sorted(set(oracle_values) & set(values))
    return sum(oracle_values[t] - values[t] for t in common) / len(common) if common else None


def _regret(metric: Metric, row: Row, rows: list[Row]) -> Stat:
    members = member_rows(row, rows)
    if members is None:
        return None, None, None
    oracle_values, values, strata, n = {}, {}, [], 0
    tasks = sorted(set(row.tasks).intersection(*(set(m.tasks) for m in members)))
    for task in tasks:
        chosen, _ = oracle_samples({m.name: questions(m.tasks[task].samples) for m in members})
        oracle, own = finite_number(summarize(chosen).get(metric.compute)), finite_number(
            row.tasks[task].summary.get(metric.compute))
        if oracle is None or own is None:
            continue
        oracle_values[task], values[task] = oracle, own
        by_q = _by_question(chosen)
        mine = _by_question(questions(row.tasks[task].samples))
        paired = [by_q[q] + mine[q] for q in sorted(set(by_q) & set(mine))]
        strata.append(paired)
        n += len(paired)
    regret = router_regret(oracle_values, values)
    if regret is None:
        return None, None, None
    k = len(strata)
    ci = stratified_ratio_interval([([1 / k, -1 / k], rows_) for rows_ in strata]) if metric.compute == "tau" \
        else None
    return regret, ci, n


def _by_question(samples: list[dict[str, Any]]) -> dict[str, list[float]]:
    counters = example_counters(samples)
    return dict(zip(sorted({str(s["example_id"]) for s in samples}), counters, strict=True))


# -- the board ----------------------------------------------------------------------------------------------------


def derive(schema: Schema, columns: list[Column], rows: list[Row], reg: Registry | None = None) -> None:
    """Fill the board statistics' columns of every row (their values, intervals and n), once the measured columns
    of all of the board's rows are computed."""
    for col in columns:
        metric = schema.metrics[col.metric]
        if metric.of != "board":
            continue
        if metric.compute == "rank":
            _ranks(schema, col, rows)
            continue
        by = schema.metrics[col.by or ""]
        for row in rows:
            if metric.compute == "specialisation_gap":
                value, ci, n = _gap(schema, by, row, reg)
            else:
                value, ci, n = _regret(by, row, rows)
            row.values[col.id], row.intervals[col.id], row.counts[col.id] = value, ci, n
