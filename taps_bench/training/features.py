"""Feature extraction: run the target once over a corpus and cache what drafter training needs.

For every conversation: token ids, a loss mask (1 on assistant tokens) and the target's post-norm last hidden states;
with `taps` (EAGLE-3 training), also the hidden states entering those target layers, from the same forward.
Shards are written atomically under `$TAPS_BENCH_HOME/features/<key>/`, keyed by target checkpoint, corpus spec,
length limit, data hash and taps (no taps: the key EAGLE-2/HASS caches always had), and reused by every drafter
trained on that corpus. A killed extraction resumes at the first missing shard.

Sequences are also shared across corpora: a conversation whose token ids were already run through the same target
for another spec (the parts of a mixture such as `sharegpt:600+mathinstruct:600` are the first conversations of
`sharegpt:1200` and `mathinstruct:1200`) takes its hidden states from there instead of running the target again.
The first sequence taken from each other directory is recomputed and compared, so features made with another dtype,
device or kernel are never mixed in.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from taps_bench.data.chat import render_chat
from taps_bench.models.forward import prefill, prepare
from taps_bench.models.targets import Target
from taps_bench.paths import exclusive, home, write_atomic
from taps_bench.training.corpora import Conversation

FORMAT_VERSION = 1


@dataclass
class Sequence:
    ids: torch.Tensor  # [T] long
    mask: torch.Tensor  # [T] bool: assistant tokens
    hidden: torch.Tensor  # [T, H] target post-norm last hidden states (float16 on disk)
    aux: torch.Tensor | None = None  # [T, len(taps) * H] the states entering the tapped layers, concatenated


def _render(tokenizer: Any, target: Target, messages: Conversation, generation_prompt: bool) -> str:
    return render_chat(tokenizer, target.card, messages, generation_prompt=generation_prompt)


def encode(target: Target, conv: Conversation, max_len: int) -> tuple[list[int], list[bool]] | None:
    """Token ids of the rendered conversation and the mask of assistant tokens (their text and end-of-turn marks).

    Assistant spans are found as character ranges between the render of the conversation up to a reply's
    generation prompt and the render including the reply, then mapped to tokens with the tokenizer's offsets.
    """
    tok = target.tokenizer
    full = _render(tok, target, conv, generation_prompt=False)
    spans = []
    for i, msg in enumerate(conv):
        if msg["role"] != "assistant":
            continue
        start = _render(tok, target, conv[:i], generation_prompt=True)
        end = _render(tok, target, conv[: i + 1], generation_prompt=False)
        if not (full.startswith(end) and end.startswith(start)):
            return None  # a template that rewrites earlier turns (e.g. drops reasoning); skip rather than mis-mask
        spans.append((len(start), len(end)))
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True, truncation=True, max_length=max_len)
    ids = enc["input_ids"]
    mask = [any(a <= s < b for a, b in spans) for s, _ in enc["offset_mapping"]]
    return (ids, mask) if any(mask) else None


def cache_key(target: Target, spec: str, max_len: int, data_hash: str, taps: tuple[int, ...] | None = None) -> str:
    key: dict[str, Any] = {"target": target.checkpoint_hash, "card": target.card.model_dump(exclude={"origin"}),
                           "spec": spec, "max_len": max_len, "data": data_hash, "v": FORMAT_VERSION}
    if taps:  # absent without taps, so the caches made before taps existed keep their keys
        key["taps"] = list(taps)
    raw = json.dumps(key, sort_keys=True)
    return hashlib.sha256(raw.encode()).hexdigest()[:20]


def _ids_digest(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.to(torch.int32).numpy().tobytes()).hexdigest()


class Donors:
    """Hidden states already extracted for this target in other feature directories, found by their token ids.

    Hidden states depend only on the target and the ids, so a sequence extracted for one corpus spec serves every
    other spec that contains it. A directory is trusted only after the first sequence taken from it matched a fresh
    forward (within the float16 rounding of the cache): features of another dtype, device or kernel are left alone.
    """

    def __init__(self, target: Target, directory: Path) -> None:
        self.index: dict[str, tuple[Path, int, int]] = {}
        self.trusted: dict[Path, bool] = {}
        self.used: dict[str, int] = {}
        for other in sorted(directory.parent.iterdir()):
            manifest = other / "manifest.json"
            if other == directory or not manifest.is_file():
                continue
            m = json.loads(manifest.read_text())
            if m.get("target_sha256") != target.checkpoint_hash or m.get("format") != FORMAT_VERSION:
                continue
            for shard in sorted(other.glob("shard-*.safetensors")):
                with safe_open(str(shard), "pt") as f:
                    lengths = f.get_tensor("lengths").tolist()
                    ids = f.get_tensor("ids") if lengths else None
                start = 0
                for n in lengths:
                    self.index.setdefault(_ids_digest(ids[start:start + n]), (shard, start, n))
                    start += n

    def take(self, ids: list[int], forward: Callable[[], torch.Tensor]) -> torch.Tensor | None:
        """The cached float16 hidden states of `ids`, or None (then the caller runs the target)."""
        hit = self.index.get(_ids_digest(torch.tensor(ids)))
        if hit is None:
            return None
        shard, start, n = hit
        with safe_open(str(shard), "pt") as f:
            hidden = f.get_slice("hidden")[start:start + n]
        source = shard.parent
        if source not in self.trusted:
            fresh = forward().to(torch.float16).cpu()
            self.trusted[source] = torch.allclose(hidden.float(), fresh.float(), rtol=2e-3, atol=2e-3)
        if not self.trusted[source]:
            return None
        self.used[source.name] = self.used.get(source.name, 0) + 1
        return hidden


def extract(target: Target, convs: list[Conversation], spec: str, data_hash: str, max_len: int,
            shard_size: int = 200, show_progress: bool = True, share: bool = True,
            taps: tuple[int, ...] | None = None) -> Path:
    """Extract (or reuse) the features of `convs`; returns the cache directory holding the shards.

    `share=False` runs the target on every sequence, even those other feature directories already hold. `taps`
    (HF hidden-state indices) adds the states entering those layers; such a cache takes no donors, because a donor
    holds only last hidden states and the taps would need the same forward anyway."""
    directory = home() / "features" / cache_key(target, spec, max_len, data_hash, taps)
    with exclusive(directory, f"extracting features of {spec} for {target.name}"):
        return _extract(target, convs, spec, data_hash, max_len, directory, shard_size, show_progress,
                        share and not taps, tuple(taps or ()))


def _extract(target: Target, convs: list[Conversation], spec: str, data_hash: str, max_len: int, directory: Path,
             shard_size: int, show_progress: bool, share: bool, taps: tuple[int, ...]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    manifest = {"target": target.name, "target_sha256": target.checkpoint_hash, "spec": spec, "max_len": max_len,
                "data_sha256": data_hash, "conversations": len(convs), "shard_size": shard_size,
                "format": FORMAT_VERSION, **({"taps": list(taps)} if taps else {})}
    # Provenance: how many sequences each other feature directory supplied (kept across resumed runs).
    earlier = json.loads((directory / "manifest.json").read_text()).get("reused_from", {}) \
        if (directory / "manifest.json").is_file() else {}
    manifest["reused_from"] = dict(earlier)
    write_atomic(directory / "manifest.json", json.dumps(manifest, indent=2))
    n_shards = (len(convs) + shard_size - 1) // shard_size
    todo = [i for i in range(n_shards) if not (directory / f"shard-{i:05d}.safetensors").is_file()]
    bar = tqdm(total=len(todo) * shard_size, unit="conv", desc=f"features {spec}", file=sys.stderr,
               disable=not show_progress or not todo, dynamic_ncols=True)
    tokens, seconds = 0, 0.0
    weights = prepare(target.model)  # the decoding forward: pre-packed weights, 2-3x the transformers forward on CPU
    donors = Donors(target, directory) if share and todo else None
    for shard in todo:
        ids_all, mask_all, hidden_all, aux_all, lengths = [], [], [], [], []
        for conv in convs[shard * shard_size:(shard + 1) * shard_size]:
            enc = encode(target, conv, max_len)
            bar.update(1)
            if enc is None or len(enc[0]) < 3:
                continue
            ids, mask = enc

            def forward(ids: list[int] = ids) -> torch.Tensor:
                with torch.inference_mode():
                    return prefill(weights, torch.tensor(ids, device=target.device), None)[0]

            hidden = donors.take(ids, forward) if donors is not None else None
            if hidden is None:
                t0 = time.perf_counter()
                if taps:
                    with torch.inference_mode():
                        last, _, tapped = prefill(weights, torch.tensor(ids, device=target.device), None, taps)
                    aux_all.append(torch.cat(tapped, dim=-1).to(torch.float16).cpu())
                    hidden = last.to(torch.float16).cpu()
                else:
                    hidden = forward().to(torch.float16).cpu()
                seconds += time.perf_counter() - t0
                tokens += len(ids)
            ids_all.append(torch.tensor(ids, dtype=torch.int32))
            mask_all.append(torch.tensor(mask, dtype=torch.bool))
            hidden_all.append(hidden)
            lengths.append(len(ids))
            reused = sum(donors.used.values()) if donors is not None else 0
            bar.set_postfix_str(f"{tokens / max(seconds, 1e-9):.0f} tok/s" + (f", {reused} reused" if reused else ""))
        tensors = {"ids": torch.cat(ids_all), "mask": torch.cat(mask_all).to(torch.uint8),
                   "hidden": torch.cat(hidden_all), "lengths": torch.tensor(lengths, dtype=torch.int64),
                   **({"aux": torch.cat(aux_all)} if aux_all else {})} \
            if lengths else {"lengths": torch.zeros(0, dtype=torch.int64)}
        part = directory / f"shard-{shard:05d}.part"
        save_file(tensors, str(part))
        part.replace(directory / f"shard-{shard:05d}.safetensors")  # atomic: a kill never leaves half a shard
        if donors is not None and donors.used:
            manifest["reused_from"] = {k: earlier.get(k, 0) + donors.used.get(k, 0) for k in {*earlier, *donors.used}}
            write_atomic(directory / "manifest.json", json.dumps(manifest, indent=2))
    bar.close()
    (directory / "complete").write_text(json.dumps({"shards": n_shards}))
    return directory


def load_sequences(directory: Path) -> list[Sequence]:
    seqs = []
    for path in sorted(directory.glob("shard-*.safetensors")):
        t = load_file(str(path))
        if not t["lengths"].numel():
            continue
        offsets = [0, *torch.cumsum(t["lengths"], 0).tolist()]
        for a, b in itertools.pairwise(offsets):
            seqs.append(Sequence(ids=t["ids"][a:b].long(), mask=t["mask"][a:b].bool(), hidden=t["hidden"][a:b],
                                 aux=t["aux"][a:b] if "aux" in t else None))
    return seqs
