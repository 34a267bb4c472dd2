"""Weight averaging: one drafter whose parameters are alpha * A + (1 - alpha) * B, used as an ordinary drafter.

Both drafters must be of one family (EAGLE-1/2/HASS, or EAGLE-3) and of one shape; two EAGLE-3 drafters must also
share their configuration and draft vocabulary (`d2t`/`t2d`): their head rows are tokens, so averaging heads over
different tokens, like averaging networks of different architectures, has no parameter-wise meaning."""

from __future__ import annotations

from dataclasses import fields
from typing import Any, Literal, overload

import torch
from pydantic import Field, field_validator
from torch import Tensor

from taps_bench.catalog.cards import TreeSettings
from taps_bench.catalog.proposers import CombinerOptions
from taps_bench.decoding.combiners.base import Combiner, NamedDrafters
from taps_bench.decoding.eagle2 import EagleProposer
from taps_bench.decoding.eagle3 import Eagle3Proposer
from taps_bench.decoding.proposer import Proposer
from taps_bench.errors import UserError
from taps_bench.models.drafter import Drafter
from taps_bench.models.eagle3 import Eagle3Drafter

VOCAB_MAP = ("d2t", "t2d")  # integer/bool buffers: a vocabulary, never averaged (they must be equal)


def family(drafter: Drafter | Eagle3Drafter) -> str:
    return "EAGLE-3" if isinstance(drafter, Eagle3Drafter) else "EAGLE-1/2/HASS"


def _mix(sa: dict[str, Tensor], sb: dict[str, Tensor], alpha: float, keep: tuple[str, ...] = ()) -> dict[str, Tensor]:
    # alpha = 1 (or 0) must give exactly A (or B): no arithmetic on the kept side.
    return {k: sa[k].clone() if alpha == 1 or k in keep else sb[k].clone() if alpha == 0
            else alpha * sa[k] + (1 - alpha) * sb[k] for k in sa}


def _same_vocabulary(a: Eagle3Drafter, b: Eagle3Drafter) -> bool:
    if a.config.vocab_size != b.config.vocab_size or a.config.draft_vocab_size != b.config.draft_vocab_size:
        return False
    if (a.d2t is None) != (b.d2t is None):
        return False
    return a.d2t is None or (torch.equal(a.d2t.cpu(), b.d2t.cpu()) and a.t2d is not None and b.t2d is not None
                             and torch.equal(a.t2d.cpu(), b.t2d.cpu()))


def _average_eagle3(a: Eagle3Drafter, b: Eagle3Drafter, alpha: float) -> Eagle3Drafter:
    if not _same_vocabulary(a, b):
        raise UserError(f"cannot average EAGLE-3 drafters with different draft vocabularies (draft_vocab_size "
                        f"{a.config.draft_vocab_size} vs {b.config.draft_vocab_size}, or a different d2t/t2d): "
                        f"their head rows are different tokens, so they cannot be averaged parameter-wise")
    differ = [f.name for f in fields(a.config) if getattr(a.config, f.name) != getattr(b.config, f.name)]
    if differ:
        raise UserError(f"cannot average EAGLE-3 drafters of different configurations (differ in "
                        f"{', '.join(differ[:3])}): different architectures cannot be averaged parameter-wise")
    merged = Eagle3Drafter(a.config)
    merged.load_state_dict(_mix(a.state_dict(), b.state_dict(), alpha, keep=VOCAB_MAP), strict=True)
    return merged.eval()


def _average_eagle2(a: Drafter, b: Drafter, alpha: float) -> Drafter:
    sa, sb = a.state_for_saving(), b.state_for_saving()
    if sa.keys() != sb.keys() or any(sa[k].shape != sb[k].shape for k in sa):
        diff = sorted(set(sa) ^ set(sb)) or [k for k in sa if sa[k].shape != sb[k].shape]
        raise UserError(f"cannot average drafters of different shapes (differ at {', '.join(diff[:3])})")
    merged = Drafter(a.config, fc_bias=a.fc.bias is not None, with_embedding=a.embed_tokens is not None)
    merged.load_state_dict(_mix(sa, sb, alpha), strict=False)
    return merged.eval()


@overload
def average_weights(a: Drafter, b: Drafter, alpha: float) -> Drafter: ...
@overload
def average_weights(a: Eagle3Drafter, b: Eagle3Drafter, alpha: float) -> Eagle3Drafter: ...
@overload
def average_weights(a: Drafter | Eagle3Drafter, b: Drafter | Eagle3Drafter,
                    alpha: float) -> Drafter | Eagle3Drafter: ...
def average_weights(a: Drafter | Eagle3Drafter, b: Drafter | Eagle3Drafter, alpha: float) -> Drafter | Eagle3Drafter:
    """The drafter alpha * A + (1 - alpha) * B, parameter by parameter, of A's family (A and B must be of one family
    and one shape; EAGLE-3 drafters also of one configuration and draft vocabulary)."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1] (got {alpha})")
    if isinstance(a, Eagle3Drafter) and isinstance(b, Eagle3Drafter):
        return _average_eagle3(a, b, alpha)
    if isinstance(a, Drafter) and isinstance(b, Drafter):
        return _average_eagle2(a, b, alpha)
    raise UserError(f"cannot average an {family(a)} drafter with an {family(b)} drafter: different architectures "
                    f"cannot be averaged parameter-wise")


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
        for name, d in drafters:  # the registry refuses this before loading anything; a direct caller gets it here
            if not isinstance(d, (Drafter, Eagle3Drafter)):
                raise UserError(f"combiner average: drafter '{name}' is model-free (prompt lookup): it has no weights "
                                "to average; combine it with confidence, entropy or merged-tree instead")
        label = f"average({name_a},{name_b};alpha={options.alpha:g})"
        merged = average_weights(a, b, options.alpha)
        if isinstance(merged, Eagle3Drafter):
            return Eagle3Proposer(merged, target_model, tree, name=label)
        return EagleProposer(merged, target_model, tree, name=label, head_dtype=head_dtype)
