"""What every combiner is, and the plumbing of those that run several proposers side by side.

A member is an `EagleProposer` (EAGLE-1/2/HASS drafter: reads the target's post-norm last hidden state), an
`Eagle3Proposer` (EAGLE-3 drafter: reads the states entering three target layers) or a model-free
`PromptLookupProposer` (reads nothing of the target, drafts within the combiner's node budget). The engine runs one
target forward per step for the whole combiner, so a combiner with an EAGLE-3 member declares `taps`: the sorted
union of what its members read, in HF `hidden_states` indices, where index L (the number of target layers) is the
post-norm last hidden state. Each member is then handed its own columns of those concatenated states, in its own
order. A combiner of EAGLE-2-style drafters only declares no taps and hands every member the engine's features
untouched (a model-free member counts as one of those: it is handed the last hidden state and ignores it).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, ClassVar

import torch
from torch import Tensor

from taps_bench.catalog.cards import PromptLookup, TreeSettings
from taps_bench.catalog.proposers import CombinerOptions
from taps_bench.decoding.eagle2 import EagleProposer
from taps_bench.decoding.eagle3 import Eagle3Proposer
from taps_bench.decoding.pld import PromptLookupProposer
from taps_bench.decoding.proposer import Proposer
from taps_bench.decoding.tree import DraftTree
from taps_bench.models.drafter import Drafter
from taps_bench.models.eagle3 import Eagle3Drafter

# A drafter is a checkpoint of either family, or a model-free drafter's options (prompt lookup).
NamedDrafters = list[tuple[str, Drafter | Eagle3Drafter | PromptLookup]]
Member = EagleProposer | Eagle3Proposer | PromptLookupProposer


class Combiner:
    """A combiner: `combiner_name`, its typed `Options`, and `build`, which makes the proposer for one sequence of
    runs. Options arrive validated (the registry checks them against `Options` before anything is loaded)."""

    combiner_name: ClassVar[str]
    Options: ClassVar[type[CombinerOptions]]
    # Whether `build` takes model-free drafters (a `PromptLookup` in place of a checkpoint): those that run members
    # side by side (`Multi`) do; one that needs weights (`average`) does not, and the registry refuses it one.
    model_free_members: ClassVar[bool] = False

    @classmethod
    def build(cls, options: Any, drafters: NamedDrafters, target_model: Any, tree: TreeSettings,
              head_dtype: str = "target") -> Proposer:
        raise NotImplementedError


def member(name: str, drafter: Drafter | Eagle3Drafter | PromptLookup, target_model: Any, tree: TreeSettings,
           head_dtype: str = "target") -> Member:
    """The single-drafter proposer of a drafter of either family (the head dtype only applies to EAGLE-2 heads,
    which are the target's lm_head; an EAGLE-3 drafter has its own), or of a model-free one, whose chain keeps to
    the tree's node budget (total_tokens - 1 drafted nodes, as every member's tree does)."""
    if isinstance(drafter, PromptLookup):
        return PromptLookupProposer(drafter, name=name, max_tokens=tree.total_tokens - 1)
    if isinstance(drafter, Eagle3Drafter):
        return Eagle3Proposer(drafter, target_model, tree, name=name)
    return EagleProposer(drafter, target_model, tree, name=name, head_dtype=head_dtype)


def feature_plan(members: list[Any], target_model: Any) -> tuple[tuple[int, ...] | None, list[Tensor | None]]:
    """The taps a combiner of these members declares, and for each member the feature columns it reads from the
    concatenation of those taps (None: all of it, as it is). No member with taps: no taps, nothing sliced."""
    needs = [getattr(p, "taps", None) for p in members]
    if all(n is None for n in needs):
        return None, [None] * len(members)
    last = int(target_model.config.num_hidden_layers)
    width = int(target_model.config.hidden_size)  # every tapped state is the residual stream: [n, hidden_size]
    device = target_model.lm_head.weight.device
    own = [tuple(n) if n is not None else (last,) for n in needs]
    union = tuple(sorted({i for n in own for i in n}))
    columns: list[Tensor | None] = []
    for n in own:
        if n == union:
            columns.append(None)
            continue
        starts = [union.index(i) * width for i in n]
        columns.append(torch.cat([torch.arange(s, s + width, device=device) for s in starts]))
    return union, columns


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
    """Shared plumbing: K proposers (EAGLE-2, EAGLE-3 or model-free drafters) over the same target, all fed the same
    committed tokens, each with its own features (`features_for`)."""

    model_free_members = True

    def __init__(self, drafters: NamedDrafters, target_model: Any, tree: TreeSettings,
                 head_dtype: str = "target") -> None:
        self.names = [n for n, _ in drafters]
        self.proposers: list[Member] = [member(n, d, target_model, tree, head_dtype) for n, d in drafters]
        self.taps, self.columns = feature_plan(self.proposers, target_model)
        self.stats = NodeStats(self.names)
        self.choices: list[int] = []

    def features_for(self, i: int, hidden: Tensor) -> Tensor:
        """Member i's features out of what the engine handed the combiner (its columns, contiguous, in its order)."""
        columns = self.columns[i]
        return hidden if columns is None else hidden.index_select(-1, columns)

    def draft(self, i: int, tokens: Tensor, hidden: Tensor, root: int) -> DraftTree:
        """Member i's tree, drafted from its own features. Every member's tree holds target ids (EAGLE-3 members
        map their draft vocabulary through d2t), so trees of different families compare and merge as they are."""
        return self.proposers[i].propose(tokens, self.features_for(i, hidden), root)

    def reset(self) -> None:
        for p in self.proposers:
            p.reset()
        self.stats = NodeStats(self.names)
        self.choices = []

    def _decisions(self) -> dict[str, Any]:
        counts = [self.choices.count(i) for i in range(len(self.names))]
        return {"choices": [self.names[i] for i in self.choices], "share": {n: c / max(1, len(self.choices)) for n, c in
                                                                           zip(self.names, counts, strict=True)}}
