"""Calibration of the routing signals: how the share of draft tokens the target accepted follows the drafter's own
confidence, and its entropy, as stored with each sample (`extra.nodes`: per drafter, the count and the mean
confidence and entropy of its accepted and of its rejected draft tokens; see site.rows.node_counts).

The store keeps no per-token record, so the unit is one drafter on one sample (prompt x turn): its drafted tokens'
mean confidence (or entropy) places it in a bin, and a bin's acceptance is the accepted share of all the draft
tokens in it (a ratio of sums). A signal a router can trust rises (confidence) or falls (entropy) across its bins;
for confidence, exp(cumulative log-probability of the path), a calibrated drafter lies on the diagonal."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from taps_bench.site.rows import node_counts

SIGNALS = {"confidence": 10, "entropy": 8}  # the bins of each signal: confidence over [0, 1], entropy [0, max]
Point = tuple[float, float, float, float]  # drafted tokens, accepted tokens, mean confidence, mean entropy
Bin = tuple[float, float, float]  # the bin's middle, its acceptance (accepted / drafted), its drafted tokens


def points(samples: Iterable[dict[str, Any]]) -> list[Point]:
    """One point per (sample, drafter) with draft tokens recorded."""
    out = []
    for s in samples:
        per: dict[str, dict[str, tuple[float, float, float]]] = defaultdict(dict)
        for key, n, c, e in node_counts(s):
            drafter, _, outcome = key.rpartition("/")
            if outcome in ("accepted", "rejected"):
                per[drafter][outcome] = (n, c, e)
        for parts in per.values():
            drafted = sum(n for n, _, _ in parts.values())
            accepted = parts.get("accepted", (0.0, 0.0, 0.0))[0]
            conf = sum(n * c for n, c, _ in parts.values()) / drafted
            ent = sum(n * e for n, _, e in parts.values()) / drafted
            point = (drafted, accepted, conf, ent)
            # Stored data comes from bundles too: sums may overflow, and a mean outside its range is no signal.
            if all(math.isfinite(x) for x in point) and 0 <= conf <= 1 and ent >= 0:
                out.append(point)
    return out


def signal_top(series: dict[str, list[Point]], signal: str) -> float:
    """The upper end of a signal's axis: 1 for confidence, the largest entropy seen (at least 0.1) for entropy."""
    if signal == "confidence":
        return 1.0
    return max((p[3] for pts in series.values() for p in pts), default=1.0) or 0.1


def binned(pts: list[Point], signal: str, top: float) -> list[Bin]:
    """The acceptance of each non-empty bin of `signal` over [0, top] (the top bin includes `top`)."""
    bins = SIGNALS[signal]
    sums: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for drafted, accepted, conf, ent in pts:
        x = conf if signal == "confidence" else ent
        i = min(bins - 1, max(0, int(x / top * bins))) if top > 0 else 0
        sums[i][0] += drafted
        sums[i][1] += accepted
    width = top / bins
    return [((i + 0.5) * width, acc / n, n) for i, (n, acc) in sorted(sums.items()) if n > 0]


def calibration(series: dict[str, list[Point]], signal: str) -> tuple[dict[str, list[Bin]], float]:
    """Each series' bins of `signal`, on one shared axis, and that axis' upper end."""
    top = signal_top(series, signal)
    return {name: b for name, pts in series.items() if (b := binned(pts, signal, top))}, top
