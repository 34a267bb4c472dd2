"""The EAGLE-3 drafter: its module and its draft-vocabulary mapping.

Its two checkpoint formats are read by `eagle3_format` (strict, like `drafter.load_drafter`).

The network (as SafeAILab's `eagle/model/cnets.py` defines it): `fc` projects the concatenation of three target
hidden states to the draft width; one decoder layer (`midlayer`) whose attention reads
`cat(input_layernorm(embed(token)), hidden_norm(hidden))` (q/k/v over 2H inputs) and adds the un-normed hidden as
its residual, then post_attention_layernorm and the MLP; its own final `norm` and an `lm_head` over
`draft_vocab_size` tokens. With a reduced vocabulary, buffer `d2t` holds OFFSETS (target id = draft index +
d2t[draft index]) and `t2d` marks the target tokens that have a draft index.

Which target states. SafeAILab's target forward (`modeling_llama_kv.py`) appends the hidden state *before* running
layer idx when idx is 2, L//2 or L-3, in layer order, so the features are the states ENTERING those layers: HF
`output_hidden_states` indices 2, L//2, L-3 (index i is the input of layer i; index 0 is the embedding). vLLM
captures the same way, and speculators hands its `eagle_aux_hidden_state_layer_ids` to vLLM unchanged (its dflash
converter says so: speculators uses the layer id directly), so a speculators id IS the HF index. SGLang/SpecForge
count layer OUTPUTS instead (SGLang captures at `id + 1`): an `eagle_config.eagle_aux_hidden_state_layer_ids` in a
SafeAILab-layout config is read with that +1. `aux_layers` below always holds HF indices.

Depth convention. At the first depth the hidden comes from the target: `forward(..., from_target=True)` applies
(the optional input norms and) `fc`. At later depths it is the drafter's own previous output as `forward` returned
it: the pre-norm output of the layer (both SafeAILab's `topK_genrate` and speculators feed that back), or the
post-norm one under speculators' `norm_output`; no `fc` again. `logits` applies the final norm (unless
`norm_output` already did) and the head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from taps_bench.errors import UserError
from taps_bench.models.drafter import KV, MLP, RMSNorm


@dataclass(frozen=True)
class Eagle3Config:
    hidden_size: int
    intermediate_size: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab_size: int  # the target's vocabulary (t2d's length, the embedding's rows)
    draft_vocab_size: int
    target_hidden_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0  # the drafter's own, never the target's
    aux_layers: tuple[int, ...] | None = None  # HF hidden_states indices; None: 2, L//2, L-3 of the target
    qk_norm: bool = False  # a Qwen3 layer (speculators' default layer type) normalises q and k per head
    norm_before_residual: bool = False  # speculators: the residual is hidden_norm(hidden), not hidden
    norm_before_fc: bool = False  # speculators: one RMSNorm (`input_norm`) over the concatenated features
    fc_norm: bool = False  # speculators: one RMSNorm per feature (`fc_norm.i`) before concatenating
    norm_output: bool = False  # speculators (EAGLE 3.1): the post-norm output is fed back and read by the head
    with_embedding: bool = False

    @property
    def num_aux(self) -> int:
        return len(self.aux_layers) if self.aux_layers else 3

    @property
    def reduced(self) -> bool:
        return self.draft_vocab_size != self.vocab_size


def aux_layers_for(config: Eagle3Config, num_target_layers: int) -> tuple[int, ...]:
    """The HF hidden_states indices (= layer inputs) this drafter reads from a target of that many layers."""
    n = num_target_layers
    if config.aux_layers is None:
        layers = (2, n // 2, n - 3)
        if not layers[0] < layers[1] < layers[2]:  # SafeAILab collects each layer once: fewer than three states
            raise UserError(f"an EAGLE-3 drafter reads target layers 2, L//2 and L-3, which are not three distinct "
                            f"layers of a {n}-layer target (it needs at least 7)")
        return layers
    bad = [i for i in config.aux_layers if not 0 <= i < n]
    if bad:
        raise UserError(f"the drafter reads hidden states entering target layer(s) {bad}, but the target has "
                        f"layers 0..{n - 1}")
    return config.aux_layers


def expected_shapes(c: Eagle3Config) -> dict[str, tuple[int, ...]]:
    """Every tensor of the SafeAILab layout with its shape (speculators renames `midlayer.` to `layers.0.`)."""
    h, t, i = c.hidden_size, c.target_hidden_size, c.intermediate_size
    q, kv = c.heads * c.head_dim, c.kv_heads * c.head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "fc.weight": (h, c.num_aux * t),
        "midlayer.self_attn.q_proj.weight": (q, 2 * h), "midlayer.self_attn.k_proj.weight": (kv, 2 * h),
        "midlayer.self_attn.v_proj.weight": (kv, 2 * h), "midlayer.self_attn.o_proj.weight": (h, q),
        "midlayer.mlp.gate_proj.weight": (i, h), "midlayer.mlp.up_proj.weight": (i, h),
        "midlayer.mlp.down_proj.weight": (h, i), "midlayer.input_layernorm.weight": (h,),
        "midlayer.hidden_norm.weight": (h,), "midlayer.post_attention_layernorm.weight": (h,),
        "norm.weight": (h,), "lm_head.weight": (c.draft_vocab_size, h)}
    if c.qk_norm:
        shapes.update({"midlayer.self_attn.q_norm.weight": (c.head_dim,),
                       "midlayer.self_attn.k_norm.weight": (c.head_dim,)})
    if c.norm_before_fc:
        shapes["input_norm.weight"] = (c.num_aux * t,)
    if c.fc_norm:
        shapes.update({f"fc_norm.{k}.weight": (t,) for k in range(c.num_aux)})
    if c.reduced:
        shapes.update({"d2t": (c.draft_vocab_size,), "t2d": (c.vocab_size,)})
    if c.with_embedding:
        shapes["embed_tokens.weight"] = (c.vocab_size, h)
    return shapes


class Attention(nn.Module):
    def __init__(self, c: Eagle3Config) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = c.heads, c.kv_heads, c.head_dim
        self.q_proj = nn.Linear(2 * c.hidden_size, c.heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(2 * c.hidden_size, c.kv_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(2 * c.hidden_size, c.kv_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.heads * c.head_dim, c.hidden_size, bias=False)
        self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps) if c.qk_norm else None
        self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps) if c.qk_norm else None

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], past: KV | None, mask: Tensor) -> tuple[Tensor, KV]:
        """x [B, T, 2H]; mask [B or 1, 1, T, past + T] bool (True: may attend)."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:  # Qwen3: per head, before rotary
            q, k = self.q_norm(q), self.k_norm(k)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), *rope)
        new = KV(k, v)
        full = past.cat(new) if past is not None else new
        out = F.scaled_dot_product_attention(q, full.keys, full.values, attn_mask=mask,
                                             enable_gqa=self.kv_heads != self.heads)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1)), new


class MidLayer(nn.Module):
    def __init__(self, c: Eagle3Config) -> None:
        super().__init__()
        self.norm_before_residual = c.norm_before_residual
        self.self_attn = Attention(c)
        self.mlp = MLP(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.hidden_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, embeds: Tensor, hidden: Tensor, rope: tuple[Tensor, Tensor], past: KV | None,
                mask: Tensor) -> tuple[Tensor, KV]:
        normed = self.hidden_norm(hidden)
        residual = normed if self.norm_before_residual else hidden
        attn, new = self.self_attn(torch.cat([self.input_layernorm(embeds), normed], dim=-1), rope, past, mask)
        x = residual + attn
        return x + self.mlp(self.post_attention_layernorm(x)), new


class Eagle3Drafter(nn.Module):
    def __init__(self, config: Eagle3Config) -> None:
        super().__init__()
        c = self.config = config
        self.fc = nn.Linear(c.num_aux * c.target_hidden_size, c.hidden_size, bias=False)
        self.midlayer = MidLayer(c)
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = nn.Linear(c.hidden_size, c.draft_vocab_size, bias=False)
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size) if c.with_embedding else None
        self.input_norm = RMSNorm(c.num_aux * c.target_hidden_size, c.rms_norm_eps) if c.norm_before_fc else None
        self.fc_norm = (nn.ModuleList([RMSNorm(c.target_hidden_size, c.rms_norm_eps) for _ in range(c.num_aux)])
                        if c.fc_norm else None)
        self.d2t: Tensor | None
        self.t2d: Tensor | None
        if c.reduced:
            self.register_buffer("d2t", torch.zeros(c.draft_vocab_size, dtype=torch.long))
            self.register_buffer("t2d", torch.zeros(c.vocab_size, dtype=torch.bool))
        else:  # the same vocabulary as the target: no mapping at all
            self.d2t = self.t2d = None
        inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.float32) / c.head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def rope(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos, sin [B, T, head_dim] of the half-split rotary convention (Llama's and Qwen's)."""
        freqs = positions[..., None].float() * self.inv_freq
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos(), emb.sin()

    def project(self, features: Tensor) -> Tensor:
        """The target's concatenated features [..., num_aux * H_target] to the draft width (first depth only)."""
        x = features.to(self.fc.weight.dtype)
        if self.input_norm is not None:
            x = self.input_norm(x)
        if self.fc_norm is not None:
            x = torch.cat([norm(part) for norm, part in zip(self.fc_norm, x.chunk(len(self.fc_norm), -1),
                                                            strict=True)], dim=-1)
        return self.fc(x)

    def forward(self, embeds: Tensor, hidden: Tensor, positions: Tensor, past: KV | None, mask: Tensor,
                from_target: bool) -> tuple[Tensor, KV]:
        """One drafter step. `hidden` is the target's features (from_target: `project` is applied) or this drafter's
        previous output (no fc). Unbatched: embeds [T, H], positions [T], mask [T, past + T]; batched: [B, T, ...],
        mask [B or 1, 1, T, past + T]. Returns the hidden to feed back at the next depth and the new KV."""
        single = embeds.dim() == 2
        if single:
            embeds, hidden, positions, mask = embeds[None], hidden[None], positions[None], mask[None, None]
        x = self.project(hidden) if from_target else hidden.to(self.fc.weight.dtype)
        out, new = self.midlayer(embeds.to(x.dtype), x, self.rope(positions), past, mask)
        if self.config.norm_output:
            out = self.norm(out)
        return (out[0] if single else out), new

    def logits(self, out: Tensor) -> Tensor:
        """Draft-vocabulary logits (float32) of `forward`'s output."""
        return self.lm_head(out if self.config.norm_output else self.norm(out)).float()


# -- draft vocabulary -> target vocabulary ------------------------------------------------------------------------


def target_ids(draft_ids: Tensor, d2t: Tensor | None) -> Tensor:
    """Target token ids of draft-vocabulary indices (d2t holds offsets; None: the vocabularies are the same)."""
    return draft_ids if d2t is None else draft_ids + d2t[draft_ids]


def to_target_vocab(values: Tensor, d2t: Tensor | None, vocab_size: int, fill: float) -> Tensor:
    """[..., draft_vocab] scattered onto [..., vocab_size]; target tokens without a draft index get `fill`."""
    if d2t is None:
        return values
    out = values.new_full((*values.shape[:-1], vocab_size), fill)
    out[..., target_ids(torch.arange(d2t.numel(), device=d2t.device), d2t)] = values
    return out


def target_logits(logits: Tensor, d2t: Tensor | None, vocab_size: int) -> Tensor:
    return to_target_vocab(logits, d2t, vocab_size, float("-inf"))  # tokens the drafter cannot propose: never


def target_probs(probs: Tensor, d2t: Tensor | None, vocab_size: int) -> Tensor:
    return to_target_vocab(probs, d2t, vocab_size, 0.0)


def topk_target(logits: Tensor, k: int, d2t: Tensor | None) -> tuple[Tensor, Tensor]:
    """Top-k in draft space (cheaper than over the scattered full vocabulary): (values, target ids)."""
    top = torch.topk(logits, k, dim=-1)
    return top.values, target_ids(top.indices, d2t)


def vocab_map_problem(d2t: Tensor, t2d: Tensor, vocab_size: int, draft_vocab_size: int) -> str | None:
    """Why d2t/t2d are not a consistent injective map of the draft vocabulary into the target's, or None."""
    if d2t.dtype.is_floating_point or d2t.dtype == torch.bool:
        return f"`d2t` has dtype {d2t.dtype}; it holds integer offsets"
    if t2d.dtype != torch.bool:
        return f"`t2d` has dtype {t2d.dtype}; it is a boolean mask over the target vocabulary"
    ids = torch.arange(draft_vocab_size) + d2t.long()
    outside = ((ids < 0) | (ids >= vocab_size)).nonzero()
    if len(outside):
        i = int(outside[0])
        return (f"`d2t` maps draft index {i} to target id {int(ids[i])}, outside the target vocabulary of "
                f"{vocab_size}")
    if int(t2d.sum()) != draft_vocab_size:
        return f"`t2d` marks {int(t2d.sum())} target tokens, but draft_vocab_size is {draft_vocab_size}"
    if torch.unique(ids).numel() != draft_vocab_size:
        return "`d2t` maps two draft indices to the same target id"
    unmarked = (~t2d[ids]).nonzero()
    if len(unmarked):
        i = int(unmarked[0])
        return f"`d2t` maps draft index {i} to target id {int(ids[i])}, which `t2d` does not mark"
    return None


def load_state(drafter: Eagle3Drafter, state: dict[str, Any]) -> None:
    """Load a shape-checked state (SafeAILab names); the mapping buffers keep their own dtypes."""
    floats = {k: (v if k in ("d2t", "t2d") else v.float()) for k, v in state.items()}
    if drafter.d2t is not None:
        floats["d2t"] = floats["d2t"].long()
    drafter.load_state_dict(floats, strict=True)
