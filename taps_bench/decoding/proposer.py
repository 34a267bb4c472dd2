"""The one interface the engine knows: something that proposes a draft tree.

A single drafter is a proposer; every combiner is a proposer built from several drafters; plain autoregressive
decoding is the proposer that proposes nothing. The engine never asks which one it has.
"""

from __future__ import annotations

from typing import Any, Protocol

from torch import Tensor

from taps_bench.decoding.tree import DraftTree, root_only


class Proposer(Protocol):
    name: str

    def reset(self) -> None:
        """Forget everything: a new sequence starts."""

    def propose(self, tokens: Tensor, hidden: Tensor, root: int) -> DraftTree:
        """Draft a tree under `root`.

        tokens: the tokens committed to the target's cache since the last call (the whole prompt on the first call),
        hidden: the target's features at those tokens [len(tokens), F]: its post-norm last hidden states, or, for a
        proposer with a `taps` attribute (EAGLE-3), the concatenated states entering those layers
        (`engine.features`); root: the token the
        target produced after them (not yet in its cache). After this call the proposer must hold only accepted
        context: anything it drafted is speculative until the next call confirms it.
        """
        ...

    def observe(self, tree: DraftTree, accepted: list[int]) -> None:
        """Told which nodes of its last tree were accepted (for diagnostics and routing); may do nothing."""

    def diagnostics(self) -> dict[str, Any]:
        """What the proposer decided during the sequence (routing choices...), stored with the sample."""
        ...


class Autoregressive:
    """Proposes nothing: the target verifies only the root, one token per forward (the baseline arm)."""

    name = "autoregressive"

    def reset(self) -> None:
        pass

    def propose(self, tokens: Tensor, hidden: Tensor, root: int) -> DraftTree:
        return root_only(root)

    def observe(self, tree: DraftTree, accepted: list[int]) -> None:
        pass

    def diagnostics(self) -> dict[str, Any]:
        return {}
