"""Static KV cache and batch-invariant attention for the decoding forward.

The property: a query's attention output depends only on the query and the keys it may see, in position order,
never on how many other rows share the forward or where its ancestors sit in the tree. Then a verified tree node gets
bit for bit the logits a one-token forward gives once its ancestors are committed, and greedy speculative output
equals autoregressive output by construction, in any dtype.

How. Matrix products round the same way only at the same shape: MKL and oneDNN pick their kernel from the row count
(one kernel from 8 rows up), and the reduction length decides how they block the sum. So the keys a query at
position `pos` sees are split at a boundary that depends on `pos` alone:
- far keys, positions [0, far(pos)), far(pos) = floor((pos - NEAR_DEPTH) / FAR_BLOCK) * FAR_BLOCK: all committed,
  the same rows of the cache in a tree and in a single-token step; one matrix product per distinct far(pos), with the
  query rows padded to at least 8;
- near keys, positions [far(pos), pos]: at most WINDOW of them, gathered per query in position order (committed
  context, then the ancestors, then the node itself) into a fixed-size window, padded with masked slots, and reduced
  by one batched product of fixed shape.
Masked keys contribute exp(-inf) = 0 to a product whose shape does not change, which adds exactly nothing. The
softmax denominator comes out of the same products, from a column of ones stored beside every value vector.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

NEAR_DEPTH = 16  # deepest tree node the window covers (TreeSettings bounds trees to depth + 1 <= this)
FAR_BLOCK = 16
WINDOW = NEAR_DEPTH + FAR_BLOCK  # pos - far(pos) + 1 <= WINDOW
MIN_ROWS = 8  # the kernels' row count is padded to this: below it they switch to matrix-vector code


@dataclass
class Cache:
    """Per layer: keys [kv_heads, capacity, d] and values [kv_heads, capacity, d + 1] (last column: ones)."""

    keys: list[Tensor]
    values: list[Tensor]

    @staticmethod
    def allocate(layers: int, kv_heads: int, capacity: int, head_dim: int, device: torch.device,
                 dtype: torch.dtype) -> Cache:
        keys = [torch.zeros(kv_heads, capacity, head_dim, device=device, dtype=dtype) for _ in range(layers)]
        values = []
        for _ in range(layers):
            v = torch.zeros(kv_heads, capacity, head_dim + 1, device=device, dtype=dtype)
            v[..., head_dim] = 1.0
            values.append(v)
        return Cache(keys, values)

    @property
    def capacity(self) -> int:
        return int(self.keys[0].shape[1])

    def write(self, layer: int, start: int, k: Tensor, v: Tensor) -> None:
        """k, v [n, kv_heads, d] into slots start..start+n-1."""
        n = k.shape[0]
        if start + n > self.capacity:
            raise ValueError(f"KV cache of {self.capacity} slots cannot hold {start + n} tokens")
        self.keys[layer][:, start:start + n] = k.transpose(0, 1)
        self.values[layer][:, start:start + n, :-1] = v.transpose(0, 1)

    def compact(self, context: int, path: list[int]) -> None:
        """Keep the context plus the accepted tree nodes, in path order, at slots context.. (in place)."""
        if path == list(range(len(path))):
            return
        src = torch.tensor(path, device=self.keys[0].device) + context
        dst = slice(context, context + len(path))
        for k, v in zip(self.keys, self.values, strict=True):
            k[:, dst] = k[:, src]
            v[:, dst] = v[:, src]


def _pad_rows(x: Tensor, rows: int) -> Tensor:
    """Pad dim -2 to at least `rows` with zeros."""
    if x.shape[-2] >= rows:
        return x
    pad = x.new_zeros(*x.shape[:-2], rows - x.shape[-2], x.shape[-1])
    return torch.cat([x, pad], dim=-2)


def _bmm(a: Tensor, b: Tensor) -> Tensor:
    """`torch.bmm`; on CPU, bfloat16 operands are multiplied in float32 and the result rounded back. Why: CPUs with
    AMX compute bf16 products by kernels that change with the row count well past `MIN_ROWS` (a tree's far product
    has count x group rows), while fp32 products keep one kernel from `MIN_ROWS` rows on; a product of two bf16
    values is exact in fp32, so only the summation order is fixed, not the precision changed."""
    if a.dtype == torch.bfloat16 and a.device.type == "cpu":
        return torch.bmm(a.float(), b.float()).to(a.dtype)
    return torch.bmm(a, b)


def causal_attention(cache: Cache | None, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Prefill: the prompt's own causal attention (cache empty before; None: keep nothing, as feature extraction
    does). q [n, heads, d] -> [n, heads, d]."""
    if cache is not None:
        cache.write(layer, 0, k, v)
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True,
                                         enable_gqa=q.shape[1] != k.shape[1])
    return out.transpose(0, 1)


@dataclass(frozen=True)
class Plan:
    """Where each new row's keys are, computed once per forward (the same for every layer)."""

    context: int
    slots: Tensor  # [n, WINDOW] cache slots of the near keys, position order (0 where padding)
    masked: Tensor  # [1, n, 1, WINDOW] bool: padding
    far: list[tuple[int, slice | Tensor, int]]  # (boundary, rows, row count) per distinct far(pos) > 0


def plan(context: int, depths: Tensor, ancestors: Tensor) -> Plan:
    """Per node at position pos = context + depth: far(pos), and the cache slots of its near keys in position order
    (committed context far(pos)..context-1, then its ancestors and itself, which sit at context + node index)."""
    n = depths.numel()
    device = depths.device
    if int(depths.max()) > NEAR_DEPTH:
        raise ValueError(f"tree depth {int(depths.max())} exceeds the {NEAR_DEPTH} the attention window covers")
    pos = context + depths
    far = torch.clamp(torch.div(pos - NEAR_DEPTH, FAR_BLOCK, rounding_mode="floor") * FAR_BLOCK, min=0)
    committed = context - far
    j = torch.arange(WINDOW, device=device)[None, :]
    # Ancestors (the node itself included) in index order, which is depth order since parents precede children.
    order = torch.where(ancestors, torch.arange(n, device=device)[None, :], n)
    anc_slots = torch.sort(order, dim=1).values[:, : NEAR_DEPTH + 1] + context
    tree_j = (j - committed[:, None]).clamp(0, anc_slots.shape[1] - 1)
    slots = torch.where(j < committed[:, None], far[:, None] + j, torch.gather(anc_slots, 1, tree_j))
    real = j < (committed + depths + 1)[:, None]
    groups = []
    far_list = far.tolist()
    for boundary in sorted(set(far_list) - {0}):
        idx = [i for i, b in enumerate(far_list) if b == boundary]
        rows: slice | Tensor = (slice(idx[0], idx[-1] + 1) if idx == list(range(idx[0], idx[-1] + 1))
                                else torch.tensor(idx, device=device))
        groups.append((boundary, rows, len(idx)))
    return Plan(context, torch.where(real, slots, 0), ~real[None, :, None, :], groups)


def tree_attention(cache: Cache, layer: int, q: Tensor, k: Tensor, v: Tensor, p: Plan) -> Tensor:
    """Attention of n new rows (a tree, or one token) at slots context..context+n-1. q [n, heads, d]."""
    cache.write(layer, p.context, k, v)
    keys, values = cache.keys[layer], cache.values[layer]
    n, heads, d = q.shape
    kv = keys.shape[0]
    group = heads // kv
    q = (q * (1.0 / math.sqrt(d))).view(n, kv, group, d)

    # Scores. Near: one fixed-shape product per (node, kv head). Far: per distinct far(pos), one product over the
    # committed prefix with the rows of those nodes. Row counts are padded to MIN_ROWS and the padding dropped.
    near_k = keys[:, p.slots].view(kv * n, WINDOW, d)
    near_v = values[:, p.slots].view(kv * n, WINDOW, d + 1)
    qn = _pad_rows(q.transpose(0, 1).reshape(kv * n, group, d), MIN_ROWS)
    near_s = _bmm(qn, near_k.transpose(1, 2))[:, :group].view(kv, n, group, WINDOW)
    near_s = near_s.masked_fill(p.masked, float("-inf"))
    best = near_s.amax(-1)  # [kv, n, group]: the softmax's shift, exact whatever the order
    far_scores = []
    for boundary, rows, count in p.far:
        m = count * group
        qf = _pad_rows(q[rows].permute(1, 0, 2, 3).reshape(kv, m, d), MIN_ROWS)
        s = _bmm(qf, keys[:, :boundary].transpose(1, 2))[:, :m].view(kv, count, group, boundary)
        far_scores.append(s)
        best[:, rows] = torch.maximum(best[:, rows], s.amax(-1))

    # Weighted values; the ones column of the values gives the denominator from the same products.
    weights = torch.exp(near_s - best[..., None]).view(kv * n, group, WINDOW)
    out = _bmm(_pad_rows(weights, MIN_ROWS), near_v)[:, :group].view(kv, n, group, d + 1)
    for (boundary, rows, count), s in zip(p.far, far_scores, strict=True):
        m = count * group
        wf = _pad_rows(torch.exp(s - best[:, rows, :, None]).view(kv, m, boundary), MIN_ROWS)
        out[:, rows] += _bmm(wf, values[:, :boundary])[:, :m].view(kv, count, group, d + 1)
    out = out[..., :d] / out[..., d:]
    return out.permute(1, 0, 2, 3).reshape(n, heads, d)
