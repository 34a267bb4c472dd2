"""Reduced draft vocabularies (FR-Spec; the `d2t` map of EAGLE-3): which target tokens the drafter may propose.

A drafter reads the lm_head at every draft level, and for a small target that head (SmolLM2: 49152 x 576) costs more
than the drafter's own layer. Assistant text uses few of those tokens: the N most frequent tokens of a corpus's
assistant replies (the loss-masked tokens drafter training learns from, counted with the target's tokenizer and chat
template) cover nearly all of it. The drafter then scores only those N rows; the target still verifies over its full
vocabulary, so decoding stays lossless at any N, and only acceptance can drop (a token outside the N is never
drafted).

Counts are cached per target checkpoint, chat rendering, corpus spec, length limit and data hash under
`$TAPS_BENCH_HOME/draft-vocab/`, written atomically.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from taps_bench.catalog.cards import DrafterCard
from taps_bench.catalog.registry import Registry
from taps_bench.data.tasks import resolve_data_dir
from taps_bench.errors import UserError
from taps_bench.models.targets import Target
from taps_bench.paths import home
from taps_bench.training.corpora import conversations
from taps_bench.training.features import encode

FORMAT_VERSION = 1
# `auto`: the smallest N whose tokens make up 99% of the corpus's assistant tokens, rounded up to a multiple of 1024
# (a round size keeps the sliced head's matrix product on whole kernel blocks, and makes N stable against small
# changes of the corpus).
AUTO_COVERAGE = 0.99
AUTO_MULTIPLE = 1024
# Drafters without a recipe corpus of their own (published checkpoints, directories) count over the corpus of this
# recipe: the 50/50 chat + math mixture.
FALLBACK_RECIPE = "mixed-eagle2"

Setting = int | Literal["auto", "full"] | None


def _log(message: str) -> None:
    print(message, file=sys.stderr)


def _cache_path(target: Target, spec: str, data_hash: str, max_len: int) -> Path:
    card = target.card
    chat = {"tokenizer": card.tokenizer.model_dump() if card.tokenizer else None,
            "system_prompt": card.system_prompt, "chat_template": card.chat_template,
            "chat_template_kwargs": card.chat_template_kwargs}
    raw = json.dumps({"target": target.checkpoint_hash, "chat": chat, "spec": spec, "data": data_hash,
                      "max_len": max_len, "v": FORMAT_VERSION}, sort_keys=True, default=str)
    return home() / "draft-vocab" / f"{hashlib.sha256(raw.encode()).hexdigest()[:20]}.safetensors"


def vocab_size(target: Target) -> int:
    return int(target.model.config.vocab_size)


def token_frequencies(target: Target, corpus_spec: str, data_dir: Path, reg: Registry | None = None,
                      max_len: int = 512, seed: int = 0, log: Callable[[str], None] = _log) -> Tensor:
    """How often each target token occurs among the assistant (loss-masked) tokens of the corpus's conversations,
    as `features.encode` renders and masks them: int64 counts [vocab]. Cached (see the module docstring)."""
    reg = reg or Registry.load()
    convs, data_hash = conversations(reg, corpus_spec, data_dir, seed=seed)
    path = _cache_path(target, corpus_spec, data_hash, max_len)
    if path.is_file():
        return load_file(str(path))["counts"]
    log(f"[taps-bench] counting the assistant tokens of {corpus_spec} ({len(convs)} conversations) for the draft "
        f"vocabulary of {target.name} (once; cached in {path.parent})")
    taken: list[int] = []
    for conv in convs:
        enc = encode(target, conv, max_len)
        if enc is not None:
            taken.extend(t for t, assistant in zip(*enc, strict=True) if assistant)
    v = vocab_size(target)
    # Ids past the lm_head (tokens a tokenizer added after training) can never be drafted: dropped.
    counts = torch.bincount(torch.tensor(taken, dtype=torch.long), minlength=v)[:v]
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    save_file({"counts": counts.contiguous()}, str(part),
              metadata={"target_sha256": target.checkpoint_hash, "corpus_spec": corpus_spec, "data_sha256": data_hash,
                        "max_len": str(max_len), "conversations": str(len(convs)), "tokens": str(len(taken))})
    part.replace(path)
    return counts


def draft_vocabulary(counts: Tensor, n: int) -> tuple[Tensor, float]:
    """The `n` most frequent token ids (ties: the lower id), in increasing id order, and the share of all counted
    tokens they cover."""
    total = int(counts.sum())
    if total <= 0:
        raise UserError("the corpus has no assistant tokens to choose a draft vocabulary from")
    n = max(1, min(int(n), counts.numel()))
    ids = torch.sort(-counts, stable=True).indices[:n]
    return torch.sort(ids).values, int(counts[ids].sum()) / total


def auto_size(counts: Tensor, coverage: float = AUTO_COVERAGE, multiple: int = AUTO_MULTIPLE) -> int:
    """The smallest N covering `coverage` of the counted tokens, rounded up to a multiple of `multiple` (at most
    the whole vocabulary)."""
    cum = torch.cumsum(torch.sort(counts, descending=True).values, 0)
    needed = int(torch.searchsorted(cum, coverage * float(cum[-1]))) + 1
    return min(-(-needed // multiple) * multiple, counts.numel())


@dataclass(frozen=True)
class DraftVocab:
    ids: Tensor  # [n] long target token ids the drafter scores
    coverage: float  # share of the corpus's assistant tokens among them
    corpus: str
    asked: int | str  # the setting that chose it: N or "auto"

    def settings(self) -> dict[str, Any]:
        """What identifies it in a run's settings: runs with different vocabularies are different runs, while `auto`
        and the N it chose are the same run (so `asked` stays out)."""
        return {"size": int(self.ids.numel()), "coverage": round(self.coverage, 6), "corpus": self.corpus}


def corpus_for(reg: Registry, card: DrafterCard | None) -> tuple[str, int, int]:
    """(corpus spec, max_len, seed) to count over: the drafter's own training corpus when taps-bench built it (its
    stored card records the recipe's spec, length limit and seed), else the fallback recipe's."""
    training = card.training if card is not None else {}
    if training.get("corpus_spec"):
        return str(training["corpus_spec"]), int(training.get("max_len", 512)), int(training.get("seed", 0))
    recipe = reg.recipe(FALLBACK_RECIPE)
    return recipe.corpus, recipe.max_len, recipe.seed


_MEMO: dict[tuple[str, str, str, int, int], Tensor] = {}


def resolve_draft_vocab(reg: Registry, target: Target, setting: Setting, card: DrafterCard | None,
                        data_dir: Path | None = None, log: Callable[[str], None] = _log) -> DraftVocab | None:
    """The draft vocabulary of one drafter on `target`, or None for the full vocabulary.

    `setting` is the command line's (`--draft-vocab N|auto|full`); None defers to the target card's `draft_vocab`.
    A setting from the card needs the corpus data; without it the run drafts over the full vocabulary (and says so),
    while an explicit `--draft-vocab` without data is an error."""
    explicit = setting is not None
    chosen = setting if explicit else target.card.draft_vocab
    if chosen is None or chosen == "full":
        return None
    spec, max_len, seed = corpus_for(reg, card)
    try:
        directory = data_dir if data_dir is not None else resolve_data_dir(None)
        key = (target.checkpoint_hash, spec, str(Path(directory).resolve()), max_len, seed)
        if key not in _MEMO:  # a matrix builds many proposers: read the corpus once per process
            _MEMO[key] = token_frequencies(target, spec, Path(directory), reg, max_len, seed, log)
        counts = _MEMO[key]
    except UserError as exc:
        if explicit:
            raise UserError(f"--draft-vocab {chosen} needs the corpus {spec}: {exc} (or pass --draft-vocab full)") \
                from None
        log(f"[taps-bench] target {target.name} asks for draft_vocab {chosen}, but its corpus {spec} cannot be read "
            f"({exc}); drafting over the full vocabulary")
        return None
    n = auto_size(counts) if chosen == "auto" else int(chosen)
    if n >= counts.numel():
        return None
    ids, coverage = draft_vocabulary(counts, n)
    return DraftVocab(ids=ids, coverage=coverage, corpus=spec, asked=chosen)

