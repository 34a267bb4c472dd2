"""Names from the command line (or a matrix spec, or lm-eval's model_args) turned into loaded things.

Two explicit steps, so that nothing trains as a side effect of looking a name up:
1. `check_proposer`, before the target is loaded: the spec validated and normalised, every drafter name checked,
   and the list of registered recipe drafters that are not built yet for this target;
2. the caller announces and builds those (`build_recipes`), then `build_proposer` loads the drafters and makes the
   proposer (it refuses a drafter that is still unbuilt).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from taps_bench.catalog.cards import (
    DrafterCard,
    DrafterForTarget,
    PromptLookup,
    RecipeCard,
    TargetCard,
    TreeOverride,
    TreeSettings,
)
from taps_bench.catalog.proposers import ProposerSpec
from taps_bench.catalog.registry import Registry, parse_card
from taps_bench.decoding.eagle2 import EagleProposer
from taps_bench.decoding.eagle3 import Eagle3Proposer
from taps_bench.decoding.pld import PromptLookupProposer
from taps_bench.decoding.proposer import Proposer
from taps_bench.errors import UserError
from taps_bench.measure import modelfree
from taps_bench.models.drafter import Drafter, check_against_target, fetch_from_hub, load_drafter
from taps_bench.models.eagle3 import Eagle3Drafter
from taps_bench.models.eagle3_format import check_eagle3_against_target, detect_format, load_eagle3
from taps_bench.models.targets import Target, sha256_file
from taps_bench.training.build import build_recipe, built, store_dir
from taps_bench.training.vocab import DraftVocab, Setting, resolve_draft_vocab


@dataclass
class ResolvedDrafter:
    name: str
    drafter: Drafter | Eagle3Drafter | PromptLookup  # a model-free drafter: its options (`measure.modelfree`)
    checkpoint: str  # where it was read from
    checkpoint_sha256: str
    card: DrafterCard | None
    own_card: dict[str, Any] | None = None  # a checkpoint directory given directly: the card.yaml found in it

    def provenance(self) -> dict[str, Any]:
        """What a run of this drafter records beside its identity: the card of a drafter built by a recipe (corpus,
        steps, losses) or found in a directory given directly, read now, so that the leaderboard shows the card
        from the store and never reads a path a stored value names. Registry drafters' cards are the registry's."""
        if self.card is not None and self.checkpoint.startswith("built:"):
            return {"drafter_card": self.card.model_dump(exclude={"origin"}, mode="json")}
        return {"drafter_card": self.own_card} if self.own_card is not None else {}


def _entry(reg: Registry, name: str, target_name: str) -> tuple[DrafterCard, DrafterForTarget]:
    card = reg.drafter(name)
    if card.model_free is not None:
        raise UserError(f"drafter '{name}' is model-free (prompt lookup): it has no checkpoint, for any target")
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


def check_drafter(reg: Registry, name: str, target: TargetCard, allow_pickle: bool = False) -> RecipeCard | None:
    """Everything about a drafter that can be checked before the target is loaded (fail fast, write nothing).
    Returns the recipe that must build it first when it is a registered recipe drafter not built yet, else None."""
    if Path(name).is_dir():
        load_any(Path(name), allow_pickle)
        return None
    if modelfree.options_of(reg, name) is not None:  # nothing to build or load, on any target
        return None
    if built(target.name, name):
        return None
    card, entry = _entry(reg, name, target.name)
    if entry.source is None:
        recipe = reg.recipe(entry.recipe or "")
        if recipe.target != target.name:
            raise UserError(f"recipe '{recipe.name}' builds a drafter for '{recipe.target}', not '{target.name}'")
        return recipe
    if entry.source.path:
        load_any(_local_path(card, name, entry.source.path), allow_pickle)
    return None


def load_any(directory: Path, allow_pickle: bool = False) -> tuple[Drafter | Eagle3Drafter, Path]:
    """A drafter checkpoint in whichever format it is (EAGLE-1/2/HASS, EAGLE-3 SafeAILab or speculators)."""
    if detect_format(directory) == "eagle":
        return load_drafter(directory, allow_pickle=allow_pickle)
    return load_eagle3(directory, allow_pickle=allow_pickle)


def _not_built(name: str, target: str, recipe: str, why: str = "") -> UserError:
    return UserError(f"drafter '{name}' for target '{target}' has not been built yet{why}; build it with "
                     f"`taps-bench train --recipe {recipe} --target {target}`")


def check_proposer(reg: Registry, spec: ProposerSpec, target: TargetCard, allow_pickle: bool = False,
                   build: bool = True) -> tuple[ProposerSpec, list[RecipeCard]]:
    """The spec with its options validated and complete, and the recipes whose drafters must be built before
    `build_proposer` can load them. `build=False` (--no-build) refuses an unbuilt recipe drafter instead."""
    spec = reg.normalise(spec)
    modelfree.refuse_in_combiner(reg, spec)
    recipes = []
    for name in spec.names():
        recipe = check_drafter(reg, name, target, allow_pickle)
        if recipe is not None:
            if not build:
                raise _not_built(name, target.name, recipe.name, " (--no-build)")
            recipes.append(recipe)
    return spec, recipes


def build_message(recipe: RecipeCard, target: str) -> str:
    minutes = f" (about {recipe.expected_minutes:g} min on a 2-core CPU)" if recipe.expected_minutes else ""
    return (f"[taps-bench] drafter '{recipe.name}' for {target} is not built yet: building it now with the recipe "
            f"'{recipe.name}'{minutes}; it is kept in {store_dir(target, recipe.name)}")


def build_recipes(reg: Registry, recipes: list[RecipeCard], target: Target, data_dir: Path | None,
                  show_progress: bool = True, log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> None:
    """Build each recipe's drafter for `target`, saying so first (a build takes minutes to hours)."""
    for recipe in recipes:
        if built(target.name, recipe.name):  # another process built it meanwhile
            continue
        if data_dir is None:
            raise UserError("building a drafter needs the training data: set TAPS_BENCH_DATA or pass --data-dir")
        log(build_message(recipe, target.name))
        build_recipe(reg, recipe, target, data_dir, show_progress=show_progress)


def drafter_location(reg: Registry, name: str, target: Target) -> tuple[Path, str, DrafterCard | None]:
    """Where the drafter `name` lives for `target`: (local directory, description, card). Never builds: an unbuilt
    recipe drafter is an error saying how to build it."""
    if Path(name).is_dir():  # a checkpoint directory given directly: evaluate your own drafter without a card
        return Path(name), f"path:{Path(name).resolve()}", None
    done = built(target.name, name)
    if done is None:
        card, entry = _entry(reg, name, target.name)
        if entry.source is None:
            raise _not_built(name, target.name, entry.recipe or name)
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


def load_for_target(reg: Registry, name: str, target: Target, allow_pickle: bool = False) -> ResolvedDrafter:
    if (options := modelfree.options_of(reg, name)) is not None:
        return ResolvedDrafter(name=name, drafter=options, checkpoint=f"model-free:{modelfree.FAMILY}",
                               checkpoint_sha256="", card=reg.drafter(name))
    directory, where, card = drafter_location(reg, name, target)
    drafter, weights = load_any(directory, allow_pickle)
    if isinstance(drafter, Eagle3Drafter):
        check_eagle3_against_target(drafter, target.model.config, name)
    else:
        check_against_target(drafter, target.model.config, target.model.get_input_embeddings().weight, name)
    return ResolvedDrafter(name=name if card else Path(name).name, drafter=drafter, checkpoint=where,
                           checkpoint_sha256=sha256_file(weights), card=card,
                           own_card=_own_card(directory) if card is None else None)


def _own_card(directory: Path) -> dict[str, Any] | None:
    """The card.yaml of a checkpoint directory given directly, as JSON data, if there is a readable mapping (it only
    describes the drafter: a broken one leaves the run without a card rather than failing it)."""
    try:
        data = yaml.safe_load((directory / "card.yaml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return json.loads(json.dumps(data, default=str)) if isinstance(data, dict) else None


def tree_settings(target: Target, override: TreeOverride | None = None, reg: Registry | None = None,
                  spec: ProposerSpec | None = None) -> TreeSettings | Literal["auto"]:
    """The tree a run uses: the target card's, with a single registered drafter's card `tree` laid over it (pass
    `reg` and `spec`), with whatever the user set laid over that; "auto" when it is to be chosen for the device and
    drafter (`auto_tree`). Combiners and checkpoint directories keep the target card's tree.

    An "auto" target card stays "auto" unless the user fixes a shape: the drafter's preference is a size, and on
    such a target the device decides sizes. `--tree paper` means the paper's tree, so it skips the drafter's too.
    A model-free drafter's tree is its chain, whatever is set (`measure.modelfree`)."""
    if (options := modelfree.single(reg, spec) if reg is not None else None) is not None:
        return modelfree.chain_tree(options)
    user = override or TreeOverride()
    base = target.card.tree
    card = _tree_card(reg, spec)
    fixes = bool(user.model_dump(exclude_none=True, exclude={"preset"}))
    if card is not None and card.tree is not None and user.preset is None and (base != "auto" or fixes):
        try:
            base = card.tree.over(TreeSettings() if base == "auto" else base)
        except UserError as exc:  # fits on its own (checked at card load) but not over this target's tree
            raise UserError(f"drafter card {card.name} ({card.origin or 'registry'}): {exc}") from None
    try:
        return user.over(base)
    except ValueError as exc:
        raise UserError(f"bad tree settings: {str(exc).splitlines()[-1].strip()}") from None


def _tree_card(reg: Registry | None, spec: ProposerSpec | None) -> DrafterCard | None:
    """The registered card of a single-drafter spec, if any: a name that is a directory is a checkpoint given
    directly (as `check_drafter` reads it), whose own card.yaml is no registry card."""
    if reg is None or spec is None or not spec.drafter or Path(spec.drafter).is_dir():
        return None
    card = reg.cards["drafter"].get(spec.drafter)
    return card if isinstance(card, DrafterCard) else None


def fixed_tree(target: Target, shape: TreeSettings | Literal["auto"]) -> TreeSettings:
    """`shape`, or the card's fallback tree where "auto" cannot be calibrated (no task prompts at hand)."""
    return target.card.fallback_tree if shape == "auto" else shape


def cost_model(reg: Registry, target: Target, draft_vocab: Setting = None, data_dir: Path | None = None,
               proposer: Proposer | None = None) -> tuple[Callable[[TreeSettings], Proposer], str]:
    """What the device profile times drafting with: a random drafter of the target's shape (drafting cost does not
    depend on the weights) with the card's draft head and the run's draft vocabulary size; and the label that keys
    the profile. An EAGLE-3 run's `proposer` is timed with its own drafter (its layer reads 2H inputs and its head
    is its draft vocabulary), keyed by that vocabulary's size."""
    from taps_bench.models.drafter import random_drafter

    if isinstance(proposer, Eagle3Proposer):
        drafter = proposer.drafter
        return (lambda tree: Eagle3Proposer(drafter, target.model, tree, name="cost")), \
            f"eagle3 vocab={drafter.config.draft_vocab_size}"

    head = target.card.draft_head_dtype
    vocab = resolve_draft_vocab(reg, target, draft_vocab, None, data_dir, log=lambda _: None)
    ids = None if vocab is None else vocab.ids
    drafter = random_drafter(target.model.config)
    size = target.model.config.vocab_size if ids is None else int(ids.numel())
    return (lambda tree: EagleProposer(drafter, target.model, tree, name="cost", head_dtype=head, draft_ids=ids)), \
        f"eagle2 head={head} vocab={size}"


def tree_candidates(reg: Registry, spec: ProposerSpec, target: Target, task: Any, data_dir: Path, sampling: Any,
                    allow_pickle: bool = False, log: Callable[[str], None] = print,
                    draft_vocab: Setting = None) -> tuple[list[Any], Any]:
    """Every tree shape ranked by predicted speedup for this proposer on this device, and the device profile."""
    from taps_bench.measure import autotree

    if (options := modelfree.single(reg, spec)) is not None:
        raise UserError(f"drafter '{spec.drafter}' is model-free: it drafts a chain of up to {options.num_pred_tokens} "
                        "tokens, so there is no tree shape to choose for it")
    calibration, _, settings = build_proposer(reg, spec, target, autotree.CALIBRATION_TREE, allow_pickle,
                                              draft_vocab, data_dir)
    norm = reg.normalise(spec)
    per_step = 1 if norm.combiner in (None, "average") or dict(norm.options).get("granularity") == "prompt" \
        else len(norm.names())
    make, label = cost_model(reg, target, draft_vocab, data_dir, calibration)
    prompts = autotree.calibration_prompts(target, task, data_dir)
    return autotree.choose(target, calibration, settings, make, label, per_step, prompts, sampling, log=log)


def auto_tree(reg: Registry, spec: ProposerSpec, target: Target, shape: TreeSettings | Literal["auto"], task: Any,
              data_dir: Path, sampling: Any, allow_pickle: bool = False, log: Callable[[str], None] = print,
              draft_vocab: Setting = None) -> tuple[TreeSettings, dict[str, Any]]:
    """`shape` itself, or the one `--tree auto` predicts fastest for this proposer on this device (autotree.py).
    Returns the tree and what to record with the run about the choice."""
    if shape != "auto":
        return shape, {}
    ranked, profile = tree_candidates(reg, spec, target, task, data_dir, sampling, allow_pickle, log, draft_vocab)
    best = ranked[0]
    return best.tree, {"tree_choice": "auto", "device_profile": profile.key,
                       "predicted": {"tau": round(best.tau, 4), "verify_ratio": round(best.verify_ratio, 4),
                                     "draft_ratio": round(best.draft_ratio, 4), "speedup": round(best.speedup, 4)}}


def eagle_proposer(resolved: ResolvedDrafter, target: Target, tree: TreeSettings,
                   vocab: DraftVocab | None = None) -> tuple[EagleProposer | Eagle3Proposer, dict[str, Any]]:
    """The single-drafter proposer and the settings that identify it in the store."""
    if isinstance(resolved.drafter, Eagle3Drafter):  # drafts over its own vocabulary (d2t), from three layers
        c = resolved.drafter.config
        return Eagle3Proposer(resolved.drafter, target.model, tree, name=resolved.name), {
            "drafter_checkpoint": resolved.checkpoint, "drafter_sha256": resolved.checkpoint_sha256,
            "tree": tree.model_dump(), "drafter_family": "eagle3", "draft_vocab_size": c.draft_vocab_size,
            # its head runs in the target's dtype (the card's draft_head_dtype is for EAGLE-1/2 heads)
            "draft_head_dtype": "target"}
    settings = {"drafter_checkpoint": resolved.checkpoint, "drafter_sha256": resolved.checkpoint_sha256,
                "tree": tree.model_dump(), "draft_head_dtype": target.card.draft_head_dtype}
    if vocab is not None:  # absent for the full vocabulary, so runs stored before reduced vocabularies still match
        settings["draft_vocab"] = vocab.settings()
    return EagleProposer(resolved.drafter, target.model, tree, name=resolved.name,
                         head_dtype=target.card.draft_head_dtype,
                         draft_ids=None if vocab is None else vocab.ids), settings


def build_proposer(reg: Registry, spec: ProposerSpec, target: Target, tree: TreeSettings,
                   allow_pickle: bool = False, draft_vocab: Setting = None,
                   data_dir: Path | None = None) -> tuple[Proposer, str, dict[str, Any]]:
    """(proposer, label stored with the run, settings that identify it). Every drafter must be loadable now (see
    `check_proposer` and `build_recipes` for the ones a recipe still has to build). `draft_vocab` (--draft-vocab;
    None: the target card's) picks a single drafter's reduced vocabulary from its corpus under `data_dir` (None:
    $TAPS_BENCH_DATA); a combiner's EAGLE-1/2/HASS members draft over the full vocabulary, EAGLE-3 drafters (alone
    or in a combiner, mixed with the others or not) over their own draft vocabulary (d2t)."""
    spec = reg.normalise(spec)
    resolved = [load_for_target(reg, n, target, allow_pickle) for n in spec.names()]
    seen: dict[str, int] = {}
    for r in resolved:  # two checkpoint directories may share a last path component ("runs/x/final", "runs/y/final")
        seen[r.name] = seen.get(r.name, 0) + 1
        if seen[r.name] > 1:
            r.name = f"{r.name}#{seen[r.name]}"
    if spec.drafter and isinstance(resolved[0].drafter, PromptLookup):  # drafts its chain whatever `tree` says
        if draft_vocab not in (None, "full"):
            raise UserError(f"drafter '{spec.drafter}' is model-free: it copies target tokens and scores no "
                            "vocabulary; --draft-vocab is for EAGLE-1/2/HASS drafters (drop it)")
        return PromptLookupProposer(resolved[0].drafter, name=resolved[0].name), resolved[0].name, \
            modelfree.run_settings(resolved[0].drafter)
    if spec.drafter:
        vocab = None
        if isinstance(resolved[0].drafter, Eagle3Drafter):
            if draft_vocab not in (None, "full"):  # its vocabulary is part of its weights (d2t and its head)
                raise UserError(f"{resolved[0].name} is an EAGLE-3 drafter: it drafts over its own draft vocabulary "
                                f"of {resolved[0].drafter.config.draft_vocab_size} tokens; --draft-vocab is for "
                                "EAGLE-1/2/HASS drafters (drop it)")
        else:
            vocab = resolve_draft_vocab(reg, target, draft_vocab, resolved[0].card, data_dir)
        proposer, settings = eagle_proposer(resolved[0], target, tree, vocab)
        proposer.run_provenance = resolved[0].provenance()  # runner.proposer_provenance: provenance, not identity
        return proposer, resolved[0].name, settings
    modelfree.refuse_in_combiner(reg, spec)  # check_proposer did; a direct caller is told too
    options = reg.combiner_options(spec)
    head = target.card.draft_head_dtype
    proposer = reg.combiner(options.combiner).build(options, [(r.name, r.drafter) for r in resolved], target.model,
                                                    tree, head)
    # A member's family is marked only for EAGLE-3 and model-free drafters (as a single one's settings mark it;
    # absent means EAGLE-1/2/HASS), so combiner runs stored before those members existed keep their identity.
    members = []
    for r in resolved:
        if isinstance(r.drafter, PromptLookup):  # no checkpoint: its options identify it
            members.append({"name": r.name, **modelfree.identity(r.drafter)})
            continue
        entry: dict[str, Any] = {"name": r.name, "checkpoint": r.checkpoint, "sha256": r.checkpoint_sha256}
        if isinstance(r.drafter, Eagle3Drafter):
            entry |= {"drafter_family": "eagle3", "draft_vocab_size": r.drafter.config.draft_vocab_size}
        members.append(entry)
    settings = {"combiner": options.combiner, "drafters": members,
                "tree": tree.model_dump(), "draft_head_dtype": head, **options.settings()}
    return proposer, proposer.name, settings
