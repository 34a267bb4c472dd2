"""Turn names from the command line into loaded things: a drafter name (resolved for a target) into a proposer."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from taps_bench.build import build_recipe, built, store_dir
from taps_bench.cards import DrafterCard, DrafterForTarget, TargetCard, TreeSettings
from taps_bench.drafter import Drafter, check_against_target, fetch_from_hub, load_drafter
from taps_bench.eagle2 import EagleProposer
from taps_bench.errors import UserError
from taps_bench.registry import Registry, parse_card
from taps_bench.targets import Target, sha256_file


@dataclass
class ResolvedDrafter:
    name: str
    drafter: Drafter
    checkpoint: str  # where it was read from
    checkpoint_sha256: str
    card: DrafterCard | None


def _entry(reg: Registry, name: str, target_name: str) -> tuple[DrafterCard, DrafterForTarget]:
    card = reg.drafter(name)
    entry = card.targets.get(target_name)
    if entry is None:
        raise UserError(f"drafter '{name}' has no checkpoint for target '{target_name}' (it has: "
                        f"{', '.join(sorted(card.targets)) or 'none'}); pick a target it was trained for")
    return card, entry


def _local_path(card: DrafterCard, name: str, raw: str) -> Path:
    path = Path(raw).expanduser()
    if not path.is_absolute() and card.origin:
        path = Path(card.origin).parent / path
    if not path.is_dir():
        raise UserError(f"drafter '{name}': checkpoint directory {path} does not exist")
    return path


def check_drafter(reg: Registry, name: str, target: TargetCard, allow_pickle: bool = False,
                  build: bool = True) -> None:
    """Everything about a drafter that can be checked before the target is loaded (fail fast, write nothing)."""
    if Path(name).is_dir():
        load_drafter(name, allow_pickle=allow_pickle)
        return
    if built(target.name, name):
        return
    card, entry = _entry(reg, name, target.name)
    if entry.source is None:
        recipe = reg.recipe(entry.recipe or "")
        if recipe.target != target.name:
            raise UserError(f"recipe '{recipe.name}' builds a drafter for '{recipe.target}', not '{target.name}'")
        if not build:
            raise UserError(f"drafter '{name}' for target '{target.name}' has not been built yet (--no-build); build "
                            f"it with `taps-bench train --recipe {recipe.name} --target {target.name}`")
        return
    if entry.source.path:
        load_drafter(_local_path(card, name, entry.source.path), allow_pickle=allow_pickle)


def drafter_location(reg: Registry, name: str, target: Target, build: bool = True, data_dir: Path | None = None,
                     show_progress: bool = True) -> tuple[Path, str, DrafterCard | None]:
    """Where the drafter `name` lives for `target`: (local directory, description, card). A drafter registered
    with a recipe for this target and not yet built is built first (announced, with progress)."""
    if Path(name).is_dir():  # a checkpoint directory given directly: evaluate your own drafter without a card
        return Path(name), f"path:{Path(name).resolve()}", None
    check_drafter(reg, name, target.card, build=build)
    done = built(target.name, name)
    if done is None:
        card, entry = _entry(reg, name, target.name)
        if entry.source is None:
            recipe = reg.recipe(entry.recipe or "")
            minutes = f" (about {recipe.expected_minutes:g} min on a 2-core CPU)" if recipe.expected_minutes else ""
            print(f"[taps-bench] drafter '{name}' for {target.name} is not built yet: building it now with the recipe "
                  f"'{recipe.name}'{minutes}; it is kept in {store_dir(target.name, name)}", file=sys.stderr)
            if data_dir is None:
                raise UserError("building a drafter needs the training data: set TAPS_BENCH_DATA or pass --data-dir")
            done = build_recipe(reg, recipe, target, data_dir, show_progress=show_progress)
        else:
            src = entry.source
            if src.hub:
                note = "" if entry.confirmed else " (hub name unconfirmed)"
                return fetch_from_hub(src.hub, src.revision), f"hub:{src.hub}{note}", card
            assert src.path
            path = _local_path(card, name, src.path)
            return path, f"path:{path}", card
    stored = parse_card(done / "card.yaml", "drafter")
    assert isinstance(stored, DrafterCard)
    return done, f"built:{done}", stored


def load_for_target(reg: Registry, name: str, target: Target, allow_pickle: bool = False, build: bool = True,
                    data_dir: Path | None = None, show_progress: bool = True) -> ResolvedDrafter:
    directory, where, card = drafter_location(reg, name, target, build, data_dir, show_progress)
    drafter, weights = load_drafter(directory, allow_pickle=allow_pickle)
    check_against_target(drafter, target.model.config, target.model.get_input_embeddings().weight, name)
    return ResolvedDrafter(name=name if card else Path(name).name, drafter=drafter, checkpoint=where,
                           checkpoint_sha256=sha256_file(weights), card=card)


def tree_settings(target: Target, total_tokens: int | None, depth: int | None, top_k: int | None) -> TreeSettings:
    """The target card's default tree, overridden by whatever the user set."""
    base = target.card.tree
    try:
        return TreeSettings(total_tokens=base.total_tokens if total_tokens is None else total_tokens,
                            depth=base.depth if depth is None else depth, top_k=base.top_k if top_k is None else top_k)
    except ValueError as exc:
        raise UserError(f"bad tree settings: {str(exc).splitlines()[-1].strip()}") from None


def eagle_proposer(resolved: ResolvedDrafter, target: Target, tree: TreeSettings) -> tuple[EagleProposer,
                                                                                          dict[str, Any]]:
    """The single-drafter proposer and the settings that identify it in the store."""
    settings = {"drafter_checkpoint": resolved.checkpoint, "drafter_sha256": resolved.checkpoint_sha256,
                "tree": tree.model_dump(), "draft_head_dtype": target.card.draft_head_dtype}
    return EagleProposer(resolved.drafter, target.model, tree, name=resolved.name,
                         head_dtype=target.card.draft_head_dtype), settings


class ProposerSpec(BaseModel):
    """What `run` was asked for (or a matrix spec lists): one drafter, or a combiner over several."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    drafter: str | None = None
    combiner: str | None = None
    drafters: tuple[str, ...] = ()
    alpha: float = 0.5
    granularity: str = "step"
    budget: str = "full"

    def names(self) -> tuple[str, ...]:
        return (self.drafter,) if self.drafter else self.drafters

    def describe(self) -> str:
        if self.drafter:
            return self.drafter
        extra = {"average": f";alpha={self.alpha:g}", "merged-tree": f";budget={self.budget}"}.get(
            self.combiner or "", f";{self.granularity}")
        return f"{self.combiner}({','.join(self.drafters)}{extra})"

    def check(self, reg: Registry, target: TargetCard, allow_pickle: bool, build: bool) -> None:
        if bool(self.drafter) == bool(self.combiner):
            raise UserError("pass either --drafter NAME or --combiner NAME --drafters a,b")
        if self.combiner:
            reg.combiner(self.combiner)
            if len(self.drafters) < 2:
                raise UserError(f"--combiner {self.combiner} needs --drafters a,b with at least two drafters")
            if self.combiner == "average" and len(self.drafters) != 2:
                raise UserError("--combiner average takes exactly two drafters (alpha * A + (1 - alpha) * B)")
            if self.combiner == "average" and not 0 <= self.alpha <= 1:
                raise UserError(f"--alpha must be in [0, 1] (got {self.alpha})")
            if self.granularity not in ("step", "prompt"):
                raise UserError(f"--granularity must be step or prompt (got {self.granularity})")
            if self.budget not in ("full", "equal"):
                raise UserError(f"--budget must be full or equal (got {self.budget})")
        for name in self.names():
            check_drafter(reg, name, target, allow_pickle, build=build)


def build_proposer(reg: Registry, spec: ProposerSpec, target: Target, tree: TreeSettings, allow_pickle: bool = False,
                   build: bool = True, data_dir: Path | None = None,
                   show_progress: bool = True) -> tuple[Any, str, dict[str, Any]]:
    """(proposer, label stored with the run, settings that identify it)."""
    resolved = [load_for_target(reg, n, target, allow_pickle, build, data_dir, show_progress) for n in spec.names()]
    seen: dict[str, int] = {}
    for r in resolved:  # two checkpoint directories may share a last path component ("runs/x/final", "runs/y/final")
        seen[r.name] = seen.get(r.name, 0) + 1
        if seen[r.name] > 1:
            r.name = f"{r.name}#{seen[r.name]}"
    checkpoints = [{"name": r.name, "checkpoint": r.checkpoint, "sha256": r.checkpoint_sha256} for r in resolved]
    if spec.drafter:
        proposer, settings = eagle_proposer(resolved[0], target, tree)
        return proposer, resolved[0].name, settings
    combiner = reg.combiner(spec.combiner or "")
    pairs = [(r.name, r.drafter) for r in resolved]
    names = ",".join(r.name for r in resolved)
    head = target.card.draft_head_dtype
    settings: dict[str, Any] = {"combiner": spec.combiner, "drafters": checkpoints, "tree": tree.model_dump(),
                                "draft_head_dtype": head}
    if spec.combiner == "average":
        merged = combiner.merge(resolved[0].drafter, resolved[1].drafter, spec.alpha)
        label = f"average({names};alpha={spec.alpha:g})"
        settings["alpha"] = spec.alpha
        return EagleProposer(merged, target.model, tree, name=label, head_dtype=head), label, settings
    if spec.combiner == "merged-tree":
        proposer = combiner(pairs, target.model, tree, budget=spec.budget, head_dtype=head)
        settings["budget"] = spec.budget
    else:
        proposer = combiner(pairs, target.model, tree, granularity=spec.granularity, head_dtype=head)
        settings["granularity"] = spec.granularity
    return proposer, proposer.name, settings
