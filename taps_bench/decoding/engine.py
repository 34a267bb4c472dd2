"""The decoding engine: prefill, then [propose tree > verify > accept > compact caches] until a stop.

Plain autoregressive decoding is this same loop with the proposer that proposes nothing (a root-only tree is one
ordinary single-token forward), so both arms share the cache, stopping and token counting, and their timings compare
like with like. Each stage is a small function over tensors returning plain data. The target runs through
`models.forward`: pre-packed weights, a static cache compacted in place, and attention whose rounding does not depend
on the tree, so a verified node's logits are exactly those of plain decoding at that position.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from taps_bench.decoding.proposer import Proposer
from taps_bench.decoding.sampling import Sampling, draw, probabilities, select
from taps_bench.decoding.tree import DraftTree, ancestor_mask, children_of, path_to, prefix
from taps_bench.models import forward
from taps_bench.models.attention import NEAR_DEPTH, Cache
from taps_bench.models.forward import Weights


@dataclass
class Counters:
    """Raw per-sample counters; every metric is derived from these (see metrics.py)."""

    new_tokens: int = 0
    steps: int = 0  # target forward passes, prefill included
    accept_lengths: list[int] = field(default_factory=list)  # drafted tokens accepted per verify step (no bonus)
    drafted_by_depth: list[int] = field(default_factory=list)  # tree nodes at depth d (index d-1), summed over steps
    accepted_by_depth: list[int] = field(default_factory=list)  # steps whose accepted path reached depth d
    tree_sizes: list[int] = field(default_factory=list)  # tree nodes verified per step, root included
    prefill_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0
    total_s: float = 0.0
    stop_reason: str = ""


@dataclass
class Generation:
    output_ids: list[int]
    counters: Counters
    diagnostics: dict[str, Any]


@dataclass(frozen=True)
class Acceptance:
    path: list[int]  # accepted tree nodes, root first (all of them enter the target's cache)
    next_token: int  # the bonus (or correction) token: the root of the next tree


# -- stages ----------------------------------------------------------------------------------------------------


def new_cache(weights: Weights, tokens: int) -> Cache:
    """A static cache for `tokens` positions (rounded up; `ensure_capacity` grows it if a run needs more)."""
    return weights.new_cache(min(-(-tokens // 256) * 256, weights.max_positions + 64))


def ensure_capacity(weights: Weights, cache: Cache, tokens: int) -> Cache:
    """The same cache, or a larger copy of it: slots keep their values, so no number changes."""
    if tokens <= cache.capacity:
        return cache
    bigger = new_cache(weights, max(tokens, 2 * cache.capacity))
    for old, new in zip(cache.keys + cache.values, bigger.keys + bigger.values, strict=True):
        new[:, : old.shape[1]] = old
    return bigger


def prefill(weights: Weights, prompt: Tensor, cache: Cache,
            taps: tuple[int, ...] | None = None) -> tuple[Tensor, Tensor]:
    """Run the prompt through the target: the features of every prompt token and the logits after the last one.
    Features are the post-norm last hidden states, or with `taps` (a proposer's, see `features`) the concatenated
    states entering those layers, in the order given (index L, the number of layers, is the post-norm last hidden
    state, as in HF's `hidden_states`)."""
    if taps is None:
        return forward.prefill(weights, prompt, cache)
    _, logits, tapped = forward.prefill(weights, prompt, cache, taps)
    return torch.cat(tapped, dim=-1), logits


def verify(weights: Weights, tree: DraftTree, cache: Cache, context: int,
           taps: tuple[int, ...] | None = None) -> tuple[Tensor, Tensor]:
    """Score every node of the tree in one target forward (node i at position context + depth, seeing the context
    and its ancestors). Each node's logits are bit-identical to a one-token forward at its position (forward.py).
    Returns the nodes' features (as `prefill` defines them) and logits."""
    ids = tree.tokens.to(weights.device)
    if taps is None:
        return forward.extend(weights, ids, tree.depths, ancestor_mask(tree.parents), cache, context)
    _, logits, tapped = forward.extend(weights, ids, tree.depths, ancestor_mask(tree.parents), cache, context, taps)
    return torch.cat(tapped, dim=-1), logits


def features(proposer: Proposer) -> tuple[int, ...] | None:
    """The HF hidden-state indices a proposer drafts from (index i < L: the state entering layer i, EAGLE-3 reads
    three; index L: the post-norm last hidden state), or None: the post-norm last hidden state alone (EAGLE-1/2,
    HASS, combiners of those). A combiner mixing EAGLE-2 and EAGLE-3 drafters declares the union, index L included,
    and slices it per drafter. One forward serves any of these; nothing is recomputed."""
    return getattr(proposer, "taps", None)


def accept_greedy(tree: DraftTree, logits: Tensor) -> Acceptance:
    """Longest root-to-leaf path whose tokens equal the target's argmax, plus the target's next token as bonus."""
    best = logits.argmax(dim=-1).tolist()
    tokens, parents = tree.tokens.tolist(), tree.parents.tolist()
    ok = [True] + [False] * (len(tokens) - 1)
    deepest, depths = 0, tree.depths.tolist()
    for i in range(1, len(tokens)):
        ok[i] = ok[parents[i]] and tokens[i] == best[parents[i]]
        if ok[i] and depths[i] > depths[deepest]:
            deepest = i
    return Acceptance(path=path_to(tree, deepest), next_token=best[deepest])


def accept_sampling(tree: DraftTree, logits: Tensor, s: Sampling, gen: torch.Generator) -> Acceptance:
    """Lossless sequential-sibling rule (EAGLE-2, for deterministically chosen drafts).

    Walk down from the root. Among the children of the current node, best draft probability first, accept child x
    with probability p(x) under the target's processed distribution p; on rejection set p(x) = 0 and renormalise.
    When every child is rejected, the correction token is drawn from what is left of p; at a leaf, the bonus token is
    drawn from p. Every emitted token is therefore distributed exactly as p.
    """
    probs = probabilities(logits, s)
    kids = children_of(tree)
    tokens = tree.tokens.tolist()
    node = 0
    while True:
        p = probs[node].clone()
        for child in kids[node]:
            x = tokens[child]
            mass = float(p.sum())
            if mass > 0 and torch.rand((), generator=gen).item() < float(p[x]) / mass:
                node = child
                break
            p[x] = 0.0
        else:
            return Acceptance(path=path_to(tree, node), next_token=draw(p / p.sum(), gen))


def compact(cache: Cache, context: int, path: list[int]) -> None:
    """Keep the context plus the accepted tree nodes (in path order) in the target's cache."""
    cache.compact(context, path)


# -- the loop --------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> float:
    """Wall clock after the device has finished queued work (CUDA is asynchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _grow(values: list[int], depth: int) -> None:
    values.extend([0] * (depth - len(values)))


@torch.inference_mode()
def generate(model: Any, prompt_ids: list[int], proposer: Proposer, sampling: Sampling, max_new_tokens: int,
             stop_ids: tuple[int, ...], gen: torch.Generator | None = None,
             max_context: int | None = None, stop_when: Callable[[list[int]], bool] | None = None) -> Generation:
    """Decode one prompt. Returns the new token ids (stop token included, as `generate` does) and raw counters.

    `stop_when(output_ids)`, when given, is asked after every emitted token and ends decoding (stop reason
    "stop_string") when it returns True: for text stop sequences (lm-eval's `until`), which no token id expresses.
    It is checked per token, not per step, so a speculative run stops on the same token as the baseline.
    """
    weights = forward.prepare(model)
    device = weights.device
    gen = gen or sampling.generator()
    stops = set(stop_ids)
    max_context = min(max_context or weights.max_positions, weights.max_positions)
    c = Counters()
    cache = new_cache(weights, len(prompt_ids) + max_new_tokens + 64)
    proposer.reset()

    start = _sync(device)
    prompt = torch.tensor(prompt_ids, dtype=torch.long, device=device)
    taps = features(proposer)
    hidden, last_logits = prefill(weights, prompt, cache, taps)
    root = select(last_logits, sampling, gen)
    committed, committed_hidden = prompt, hidden
    context = prompt.numel()
    out = [root]
    c.steps = 1
    c.prefill_s = _sync(device) - start

    reason = ("stop_token" if root in stops else "stop_string" if stop_when is not None and stop_when(out)
              else "max_new_tokens" if max_new_tokens <= 1 else "")
    while not reason:
        if context + 1 > max_context:  # checked before drafting: a tree that cannot be verified is never drafted
            reason = "context"
            break
        t0 = _sync(device)
        tree = proposer.propose(committed.cpu(), committed_hidden, root)
        t1 = _sync(device)
        if context + tree.size > max_context:  # near the limit, verify what fits (parents precede children)
            tree = prefix(tree, max_context - context)
        if tree.max_depth > NEAR_DEPTH:
            raise ValueError(f"proposer {proposer.name} drafted a tree of depth {tree.max_depth}; the engine verifies "
                             f"trees up to depth {NEAR_DEPTH}")
        cache = ensure_capacity(weights, cache, context + tree.size)
        hidden, logits = verify(weights, tree, cache, context, taps)
        t2 = _sync(device)
        acc = (accept_greedy(tree, logits) if sampling.greedy
               else accept_sampling(tree, logits, sampling, gen))
        proposer.observe(tree, acc.path)
        compact(cache, context, acc.path)

        c.steps += 1
        c.tree_sizes.append(tree.size)
        c.accept_lengths.append(len(acc.path) - 1)
        depth_hist = torch.bincount(tree.depths[1:], minlength=tree.max_depth + 1).tolist()[1:]
        _grow(c.drafted_by_depth, len(depth_hist))
        for d, n in enumerate(depth_hist):
            c.drafted_by_depth[d] += n
        _grow(c.accepted_by_depth, len(acc.path) - 1)
        for d in range(len(acc.path) - 1):
            c.accepted_by_depth[d] += 1

        path_index = torch.tensor(acc.path, device=device)
        committed = tree.tokens[acc.path]
        committed_hidden = hidden[path_index]
        context += len(acc.path)
        emitted = [*tree.tokens[acc.path[1:]].tolist(), acc.next_token]
        for tok in emitted:
            out.append(tok)
            if tok in stops:
                reason = "stop_token"
                break
            if stop_when is not None and stop_when(out):
                reason = "stop_string"
                break
            if len(out) >= max_new_tokens:
                reason = "max_new_tokens"
                break
        root = acc.next_token
        c.draft_s += t1 - t0
        c.verify_s += t2 - t1

    c.total_s = _sync(device) - start
    c.new_tokens = len(out)
    c.stop_reason = reason
    return Generation(output_ids=out, counters=c, diagnostics=proposer.diagnostics())
