"""Token selection: greedy, or temperature / top-k / top-p sampling with a seeded generator.

The same processing is applied to every token the target emits (accepted, correction and bonus tokens alike), which
is what makes speculative sampling lossless with respect to the processed distribution.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import Tensor

from taps_bench.errors import UserError


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise UserError(f"temperature must be >= 0 (got {self.temperature}); 0 means greedy decoding")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1] (got {self.top_p})")
        if self.top_k < 0:
            raise UserError(f"sampling top_k must be >= 0 (got {self.top_k}); 0 disables the top-k cut")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self, *key: object) -> torch.Generator:
        """A generator seeded from the run seed and a sample key, so a resumed run draws the same tokens."""
        digest = hashlib.sha256(repr((self.seed, *key)).encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def probabilities(logits: Tensor, s: Sampling) -> Tensor:
    """Processed next-token distribution(s) for logits [..., V] (float32, on the CPU)."""
    logits = logits.float().cpu() / s.temperature
    if s.top_k:
        kth = torch.topk(logits, min(s.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if s.top_p < 1:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p: drop a token when the mass before it already does.
        drop_sorted = (torch.cumsum(sorted_p, dim=-1) - sorted_p) >= s.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def draw(probs: Tensor, gen: torch.Generator) -> int:
    return int(torch.multinomial(probs, 1, generator=gen))


def select(logits: Tensor, s: Sampling, gen: torch.Generator) -> int:
    """One token from one row of logits."""
    if s.greedy:
        return int(logits.argmax())
    return draw(probabilities(logits, s), gen)
