"""The statistics behind `taps-bench report`: per-cell estimates with intervals, and paired comparisons of two
proposers on the same prompts, as pure functions over stored sample dicts (`Store.samples`; hand-made dicts work).

The unit of resampling is the prompt (an example): a multi-turn MT-Bench question pools its turns, and the repeats
of a sampled cell pool into their prompt too (`pool_repeats`), since turns and repeats of one prompt are not
independent. Every interval is a 95% percentile bootstrap over prompts, computed by `summaries.bootstrap_interval`
(seeded: the same samples always give the same interval); this module only says which per-prompt counters are
resampled together and which statistic is recomputed on each resample.

A paired comparison of proposers A and B resamples the prompts both have, A's and B's counters of one prompt
together, so that what the prompts share (a hard question is hard for both) cancels out of the difference. For
speed, each proposer's speedup is against its own matched baseline run, on the prompts all four arms have.

Verdicts read the interval of the difference A - B for the claim "A above B": `holds` when it excludes 0 above,
`fails` when it excludes 0 below, `not separated` otherwise (or with too few prompts for an interval).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from taps_bench.results.metrics import acceptance_by_depth, speedup, summarize
from taps_bench.results.summaries import bootstrap_interval, speedup_interval, tau_interval

Sample = dict[str, Any]
Interval = list[float] | None

HOLDS, FAILS, NOT_SEPARATED, NOT_MEASURED = "holds", "fails", "not separated", "not measured"
# A repeat's turns are renumbered repeat * TURN_STRIDE + turn: no task has this many turns.
TURN_STRIDE = 1000


def pool_repeats(arms: Sequence[tuple[list[Sample], list[Sample]]]) -> tuple[list[Sample], list[Sample]]:
    """Several runs of one proposer on one task (the repeats of a sampled cell, each `(samples, baseline)` with its
    own baseline run) as one arm: turn t of repeat r becomes r * TURN_STRIDE + t in both, so a prompt pools all its
    turns and repeats into one resampling unit while every sample stays matched with its own repeat's baseline."""
    if len(arms) == 1:
        return list(arms[0][0]), list(arms[0][1])
    spec, base = [], []
    for r, (ss, bs) in enumerate(arms):
        spec += [{**s, "turn": r * TURN_STRIDE + int(s["turn"])} for s in ss]
        base += [{**s, "turn": r * TURN_STRIDE + int(s["turn"])} for s in bs]
    return spec, base


def eagle_count(samples: Iterable[Sample]) -> list[Sample]:
    """The samples with `steps` set to their verify steps (the prefill not a step), so that tau and its interval
    come out in EAGLE's and the paper's convention (`metrics.summarize`'s `tau_eagle`)."""
    return [{**s, "steps": len(s.get("accept_lengths") or [])} for s in samples]


def cell_estimate(spec: list[Sample], base: list[Sample] | None = None) -> dict[str, Any]:
    """One table cell from a speculative arm and (optionally) its baseline arm.

    Returns: n (prompts), n_samples, tau and tau_ci95 (taps-bench's count: the prefill is a step), tau_eagle and
    tau_eagle_ci95 (EAGLE's count: new tokens / verify steps), speedup (ratio of sums over the matched samples),
    speedup_ci95 and speedup_n (the prompts it resamples); the speedup fields are None / 0 without a baseline;
    acceptance: the conditional acceptance per drafted depth (`metrics.acceptance_by_depth`), up to the deepest
    depth any accepted path reached. Intervals are None with fewer than 2 prompts."""
    ss = summarize(spec)
    out: dict[str, Any] = {"n": ss["n_questions"], "n_samples": ss["n_samples"], "tau": ss["tau"],
                           "tau_ci95": tau_interval(spec), "tau_eagle": ss["tau_eagle"],
                           "tau_eagle_ci95": tau_interval(eagle_count(spec)) if ss["verify_steps"] else None,
                           "speedup": None, "speedup_ci95": None, "speedup_n": 0,
                           "acceptance": [d["conditional"] for d in acceptance_by_depth(spec) if d["reached"]]}
    if base:
        out["speedup"] = speedup(spec, base)["ratio_of_sums"]
        out["speedup_ci95"], out["speedup_n"] = speedup_interval(spec, base)
    return out


def _keyed(samples: Iterable[Sample]) -> dict[tuple[str, int], Sample]:
    return {(str(s["example_id"]), int(s["turn"])): s for s in samples}


Key = tuple[str, int]


def _per_prompt(keys: Iterable[Key], parts: Sequence[Callable[[Key], float]]) -> list[list[float]]:
    """One row per prompt (its keys' values summed, column by column), in sorted order (the seeded resampling
    then sees one fixed order)."""
    acc: dict[str, list[float]] = defaultdict(lambda: [0.0] * len(parts))
    for key in keys:
        row = acc[key[0]]
        for i, part in enumerate(parts):
            row[i] += float(part(key))
    return [acc[k] for k in sorted(acc)]


def _rate(n: Any, d: Any, axis: int) -> Any:
    return n.sum(axis) / d.sum(axis)


def _tau_difference(na: Any, ma: Any, nb: Any, mb: Any, axis: int = -1) -> Any:
    return _rate(na, ma, axis) - _rate(nb, mb, axis)


def _tau_ratio(na: Any, ma: Any, nb: Any, mb: Any, axis: int = -1) -> Any:
    return _rate(na, ma, axis) / _rate(nb, mb, axis)


def _speedups(c: tuple[Any, ...], axis: int) -> tuple[Any, Any]:
    # columns: A spec tokens, A spec time, A base tokens, A base time, then the same for B
    return (_rate(c[0], c[1], axis) / _rate(c[2], c[3], axis), _rate(c[4], c[5], axis) / _rate(c[6], c[7], axis))


def _speedup_difference(*c: Any, axis: int = -1) -> Any:
    a, b = _speedups(c, axis)
    return a - b


def _speedup_ratio(*c: Any, axis: int = -1) -> Any:
    a, b = _speedups(c, axis)
    return a / b


def _finite(value: float) -> float | None:
    return value if value == value and abs(value) != float("inf") else None


def _paired(rows: list[list[float]], difference: Callable[..., Any], ratio: Callable[..., Any]) -> dict[str, Any]:
    import numpy as np

    if not rows:
        return {"n": 0, "difference": None, "difference_ci95": None, "ratio": None, "ratio_ci95": None}
    columns = tuple(np.asarray(rows, dtype=float).T)
    with np.errstate(divide="ignore", invalid="ignore"):
        point_difference, point_ratio = float(difference(*columns)), float(ratio(*columns))
    return {"n": len(rows), "difference": _finite(point_difference),
            "difference_ci95": bootstrap_interval(rows, difference), "ratio": _finite(point_ratio),
            "ratio_ci95": bootstrap_interval(rows, ratio)}


def paired_tau(a: list[Sample], b: list[Sample], eagle: bool = False) -> dict[str, Any]:
    """Tau of proposer A against proposer B on the (prompt, turn) samples both have, paired over prompts.

    Returns: n (prompts), a and b (each one's tau on those samples), difference (a - b) and ratio (a / b), each with
    its paired 95% bootstrap interval (`difference_ci95`, `ratio_ci95`; None with fewer than 2 prompts).
    `eagle`: count verify steps only (EAGLE's convention) instead of every target forward."""
    if eagle:
        a, b = eagle_count(a), eagle_count(b)
    ka, kb = _keyed(a), _keyed(b)
    keys = [k for k in ka if k in kb]
    rows = _per_prompt(keys, [lambda k: ka[k]["new_tokens"], lambda k: ka[k]["steps"],
                              lambda k: kb[k]["new_tokens"], lambda k: kb[k]["steps"]])
    out = _paired(rows, _tau_difference, _tau_ratio)
    for name, n, m in (("a", 0, 1), ("b", 2, 3)):
        steps = sum(r[m] for r in rows)
        out[name] = sum(r[n] for r in rows) / steps if steps else None
    return out


def paired_speedup(a: list[Sample], a_base: list[Sample], b: list[Sample], b_base: list[Sample]) -> dict[str, Any]:
    """The speedup of A (over its baseline `a_base`) against that of B (over `b_base`), on the (prompt, turn)
    samples all four arms have, paired over prompts; the keys of `paired_tau`, for speedup (ratio of sums)."""
    arms = [_keyed(x) for x in (a, a_base, b, b_base)]
    keys = [k for k in arms[0] if all(k in arm for arm in arms[1:])]
    parts = [(lambda k, arm=arm, f=f: arm[k][f]) for arm in arms for f in ("new_tokens", "total_s")]
    rows = _per_prompt(keys, parts)
    out = _paired(rows, _speedup_difference, _speedup_ratio)
    if rows:
        import numpy as np

        with np.errstate(divide="ignore", invalid="ignore"):
            sa, sb = _speedups(tuple(np.asarray(rows, dtype=float).T), -1)
        out["a"], out["b"] = _finite(float(sa)), _finite(float(sb))
    else:
        out["a"] = out["b"] = None
    return out


def verdict(difference_ci95: Interval) -> str:
    """The claim "A above B" read from the interval of A - B: holds, fails, or not separated."""
    if difference_ci95 is None:
        return NOT_SEPARATED
    lo, hi = difference_ci95
    return HOLDS if lo > 0 else FAILS if hi < 0 else NOT_SEPARATED


def compare(a: list[Sample], b: list[Sample], a_base: list[Sample] | None = None,
            b_base: list[Sample] | None = None) -> dict[str, Any]:
    """The claim "A above B" on tau and on speedup: `tau` (`paired_tau`) and `tau_verdict`; `speedup`
    (`paired_speedup`, None unless both have a baseline) and `speedup_verdict` ("not measured" without one)."""
    tau = paired_tau(a, b)
    out: dict[str, Any] = {"tau": tau, "tau_verdict": verdict(tau["difference_ci95"]) if tau["n"] else NOT_MEASURED,
                           "speedup": None, "speedup_verdict": NOT_MEASURED}
    if a_base and b_base:
        sp = paired_speedup(a, a_base, b, b_base)
        if sp["n"]:
            out["speedup"], out["speedup_verdict"] = sp, verdict(sp["difference_ci95"])
    return out
