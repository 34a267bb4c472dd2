"""The single-drafter proposer: EAGLE-2 dynamic draft trees over one EAGLE-format drafter.

Drafting (EAGLE-2, Li et al. 2024): the first level takes the `top_k` best next tokens under the root; then, `depth`
times, every frontier node proposes its own `top_k` children, and only the `top_k` children with the best cumulative
draft log-probability become the next frontier. Every child stays a candidate. Finally the best `total_tokens - 1`
candidates by cumulative log-probability form the tree (sorting by (score, creation order) keeps it closed under
ancestors, since a child never scores above its parent). So the tree has up to depth + 1 drafted levels, as in the
EAGLE-2 code that the paper's `depth=5` refers to; `top_k=1` gives a chain.

Why it is written this way: drafting runs once per verify step, so its Python overhead is paid per step. A level is a
fixed number of tensor ops whatever `top_k` is: the frontier's ancestry is a bool tensor (the attention mask is cut
from it), the drafter's KV cache is a static buffer written in place (the tree part of a step lies after the accepted
part and is forgotten by resetting the length), and the drafter's projections are pre-packed (`forward.Linear`).

Reduced draft vocabulary (FR-Spec; EAGLE-3's `d2t`): with `draft_ids`, the drafter scores only those target tokens
(the most frequent ones of a corpus, `training/vocab.py`) through a sliced copy of the lm_head, and its picks are
mapped back to target ids. The target still verifies over its full vocabulary, so decoding stays lossless at any
size: greedy acceptance compares target argmaxes, and the sampling rule only uses target probabilities of
deterministically chosen drafts. A tree's `logp` and `entropy` are then over the reduced draft distribution.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from taps_bench.catalog.cards import TreeSettings
from taps_bench.decoding.tree import DraftTree
from taps_bench.models.drafter import KV, Drafter, draft_head
from taps_bench.models.forward import Linear


class StaticKV:
    """The drafter's cache for one sequence: keys and values [kv_heads, capacity, head_dim], slots [0, length)
    valid. Capacity grows by doubling (slots keep their values), so a step never concatenates the past."""

    def __init__(self, kv_heads: int, head_dim: int, device: torch.device, dtype: torch.dtype,
                 capacity: int = 256) -> None:
        self.keys = torch.zeros(kv_heads, capacity, head_dim, device=device, dtype=dtype)
        self.values = torch.zeros_like(self.keys)
        self.length = 0

    @property
    def capacity(self) -> int:
        return int(self.keys.shape[1])

    def reserve(self, slots: int) -> None:
        if slots <= self.capacity:
            return
        size = self.capacity
        while size < slots:
            size *= 2
        keys = self.keys.new_zeros(self.keys.shape[0], size, self.keys.shape[2])
        values = torch.zeros_like(keys)
        keys[:, : self.length] = self.keys[:, : self.length]
        values[:, : self.length] = self.values[:, : self.length]
        self.keys, self.values = keys, values


class PackedDrafter:
    """The drafter's forward for drafting (no autograd): fused, pre-packed projections over a `StaticKV`.

    Same maths as `Drafter.forward` (fc over [embed, feature], one Llama layer without input norm); training keeps
    the nn.Module, whose `F.linear` over unpacked weights is 2-3x slower at the 1-10 rows a draft level has."""

    def __init__(self, drafter: Drafter) -> None:
        layer, c = drafter.layers[0], drafter.config
        a, m = layer.self_attn, layer.mlp
        self.heads, self.kv_heads, self.head_dim = a.heads, a.kv_heads, a.head_dim
        self.fc = Linear(drafter.fc.weight, drafter.fc.bias)
        self.qkv = Linear(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).detach())
        self.o = Linear(a.o_proj.weight)
        self.gate_up = Linear(torch.cat([m.gate_proj.weight, m.up_proj.weight]).detach())
        self.down = Linear(m.down_proj.weight)
        self.norm = layer.post_attention_layernorm.weight.detach().float()
        self.eps = layer.post_attention_layernorm.eps
        self.rotary = drafter.rotary
        self.weight = drafter.fc.weight
        self.cos = self.sin = self.weight.new_zeros(0, self.head_dim)
        self.hidden = c.hidden_size

    def new_cache(self) -> StaticKV:
        return StaticKV(self.kv_heads, self.head_dim, self.weight.device, self.weight.dtype)

    def _tables(self, positions: int) -> None:
        """Rotary cos/sin for positions [0, positions), from the drafter's own rotary module (its scaling rules),
        recomputed by doubling so that a call never depends on which positions came before."""
        if positions <= self.cos.shape[0]:
            return
        size = max(positions, 2 * self.cos.shape[0], 512)
        probe = self.weight.new_zeros(1)
        cos, sin = self.rotary(probe, torch.arange(size, device=self.weight.device)[None])
        self.cos, self.sin = cos[0].to(self.weight.dtype), sin[0].to(self.weight.dtype)

    def __call__(self, embeds: Tensor, features: Tensor, positions: Tensor, past: StaticKV,
                 mask: Tensor) -> tuple[Tensor, KV]:
        return self.forward(embeds, features, positions, past, mask)

    def forward(self, embeds: Tensor, features: Tensor, positions: Tensor, past: StaticKV,
                mask: Tensor) -> tuple[Tensor, KV]:
        """embeds, features [t, H]; positions [t]; mask [t, past.length + t] bool. Writes the new keys and values
        at slots past.length.. (the caller decides whether to keep them by moving `past.length`). Returns the
        predicted features [t, H] and views of the new keys and values."""
        t, start = embeds.shape[0], past.length
        end = start + t
        past.reserve(end)
        self._tables(int(positions.max()) + 1)
        x = self.fc(torch.cat([embeds, features.to(embeds.dtype)], dim=-1).to(self.weight.dtype))
        qkv = self.qkv(x).view(t, self.heads + 2 * self.kv_heads, self.head_dim)
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]
        qk = qkv[:, : self.heads + self.kv_heads]
        half = self.head_dim // 2
        qk = qk * cos + torch.cat([-qk[..., half:], qk[..., :half]], dim=-1) * sin
        past.keys[:, start:end] = qk[:, self.heads:].transpose(0, 1)
        past.values[:, start:end] = qkv[:, self.heads + self.kv_heads:].transpose(0, 1)
        attn = F.scaled_dot_product_attention(qk[:, : self.heads].transpose(0, 1)[None], past.keys[None, :, :end],
                                              past.values[None, :, :end], attn_mask=mask[None, None],
                                              enable_gqa=self.kv_heads != self.heads)
        x = x + self.o(attn[0].transpose(0, 1).reshape(t, self.heads * self.head_dim))
        h = F.rms_norm(x.float(), (self.hidden,), self.norm, self.eps).to(x.dtype)
        gate, up = self.gate_up(h).chunk(2, dim=-1)
        out = x + self.down(F.silu(gate) * up)
        return out, KV(past.keys[None, :, start:end], past.values[None, :, start:end])


class EagleProposer:
    """Proposes EAGLE-2 trees; its own KV cache holds only accepted context between calls."""

    def __init__(self, drafter: Drafter, target_model: Any, tree: TreeSettings, name: str = "drafter",
                 head_dtype: str = "target", draft_ids: Tensor | None = None) -> None:
        self.name = name
        device = target_model.lm_head.weight.device
        vocab = int(target_model.lm_head.weight.shape[0])
        if draft_ids is not None:
            draft_ids = draft_ids.to(device=device, dtype=torch.long).flatten()
            if draft_ids.numel() < 1 or int(draft_ids.min()) < 0 or int(draft_ids.max()) >= vocab or \
                    torch.unique(draft_ids).numel() != draft_ids.numel():
                raise ValueError(f"draft_ids must be distinct target token ids in [0, {vocab})")
        self.draft_ids = draft_ids
        self.drafter = PackedDrafter(drafter.to(device=device, dtype=target_model.lm_head.weight.dtype))
        self.embed = target_model.get_input_embeddings().weight.detach()
        self.lm_head = draft_head(target_model.lm_head, head_dtype, draft_ids)
        self.vocab = vocab if draft_ids is None else int(draft_ids.numel())
        self.settings = tree
        self.device = device
        self.kv = self.drafter.new_cache()
        self.accepted = 0  # drafter cache slots holding accepted context; the rest is last step's tree

    def reset(self) -> None:
        self.kv.length = self.accepted = 0

    def observe(self, tree: DraftTree, accepted: list[int]) -> None:
        pass

    def diagnostics(self) -> dict[str, Any]:
        return {}

    def _target_ids(self, index: Tensor) -> Tensor:
        return index if self.draft_ids is None else self.draft_ids[index]

    def _scores(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """Draft log-probabilities [rows, vocab] (the reduced vocabulary's, when there is one) and their entropy."""
        logp = torch.log_softmax(self.lm_head(features), dim=-1)
        return logp, -(logp.exp() * logp).sum(-1)

    def _advance(self, tokens: Tensor, hidden: Tensor, root: int) -> Tensor:
        """Consume the newly committed (feature, next token) pairs into the cache; return the root's predicted
        feature (the drafter's output at the last pair, whose token is the root)."""
        self.kv.length = self.accepted  # forget last step's tree: the target's hidden states replace it
        next_tokens = torch.cat([tokens[1:].to(self.device), torch.tensor([root], device=self.device)])
        past, t = self.accepted, next_tokens.numel()
        positions = torch.arange(past, past + t, device=self.device)
        mask = torch.ones(t, past + t, dtype=torch.bool, device=self.device).tril(past)
        out, _ = self.drafter(self.embed[next_tokens], hidden.to(self.device), positions, self.kv, mask)
        self.kv.length = self.accepted = past + t
        return out[-1:]

    @torch.inference_mode()
    def propose(self, tokens: Tensor, hidden: Tensor, root: int) -> DraftTree:
        s = self.settings
        k = min(s.top_k, self.vocab)  # a reduced vocabulary may be smaller than top_k
        feature = self._advance(tokens, hidden, root)
        base = self.kv.length  # drafter position of the depth-1 nodes
        dev = self.device
        self.kv.reserve(base + s.depth * k)

        # Candidate nodes, in creation order (parents always before children). Index 0 is the root.
        logp, entropy = self._scores(feature)  # [1, V'], [1]
        top = torch.topk(logp[0], k)
        frontier_tokens, frontier_score = self._target_ids(top.indices), top.values
        cand_tokens = [torch.tensor([root], device=dev), frontier_tokens]
        cand_parent = [torch.tensor([-1], device=dev), torch.zeros(k, dtype=torch.long, device=dev)]
        cand_score = [torch.zeros(1, device=dev), frontier_score]
        cand_entropy = [torch.zeros(1, device=dev), entropy.expand(k)]
        n_cand = 1 + k
        frontier_ids = torch.arange(1, 1 + k, device=dev)
        frontier_features = feature.expand(k, -1)

        # The tree part of the cache: level l's k frontier nodes sit at slots base + l*k + row. `ancestry[r]` marks
        # the tree slots of frontier row r's expanded ancestors (one per earlier level), so the level's mask is
        # [context | ancestry | itself] without looking at any node on its own.
        ancestry = torch.zeros(k, 0, dtype=torch.bool, device=dev)
        eye = torch.eye(k, dtype=torch.bool, device=dev)
        context = torch.ones(k, base, dtype=torch.bool, device=dev)
        for level in range(s.depth):
            mask = torch.cat([context, ancestry, eye], dim=1)
            positions = torch.full((k,), base + level, device=dev)
            out, _ = self.drafter(self.embed[frontier_tokens], frontier_features, positions, self.kv, mask)
            self.kv.length += k

            logp, entropy = self._scores(out)  # [k, V'], [k]
            child = torch.topk(logp, k, dim=-1)  # [k, k]
            child_score = (frontier_score[:, None] + child.values).reshape(-1)
            child_tokens = self._target_ids(child.indices.reshape(-1))
            cand_tokens.append(child_tokens)
            cand_parent.append(frontier_ids.repeat_interleave(k))
            cand_score.append(child_score)
            cand_entropy.append(entropy.repeat_interleave(k))
            if level + 1 == s.depth:
                break  # the last level's children are candidates only: no frontier is expanded after it
            best = torch.topk(child_score, k).indices
            rows = torch.div(best, k, rounding_mode="floor")  # each new frontier node's parent row
            frontier_ids = n_cand + best
            frontier_tokens, frontier_score = child_tokens[best], child_score[best]
            frontier_features = out[rows]
            ancestry = torch.cat([ancestry[rows], eye[rows]], dim=1)
            n_cand += k * k

        return select_tree(torch.cat(cand_tokens), torch.cat(cand_parent), torch.cat(cand_score),
                       torch.cat(cand_entropy), s.total_tokens)


def select_tree(tokens: Tensor, parents: Tensor, scores: Tensor, entropy: Tensor, total_tokens: int) -> DraftTree:
    """Keep the root and the best `total_tokens - 1` candidates, parents before children, re-indexed."""
    n = tokens.numel() - 1
    keep_n = min(total_tokens - 1, n)
    # Stable sort on -score: ties keep creation order, so a parent (created first, never scoring below its child)
    # always ranks ahead of its children and the kept set is closed under ancestors.
    order = torch.sort(-scores[1:].cpu(), stable=True).indices[:keep_n] + 1
    kept = torch.sort(order).values  # creation order: parents precede children
    kept = torch.cat([torch.zeros(1, dtype=torch.long), kept])
    new_index = torch.full((n + 1,), -1, dtype=torch.long)
    new_index[kept] = torch.arange(kept.numel())
    par = parents.cpu()[kept]
    new_par = torch.where(par >= 0, new_index[par.clamp(min=0)], torch.full_like(par, -1))
    return DraftTree(tokens=tokens.cpu()[kept], parents=new_par, logp=scores.cpu()[kept], entropy=entropy.cpu()[kept])
