"""The EAGLE-1/2 / HASS drafter: its module and its checkpoint format.

Format (shared by EAGLE-1, EAGLE-2 and HASS): `config.json` (Llama-style, `num_hidden_layers: 1`) and
`model.safetensors` (or `pytorch_model.bin`) with keys `fc.weight`, optional `fc.bias`,
`layers.0.self_attn.{q,k,v,o}_proj.weight`, `layers.0.mlp.{gate,up,down}_proj.weight`,
`layers.0.post_attention_layernorm.weight` and optional `embed_tokens.weight`. The layer has no input layernorm,
there is no final norm and no lm_head: the target's embedding and lm_head are used, and the input is
`fc([embed(token), feature])` where the feature is the target's post-norm last hidden state.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from taps_bench.errors import UserError
from taps_bench.models.forward import Linear, native_bf16


@dataclass
class KV:
    """The drafter's own cache: keys and values [batch, kv_heads, length, head_dim] of the positions it has seen."""

    keys: Tensor
    values: Tensor

    @property
    def length(self) -> int:
        return int(self.keys.shape[2])

    def cat(self, other: KV) -> KV:
        return KV(torch.cat([self.keys, other.keys], 2), torch.cat([self.values, other.values], 2))


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        var = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x.float() * torch.rsqrt(var + self.eps)).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, c: LlamaConfig) -> None:
        super().__init__()
        self.heads, self.kv_heads = c.num_attention_heads, c.num_key_value_heads
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.q_proj = nn.Linear(c.hidden_size, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, c.hidden_size, bias=False)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], past: KV | None, mask: Tensor) -> tuple[Tensor, KV]:
        """x [B, T, H]; mask [B or 1, 1, T, past + T] bool (True: may attend). Returns the output and the KV of the
        new positions."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, *rope)
        new = KV(k, v)
        full = past.cat(new) if past is not None else new
        out = F.scaled_dot_product_attention(q, full.keys, full.values, attn_mask=mask,
                                             enable_gqa=self.kv_heads != self.heads)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1)), new


class MLP(nn.Module):
    """The Llama MLP; `c` is anything with hidden_size and intermediate_size (a LlamaConfig, an Eagle3Config)."""

    def __init__(self, c: Any) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    """A Llama decoder layer without `input_layernorm` (the fc output goes straight into attention)."""

    def __init__(self, c: LlamaConfig) -> None:
        super().__init__()
        self.self_attn = Attention(c)
        self.mlp = MLP(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], past: KV | None, mask: Tensor) -> tuple[Tensor, KV]:
        attn, new = self.self_attn(x, rope, past, mask)
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x)), new


class Drafter(nn.Module):
    def __init__(self, config: LlamaConfig, fc_bias: bool, with_embedding: bool = False) -> None:
        super().__init__()
        if config.num_hidden_layers != 1:
            raise UserError(f"drafter config has num_hidden_layers={config.num_hidden_layers}; the EAGLE-1/2/HASS "
                            "format has exactly one layer")
        self.config = config
        self.fc = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=fc_bias)
        self.layers = nn.ModuleList([Layer(config)])
        self.rotary = LlamaRotaryEmbedding(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size) if with_embedding else None

    def forward(self, embeds: Tensor, features: Tensor, positions: Tensor, past: KV | None,
                mask: Tensor) -> tuple[Tensor, KV]:
        """Predict next features from `fc([embed(token), feature])`.

        Unbatched (drafting): embeds, features [T, H], positions [T], mask [T, past + T].
        Batched (training): [B, T, H], positions [B, T], mask [B or 1, 1, T, past + T].
        Returns the predicted features (same leading shape) and the KV of these positions.
        """
        single = embeds.dim() == 2
        if single:
            embeds, features, positions, mask = embeds[None], features[None], positions[None], mask[None, None]
        x = self.fc(torch.cat([embeds, features.to(embeds.dtype)], dim=-1).to(self.fc.weight.dtype))
        cos, sin = self.rotary(x, positions)
        out, new = self.layers[0](x, (cos, sin), past, mask)
        return (out[0] if single else out), new

    def state_for_saving(self) -> dict[str, Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("rotary.")}


def has_bf16_matmul() -> bool:
    """A CUDA device, or a CPU with bf16 dot-product units (`forward.native_bf16`)."""
    return torch.cuda.is_available() or native_bf16()


def vocab_head(lm_head: nn.Module, dtype: str) -> Callable[[Tensor], Tensor]:
    """The target's frozen lm_head as a function returning float32 logits, in the requested precision:
    "target" (its own dtype, no copy), "float32", "bfloat16", or "auto" (bfloat16 where the hardware has bf16 matrix
    units, else the target's own).

    The drafter reads the target's 49152 x 576 (SmolLM2) lm_head at every draft level and training step; on a CPU
    that is memory-bound, and a bfloat16 copy is 2.8-4.7x faster where the CPU has bf16 units. Only proposals and
    training losses use it: the target verifies in its own dtype, so decoding stays lossless."""
    if dtype == "auto":
        dtype = "bfloat16" if has_bf16_matmul() else "target"
    own = lm_head.weight.dtype
    if dtype == "target" or DTYPE_NAMES.get(dtype) == own:
        return lambda h: lm_head(h.to(own)).float()
    if dtype not in DTYPE_NAMES:
        raise UserError(f"unknown head dtype '{dtype}'; use target, auto, float32 or bfloat16")
    dt = DTYPE_NAMES[dtype]
    weight = lm_head.weight.detach().to(dt)
    return lambda h: F.linear(h.to(dt), weight).float()


DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def draft_head(lm_head: nn.Module, dtype: str, rows: Tensor | None = None) -> Callable[[Tensor], Tensor]:
    """`vocab_head` for drafting only (no autograd): float32 logits [n, V] from features [n, H], or [n, len(rows)]
    over the lm_head rows `rows` (a reduced draft vocabulary), through a pre-packed `forward.Linear` (float32, and
    bfloat16 on CPUs with bf16 units). Built once per (lm_head, dtype, rows) and shared: the proposers of a combiner
    read the same head."""
    if dtype == "auto":
        dtype = "bfloat16" if has_bf16_matmul() else "target"
    if dtype != "target" and dtype not in DTYPE_NAMES:
        raise UserError(f"unknown head dtype '{dtype}'; use target, auto, float32 or bfloat16")
    dt = lm_head.weight.dtype if dtype == "target" else DTYPE_NAMES[dtype]
    key = (str(dt), None if rows is None else tuple(rows.tolist()))
    heads = lm_head.__dict__.setdefault("_taps_bench_draft_heads", {})
    if key not in heads:
        weight, bias = lm_head.weight.detach(), getattr(lm_head, "bias", None)
        if rows is not None:
            index = rows.to(weight.device)
            weight, bias = weight[index], None if bias is None else bias[index]
        # exact=False: the head only proposes (the target verifies), so a bf16 head may be packed (see `Linear`).
        heads[key] = Linear(weight.to(dt).contiguous(), None if bias is None else bias.detach().to(dt), exact=False)
    head = heads[key]
    return lambda h: head(h.to(dt)).float()


# -- checkpoint format -----------------------------------------------------------------------------------------


def expected_shapes(config: LlamaConfig, fc_bias: bool, with_embedding: bool) -> dict[str, tuple[int, ...]]:
    h, i = config.hidden_size, config.intermediate_size
    hd = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    shapes = {
        "fc.weight": (h, 2 * h),
        "layers.0.self_attn.q_proj.weight": (q, h), "layers.0.self_attn.k_proj.weight": (kv, h),
        "layers.0.self_attn.v_proj.weight": (kv, h), "layers.0.self_attn.o_proj.weight": (h, q),
        "layers.0.mlp.gate_proj.weight": (i, h), "layers.0.mlp.up_proj.weight": (i, h),
        "layers.0.mlp.down_proj.weight": (h, i), "layers.0.post_attention_layernorm.weight": (h,),
    }
    if fc_bias:
        shapes["fc.bias"] = (h,)
    if with_embedding:
        shapes["embed_tokens.weight"] = (config.vocab_size, h)
    return shapes


def read_config(directory: Path) -> tuple[Any, Path]:
    """A drafter directory's parsed config.json and its path (shared by the EAGLE-1/2 and EAGLE-3 loaders)."""
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        raise UserError(f"no config.json in drafter directory {directory}")
    try:
        raw = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{cfg_path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    return raw, cfg_path


def read_state(directory: Path, allow_pickle: bool) -> tuple[dict[str, Tensor], Path]:
    from safetensors.torch import load_file

    st = directory / "model.safetensors"
    if st.is_file():
        try:
            return load_file(str(st)), st
        except Exception as exc:  # safetensors raises its own error type for truncated or foreign files
            raise UserError(f"{st}: not a readable safetensors file ({str(exc).splitlines()[0]})") from None
    pkl = directory / "pytorch_model.bin"
    if pkl.is_file():
        if not allow_pickle:
            raise UserError(f"{pkl} is a pickle file, which can run code when loaded; convert it to safetensors, or "
                            "set allow_pickle if you trust its source (it is then loaded with weights_only=True)")
        try:
            return torch.load(pkl, map_location="cpu", weights_only=True), pkl
        except Exception as exc:  # weights_only refuses anything but tensors and plain containers
            raise UserError(f"{pkl}: cannot be loaded safely with weights_only=True "
                            f"({str(exc).splitlines()[0]})") from None
    raise UserError(f"no model.safetensors or pytorch_model.bin in {directory}")


def check_finite(state: dict[str, Tensor], weights: Path) -> None:
    """Refuse NaN or infinite weights: such a drafter proposes garbage (or nothing) and its run measures a broken
    file, not a method."""
    for key, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise UserError(f"{weights}: tensor `{key}` holds {bad} NaN or infinite value(s) of {tensor.numel()}; "
                            "the checkpoint is broken: re-export it from a healthy training state")


def load_drafter(directory: str | Path, allow_pickle: bool = False) -> tuple[Drafter, Path]:
    """Strictly load an EAGLE-format drafter from a local directory. Any missing, unexpected or mis-shaped key is a
    UserError naming the key. Returns the drafter (float32, CPU) and the weights file."""
    directory = Path(directory)
    raw, cfg_path = read_config(directory)
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "vocab_size"):
        if key not in raw:
            raise UserError(f"{cfg_path}: missing `{key}`")
    raw["num_hidden_layers"] = raw.get("num_hidden_layers", 1)
    try:
        config = LlamaConfig(**{k: v for k, v in raw.items() if k not in ("architectures", "model_type")})
        if config.num_attention_heads < 1 or config.num_key_value_heads < 1:
            raise ValueError("num_attention_heads and num_key_value_heads must be positive")
    except Exception as exc:  # transformers validates field types with its own exception classes
        raise UserError(f"{cfg_path}: invalid drafter config ({str(exc).splitlines()[0]})") from None
    state, weights = read_state(directory, allow_pickle)
    # The config's `bias` field is unreliable in published checkpoints: the state dict decides.
    fc_bias, with_embedding = "fc.bias" in state, "embed_tokens.weight" in state
    shapes = expected_shapes(config, fc_bias, with_embedding)
    for key in shapes:
        if key not in state:
            raise UserError(f"{weights}: missing key `{key}`")
    for key in state:
        if key not in shapes:
            raise UserError(f"{weights}: unexpected key `{key}` (not part of the EAGLE-1/2/HASS drafter format)")
    for key, shape in shapes.items():
        if tuple(state[key].shape) != shape:
            raise UserError(f"{weights}: key `{key}` has shape {tuple(state[key].shape)}, expected {shape} from "
                            f"{cfg_path.name}")
    check_finite(state, weights)
    drafter = Drafter(config, fc_bias=fc_bias, with_embedding=with_embedding)
    drafter.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    return drafter.eval(), weights


def save_drafter(drafter: Drafter, directory: str | Path, extra_config: dict[str, Any] | None = None) -> Path:
    """Write config.json + model.safetensors (the format other EAGLE tools read). Atomic per file."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = drafter.config.to_dict()
    config.update({"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 1, "bias": drafter.fc.bias is not None,
                   **(extra_config or {})})
    tmp = directory / "model.safetensors.part"
    save_file({k: v.detach().contiguous().cpu() for k, v in drafter.state_for_saving().items()}, str(tmp),
              metadata={"format": "pt"})
    tmp.replace(directory / "model.safetensors")
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
    return directory / "model.safetensors"


def check_against_target(drafter: Drafter, target_config: Any, target_embedding: Tensor | None, name: str) -> None:
    """A drafter must match its target's hidden size, vocabulary and head layout."""
    d, t = drafter.config, target_config
    t_head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    checks = [("hidden_size", d.hidden_size, t.hidden_size), ("vocab_size", d.vocab_size, t.vocab_size)]
    for field, mine, theirs in checks:
        if mine != theirs:
            raise UserError(f"drafter {name} does not fit the target: {field} {mine} != target's {theirs}")
    d_head_dim = getattr(d, "head_dim", None) or d.hidden_size // d.num_attention_heads
    if d.hidden_size % d.num_attention_heads or d.num_attention_heads % d.num_key_value_heads:
        raise UserError(f"drafter {name}: {d.num_attention_heads} heads / {d.num_key_value_heads} KV heads do not "
                        f"divide hidden size {d.hidden_size}")
    if d_head_dim != t_head_dim:
        raise UserError(f"drafter {name} does not fit the target: head_dim {d_head_dim} != target's {t_head_dim}")
    if drafter.embed_tokens is not None and target_embedding is not None and not torch.equal(
            drafter.embed_tokens.weight.to(target_embedding), target_embedding):
        raise UserError(f"drafter {name} carries embed_tokens.weight that differs from the target's embedding")


def random_drafter(target_config: Any, seed: int = 0, fc_bias: bool = True, std: float = 0.02) -> Drafter:
    """A drafter of the right shape for a target, with random weights (tests, and `--drafter random` smoke runs)."""
    cfg = LlamaConfig(hidden_size=target_config.hidden_size, intermediate_size=target_config.intermediate_size,
                      num_attention_heads=target_config.num_attention_heads,
                      num_key_value_heads=target_config.num_key_value_heads,
                      head_dim=getattr(target_config, "head_dim", None), vocab_size=target_config.vocab_size,
                      rms_norm_eps=target_config.rms_norm_eps, num_hidden_layers=1,
                      max_position_embeddings=target_config.max_position_embeddings,
                      rope_parameters=getattr(target_config, "rope_parameters", None))
    gen = torch.Generator().manual_seed(seed)
    drafter = Drafter(cfg, fc_bias=fc_bias)
    with torch.no_grad():
        for name, p in drafter.named_parameters():
            if name.endswith("layernorm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return drafter.eval()


# -- resolution: a drafter name (resolved per target) or a checkpoint directory ---------------------------------


def fetch_from_hub(repo: str, revision: str | None = None) -> Path:
    """Download only the files of the drafter format from the hub (needs network; never used by tests)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, revision=revision,
                                      allow_patterns=["config.json", "*.safetensors", "pytorch_model.bin"]))
    except Exception as exc:  # the hub client raises many types; the user needs one line either way
        raise UserError(f"cannot download drafter {repo} from the hub: {str(exc).splitlines()[0]}") from None
