"""Combiners: proposers built from K >= 2 drafters of one target. The engine does not know they exist.

Each is a registered class (`@register_combiner`); `build(drafters, target_model, tree, **options)` makes one.
- `average`: one drafter whose parameters are alpha * A + (1 - alpha) * B (weight-space merging; the paper's worst).
- `confidence`: every drafter drafts; the tree with the highest mean node confidence exp(cumulative log-prob) wins.
- `entropy`: every drafter drafts; the tree with the lowest mean draft entropy wins.
  Both route per step (every drafter drafts from the same accepted state each step, only the winner's tree is
  verified, every drafter's cache stays in sync) or per prompt (decided on the first tree, kept for the answer).
- `merged-tree`: every drafter's tree hangs under the shared root and all are verified in one forward. `budget=full`
  (the paper's: each drafter keeps its own budget) or `budget=equal` (the total budget is split between drafters).
The oracle (per prompt, the drafter with the best tau) needs no decoding: it is computed from stored single-drafter
runs by `oracle_samples`, since at T=0 every drafter produces the same tokens.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torch import Tensor

from taps_bench.cards import TreeSettings
from taps_bench.drafter import Drafter
from taps_bench.eagle2 import EagleProposer
from taps_bench.errors import UserError
from taps_bench.registry import register_combiner
from taps_bench.tree import DraftTree


def tree_confidence(tree: DraftTree) -> float:
    """Mean over drafted nodes of exp(cumulative draft log-probability)."""
    return float(tree.logp[1:].exp().mean()) if tree.size > 1 else 0.0


def tree_entropy(tree: DraftTree) -> float:
    """Mean over drafted nodes of the entropy of the distribution each was drawn from."""
    return float(tree.entropy[1:].mean()) if tree.size > 1 else float("inf")


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


class _Multi:
    """Shared plumbing: K EAGLE-2 proposers over the same target, all fed the same committed tokens."""

    def __init__(self, drafters: list[tuple[str, Drafter]], target_model: Any, tree: TreeSettings,
                 head_dtype: str = "target") -> None:
        if len(drafters) < 2:
            raise UserError("a combiner needs at least two drafters (--drafters a,b)")
        self.names = [n for n, _ in drafters]
        if len(set(self.names)) != len(self.names):
            raise UserError(f"a combiner's drafters need distinct names (got {', '.join(self.names)})")
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


class Routed(_Multi):
    """Route to one drafter's tree by a score, per step or per prompt."""

    higher_is_better = True

    def __init__(self, drafters: list[tuple[str, Drafter]], target_model: Any, tree: TreeSettings,
                 granularity: str = "step", head_dtype: str = "target") -> None:
        super().__init__(drafters, target_model, tree, head_dtype)
        if granularity not in ("step", "prompt"):
            raise UserError(f"--granularity must be step or prompt (got {granularity})")
        self.granularity = granularity
        self.name = f"{self.combiner_name}-{granularity}({','.join(self.names)})"  # type: ignore[attr-defined]
        self.chosen: int | None = None

    def score(self, tree: DraftTree) -> float:
        raise NotImplementedError

    def reset(self) -> None:
        super().reset()
        self.chosen = None

    def propose(self, tokens: Tensor, hidden: Tensor, root: int) -> DraftTree:
        if self.chosen is not None:  # per prompt, decided: only the chosen drafter keeps drafting
            self.choices.append(self.chosen)
            return self.proposers[self.chosen].propose(tokens, hidden, root)
        trees = [p.propose(tokens, hidden, root) for p in self.proposers]
        scores = [self.score(t) for t in trees]
        best = max(range(len(trees)), key=lambda i: scores[i] if self.higher_is_better else -scores[i])
        if self.granularity == "prompt":
            self.chosen = best
        self.choices.append(best)
        return trees[best]

    def observe(self, tree: DraftTree, accepted: list[int]) -> None:
        self.stats.add(tree, accepted, source=self.choices[-1])

    def diagnostics(self) -> dict[str, Any]:
        return {"combiner": self.combiner_name, "granularity": self.granularity,  # type: ignore[attr-defined]
                **self._decisions(), "nodes": self.stats.summary()}


@register_combiner("confidence")
class Confidence(Routed):
    """Route to the drafter whose tree has the highest mean confidence exp(cumulative log-prob); per step or prompt."""

    def score(self, tree: DraftTree) -> float:
        return tree_confidence(tree)


@register_combiner("entropy")
class Entropy(Routed):
    """Route to the drafter whose tree has the lowest mean draft entropy; per step or per prompt."""

    higher_is_better = False

    def score(self, tree: DraftTree) -> float:
        return tree_entropy(tree)


def merge_trees(trees: list[DraftTree]) -> DraftTree:
    """Hang every tree under one shared root: index offsets, `source` says which drafter proposed each node.

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


@register_combiner("merged-tree")
class MergedTree(_Multi):
    """Verify every drafter's tree at once under a shared root (budget=full: the paper's; equal: total split)."""

    def __init__(self, drafters: list[tuple[str, Drafter]], target_model: Any, tree: TreeSettings,
                 budget: str = "full", head_dtype: str = "target") -> None:
        if budget not in ("full", "equal"):
            raise UserError(f"--budget must be full or equal (got {budget})")
        if budget == "equal":  # the root is shared: split the drafted nodes, keep at least one each
            per = max(2, 1 + (tree.total_tokens - 1) // len(drafters))
            tree = TreeSettings(total_tokens=per, depth=tree.depth, top_k=tree.top_k)
        super().__init__(drafters, target_model, tree, head_dtype)
        self.budget = budget
        self.name = f"merged-tree-{budget}({','.join(self.names)})"

    def propose(self, tokens: Tensor, hidden: Tensor, root: int) -> DraftTree:
        return merge_trees([p.propose(tokens, hidden, root) for p in self.proposers])

    def observe(self, tree: DraftTree, accepted: list[int]) -> None:
        if len(accepted) > 1 and tree.source is not None:
            self.choices.append(int(tree.source[accepted[1]]))
        self.stats.add(tree, accepted)

    def diagnostics(self) -> dict[str, Any]:
        return {"combiner": "merged-tree", "budget": self.budget, **self._decisions(), "nodes": self.stats.summary()}


@register_combiner("average")
class Average:
    """Parameter-wise alpha * A + (1 - alpha) * B of two drafters (weight-space merging), used as one drafter."""

    @staticmethod
    def merge(a: Drafter, b: Drafter, alpha: float) -> Drafter:
        if not 0 <= alpha <= 1:
            raise UserError(f"--alpha must be in [0, 1] (got {alpha})")
        sa, sb = a.state_for_saving(), b.state_for_saving()
        if sa.keys() != sb.keys() or any(sa[k].shape != sb[k].shape for k in sa):
            diff = sorted(set(sa) ^ set(sb)) or [k for k in sa if sa[k].shape != sb[k].shape]
            raise UserError(f"cannot average drafters of different shapes (differ at {', '.join(diff[:3])})")
        merged = Drafter(a.config, fc_bias=a.fc.bias is not None, with_embedding=a.embed_tokens is not None)
        # alpha = 1 (or 0) must give exactly A (or B): no arithmetic on the kept side.
        state = {k: sa[k].clone() if alpha == 1 else sb[k].clone() if alpha == 0
                 else alpha * sa[k] + (1 - alpha) * sb[k] for k in sa}
        merged.load_state_dict(state, strict=False)
        return merged.eval()


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
