"""Prompt-lookup decoding (PLD): a model-free proposer that drafts by copying from the sequence itself.

The draft: the longest suffix n-gram of the context (prompt, every committed token, then the root), n from
`max_ngram` down to `min_ngram`, that occurs earlier in the context; after its most recent earlier occurrence, the
`num_pred_tokens` tokens that followed it, as a chain under the root. No match: the root alone (a plain step). Where
the copy reaches the end of the context (a recent match), it goes on copying what it has just copied (an overlapping
copy, as LZ77 decodes one), so a repeating pattern is continued instead of cut short. (The reference implementation
takes the first occurrence and stops at the end; the most recent one is the likelier continuation of the text being
written.) The match is one comparison of every window of the context with its suffix, not a loop over positions.

Why it stays lossless at any temperature: the draft is a deterministic function of the committed tokens, a point
mass q = one-hot. The engine's sampling rule (`engine.accept_sampling`) is speculative sampling for such drafts: it
accepts a drafted x with probability p(x) = min(1, p(x) / q(x)) and on a rejection draws from p without x,
renormalised, which is norm(max(0, p - q)). It reads no draft probability (`logp` only orders siblings, and a chain
has none), so PLD's drafts need no q of their own and `logp` is free to carry what the routing combiners read.

What the combiners read (`combiners.routing`: mean exp(logp) and mean entropy of a tree's drafted nodes): a point
mass has probability 1 and entropy 0, which would make confidence and entropy routing pick PLD at every match,
however badly its copies fare. Each drafted node carries instead an estimate of its chance of being accepted:
- rate: the chance that one copied token is accepted, by Laplace's rule of succession over the evidence for this
  copy: the n tokens of the matched n-gram (the two places agree that far; a longer match is a safer copy) and the
  sequence's own record of copies (each earlier draft checked against what the target then emitted, whether that
  draft was verified or, in a combiner, another drafter's was): (hits + n + 1) / (trials + n + 2);
- logp at depth d: d * log(rate), the estimated chance that the path to the node is accepted (what an EAGLE
  drafter's cumulative draft probability approximates, so confidence routing compares like with like);
- entropy: h(rate), the binary entropy of a copy's outcome (log 2 for a coin flip, 0 for a sure copy). It is a lower
  bound of the entropy of any next-token distribution that gives the copy probability `rate`, so entropy routing
  still leans towards PLD; confidence routing is the fairer router for it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from taps_bench.catalog.cards import PromptLookup
from taps_bench.decoding.tree import DraftTree, root_only

NO_MATCH = (-1, 0)


def find_match(context: Tensor, max_ngram: int, min_ngram: int) -> tuple[int, int]:
    """(start, n): the longest suffix n-gram of `context` (n from max_ngram down to min_ngram) that occurs earlier,
    at its most recent earlier occurrence; `start` is the position of the token that followed it. NO_MATCH: none."""
    length = context.numel()
    longest = min(max_ngram, length - 1)  # an earlier occurrence ends before the last token: it needs a follower
    if longest < min_ngram:
        return NO_MATCH
    # Row e: the `longest` tokens ending at position e, for every e that has a follower (padded with -1, no token,
    # before the start); column j lines up with the suffix's token j.
    padded = torch.cat([context.new_full((longest - 1,), -1), context[:-1]])
    windows = padded.unfold(0, longest, 1)  # [length - 1, longest]
    agree = (windows == context[length - longest:]).flip(1)  # column 0: position e against the last token
    run = agree.to(torch.int32).cumprod(1).sum(1)  # per e: how many tokens agree, counted back from e
    best = int(run.max())
    if best < min_ngram:
        return NO_MATCH
    end = int(torch.nonzero(run == best)[-1])  # the most recent occurrence of the longest match
    return end + 1, best


def copy_from(context: Tensor, start: int, count: int) -> Tensor:
    """`count` tokens copied from position `start` on; past the end of `context` the copy continues from what it
    has copied, i.e. the last `len - start` tokens repeat."""
    period = context.numel() - start
    return context[start + torch.arange(count) % period]


def copy_outcome(draft: Tensor, emitted: Tensor) -> tuple[int, int]:
    """(hits, trials) of one draft against the tokens the target emitted after its root: the draft's leading tokens
    the target also emitted, and how many tokens that judged (the first miss ends it; tokens past what was emitted
    are not judged)."""
    m = min(draft.numel(), emitted.numel())
    hits = int((draft[:m] == emitted[:m]).to(torch.int32).cumprod(0).sum())
    return hits, hits + int(hits < m)


def acceptance_rate(hits: int, trials: int, ngram: int) -> float:
    """The estimated chance that a copied token is accepted (the module docstring says why): in (0, 1)."""
    return (hits + ngram + 1) / (trials + ngram + 2)


def binary_entropy(p: float) -> float:
    return -(p * math.log(p) + (1 - p) * math.log1p(-p)) if 0 < p < 1 else 0.0


def chain(root: int, draft: Tensor, rate: float) -> DraftTree:
    """The draft as a chain under the root: node d (depth d) carries logp d * log(rate) and entropy h(rate)."""
    depth = torch.arange(draft.numel() + 1, dtype=torch.float32)
    return DraftTree(tokens=torch.cat([torch.tensor([root]), draft.cpu()]), parents=torch.arange(-1, draft.numel()),
                     logp=depth * math.log(rate), entropy=(depth > 0).float() * binary_entropy(rate))


class PromptLookupProposer:
    """Drafts by prompt lookup (see the module docstring); holds the committed context and its record of copies.
    `max_tokens` caps the chain below `num_pred_tokens` (a combiner's node budget); it ignores the target's
    features."""

    def __init__(self, options: PromptLookup, name: str = "pld", max_tokens: int | None = None) -> None:
        self.name = name
        self.options = options
        cap = options.num_pred_tokens if max_tokens is None else max_tokens
        self.count = max(0, min(options.num_pred_tokens, cap))
        self.reset()

    def reset(self) -> None:
        self.context = torch.zeros(0, dtype=torch.long)  # the committed tokens (the root is not yet one)
        self.last = torch.zeros(0, dtype=torch.long)  # the last draft, below its root: judged at the next call
        self.hits = self.trials = self.steps = self.matched = self.ngrams = 0

    def propose(self, tokens: Tensor, hidden: Tensor, root: int) -> DraftTree:
        tokens = tokens.to(device="cpu", dtype=torch.long).flatten()
        if self.last.numel():  # tokens[0] is the last root; what the target emitted after it follows, then `root`
            hits, trials = copy_outcome(self.last, torch.cat([tokens[1:], torch.tensor([root])]))
            self.hits, self.trials = self.hits + hits, self.trials + trials
        self.context = torch.cat([self.context, tokens])
        context = torch.cat([self.context, torch.tensor([root])])
        self.steps += 1
        o = self.options
        start, ngram = find_match(context, o.max_ngram, o.min_ngram) if self.count else NO_MATCH
        if start < 0:
            self.last = self.last[:0]
            return root_only(root)
        self.last = copy_from(context, start, self.count)
        self.matched, self.ngrams = self.matched + 1, self.ngrams + ngram
        return chain(root, self.last, acceptance_rate(self.hits, self.trials, ngram))

    def observe(self, tree: DraftTree, accepted: list[int]) -> None:
        pass  # the next call's tokens say what was accepted, also when another drafter's tree was verified

    def diagnostics(self) -> dict[str, Any]:
        """Share of steps with a match, the mean matched n-gram length, and the share of judged copies accepted."""
        return {"lookup": {"steps": self.steps, "matched": self.matched / max(1, self.steps),
                           "mean_ngram": self.ngrams / self.matched if self.matched else None,
                           "copies_judged": self.trials,
                           "copy_accept_rate": self.hits / self.trials if self.trials else None}}
