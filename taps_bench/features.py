"""Feature extraction: run the target once over a corpus and cache what drafter training needs.

For every conversation: token ids, a loss mask (1 on assistant tokens) and the target's post-norm last hidden states.
Shards are written atomically under `$TAPS_BENCH_HOME/features/<key>/`, keyed by target checkpoint, corpus spec,
length limit and data hash, and reused by every drafter trained on that corpus. A killed extraction resumes at the
first missing shard.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from taps_bench.corpora import Conversation
from taps_bench.paths import home
from taps_bench.targets import Target

FORMAT_VERSION = 1


@dataclass
class Sequence:
    ids: torch.Tensor  # [T] long
    mask: torch.Tensor  # [T] bool: assistant tokens
    hidden: torch.Tensor  # [T, H] target post-norm last hidden states (float16 on disk)


def _render(tokenizer: Any, target: Target, messages: Conversation, generation_prompt: bool) -> str:
    msgs = ([{"role": "system", "content": target.card.system_prompt}] if target.card.system_prompt is not None
            else []) + messages
    kwargs = dict(target.card.chat_template_kwargs)
    if target.card.chat_template:
        kwargs["chat_template"] = target.card.chat_template
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt, **kwargs)


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


def cache_key(target: Target, spec: str, max_len: int, data_hash: str) -> str:
    raw = json.dumps({"target": target.checkpoint_hash, "card": target.card.model_dump(exclude={"origin"}),
                      "spec": spec, "max_len": max_len, "data": data_hash, "v": FORMAT_VERSION}, sort_keys=True)
    return hashlib.sha256(raw.encode()).hexdigest()[:20]


def extract(target: Target, convs: list[Conversation], spec: str, data_hash: str, max_len: int,
            shard_size: int = 200, show_progress: bool = True) -> Path:
    """Extract (or reuse) the features of `convs`; returns the cache directory holding the shards."""
    directory = home() / "features" / cache_key(target, spec, max_len, data_hash)
    directory.mkdir(parents=True, exist_ok=True)
    manifest = {"target": target.name, "target_sha256": target.checkpoint_hash, "spec": spec, "max_len": max_len,
                "data_sha256": data_hash, "conversations": len(convs), "shard_size": shard_size,
                "format": FORMAT_VERSION}
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2))
    n_shards = (len(convs) + shard_size - 1) // shard_size
    todo = [i for i in range(n_shards) if not (directory / f"shard-{i:05d}.safetensors").is_file()]
    bar = tqdm(total=len(todo) * shard_size, unit="conv", desc=f"features {spec}", file=sys.stderr,
               disable=not show_progress or not todo, dynamic_ncols=True)
    tokens, seconds = 0, 0.0
    model = target.model
    for shard in todo:
        ids_all, mask_all, hidden_all, lengths = [], [], [], []
        for conv in convs[shard * shard_size:(shard + 1) * shard_size]:
            enc = encode(target, conv, max_len)
            bar.update(1)
            if enc is None or len(enc[0]) < 3:
                continue
            ids, mask = enc
            t0 = time.perf_counter()
            with torch.inference_mode():
                hidden = model.model(input_ids=torch.tensor([ids], device=target.device)).last_hidden_state[0]
            seconds += time.perf_counter() - t0
            tokens += len(ids)
            ids_all.append(torch.tensor(ids, dtype=torch.int32))
            mask_all.append(torch.tensor(mask, dtype=torch.bool))
            hidden_all.append(hidden.to(torch.float16).cpu())
            lengths.append(len(ids))
            bar.set_postfix_str(f"{tokens / max(seconds, 1e-9):.0f} tok/s")
        tensors = {"ids": torch.cat(ids_all), "mask": torch.cat(mask_all).to(torch.uint8),
                   "hidden": torch.cat(hidden_all), "lengths": torch.tensor(lengths, dtype=torch.int64)} \
            if lengths else {"lengths": torch.zeros(0, dtype=torch.int64)}
        part = directory / f"shard-{shard:05d}.part"
        save_file(tensors, str(part))
        part.replace(directory / f"shard-{shard:05d}.safetensors")  # atomic: a kill never leaves half a shard
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
            seqs.append(Sequence(ids=t["ids"][a:b].long(), mask=t["mask"][a:b].bool(), hidden=t["hidden"][a:b]))
    return seqs
