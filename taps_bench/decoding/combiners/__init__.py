"""Combiners: proposers built from K >= 2 drafters of one target. The engine does not know they exist.

The drafters may be EAGLE-1/2/HASS or EAGLE-3 ones, in any mix: one target forward per step serves them all
(`base.Multi` declares the union of the target states its members read and hands each its own), every tree holds
target token ids, and the target verifies over its full vocabulary, so every combiner stays lossless. The routing
and merged-tree combiners also take model-free drafters (prompt lookup, `decoding.pld`), which read nothing of the
target; `average` refuses them (no weights to average).

A combiner is one class with a typed options model (`Options`, a `CombinerOptions` subclass whose `combiner` field
is the combiner's name) and a `build(options, drafters, target_model, tree, head_dtype) -> Proposer` classmethod.
The built-in ones are registered exactly as a plugin's are: by the `taps_bench.combiners` entry points in
pyproject.toml (a third party declares its own, or drops a file in `--include DIR/combiners/`).

- `average`: one drafter whose parameters are alpha * A + (1 - alpha) * B (weight-space merging; the paper's worst);
  A and B of one family and shape (two EAGLE-3 drafters: one configuration and draft vocabulary).
- `confidence`: every drafter drafts; the tree with the highest mean node confidence exp(cumulative log-prob) wins.
- `entropy`: every drafter drafts; the tree with the lowest mean draft entropy wins.
  Both route per step (every drafter drafts from the same accepted state each step, only the winner's tree is
  verified, every drafter's cache stays in sync) or per prompt (decided on the first tree, kept for the answer).
- `merged-tree`: every drafter's tree hangs under the shared root and all are verified in one forward. `budget=full`
  (the paper's: each drafter keeps its own budget) or `budget=equal` (the total budget is split between drafters).
The oracle (per prompt, the drafter with the best tau) needs no decoding: `taps_bench.results.oracle` computes it
from stored single-drafter runs, since at T=0 every drafter produces the same tokens.
"""

from taps_bench.decoding.combiners.average import Average, AverageOptions, average_weights
from taps_bench.decoding.combiners.base import Combiner, Multi, NodeStats
from taps_bench.decoding.combiners.merged import MergedTree, MergedTreeOptions, merge_trees
from taps_bench.decoding.combiners.routing import (
    Confidence,
    Entropy,
    Routed,
    RoutingOptions,
    tree_confidence,
    tree_entropy,
)

__all__ = ["Average", "AverageOptions", "Combiner", "Confidence", "Entropy", "MergedTree", "MergedTreeOptions",
           "Multi", "NodeStats", "Routed", "RoutingOptions", "average_weights", "merge_trees", "tree_confidence",
           "tree_entropy"]
