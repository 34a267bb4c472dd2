"""Every reported number, derived from the raw per-sample counters in the store.

All functions are pure and take lists of sample dicts as returned by `Store.samples` (only the counter fields are
read, so hand-written dicts work too). Notation, for a set of samples S, where a sample s has
`new_tokens` n_s, `steps` m_s (target forward passes, *including the prefill*), `total_s` t_s, and per verify step
j the accepted draft length a_{s,j} (bonus token excluded):

- V = sum_s len(accept_lengths_s)                       verify steps (the prefill is not a verify step)
- tau = sum_s n_s / sum_s m_s                           acceptance length, taps-bench's count: every target
                                                        forward is a step, the prefill too; it counts the bonus
                                                        token, so plain decoding gives 1.00
- tau_eagle = sum_s n_s / V                             the same tokens over verify steps only (the prefill not a
                                                        step): how EAGLE's evaluation and the paper count it, a few
                                                        percent above tau at short lengths; None when V = 0
- tau_macro = mean_q ( sum_{s in q} n_s / sum_{s in q} m_s )
                                                        HASS's convention: a question q is one example_id with all
                                                        its turns pooled; questions with no steps are skipped
- tokens_per_s = sum_s n_s / sum_s t_s
- A_d = sum_s accepted_by_depth_s[d-1]                  accepted draft tokens at depth d (A_0 = V)
- conditional_d = A_d / A_{d-1}                         acceptance at depth d given the accepted path reached d-1
- unconditional_d = A_d / V
- speedup (ratio of sums) = (sum n^spec / sum t^spec) / (sum n^base / sum t^base) over matched (example, turn) pairs
- speedup (mean of ratios) = mean_q (tokens_per_s of q, speculative) / (tokens_per_s of q, autoregressive)

Undefined values (a division by zero, no graded samples) are None, never NaN, so they survive JSON.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

Sample = dict[str, Any]


def _div(num: float, den: float) -> float | None:
    return num / den if den else None


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _key(sample: Sample) -> tuple[str, int]:
    # Same normalisation as the store, so that hand-made dicts with int example ids match stored ones.
    return str(sample["example_id"]), int(sample["turn"])


def _accepted_by_depth(sample: Sample) -> list[int]:
    """The sample's accepted-per-depth counts; derived from accept_lengths when the list was not recorded.

    Only one path is accepted per step, so "accepted at depth d" summed over steps equals the number of steps whose
    accept length is at least d; the two fields carry the same information.
    """
    stored = list(sample.get("accepted_by_depth") or [])
    if stored:
        return stored
    lengths = list(sample.get("accept_lengths") or [])
    deepest = max(lengths, default=0)
    return [sum(1 for a in lengths if a >= d) for d in range(1, deepest + 1)]


def acceptance_by_depth(samples: Iterable[Sample]) -> list[dict[str, Any]]:
    """Per-depth acceptance, one dict per depth d = 1..D (D = the deepest drafted or accepted depth).

    Each dict: depth; drafted (N_d = sum of drafted_by_depth[d-1], draft nodes at depth d); reached (A_{d-1}, steps
    whose accepted path reached depth d-1, with A_0 = V the verify steps); accepted (A_d);
    conditional = A_d / A_{d-1}; unconditional = A_d / V.
    """
    samples = list(samples)
    verify_steps = sum(len(s.get("accept_lengths") or []) for s in samples)
    drafted: list[int] = []
    accepted: list[int] = []
    for s in samples:
        for totals, counts in ((drafted, list(s.get("drafted_by_depth") or [])), (accepted, _accepted_by_depth(s))):
            if len(counts) > len(totals):
                totals.extend([0] * (len(counts) - len(totals)))
            for i, c in enumerate(counts):
                totals[i] += int(c)
    depth = max(len(drafted), len(accepted))
    drafted += [0] * (depth - len(drafted))
    accepted += [0] * (depth - len(accepted))
    rows = []
    reached = verify_steps
    for d in range(1, depth + 1):
        acc = accepted[d - 1]
        rows.append(
            {
                "depth": d,
                "drafted": drafted[d - 1],
                "reached": reached,
                "accepted": acc,
                "conditional": _div(acc, reached),
                "unconditional": _div(acc, verify_steps),
            }
        )
        reached = acc
    return rows


def tau_macro(samples: Iterable[Sample]) -> float | None:
    """mean over questions q of (sum_{s in q} new_tokens / sum_{s in q} steps); a question pools all its turns."""
    tokens: dict[str, int] = defaultdict(int)
    steps: dict[str, int] = defaultdict(int)
    for s in samples:
        q = str(s["example_id"])
        tokens[q] += int(s["new_tokens"])
        steps[q] += int(s["steps"])
    return _mean([tokens[q] / steps[q] for q in tokens if steps[q]])


def summarize(samples: Iterable[Sample]) -> dict[str, Any]:
    """All per-run metrics from a run's samples (formulas in the module docstring).

    Keys: n_samples, n_questions, new_tokens, steps, verify_steps, tau, tau_eagle, tau_macro, mean_accept_length
    (mean of accept_lengths, bonus excluded), tokens_per_s, wall_s (sum of total_s), prefill_s, draft_s, verify_s,
    overhead_s (= wall_s - prefill_s - draft_s - verify_s), acceptance_by_depth (see `acceptance_by_depth`),
    acceptance_histogram ({accepted length: number of verify steps}), accuracy (mean of `correct` over graded
    samples, None when none is graded), n_graded, lossless_rate (mean of `lossless` over checked samples, None when
    none is checked), n_lossless_checked, mean_tree_size (mean over verify steps of the tree size), stop_reasons
    ({reason: count}).
    """
    samples = list(samples)
    new_tokens = sum(int(s["new_tokens"]) for s in samples)
    steps = sum(int(s["steps"]) for s in samples)
    times = {name: sum(float(s.get(name) or 0.0) for s in samples) for name in ("prefill_s", "draft_s", "verify_s")}
    wall = sum(float(s["total_s"]) for s in samples)
    lengths = [int(a) for s in samples for a in (s.get("accept_lengths") or [])]
    trees = [int(t) for s in samples for t in (s.get("tree_sizes") or [])]
    graded = [bool(s["correct"]) for s in samples if s.get("correct") is not None]
    checked = [bool(s["lossless"]) for s in samples if s.get("lossless") is not None]
    return {
        "n_samples": len(samples),
        "n_questions": len({str(s["example_id"]) for s in samples}),
        "new_tokens": new_tokens,
        "steps": steps,
        "verify_steps": len(lengths),
        "tau": _div(new_tokens, steps),
        "tau_eagle": _div(new_tokens, len(lengths)),
        "tau_macro": tau_macro(samples),
        "mean_accept_length": _mean(lengths),
        "tokens_per_s": _div(new_tokens, wall),
        "wall_s": wall,
        **times,
        "overhead_s": wall - sum(times.values()),
        "acceptance_by_depth": acceptance_by_depth(samples),
        "acceptance_histogram": dict(sorted(Counter(lengths).items())),
        "accuracy": _mean(graded),
        "n_graded": len(graded),
        "lossless_rate": _mean(checked),
        "n_lossless_checked": len(checked),
        "mean_tree_size": _mean(trees),
        "stop_reasons": dict(sorted(Counter(str(s.get("stop_reason")) for s in samples).items())),
    }


def speedup(spec_samples: Iterable[Sample], base_samples: Iterable[Sample]) -> dict[str, Any]:
    """Speedup of a speculative run over its autoregressive baseline, on the (example_id, turn) pairs both have.

    ratio_of_sums = (sum n^spec / sum t^spec) / (sum n^base / sum t^base) over the matched pairs;
    mean_of_ratios = mean over questions q (example_id, turns pooled) of
    (sum_{q} n^spec / sum_{q} t^spec) / (sum_{q} n^base / sum_{q} t^base), skipping questions with a zero rate.
    Also returned: n_matched (pairs), n_questions (questions in mean_of_ratios), spec_tokens_per_s,
    base_tokens_per_s (over the matched pairs), n_spec_only and n_base_only (samples left unmatched).
    """
    spec = {_key(s): s for s in spec_samples}
    base = {_key(s): s for s in base_samples}
    matched = [k for k in spec if k in base]
    per_q: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0, 0.0])
    for k in matched:
        acc = per_q[k[0]]
        acc[0] += int(spec[k]["new_tokens"])
        acc[1] += float(spec[k]["total_s"])
        acc[2] += int(base[k]["new_tokens"])
        acc[3] += float(base[k]["total_s"])
    spec_rate = _div(sum(a[0] for a in per_q.values()), sum(a[1] for a in per_q.values()))
    base_rate = _div(sum(a[2] for a in per_q.values()), sum(a[3] for a in per_q.values()))
    ratios = []
    for sn, st, bn, bt in per_q.values():
        s_rate, b_rate = _div(sn, st), _div(bn, bt)
        if s_rate is not None and b_rate:
            ratios.append(s_rate / b_rate)
    return {
        "n_matched": len(matched),
        "n_questions": len(ratios),
        "spec_tokens_per_s": spec_rate,
        "base_tokens_per_s": base_rate,
        "ratio_of_sums": _div(spec_rate, base_rate) if spec_rate is not None and base_rate is not None else None,
        "mean_of_ratios": _mean(ratios),
        "n_spec_only": len(spec) - len(matched),
        "n_base_only": len(base) - len(matched),
    }


def lossless(spec_output_ids: Sequence[int], base_output_ids: Sequence[int]) -> bool:
    """True when the speculative output equals the autoregressive one token for token (the T=0 lossless check)."""
    return [int(t) for t in spec_output_ids] == [int(t) for t in base_output_ids]


def compare_outputs(spec_samples: Iterable[Sample], base_samples: Iterable[Sample]) -> dict[str, Any]:
    """Token-for-token comparison of matched (example_id, turn) pairs: n_compared, n_equal, rate, mismatches.

    `mismatches` lists the (example_id, turn) keys whose outputs differ, for a lossless check across two runs.
    """
    base = {_key(s): s for s in base_samples}
    mismatches: list[tuple[str, int]] = []
    n = 0
    for s in spec_samples:
        k = _key(s)
        if k in base:
            n += 1
            if not lossless(s["output_ids"], base[k]["output_ids"]):
                mismatches.append(k)
    return {
        "n_compared": n,
        "n_equal": n - len(mismatches),
        "rate": _div(n - len(mismatches), n),
        "mismatches": mismatches,
    }
