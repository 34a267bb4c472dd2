"""Model-free drafters (prompt lookup, `drafters/pld.yaml`) as names resolve to them: a card with `method: pld` and
its options under `model_free`, on every target, with nothing to build, load or hash.

Its tree is a chain of `num_pred_tokens` nodes whatever the tree settings say, so a run records that chain as its
tree (total_tokens num_pred_tokens + 1, depth num_pred_tokens - 1, top_k 1: the EAGLE-2 shape of such a chain, which
bounds what every stored step can hold) next to the options, which split its rows: another setting is another card.
`--tree auto` has nothing to choose for it; explicit sizes on `run` are refused (`refuse_tree_flags`), while a
matrix spec's tree, meant for its EAGLE entries, passes it by.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from taps_bench.catalog.cards import DrafterCard, PromptLookup, TreeOverride, TreeSettings
from taps_bench.catalog.proposers import ProposerSpec
from taps_bench.catalog.registry import Registry
from taps_bench.errors import UserError

FAMILY = "pld"  # the family a run or a combiner member records (site.labels shows it)


def options_of(reg: Registry, name: str) -> PromptLookup | None:
    """The options of the registered model-free drafter `name`; None for any other name (a name that is a
    directory is a checkpoint given directly, as `resolve.check_drafter` reads it)."""
    card = reg.cards["drafter"].get(name)
    if not isinstance(card, DrafterCard) or card.model_free is None or Path(name).is_dir():
        return None
    return card.model_free


def single(reg: Registry, spec: ProposerSpec | None) -> PromptLookup | None:
    """The options of a spec that is one model-free drafter, else None."""
    return options_of(reg, spec.drafter) if spec is not None and spec.drafter else None


def chain_tree(options: PromptLookup) -> TreeSettings:
    n = options.num_pred_tokens
    return TreeSettings(total_tokens=n + 1, depth=n - 1, top_k=1)


def identity(options: PromptLookup) -> dict[str, Any]:
    """What identifies a model-free drafter in a run's settings (a run's own, or a combiner member's)."""
    return {"drafter_family": FAMILY, "model_free": {"method": FAMILY, **options.model_dump()}}


def run_settings(options: PromptLookup) -> dict[str, Any]:
    """The settings of a run of one model-free drafter: its identity and the chain it drafts, as its tree."""
    return {**identity(options), "tree": chain_tree(options).model_dump()}


def refuse_in_combiner(reg: Registry, spec: ProposerSpec) -> None:
    """A combiner that needs drafter weights (`average`; a plugin that does not declare `model_free_members`)
    cannot take a model-free drafter: one line, before anything is loaded."""
    if spec.combiner is None:
        return
    free = [n for n in spec.drafters if options_of(reg, n) is not None]
    if free and not getattr(reg.combiner(spec.combiner), "model_free_members", False):
        why = ("it has no weights to average" if spec.combiner == "average"
               else f"{spec.combiner} does not take model-free drafters")
        raise UserError(f"combiner {spec.combiner}: drafter '{free[0]}' is model-free (prompt lookup): {why}; "
                        "combine it with confidence, entropy or merged-tree instead")


def refuse_tree_flags(reg: Registry, spec: ProposerSpec | None, tree: TreeOverride | None) -> None:
    """`run --drafter pld` with tree sizes or `--tree paper`: they cannot apply to a chain (`--tree auto` can: the
    chain is the only shape there is to choose)."""
    options = single(reg, spec)
    if options is None or tree is None:
        return
    given = [f"--{k.replace('_', '-')}" for k in tree.model_dump(exclude_none=True, exclude={"preset"})]
    given += ["--tree paper"] if tree.preset == "paper" else []
    if given:
        raise UserError(f"drafter '{spec.drafter if spec else ''}' is model-free: it drafts a chain of up to "
                        f"{options.num_pred_tokens} tokens (model_free.num_pred_tokens in its card), so "
                        f"{', '.join(given)} cannot apply; drop {'it' if len(given) == 1 else 'them'}")
