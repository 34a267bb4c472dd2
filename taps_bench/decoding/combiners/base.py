"""What every combiner is, and the plumbing of those that run several EAGLE-2 proposers side by side."""

from __future__ import annotations

from collections import defaultdict
from typing import Any, ClassVar

from taps_bench.catalog.cards import TreeSettings
from taps_bench.catalog.proposers import CombinerOptions
from taps_bench.decoding.eagle2 import EagleProposer
from taps_bench.decoding.proposer import Proposer
from taps_bench.decoding.tree import DraftTree
from taps_bench.models.drafter import Drafter

NamedDrafters = list[tuple[str, Drafter]]


class Combiner:
    """A combiner: `combiner_name`, its typed `Options`, and `build`, which makes the proposer for one sequence of
    runs. Options arrive validated (the registry checks them against `Options` before anything is loaded)."""

    combiner_name: ClassVar[str]
    Options: ClassVar[type[CombinerOptions]]

    @classmethod
    def build(cls, options: Any, drafters: NamedDrafters, target_model: Any, tree: TreeSettings,
              head_dtype: str = "target") -> Proposer:
        raise NotImplementedError


class NodeStats:
    """Confidence and entropy of accepted versus rejected draft tokens, per drafter (stored as diagnostics)."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])  # count, confidence, entropy

    def add(self, tree: DraftTree, accepted: list[int], source: int | None = None) -> None:
        acc = set(accepted)
        src = tree.source.tolist() if tree.source is not None else [source or 0] * tree.size
        conf, ent = tree.logp.exp().tolist(), tree.entropy.tolist()
        for i in range(1, tree.size):
            key = f"{self.names[src[i]]}/{'accepted' if i in acc else 'rejected'}"
            s = self.sums[key]
            s[0] += 1
            s[1] += conf[i]
            s[2] += ent[i]

    def summary(self) -> dict[str, dict[str, float]]:
        return {k: {"n": v[0], "confidence": v[1] / v[0], "entropy": v[2] / v[0]} for k, v in sorted(self.sums.items())
                if v[0]}


class Multi(Combiner):
    """Shared plumbing: K EAGLE-2 proposers over the same target, all fed the same committed tokens."""

    def __init__(self, drafters: NamedDrafters, target_model: Any, tree: TreeSettings,
                 head_dtype: str = "target") -> None:
        self.names = [n for n, _ in drafters]
        self.proposers = [EagleProposer(d, target_model, tree, name=n, head_dtype=head_dtype) for n, d in drafters]
        self.stats = NodeStats(self.names)
        self.choices: list[int] = []

    def reset(self) -> None:
        for p in self.proposers:
            p.reset()
        self.stats = NodeStats(self.names)
        self.choices = []

    def _decisions(self) -> dict[str, Any]:
        counts = [self.choices.count(i) for i in range(len(self.names))]
        return {"choices": [self.names[i] for i in self.choices], "share": {n: c / max(1, len(self.choices)) for n, c in
                                                                           zip(self.names, counts, strict=True)}}
