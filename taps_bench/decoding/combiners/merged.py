"""The merged-tree combiner: every drafter's tree under one shared root, all verified in one target forward."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from taps_bench.catalog.cards import TreeSettings
from taps_bench.catalog.proposers import CombinerOptions
from taps_bench.decoding.combiners.base import Multi, NamedDrafters
from taps_bench.decoding.proposer import Proposer
from taps_bench.decoding.tree import DraftTree


def merge_trees(trees: list[DraftTree]) -> DraftTree:
    """Hang every tree under one shared root: index offsets, `source` says which drafter proposed each node. Trees
    hold target ids whatever drafted them (an EAGLE-3 drafter's picks are mapped through d2t), so any mix merges.

    No node of one subtree is an ancestor of another's, so the ancestor mask is block-diagonal below the root:
    no attention across subtrees."""
    tokens, parents, logp, entropy, source = [trees[0].tokens[:1]], [torch.tensor([-1])], [torch.zeros(1)], \
        [torch.zeros(1)], [torch.zeros(1, dtype=torch.long)]
    offset = 1
    for k, t in enumerate(trees):
        if int(t.tokens[0]) != int(trees[0].tokens[0]):
            raise ValueError("trees to merge must share their root")
        n = t.size - 1
        par = t.parents[1:].clone()
        # parent 0 (the root) stays 0; parent j >= 1 moves to offset + j - 1
        parents.append(torch.where(par == 0, par, par + offset - 1))
        tokens.append(t.tokens[1:])
        logp.append(t.logp[1:])
        entropy.append(t.entropy[1:])
        source.append(torch.full((n,), k, dtype=torch.long))
        offset += n
    return DraftTree(tokens=torch.cat(tokens), parents=torch.cat(parents), logp=torch.cat(logp),
                     entropy=torch.cat(entropy), source=torch.cat(source))


class MergedTreeOptions(CombinerOptions):
    combiner: Literal["merged-tree"] = "merged-tree"
    budget: Literal["full", "equal"] = "full"


class MergedTree(Multi):
    """Verify every drafter's tree at once under a shared root (budget=full: the paper's; equal: total split)."""

    combiner_name = "merged-tree"
    Options = MergedTreeOptions

    def __init__(self, drafters: NamedDrafters, target_model: Any, tree: TreeSettings, budget: str = "full",
                 head_dtype: str = "target") -> None:
        if budget == "equal":  # the root is shared: split the drafted nodes, keep at least one each
            per = max(2, 1 + (tree.total_tokens - 1) // len(drafters))
            tree = TreeSettings(total_tokens=per, depth=tree.depth, top_k=tree.top_k)
        super().__init__(drafters, target_model, tree, head_dtype)
        self.budget = budget
        self.name = f"merged-tree-{budget}({','.join(self.names)})"

    @classmethod
    def build(cls, options: Any, drafters: NamedDrafters, target_model: Any, tree: TreeSettings,
              head_dtype: str = "target") -> Proposer:
        return cls(drafters, target_model, tree, budget=options.budget, head_dtype=head_dtype)

    def propose(self, tokens: Tensor, hidden: Tensor, root: int) -> DraftTree:
        return merge_trees([self.draft(i, tokens, hidden, root) for i in range(len(self.proposers))])

    def observe(self, tree: DraftTree, accepted: list[int]) -> None:
        if len(accepted) > 1 and tree.source is not None:
            self.choices.append(int(tree.source[accepted[1]]))
        self.stats.add(tree, accepted)

    def diagnostics(self) -> dict[str, Any]:
        return {"combiner": "merged-tree", "budget": self.budget, **self._decisions(), "nodes": self.stats.summary()}
