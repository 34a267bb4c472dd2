"""Weight averaging: one drafter whose parameters are alpha * A + (1 - alpha) * B, used as an ordinary drafter."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from taps_bench.catalog.cards import TreeSettings
from taps_bench.catalog.proposers import CombinerOptions
from taps_bench.decoding.combiners.base import Combiner, NamedDrafters
from taps_bench.decoding.eagle2 import EagleProposer
from taps_bench.decoding.proposer import Proposer
from taps_bench.errors import UserError
from taps_bench.models.drafter import Drafter


def average_weights(a: Drafter, b: Drafter, alpha: float) -> Drafter:
    """The drafter alpha * A + (1 - alpha) * B, parameter by parameter (A and B must have the same shapes)."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1] (got {alpha})")
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


class AverageOptions(CombinerOptions):
    combiner: Literal["average"] = "average"
    alpha: float = Field(0.5, ge=0, le=1)

    @field_validator("drafters", mode="before")  # before the shared checks: "exactly two" is the clearer message
    @classmethod
    def _two(cls, names: Any) -> Any:
        if len(names) != 2:
            raise ValueError(f"average takes exactly two drafters, alpha * A + (1 - alpha) * B (got {len(names)})")
        return names


class Average(Combiner):
    """Parameter-wise alpha * A + (1 - alpha) * B of two drafters (weight-space merging), used as one drafter."""

    combiner_name = "average"
    Options = AverageOptions

    @classmethod
    def build(cls, options: Any, drafters: NamedDrafters, target_model: Any, tree: TreeSettings,
              head_dtype: str = "target") -> Proposer:
        (name_a, a), (name_b, b) = drafters
        label = f"average({name_a},{name_b};alpha={options.alpha:g})"
        return EagleProposer(average_weights(a, b, options.alpha), target_model, tree, name=label,
                             head_dtype=head_dtype)
