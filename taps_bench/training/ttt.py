"""EAGLE-3's training objective: training-time test over the three-layer target features.

The drafter reads, at slot s, the concatenated target states entering the tapped layers at token s (through `fc`)
and the embedding of token s+1, and is scored on the target's next-token distribution at position s+1. Training-time
test then unrolls it on its own outputs for `ttt_steps - 1` more steps, exactly as it drafts: in step j (0-based),
slot s reads the drafter's own output of step j-1 at slot s (no `fc`, and not detached, so the gradient runs
through the unrolled chain as in EAGLE-3's trainer) with the embedding of token s+1+j, sits at rotary position
s+j, attends to the step-0 keys of slots <= s (the true context) and to its own keys of steps 1..j at slot s (its
drafted ancestors), and is scored on the target's distribution at position s+1+j. That is the attention a depth-j
tree node has at decoding time (`decoding.eagle3`), so deep drafts are trained where they are used.

The target distribution is the target's softmax restricted to the draft vocabulary; positions whose target argmax
is outside it carry no loss (the drafter cannot propose that token). Step j's loss is weighted 0.8^j, EAGLE-3's
weights. There is no feature regression: the drafter's output is its own representation, not the target's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from taps_bench.models.drafter import KV
from taps_bench.models.eagle3 import Eagle3Drafter

STEP_DECAY = 0.8  # EAGLE-3's per-step loss weights: 1, 0.8, 0.64, ...


def ttt_mask(length: int, step: int, device: torch.device | str = "cpu") -> Tensor:
    """[length, (step + 1) * length] bool: what slot s may attend to in unrolled step `step` (0-based).

    Block 0 holds the step-0 keys (the true context: slots <= s); block k >= 1 holds step k's keys, of which only
    slot s itself is visible (its drafted ancestor at depth k)."""
    s = torch.arange(length, device=device)[:, None]
    p = torch.arange(length, device=device)[None, :]
    return torch.cat([p <= s] + [p == s] * step, dim=1)


@dataclass
class Targets:
    """The target's distributions over the draft vocabulary at positions 1..T-1 (index q: position q + 1)."""

    probs: Tensor  # [B, T-1, V'] (zero where weight is zero)
    weight: Tensor  # [B, T-1] loss mask x (target argmax is in the draft vocabulary)


def target_distributions(lm_head: Any, hidden: Tensor, weight: Tensor, draft_ids: Tensor | None) -> Targets:
    """`hidden` [B, T-1, H]: the target's post-norm states at positions 1..T-1; `weight` [B, T-1] the loss mask.
    The vocabulary-sized product runs only where the weight is non-zero (assistant tokens)."""
    sel = weight > 0
    with torch.no_grad():
        logits = lm_head(hidden[sel]).float()
        top = logits.argmax(-1)
        if draft_ids is not None:
            inside = torch.zeros(logits.shape[-1], dtype=torch.bool)
            inside[draft_ids] = True
            keep = inside[top]
            logits = logits[:, draft_ids]
        else:
            keep = torch.ones_like(top, dtype=torch.bool)
        probs = torch.zeros(*weight.shape, logits.shape[-1])
        probs[sel] = torch.softmax(logits, dim=-1)
        w = torch.zeros_like(weight)
        w[sel] = weight[sel] * keep.float()
    return Targets(probs=probs, weight=w)


def unroll(drafter: Eagle3Drafter, embed: Any, ids: Tensor, aux: Tensor, steps: int) -> list[Tensor]:
    """The drafter's outputs of each unrolled step, [B, T-1, H] each (slot s of step j: depth-j output of the chain
    rooted at slot s). ids [B, T]; aux [B, T, F]: the tapped features of every token."""
    b, t = ids.shape
    length = t - 1
    outputs: list[Tensor] = []
    past: KV | None = None
    hidden = aux[:, :-1].float()
    for step in range(min(steps, length)):
        # Slot s reads token s+1+step (zero past the end: those slots carry no loss).
        tokens = torch.zeros(b, length, dtype=torch.long, device=ids.device)
        tokens[:, : length - step] = ids[:, 1 + step:]
        positions = (torch.arange(length, device=ids.device) + step)[None].expand(b, -1)
        mask = ttt_mask(length, step, ids.device)[None, None]
        hidden, new = drafter(embed(tokens).detach(), hidden, positions, past, mask, from_target=step == 0)
        past = new if past is None else past.cat(new)
        outputs.append(hidden)
    return outputs


def ttt_losses(drafter: Eagle3Drafter, embed: Any, ids: Tensor, aux: Tensor, targets: Targets,
               steps: int) -> dict[str, Tensor]:
    """The weighted sum of the unrolled steps' soft cross-entropies, and per-step top-1 agreement with the target
    (`acc` for step 0, `acc<j>` for step j)."""
    length = ids.shape[1] - 1
    out: dict[str, Tensor] = {"loss": torch.zeros(()), "p": torch.zeros(())}
    for step, hidden in enumerate(unroll(drafter, embed, ids, aux, steps)):
        # Slot s of this step is scored at position s+1+step: the targets shifted by `step`.
        w = targets.weight[:, step:]
        sel = w > 0
        logq = torch.log_softmax(drafter.logits(hidden[:, : length - step][sel]), dim=-1)
        p = targets.probs[:, step:][sel]
        ws = w[sel]
        ce = (-(p * logq).sum(-1) * ws).sum() / ws.sum().clamp(min=1e-5)
        out["loss"] = out["loss"] + STEP_DECAY ** step * ce
        out["p"] = out["p"] + ce.detach()
        agree = ((logq.argmax(-1) == p.argmax(-1)).float() * ws).sum() / ws.sum().clamp(min=1)
        out["acc" if step == 0 else f"acc{step}"] = agree.detach()
    return out
