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

from taps_bench.catalog.cards import RecipeCard
from taps_bench.catalog.registry import Registry
from taps_bench.models.drafter import Drafter
from taps_bench.models.targets import Target
from taps_bench.paths import exclusive, home
from taps_bench.training.corpora import conversations
from taps_bench.training.features import extract, load_sequences
from taps_bench.training.train import TrainSettings, save_trained, train


def store_dir(target_name: str, name: str) -> Path:
    return home() / "drafters" / target_name / name


def built(target_name: str, name: str) -> Path | None:
    d = store_dir(target_name, name)
    return d if (d / "card.yaml").is_file() and (d / "model.safetensors").is_file() else None


def building(target_name: str, name: str) -> AbstractContextManager[None]:
    """The store's lock on one drafter while it is built: a second process needing it waits, then finds it built."""
    return exclusive(store_dir(target_name, name), f"building drafter '{name}' for {target_name}")


def build_drafter(reg: Registry, target: Target, name: str, spec: str, settings: TrainSettings, max_len: int,
                  data_dir: Path, init: Drafter | None = None, init_name: str | None = None,
                  show_progress: bool = True, description: str | None = None) -> Path:
    """Extract features (cached), train (resumable), save the checkpoint and its card. Returns the directory."""
    with building(target.name, name):
        return _build(reg, target, name, spec, settings, max_len, data_dir, init, init_name, show_progress,
                      description)


def _build(reg: Registry, target: Target, name: str, spec: str, settings: TrainSettings, max_len: int,
           data_dir: Path, init: Drafter | None, init_name: str | None, show_progress: bool,
           description: str | None) -> Path:
    start = time.time()
    out = store_dir(target.name, name)
    (out / "train").mkdir(parents=True, exist_ok=True)
    convs, data_hash = conversations(reg, spec, data_dir, seed=settings.seed)
    feature_dir = extract(target, convs, spec, data_hash, max_len, show_progress=show_progress)
    seqs = load_sequences(feature_dir)
    log_path = out / "train" / "log.jsonl"

    def log(record: dict[str, Any]) -> None:
        with log_path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        print(f"[taps-bench] {name} epoch {record['epoch']}: loss {record['loss']:.4f} (regression {record['v']:.4f}, "
              f"soft CE {record['p']:.4f}, top-k {record['topk']:.4f}), top-1 agreement {record['acc']:.3f}",
              file=sys.stderr)

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
            "versions": {p: _version(p) for p in ("taps-bench", "torch", "transformers")},
            "machine": platform.platform(), "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
    }
    return save_trained(drafter, out, card)


def build_recipe(reg: Registry, recipe: RecipeCard, target: Target, data_dir: Path, show_progress: bool = True) -> Path:
    """The recipe's drafter, built now unless it is already (or, waiting for the lock, has meanwhile been) built."""
    settings = TrainSettings(method=recipe.method, epochs=recipe.epochs, lr=recipe.lr,
                             batch_tokens=recipe.batch_tokens, seed=recipe.seed)
    with building(target.name, recipe.name):
        return built(target.name, recipe.name) or _build(
            reg, target, recipe.name, recipe.corpus, settings, recipe.max_len, data_dir, None, None, show_progress,
            recipe.description)


def recipe_from_flags(reg: Registry, recipe: str | None, target: str, given: dict[str, Any]) -> RecipeCard:
    """What `taps-bench train` builds: a named recipe with the flags that were given laid over it, or a recipe made
    of the flags alone (which must then name the drafter, its corpus and method). Checked before any model loads."""
    from taps_bench.errors import UserError
    from taps_bench.training.corpora import parse_spec

    base = reg.recipe(recipe) if recipe else None
    target_card = reg.target(target)
    if base and base.target != target_card.name:
        raise UserError(f"recipe '{base.name}' is for target '{base.target}', not '{target_card.name}'")
    if base is None and (given.get("name") is None or given.get("method") is None):
        raise UserError("training needs a recipe, or a corpus spec, a method (eagle2 or hass) and a drafter name")
    merged = base.model_dump(exclude={"origin"}) if base else {"name": "unnamed", "description": "", "corpus": ""}
    merged |= {k: v for k, v in given.items() if v is not None} | {"target": target_card.name}
    if base is not None and given.get("name") is not None:  # a renamed variant is not the recipe's drafter
        merged["description"] = ""
    try:
        spec = RecipeCard(**merged)
    except ValueError as exc:
        raise UserError(f"bad training settings: {str(exc).splitlines()[1:3]}") from None
    if not spec.corpus:
        raise UserError("no corpus: give a recipe or a corpus spec (see `taps-bench list corpora`)")
    for part in parse_spec(spec.corpus):
        reg.corpus(part.corpus)
    return spec


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None
