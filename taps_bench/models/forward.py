"""The target's forward pass for decoding: our own small Llama/Qwen3 forward over the weights transformers loaded.

Why not call the transformers modules: on a CPU they are the reason speculative decoding did not pay. Their
`F.linear` reads unpacked weights (2-3x slower than oneDNN's pre-packed blocked layout at 1-16 rows), their dynamic
cache concatenates, and their kernels round differently depending on how many rows are computed together, so a tree
node's logits were not the logits a single-token forward gives at that position. Here:

- every projection goes through `Linear`, which pre-packs its weight for oneDNN's float32 kernel on CPU (bfloat16
  weights upcast), a kernel whose rows do not depend on each other (probed per weight);
- the KV cache is static (`Cache`), compacted in place after each step;
- attention is computed so that a row's result depends only on its own query and the keys it may see, in position
  order, never on which other rows share the forward (see `attention.py`);
- between the matrix products, only row-wise kernels (the fused RMSNorm) and elementwise ops whose vector and
  scalar loops round alike (add, mul, div, `exp`): torch's `silu` and `rsqrt` do not (their last bits differ), and
  which loop an element meets depends on how the tensor is split between threads.

`tests/test_forward.py` checks the logits against the transformers forward and the batch invariance bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, overload

import torch
import torch.nn.functional as F
from torch import Tensor

from taps_bench.errors import UserError
from taps_bench.models.attention import Cache, causal_attention, plan, tree_attention

SUPPORTED = ("LlamaForCausalLM", "Qwen3ForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")
MAX_ROPE_TABLE = 32768  # positions precomputed once per model; longer contexts stop with reason "context"


class Linear:
    """y = x W^T (+ b), computed so that a row's result never depends on how many rows are computed with it.

    On CPU every product goes through oneDNN's pre-packed float32 kernel: bfloat16 weights of the target are upcast
    once and packed in float32 (the products of bf16 values are exact in fp32; only the output is rounded back to
    bf16). Why not a bf16 kernel for the target: on CPUs with AMX (Sapphire Rapids and later) both oneDNN's packed
    bf16 kernel and `F.linear` switch kernels with the row count, far beyond what padding can cover (576x1536: rows
    33 to ~512 round unlike 700 rows; 49152x576: rows 1-32), and a bf16 product's output rounding hides the switch
    from a small probe. Over a whole model such switches made greedy outputs diverge from autoregressive ones (33
    of 50 GSM8K prompts with packed bf16 weights). Upcasting costs bf16's halved weight reads, not exactness.

    With `exact=False` (the draft head, whose rounding never reaches an output: the target verifies every draft) a
    bf16 weight is packed for oneDNN's bf16 kernel where the CPU has bf16 units, 2.8-4.7x faster than fp32 there.
    That kernel is not row-invariant on AMX CPUs (a node's draft logits may differ in the last bit with the number of
    nodes drafted together), and no probe can show it reliably, so none is made: it is fast, deterministic for a
    given tree, and lossless, not batch-invariant.

    The packed fp32 kernel is batch-invariant from two rows on. One row may meet another kernel: on AVX-512 Xeons
    oneDNN computes a lone row with more than 1024 inputs by matrix-vector code that rounds differently. Row counts
    are probed once, when the weight is packed: a lone row that rounds differently is then computed as two
    (`pad_single`; 3-4% slower there; weights that do not need it keep the one-row kernel, so the autoregressive arm
    is not slowed for nothing), and a weight whose larger row counts disagree is not packed at all. The unpacked
    fallback (no oneDNN, or CUDA) pads to at least `MIN_ROWS` rows, the smallest count from which MKL and oneDNN
    pick one kernel for every row count."""

    MIN_ROWS = 8
    PROBE_ROWS = (2, 3, 8, 16)  # compared with the same rows of a 17-row product

    def __init__(self, weight: Tensor, bias: Tensor | None = None, exact: bool = True) -> None:
        self.weight, self.bias = weight.detach(), None if bias is None else bias.detach()
        self.out_features = int(weight.shape[0])
        self.packed: Tensor | None = None
        self.packed_bias: Tensor | None = None
        self.pad_single = False
        self.upcast = False  # bf16 weights computed by the fp32 kernel (output rounded back to bf16)
        if weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16):
            return
        if weight.dtype == torch.bfloat16 and not exact and packing_available(torch.bfloat16):
            self.packed, self.packed_bias = torch.ops.mkldnn._reorder_linear_weight(self.weight, None), self.bias
            return
        if packing_available(torch.float32):
            self.upcast = weight.dtype != torch.float32
            self._pack(self.weight.float(), None if self.bias is None else self.bias.float())
            if self.packed is None:
                self.upcast = False

    def _pack(self, weight: Tensor, bias: Tensor | None) -> None:
        """Pack float32 `weight` if its products at `PROBE_ROWS` rows equal the same rows of a 17-row product."""
        self.packed, self.packed_bias = torch.ops.mkldnn._reorder_linear_weight(weight, None), bias
        probe = torch.randn(17, int(weight.shape[1]), generator=torch.Generator().manual_seed(0))
        full = self._packed(probe)
        if all(torch.equal(self._packed(probe[:rows]), full[:rows]) for rows in self.PROBE_ROWS):
            self.pad_single = not torch.equal(self._packed(probe[:1]), full[:1])
        else:
            self.packed = self.packed_bias = None

    def _packed(self, x: Tensor) -> Tensor:
        assert self.packed is not None
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.packed_bias, "none", [], "")

    def __call__(self, x: Tensor) -> Tensor:
        rows = x.shape[0]
        if self.packed is not None:
            dtype = x.dtype
            if self.upcast:
                x = x.float()
            if rows == 1 and self.pad_single:
                y = self._packed(torch.cat([x, x.new_zeros(1, x.shape[1])]))[:1]
            else:
                y = self._packed(x)
            return y.to(dtype) if self.upcast else y
        if rows < self.MIN_ROWS:
            x = torch.cat([x, x.new_zeros(self.MIN_ROWS - rows, x.shape[1])])
        return F.linear(x, self.weight, self.bias)[:rows]


_PACKING: dict[torch.dtype, bool] = {}


def native_bf16() -> bool:
    """bf16 dot-product units (AVX512-BF16 or AMX): without them oneDNN emulates bf16 products and is no faster
    than float32, so bfloat16 weights are not packed there."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private torch API: absent reads as no
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def packing_available(dtype: torch.dtype = torch.float32) -> bool:
    """oneDNN's pre-packed linear is a private torch API (what inductor's freezing pass emits): probe it once per
    dtype (float32, and bfloat16 on CPUs with bf16 units)."""
    if dtype not in _PACKING:
        ok = dtype == torch.float32 or (dtype == torch.bfloat16 and native_bf16())
        if ok:
            try:
                w = torch.randn(16, 8).to(dtype)
                packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
                x = torch.randn(3, 8).to(dtype)
                got = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
                tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: the output's own rounding
                ok = bool(torch.allclose(got.float(), x.float() @ w.float().T, atol=tol, rtol=tol))
            except (RuntimeError, AttributeError):
                ok = False
        _PACKING[dtype] = ok
    return _PACKING[dtype]


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """torch's fused RMSNorm: one kernel that normalises each row on its own (row-invariant; tested)."""
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def silu(x: Tensor) -> Tensor:
    return x / (1.0 + torch.exp(-x))


@dataclass
class Layer:
    qkv: Linear  # q, k and v projections in one product (one weight read, one call)
    o: Linear
    gate_up: Linear
    down: Linear
    input_norm: Tensor
    post_norm: Tensor
    q_norm: Tensor | None  # Qwen3 normalises each head's query and key before rotary
    k_norm: Tensor | None


def _fused(*linears: Any) -> Linear:
    weight = torch.cat([m.weight.detach() for m in linears])
    biases = [getattr(m, "bias", None) for m in linears]
    if all(b is None for b in biases):
        return Linear(weight)
    bias = torch.cat([b.detach() if b is not None else m.weight.new_zeros(m.weight.shape[0])
                      for m, b in zip(linears, biases, strict=True)])
    return Linear(weight, bias)


@dataclass
class Weights:
    """A target prepared for decoding. Built once per loaded model by `prepare` (packing takes a second)."""

    layers: list[Layer]
    embed: Tensor
    norm: Tensor
    lm_head: Linear
    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    cos: Tensor  # [positions, head_dim] rotary tables, computed once so a position's value never depends on the call
    sin: Tensor
    device: torch.device
    dtype: torch.dtype

    @property
    def max_positions(self) -> int:
        return int(self.cos.shape[0])

    def new_cache(self, capacity: int) -> Cache:
        return Cache.allocate(len(self.layers), self.kv_heads, capacity, self.head_dim, self.device, self.dtype)


def prepare(model: Any) -> Weights:
    """Our forward's view of a transformers causal LM (cached on the model: later calls are free)."""
    cached = getattr(model, "_taps_bench_weights", None)
    if cached is not None:
        return cached
    arch = type(model).__name__
    if arch not in SUPPORTED:
        raise UserError(f"target architecture {arch} is not supported by the decoding engine; supported: "
                        f"{', '.join(SUPPORTED)}")
    c = model.config
    if getattr(c, "sliding_window", None) and getattr(c, "use_sliding_window", True) and arch == "MistralForCausalLM":
        raise UserError(f"target {arch} uses sliding-window attention, which the decoding engine does not implement")
    heads, kv_heads = c.num_attention_heads, c.num_key_value_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    layers = []
    for block in model.model.layers:
        a, m = block.self_attn, block.mlp
        layers.append(Layer(
            qkv=_fused(a.q_proj, a.k_proj, a.v_proj), o=Linear(a.o_proj.weight, a.o_proj.bias),
            gate_up=_fused(m.gate_proj, m.up_proj), down=Linear(m.down_proj.weight),
            input_norm=block.input_layernorm.weight.detach(), post_norm=block.post_attention_layernorm.weight.detach(),
            q_norm=a.q_norm.weight.detach() if hasattr(a, "q_norm") else None,
            k_norm=a.k_norm.weight.detach() if hasattr(a, "k_norm") else None))
    weight = model.lm_head.weight
    positions = min(getattr(c, "max_position_embeddings", MAX_ROPE_TABLE) or MAX_ROPE_TABLE, MAX_ROPE_TABLE)
    with torch.no_grad():
        probe = torch.zeros(1, device=weight.device, dtype=torch.float32)
        cos, sin = model.model.rotary_emb(probe, torch.arange(positions, device=weight.device)[None])
    w = Weights(layers=layers, embed=model.get_input_embeddings().weight.detach(),
                norm=model.model.norm.weight.detach(),
                lm_head=Linear(weight, getattr(model.lm_head, "bias", None)), heads=heads, kv_heads=kv_heads,
                head_dim=head_dim, eps=c.rms_norm_eps, cos=cos[0].to(weight.dtype), sin=sin[0].to(weight.dtype),
                device=weight.device, dtype=weight.dtype)
    model._taps_bench_weights = w
    return w


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding (the half-split convention of Llama and Qwen), x [n, heads, d], cos/sin [n, 1, d]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def _layer(w: Weights, layer: Layer, x: Tensor, cos: Tensor, sin: Tensor, attend: Any) -> Tensor:
    n = x.shape[0]
    qkv = layer.qkv(rms_norm(x, layer.input_norm, w.eps)).view(n, w.heads + 2 * w.kv_heads, w.head_dim)
    qk, v = qkv[:, : w.heads + w.kv_heads], qkv[:, w.heads + w.kv_heads:]
    if layer.q_norm is not None and layer.k_norm is not None:
        qk = torch.cat([rms_norm(qk[:, : w.heads], layer.q_norm, w.eps),
                        rms_norm(qk[:, w.heads:], layer.k_norm, w.eps)], dim=1)
    qk = _rotate(qk, cos, sin)
    x = x + layer.o(attend(qk[:, : w.heads], qk[:, w.heads:], v).reshape(n, w.heads * w.head_dim))
    gate, up = layer.gate_up(rms_norm(x, layer.post_norm, w.eps)).chunk(2, dim=-1)
    return x + layer.down(silu(gate) * up)


def _run(w: Weights, ids: Tensor, positions: Tensor, attend_for: Any, logits_rows: slice | None,
         taps: tuple[int, ...] = ()) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
    last = len(w.layers)
    for index in taps:
        if not 0 <= index <= last:
            raise ValueError(f"tap at layer {index}: the target has layers 0..{last - 1} (and {last}, the post-norm "
                             f"last hidden state)")
    x = w.embed[ids]
    cos, sin = w.cos[positions][:, None], w.sin[positions][:, None]
    entering: dict[int, Tensor] = {}
    for index, layer in enumerate(w.layers):
        if index in taps:  # `_layer` never writes into x, so keeping the reference is enough (no copy)
            entering[index] = x
        x = _layer(w, layer, x, cos, sin, attend_for(index))
    hidden = rms_norm(x, w.norm, w.eps)
    # HF's last `hidden_states` entry is after the final norm: index L is the very tensor the logits come from, so a
    # proposer tapping it reads exactly what an untapped forward would have handed it.
    entering[last] = hidden
    return hidden, w.lm_head(hidden if logits_rows is None else hidden[logits_rows]), tuple(entering[i] for i in taps)


@overload
def prefill(w: Weights, ids: Tensor, cache: Cache | None) -> tuple[Tensor, Tensor]: ...
@overload
def prefill(w: Weights, ids: Tensor, cache: Cache | None, taps: tuple[int, ...]) -> tuple[Tensor, Tensor,
                                                                                           tuple[Tensor, ...]]: ...
def prefill(w: Weights, ids: Tensor, cache: Cache | None, taps: tuple[int, ...] | None = None) -> tuple[Any, ...]:
    """The prompt through the target into an empty cache (or none): post-norm hidden of every token, logits of the
    last one; with `taps`, also the hidden states ENTERING those layers (HF `output_hidden_states` index i is the
    input of layer i), one [n, H] per index in the order given (EAGLE-3 drafters read three of them). As in HF, index
    L (the number of layers) is the post-norm last hidden state, so one forward serves EAGLE-2 and EAGLE-3 drafters.

    Causal attention here need not be batch-invariant: both arms of a measurement run this same prefill."""
    n = ids.numel()
    if n > w.max_positions:
        raise UserError(f"prompt of {n} tokens is longer than the {w.max_positions} positions the engine supports")
    positions = torch.arange(n, device=ids.device)
    hidden, logits, tapped = _run(w, ids, positions, lambda i: lambda q, k, v: causal_attention(cache, i, q, k, v),
                                  slice(n - 1, n), taps or ())
    return (hidden, logits[0]) if taps is None else (hidden, logits[0], tapped)


@overload
def extend(w: Weights, ids: Tensor, depths: Tensor, ancestors: Tensor, cache: Cache,
           context: int) -> tuple[Tensor, Tensor]: ...
@overload
def extend(w: Weights, ids: Tensor, depths: Tensor, ancestors: Tensor, cache: Cache, context: int,
           taps: tuple[int, ...]) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]: ...
def extend(w: Weights, ids: Tensor, depths: Tensor, ancestors: Tensor, cache: Cache, context: int,
           taps: tuple[int, ...] | None = None) -> tuple[Any, ...]:
    """A draft tree (or one token: a root-only tree) through the target after `context` committed tokens.

    ids, depths [n]; ancestors [n, n] bool, ancestors[i, j]: node j is node i or one of its ancestors. Node i sits at
    position context + depths[i] and sees the context and its ancestors. Returns post-norm hidden [n, H] and logits
    [n, V]; row i is bit-identical to what a one-token `extend` at that position gives once its ancestors are
    committed. With `taps` (as in `prefill`), also the per-node hidden states entering those layers."""
    depths, ancestors = depths.to(w.device), ancestors.to(w.device)
    p = plan(context, depths, ancestors)
    hidden, logits, tapped = _run(w, ids, context + depths,
                                  lambda i: lambda q, k, v: tree_attention(cache, i, q, k, v, p), None, taps or ())
    return (hidden, logits) if taps is None else (hidden, logits, tapped)
