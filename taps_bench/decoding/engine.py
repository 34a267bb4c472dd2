"""The decoding engine: prefill, then [propose tree > verify > accept > compact caches] until a stop.

Plain autoregressive decoding is this same loop with the proposer that proposes nothing (a root-only tree is one
ordinary single-token forward), so both arms share the cache, stopping and token counting, and their timings compare
like with like. Each stage is a small function over tensors returning plain data.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from transformers import DynamicCache

from taps_bench.decoding.proposer import Proposer
from taps_bench.decoding.sampling import Sampling, draw, probabilities, select
from taps_bench.decoding.tree import DraftTree, ancestor_mask, children_of, path_to, prefix
from taps_bench.errors import UserError


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


@functools.cache
def _cache_kwarg_of(cls: type) -> str:
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def cache_kwarg(module: Any) -> str:
    """transformers renamed `past_key_values` to `cache` during 5.x; use whichever this version takes."""
    return _cache_kwarg_of(type(module))


# -- stages ----------------------------------------------------------------------------------------------------


def forward(model: Any, ids: Tensor, cache: DynamicCache, positions: Tensor, mask: Tensor | None) -> tuple[Tensor,
                                                                                                            Tensor]:
    """One target forward over `ids` [n] appended to `cache`. Returns (post-norm hidden [n, H], logits [n, V])."""
    out = model.model(input_ids=ids[None], position_ids=positions[None], attention_mask=mask, use_cache=True,
                      **{cache_kwarg(model.model): cache})
    hidden = out.last_hidden_state[0]
    return hidden, model.lm_head(hidden)


def prefill(model: Any, prompt: Tensor, cache: DynamicCache) -> tuple[Tensor, Tensor]:
    """Run the prompt through the target: hidden states of every prompt token and the logits after the last one."""
    hidden, logits = forward(model, prompt, cache, torch.arange(prompt.numel(), device=prompt.device), None)
    return hidden, logits[-1]


# Attention implementations known to apply a custom 4D mask as given (tested for both in tests/test_engine.py).
# Flash-attention kernels take no arbitrary mask and would silently verify the tree as a causal chain.
TREE_MASK_IMPLEMENTATIONS = ("sdpa", "eager")


def tree_attention_mask(tree: DraftTree, context: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """[1, 1, N, context + N] additive mask: each node sees the whole context, the root and its own ancestors.

    Additive (0 or the dtype's minimum) rather than boolean, because eager attention adds the mask to the scores:
    a boolean mask would be read as +1/+0 there and mask nothing.
    """
    n = tree.size
    allowed = torch.ones(n, context + n, dtype=torch.bool, device=device)
    allowed[:, context:] = ancestor_mask(tree.parents).to(device)
    mask = torch.zeros(1, 1, n, context + n, dtype=dtype, device=device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)


def verify(model: Any, tree: DraftTree, cache: DynamicCache, context: int) -> tuple[Tensor, Tensor]:
    """Score every node of the tree in one target forward (positions: context length + depth)."""
    device = model.lm_head.weight.device
    ids = tree.tokens.to(device)
    positions = (context + tree.depths).to(device)
    # A root-only tree is an ordinary decoding step: the default causal mask is exact and cheaper than a 4D one.
    mask = None
    if tree.size > 1:
        impl = getattr(model.config, "_attn_implementation", "sdpa")
        if impl not in TREE_MASK_IMPLEMENTATIONS:
            raise UserError(f"attention implementation '{impl}' cannot apply a tree mask; load the target with "
                            f"attn_implementation='sdpa'")
        mask = tree_attention_mask(tree, context, device, model.lm_head.weight.dtype)
    return forward(model, ids, cache, positions, mask)


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


def compact(cache: DynamicCache, context: int, path: list[int]) -> None:
    """Keep the context plus the accepted tree nodes (in path order) in every layer of the target's cache."""
    m = len(path)
    contiguous = path == list(range(m))
    index = torch.tensor(path, device=cache.layers[0].keys.device) + context
    for layer in cache.layers:
        if not contiguous:
            layer.keys[..., context:context + m, :] = layer.keys[..., index, :]
            layer.values[..., context:context + m, :] = layer.values[..., index, :]
        layer.keys = layer.keys[..., : context + m, :]
        layer.values = layer.values[..., : context + m, :]


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
    device = model.lm_head.weight.device
    gen = gen or sampling.generator()
    stops = set(stop_ids)
    max_context = max_context or getattr(model.config, "max_position_embeddings", None) or 1 << 30
    c = Counters()
    cache = DynamicCache(config=model.config)
    proposer.reset()

    start = _sync(device)
    prompt = torch.tensor(prompt_ids, dtype=torch.long, device=device)
    hidden, last_logits = prefill(model, prompt, cache)
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
        hidden, logits = verify(model, tree, cache, context)
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
