"""A speculative arm and its baseline, summarised the one way every front end shows them."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from taps_bench.results.metrics import compare_outputs, speedup, summarize

Sample = dict[str, Any]


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


@dataclass
class PairSummary:
    """`summarize` of each arm, the speedup over the samples both have, and the routing decisions. At temperature 0
    `speculative["lossless_rate"]` compares the outputs of the two arms now (baseline samples may have been stored
    after the speculative ones, whose per-sample flag then says nothing)."""

    speculative: dict[str, Any]
    baseline: dict[str, Any]
    speedup: dict[str, Any]
    decisions: dict[str, float]


def summarize_pair(spec: list[Sample], base: list[Sample], greedy: bool) -> PairSummary:
    ss = summarize(spec)
    if greedy:
        ss["lossless_rate"] = compare_outputs(spec, base)["rate"]
    return PairSummary(speculative=ss, baseline=summarize(base), speedup=speedup(spec, base),
                       decisions=decisions(spec))
