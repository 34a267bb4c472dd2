"""The oracle: per question, the single drafter with the best tau, picked after the fact from stored runs.

Analysis only (an oracle needs the answer to choose), and it needs no decoding: at temperature 0 every drafter
produces the same tokens, so the oracle's samples are the chosen drafter's stored samples.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any


def oracle_samples(runs: dict[str, list[dict[str, Any]]]) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Per question, the samples of the drafter with the best tau (new tokens / steps, turns pooled).

    `runs` maps drafter name -> stored samples of one single-drafter run each (same task, settings). Returns the
    oracle's samples and its choice per question. Analysis only: an oracle needs the answer to pick."""
    by_q: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for name, samples in runs.items():
        for s in samples:
            by_q[str(s["example_id"])][name].append(s)
    out, choice = [], {}
    for q, per in sorted(by_q.items()):
        complete = {n: ss for n, ss in per.items() if len(ss) == max(len(x) for x in per.values())}
        best = max(sorted(complete), key=lambda n: sum(s["new_tokens"] for s in complete[n]) /
                   max(1, sum(s["steps"] for s in complete[n])))
        choice[q] = best
        out.extend(complete[best])
    return out, choice
