"""Build a drafter: corpus -> target features -> training -> EAGLE-format checkpoint + card in the model store.

The model store is `$TAPS_BENCH_HOME/drafters/<target>/<name>/`: `config.json` + `model.safetensors` (the EAGLE
format), `card.yaml` (a drafter card with the training provenance; written last, so its presence means "built") and
`train/` (per-epoch state for resuming, and a JSONL log).
"""

from __future__ import annotations

import json
import platform
import sys
import time
from contextlib import AbstractContextManager
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from taps_bench.catalog.cards import RecipeCard
from taps_bench.catalog.registry import Registry
from taps_bench.errors import UserError
from taps_bench.models.drafter import Drafter
from taps_bench.models.eagle3 import Eagle3Drafter, aux_layers_for
from taps_bench.models.targets import Target
from taps_bench.paths import exclusive, home
from taps_bench.training.corpora import conversations
from taps_bench.training.features import extract, load_sequences
from taps_bench.training.train import TrainSettings, fresh_eagle3, save_trained, train
from taps_bench.training.vocab import Setting, auto_size, draft_vocabulary, token_frequencies


def store_dir(target_name: str, name: str) -> Path:
    return home() / "drafters" / target_name / name


def built(target_name: str, name: str) -> Path | None:
    d = store_dir(target_name, name)
    return d if (d / "card.yaml").is_file() and (d / "model.safetensors").is_file() else None


def building(target_name: str, name: str) -> AbstractContextManager[None]:
    """The store's lock on one drafter while it is built: a second process needing it waits, then finds it built."""
    return exclusive(store_dir(target_name, name), f"building drafter '{name}' for {target_name}")


def build_drafter(reg: Registry, target: Target, name: str, spec: str, settings: TrainSettings, max_len: int,
                  data_dir: Path, init: Drafter | Eagle3Drafter | None = None, init_name: str | None = None,
                  show_progress: bool = True, description: str | None = None, draft_vocab: Setting = "auto") -> Path:
    """Extract features (cached), train (resumable), save the checkpoint and its card. Returns the directory.
    `draft_vocab` is an EAGLE-3 drafter's draft vocabulary (N, "auto" or "full"; see `eagle3_start`)."""
    with building(target.name, name):
        return _build(reg, target, name, spec, settings, max_len, data_dir, init, init_name, show_progress,
                      description, draft_vocab)


def eagle3_start(reg: Registry, target: Target, spec: str, max_len: int, data_dir: Path, seed: int,
                 draft_vocab: Setting, init: Drafter | Eagle3Drafter | None,
                 init_seed: int | None = None) -> tuple[Eagle3Drafter, dict[str, Any]]:
    """The drafter EAGLE-3 training starts from, and what to record about its vocabulary. A fresh drafter drafts
    over the N most frequent target tokens among the corpus's loss-masked assistant tokens (FR-Spec, as EAGLE-3's
    trainer chooses its d2t; "auto": the smallest round N covering 99%, training/vocab.py). `seed` selects the
    corpus the vocabulary is counted over; `init_seed` (default `seed`) draws the initial weights."""
    init_seed = seed if init_seed is None else init_seed
    if init is not None:
        if not isinstance(init, Eagle3Drafter):
            raise UserError("--init for EAGLE-3 training must be an EAGLE-3 drafter")
        return init, {"size": init.config.draft_vocab_size, "from": "init"}
    counts = token_frequencies(target, spec, data_dir, reg, max_len, seed)
    vocab = int(target.model.config.vocab_size)
    n = vocab if draft_vocab in (None, "full") else auto_size(counts) if draft_vocab == "auto" else int(draft_vocab)
    if n >= vocab:
        return fresh_eagle3(target.model, None, init_seed), {"size": vocab, "coverage": 1.0, "asked": draft_vocab}
    ids, coverage = draft_vocabulary(counts, n)
    return fresh_eagle3(target.model, ids, init_seed), {"size": int(ids.numel()), "coverage": round(coverage, 6),
                                                   "asked": draft_vocab}


def _build(reg: Registry, target: Target, name: str, spec: str, settings: TrainSettings, max_len: int,
           data_dir: Path, init: Drafter | Eagle3Drafter | None, init_name: str | None, show_progress: bool,
           description: str | None, draft_vocab: Setting = "auto") -> Path:
    start = time.time()
    out = store_dir(target.name, name)
    (out / "train").mkdir(parents=True, exist_ok=True)
    convs, data_hash = conversations(reg, spec, data_dir, seed=settings.seed)
    eagle3: dict[str, Any] = {}
    taps = None
    if settings.method == "eagle3":
        init, vocab_info = eagle3_start(reg, target, spec, max_len, data_dir, settings.seed, draft_vocab, init,
                                        settings.initial_seed)
        taps = aux_layers_for(init.config, int(target.model.config.num_hidden_layers))
        eagle3 = {"draft_vocab": vocab_info, "taps": list(taps), "ttt_steps": settings.ttt_steps}
    elif isinstance(init, Eagle3Drafter):
        raise UserError(f"--init is an EAGLE-3 drafter; {settings.method} training starts from an EAGLE-1/2/HASS one")
    feature_dir = extract(target, convs, spec, data_hash, max_len, show_progress=show_progress, taps=taps)
    seqs = load_sequences(feature_dir)
    log_path = out / "train" / "log.jsonl"

    def log(record: dict[str, Any]) -> None:
        with log_path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        print(f"[taps-bench] {name} epoch {record['epoch']}: {epoch_summary(record)}", file=sys.stderr)

    drafter, info = train(init, target.model, seqs, settings, out / "train", show_progress=show_progress, log=log)
    card = {
        "name": name,
        "description": description or f"{settings.method.upper()} drafter for {target.name} trained by taps-bench "
                                      f"on {spec}",
        "method": settings.method,
        "corpus": spec,
        "targets": {target.name: {"source": {"path": "."}}},
        "training": {
            "target_checkpoint_sha256": target.checkpoint_hash,
            "corpus_spec": spec, "data_sha256": data_hash, "conversations": len(convs), "sequences": len(seqs),
            "tokens": sum(int(s.ids.numel()) for s in seqs),
            "loss_tokens_per_epoch": sum(int(s.mask[1:].sum()) for s in seqs),
            "max_len": max_len, "features": str(feature_dir), "init": init_name or "scratch",
            "steps": info["steps"], "tokens_seen": info["tokens_seen"],
            "train_seconds": round(info["train_seconds"], 1),
            "wall_seconds_this_session": round(time.time() - start, 1), "final": info["final"],
            "history": info["history"], "settings": info["settings"], "seed": settings.seed,
            "init_seed": settings.initial_seed, **eagle3,
            "versions": {p: _version(p) for p in ("taps-bench", "torch", "transformers")},
            "machine": platform.platform(), "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
    }
    return save_trained(drafter, out, card)


def build_recipe(reg: Registry, recipe: RecipeCard, target: Target, data_dir: Path, show_progress: bool = True) -> Path:
    """The recipe's drafter, built now unless it is already (or, waiting for the lock, has meanwhile been) built."""
    with building(target.name, recipe.name):
        return built(target.name, recipe.name) or _build(
            reg, target, recipe.name, recipe.corpus, recipe_settings(recipe), recipe.max_len, data_dir, None, None,
            show_progress, recipe.description, recipe.draft_vocab)


def epoch_summary(record: dict[str, Any]) -> str:
    """One epoch's losses as a line: what each method's record holds (EAGLE-3 adds agreement per unrolled step)."""
    parts = [f"loss {record['loss']:.4f}"]
    parts += [f"{label} {record[key]:.4f}" for key, label in (("v", "regression"), ("p", "soft CE"),
                                                              ("topk", "top-k")) if record.get(key)]
    steps = sorted((int(k[3:]), v) for k, v in record.items() if k.startswith("acc") and k[3:].isdigit())
    parts.append(f"top-1 agreement {record['acc']:.3f}" + "".join(f" / {v:.3f}" for _, v in steps))
    return ", ".join(parts)


def recipe_settings(recipe: RecipeCard) -> TrainSettings:
    return TrainSettings(method=recipe.method, epochs=recipe.epochs, lr=recipe.lr, batch_tokens=recipe.batch_tokens,
                         seed=recipe.seed, init_seed=recipe.init_seed, ttt_steps=recipe.ttt_steps)


def recipe_from_flags(reg: Registry, recipe: str | None, target: str, given: dict[str, Any]) -> RecipeCard:
    """What `taps-bench train` builds: a named recipe with the flags that were given laid over it, or a recipe made
    of the flags alone (which must then name the drafter, its corpus and method). Checked before any model loads."""
    from taps_bench.training.corpora import parse_spec

    base = reg.recipe(recipe) if recipe else None
    target_card = reg.target(target)
    if base and base.target != target_card.name:
        raise UserError(f"recipe '{base.name}' is for target '{base.target}', not '{target_card.name}'")
    if base is None and (given.get("name") is None or given.get("method") is None):
        raise UserError("training needs a recipe, or a corpus spec, a method (eagle2, hass or eagle3) and a drafter "
                        "name")
    merged = base.model_dump(exclude={"origin"}) if base else {"name": "unnamed", "description": "", "corpus": ""}
    merged |= {k: v for k, v in given.items() if v is not None} | {"target": target_card.name}
    own = bool(base) and given.get("name") is None  # a renamed variant is not the recipe's drafter
    # A card needs a description; a drafter built from flags gets the one `build_drafter` writes (cleared below).
    merged["description"] = merged["description"] if own else "built from flags"
    try:
        spec = RecipeCard(**merged)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"][:1])  # a union's member type is noise in the message
        msg = "must be a number of tokens, auto or full" if field == "draft_vocab" else first["msg"]
        raise UserError(f"bad training setting {field or 'value'}: {msg} (got {first['input']!r})") from None
    if not spec.corpus:
        raise UserError("no corpus: give a recipe or a corpus spec (see `taps-bench list corpora`)")
    for part in parse_spec(spec.corpus):
        reg.corpus(part.corpus)
    return spec if own else spec.model_copy(update={"description": ""})


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None
