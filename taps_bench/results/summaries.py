"""A speculative arm and its baseline, summarised the one way every front end shows them.

Besides the point estimates, `summarize_pair` gives 95% bootstrap confidence intervals over prompts: examples (an
example pools its turns) are resampled with replacement, paired across the two arms, and the statistic is recomputed
on each resample. Like every shown number they are derived from the stored per-sample counters; nothing about them
is stored. The resampling is seeded, so the same samples always give the same interval.
"""

from __future__ import annotations

import inspect
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from taps_bench.results.metrics import compare_outputs, speedup, summarize

Sample = dict[str, Any]

CONFIDENCE = 0.95
RESAMPLES = 2000  # enough for a stable 2.5% / 97.5% percentile; vectorised, so cheap even on a large board
SEED = 15  # fixed: a summary is a function of the stored samples, the same on every machine and every rebuild


def decisions(samples: Iterable[Sample]) -> dict[str, float]:
    """Share of steps per drafter, pooled over samples (routing decisions, or merged-tree accepted subtrees)."""
    counts: dict[str, int] = {}
    for s in samples:
        for name in (s.get("extra") or {}).get("choices", []):
            counts[name] = counts.get(name, 0) + 1
    total = sum(counts.values())
    return {k: v / total for k, v in sorted(counts.items())} if total else {}


def of_examples(samples: Iterable[Sample], example_ids: Iterable[str]) -> list[Sample]:
    """The samples of these examples (a run may hold more, from an earlier and larger --limit)."""
    wanted = {str(e) for e in example_ids}
    return [s for s in samples if str(s["example_id"]) in wanted]


def bootstrap_interval(rows: list[list[float]], statistic: Callable[..., Any]) -> list[float] | None:
    """The 95% percentile bootstrap interval of `statistic(*columns, axis=-1)`, resampling the rows (one per
    example, its counters in columns) with replacement, all of a row's counters together; None with fewer than 2
    rows or when a resample is undefined.

    Percentile rather than scipy's default BCa: with a handful of prompts BCa's jackknife is often degenerate (it
    returns NaN), while a percentile interval of identical values is just that value."""
    if len(rows) < 2:
        return None
    import numpy as np

    return _percentile_bootstrap(tuple(np.asarray(rows, dtype=float).T), statistic, paired=True)


def _percentile_bootstrap(data: tuple[Any, ...], statistic: Callable[..., Any], paired: bool) -> list[float] | None:
    """scipy's bootstrap, the one way every interval here is computed: percentile, seeded, RESAMPLES resamples."""
    import numpy as np
    from scipy.stats import bootstrap

    # scipy 1.15 renamed random_state to rng (random_state is on its way out); either takes a seeded Generator.
    seed = "rng" if "rng" in inspect.signature(bootstrap).parameters else "random_state"
    with np.errstate(divide="ignore", invalid="ignore"):  # a resample of zero-time samples: inf, reported as None
        result = bootstrap(data, statistic, paired=paired, vectorized=True, axis=-1, confidence_level=CONFIDENCE,
                           n_resamples=RESAMPLES, method="percentile", **{seed: np.random.default_rng(SEED)})
    lo, hi = (float(v) for v in result.confidence_interval)
    return [lo, hi] if np.isfinite(lo) and np.isfinite(hi) else None


# One stratum of `stratified_ratio_interval`: the weights w_1..w_k of its k ratios, and its rows (one per example),
# each holding 2k counters: numerator_1, denominator_1, ..., numerator_k, denominator_k.
Stratum = tuple[Sequence[float], list[list[float]]]


def stratified_ratio_interval(strata: Sequence[Stratum]) -> list[float] | None:
    """The 95% percentile bootstrap interval of  sum_s sum_j w_sj * (sum of numerator_j / sum of denominator_j over
    stratum s's rows),  each stratum's rows (examples) resampled with replacement on their own, all of a row's
    counters together: a stratified bootstrap, paired within a stratum. One stratum per task gives the interval of
    a mean of per-task taus (weights 1/k), of a difference of two groups of tasks (weights +1/a and -1/b), or of a
    mean over tasks of the difference between two arms on the same examples (rows of four counters, weights
    (1/k, -1/k)). None when a stratum has fewer than 2 rows, there is no stratum, or a resample is undefined."""
    if not strata or any(len(rows) < 2 for _, rows in strata):
        return None
    import numpy as np

    weights = [[float(w) for w in ws] for ws, _ in strata]
    data = tuple(np.asarray(rows, dtype=float).T for _, rows in strata)  # each (2k, examples): resampled together
    if any(d.shape[0] != 2 * len(ws) for d, ws in zip(data, weights, strict=True)):
        raise ValueError("each row of a stratum holds a numerator and a denominator per weight")

    def statistic(*samples: Any, axis: int = -1) -> Any:
        return sum(w * samples[s][2 * j].sum(axis) / samples[s][2 * j + 1].sum(axis)
                   for s, ws in enumerate(weights) for j, w in enumerate(ws))

    return _percentile_bootstrap(data, statistic, paired=False)


def _ratio_of_rates(sn: Any, st: Any, bn: Any, bt: Any, axis: int = -1) -> Any:
    # (sum spec tokens / sum spec time) / (sum base tokens / sum base time): metrics.speedup's ratio_of_sums.
    return (sn.sum(axis) / st.sum(axis)) / (bn.sum(axis) / bt.sum(axis))


def _ratio(n: Any, m: Any, axis: int = -1) -> Any:
    return n.sum(axis) / m.sum(axis)  # tau: sum new tokens / sum target forwards


def speedup_interval(spec: Iterable[Sample], base: Iterable[Sample]) -> tuple[list[float] | None, int]:
    """The interval of the ratio-of-sums speedup over the examples both arms have (on their matched turns, as
    `metrics.speedup` pairs them), and how many examples it resamples."""

    def keyed(samples: Iterable[Sample]) -> dict[tuple[str, int], Sample]:
        return {(str(s["example_id"]), int(s["turn"])): s for s in samples}

    by_key = keyed(base)
    per_example: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0, 0.0])
    for key, s in keyed(spec).items():
        if (b := by_key.get(key)) is not None:
            acc = per_example[key[0]]  # an example pools its turns: multi-turn answers are not independent
            for i, v in enumerate((s["new_tokens"], s["total_s"], b["new_tokens"], b["total_s"])):
                acc[i] += float(v)
    rows = [per_example[k] for k in sorted(per_example)]  # sorted: the seeded resampling sees one fixed order
    return bootstrap_interval(rows, _ratio_of_rates), len(rows)


def example_counters(spec: Iterable[Sample]) -> list[list[float]]:
    """(new tokens, steps) of each example (an example pools its turns and its repeats), in example-id order: the
    rows that tau's intervals resample."""
    per_example: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for s in spec:
        acc = per_example[str(s["example_id"])]
        acc[0] += float(s["new_tokens"])
        acc[1] += float(s["steps"])
    return [per_example[k] for k in sorted(per_example)]  # sorted: the seeded resampling sees one fixed order


def tau_interval(spec: Iterable[Sample]) -> list[float] | None:
    """The interval of tau (sum new tokens / sum steps), resampling examples of the speculative arm."""
    return bootstrap_interval(example_counters(spec), _ratio)


def slower_than_plain(interval: list[float] | None) -> bool:
    """The flag: the whole speedup interval lies below 1.0, i.e. speculative decoding measurably lost to plain
    decoding (a point estimate below 1.0 alone may be noise)."""
    return interval is not None and interval[1] < 1.0


def speedup_text(sp: dict[str, Any], digits: int = 2) -> str:
    """A speedup as every front end prints it: `1.23x [1.10, 1.37]`, with `, slower than plain decoding` when
    flagged; `n/a` when there is no speedup, and no interval when there is none."""
    point = sp.get("ratio_of_sums")
    if point is None:
        return "n/a"
    ci = sp.get("ci95")
    text = f"{point:.{digits}f}x" + (f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci is not None else "")
    return text + (", slower than plain decoding" if sp.get("slower_than_plain") else "")


@dataclass
class PairSummary:
    """`summarize` of each arm, the speedup over the samples both have, and the routing decisions. At temperature 0
    `speculative["lossless_rate"]` compares the outputs of the two arms now (baseline samples may have been stored
    after the speculative ones, whose per-sample flag then says nothing). `speedup` adds `ci95` (its bootstrap
    interval, None with fewer than 2 examples), `n` (the examples resampled) and `slower_than_plain`;
    `speculative` adds `tau_ci95`."""

    speculative: dict[str, Any]
    baseline: dict[str, Any]
    speedup: dict[str, Any]
    decisions: dict[str, float]


def step_costs(ss: dict[str, Any], sb: dict[str, Any]) -> dict[str, float] | None:
    """Why a drafter is as fast as it is: a speculative step's verify and draft time in plain decoding steps, the
    speedup those two ratios predict (tokens per step / (verify + draft)), and each part's share of decoding time
    (prefill excluded). The gap between predicted and measured speedup is the rest (`other_share`)."""
    base_steps, steps = sb["verify_steps"], ss["verify_steps"]
    base_s = sb["wall_s"] - sb["prefill_s"]
    decode_s = ss["wall_s"] - ss["prefill_s"]
    if not base_steps or not steps or base_s <= 0 or decode_s <= 0:
        return None
    plain_step = base_s / base_steps
    verify = ss["verify_s"] / steps / plain_step
    draft = ss["draft_s"] / steps / plain_step
    tokens_per_step = (ss["mean_accept_length"] or 0.0) + 1.0
    return {"verify_ratio": verify, "draft_ratio": draft, "tokens_per_step": tokens_per_step,
            "predicted_speedup": tokens_per_step / (verify + draft) if verify + draft > 0 else 0.0,
            "draft_share": ss["draft_s"] / decode_s, "verify_share": ss["verify_s"] / decode_s,
            "other_share": ss["overhead_s"] / decode_s}


def summarize_pair(spec: list[Sample], base: list[Sample], greedy: bool) -> PairSummary:
    ss = summarize(spec)
    if greedy:
        ss["lossless_rate"] = compare_outputs(spec, base)["rate"]
    ss["tau_ci95"] = tau_interval(spec)
    sp = speedup(spec, base)
    sp["ci95"], sp["n"] = speedup_interval(spec, base)
    sp["slower_than_plain"] = slower_than_plain(sp["ci95"])
    sb = summarize(base)
    sp["cost"] = step_costs(ss, sb)
    return PairSummary(speculative=ss, baseline=sb, speedup=sp, decisions=decisions(spec))
