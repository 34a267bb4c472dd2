"""Routing combiners: every drafter drafts, one tree (chosen by a score) is verified, per step or per prompt."""

from __future__ import annotations

from typing import Any, Literal

from torch import Tensor

from taps_bench.catalog.cards import TreeSettings
from taps_bench.catalog.proposers import CombinerOptions
from taps_bench.decoding.combiners.base import Multi, NamedDrafters
from taps_bench.decoding.proposer import Proposer
from taps_bench.decoding.tree import DraftTree


def tree_confidence(tree: DraftTree) -> float:
    """Mean over drafted nodes of exp(cumulative draft log-probability)."""
    return float(tree.logp[1:].exp().mean()) if tree.size > 1 else 0.0


def tree_entropy(tree: DraftTree) -> float:
    """Mean over drafted nodes of the entropy of the distribution each was drawn from."""
    return float(tree.entropy[1:].mean()) if tree.size > 1 else float("inf")


class RoutingOptions(CombinerOptions):
    granularity: Literal["step", "prompt"] = "step"


class Routed(Multi):
    """Route to one drafter's tree by a score, per step or per prompt."""

    higher_is_better = True

    def __init__(self, drafters: NamedDrafters, target_model: Any, tree: TreeSettings, granularity: str = "step",
                 head_dtype: str = "target") -> None:
        super().__init__(drafters, target_model, tree, head_dtype)
        self.granularity = granularity
        self.name = f"{self.combiner_name}-{granularity}({','.join(self.names)})"
        self.chosen: int | None = None

    @classmethod
    def build(cls, options: Any, drafters: NamedDrafters, target_model: Any, tree: TreeSettings,
              head_dtype: str = "target") -> Proposer:
        return cls(drafters, target_model, tree, granularity=options.granularity, head_dtype=head_dtype)

    def score(self, tree: DraftTree) -> float:
        raise NotImplementedError

    def reset(self) -> None:
        super().reset()
        self.chosen = None

    def propose(self, tokens: Tensor, hidden: Tensor, root: int) -> DraftTree:
        if self.chosen is not None:  # per prompt, decided: only the chosen drafter keeps drafting
            self.choices.append(self.chosen)
            return self.draft(self.chosen, tokens, hidden, root)
        trees = [self.draft(i, tokens, hidden, root) for i in range(len(self.proposers))]
        scores = [self.score(t) for t in trees]
        best = max(range(len(trees)), key=lambda i: scores[i] if self.higher_is_better else -scores[i])
        if self.granularity == "prompt":
            self.chosen = best
        self.choices.append(best)
        return trees[best]

    def observe(self, tree: DraftTree, accepted: list[int]) -> None:
        self.stats.add(tree, accepted, source=self.choices[-1])

    def diagnostics(self) -> dict[str, Any]:
        return {"combiner": self.combiner_name, "granularity": self.granularity, **self._decisions(),
                "nodes": self.stats.summary()}


class ConfidenceOptions(RoutingOptions):
    combiner: Literal["confidence"] = "confidence"


class Confidence(Routed):
    """Route to the drafter whose tree has the highest mean confidence exp(cumulative log-prob); per step or prompt."""

    combiner_name = "confidence"
    Options = ConfidenceOptions

    def score(self, tree: DraftTree) -> float:
        return tree_confidence(tree)


class EntropyOptions(RoutingOptions):
    combiner: Literal["entropy"] = "entropy"


class Entropy(Routed):
    """Route to the drafter whose tree has the lowest mean draft entropy; per step or per prompt."""

    combiner_name = "entropy"
    Options = EntropyOptions
    higher_is_better = False

    def score(self, tree: DraftTree) -> float:
        return tree_entropy(tree)
