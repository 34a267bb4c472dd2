"""Everything taps-bench knows by name: targets, drafters, tasks, corpora and recipes (YAML cards), and combiners.

Built-in cards are YAML files at the top of the repository (shipped inside the wheel as `taps_bench/cards/<dir>`).
Built-in combiners are declared exactly as a third party's are: as entry points of the group
`taps_bench.combiners` (pyproject.toml), each naming a combiner class, loaded only when the combiner is used or
listed. Third parties add cards through the entry-point groups `taps_bench.<kind>s` (an entry point may name a
directory of cards, a card, a list of cards, or a callable returning any of those) or through `--include DIR`
(cards in `DIR/<kind>s/*.yaml` or any `*.yaml` with a `kind:` field, and combiner classes in `DIR/combiners/*.py`).

A combiner class has `combiner_name`, a typed options model `Options` (a `CombinerOptions` subclass whose
`combiner` field is a Literal of the name) and `build(options, drafters, target_model, tree, head_dtype)`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cached_property
from importlib import metadata
from pathlib import Path
from typing import Annotated, Any, TypeVar, Union

from pydantic import Field, TypeAdapter, ValidationError

from taps_bench.catalog.cards import (
    CARD_DIRS,
    CARD_TYPES,
    Card,
    CorpusCard,
    DrafterCard,
    RecipeCard,
    TargetCard,
    TaskCard,
)
from taps_bench.catalog.proposers import CombinerOptions, ProposerSpec
from taps_bench.catalog.yamlfiles import read_yaml_mapping, validate_yaml
from taps_bench.errors import UserError, shorten, unknown_name
from taps_bench.paths import shipped_dir

KINDS = ("target", "drafter", "combiner", "task", "corpus", "recipe")
COMBINER_GROUP = "taps_bench.combiners"

C = TypeVar("C", bound=Card)


def builtin_card_dir(kind: str) -> Path:
    """The built-in cards: `taps_bench/cards/<dir>` in a wheel, `<repo>/<dir>` in a source or editable install."""
    return shipped_dir(CARD_DIRS[kind])


def parse_card(path: Path, kind: str | None = None) -> Card:
    """Read and validate one card file; a malformed card is a UserError naming the file and line."""
    data, text = read_yaml_mapping(path, "card")
    declared = data.pop("kind", None)
    kind = kind or declared
    if kind not in CARD_TYPES:
        raise UserError(f"malformed card {path}:1: cannot tell what kind of card this is; add `kind: "
                        f"{'|'.join(CARD_TYPES)}` or put it under {'/, '.join(CARD_DIRS.values())}/")
    return validate_yaml(CARD_TYPES[kind], {**data, "origin": str(path)}, path, text, "card")


def _cards_from_object(obj: Any, kind: str, origin: str) -> list[Card]:
    """Entry points may give a directory, a card, a mapping, a list of those, or a callable returning them."""
    if callable(obj) and not isinstance(obj, type):
        obj = obj()
    if isinstance(obj, (str, Path)) and Path(obj).is_dir():
        return [parse_card(p, kind) for p in sorted(Path(obj).glob("*.yaml"))]
    items = obj if isinstance(obj, (list, tuple)) else [obj]
    cards: list[Card] = []
    for item in items:
        if isinstance(item, Card):
            cards.append(item)
        elif isinstance(item, dict):
            cards.append(CARD_TYPES[kind].model_validate({**item, "origin": origin}))
        else:
            raise UserError(f"entry point {origin} gave a {type(item).__name__}, not a {kind} card")
    return cards


def check_combiner(obj: Any, name: str, origin: str) -> type:
    """`obj` if it is a combiner class registered under `name`; else one line saying what is missing."""
    options = getattr(obj, "Options", None)
    problems = []
    if not isinstance(obj, type):
        problems.append("it is not a class")
    elif getattr(obj, "combiner_name", None) != name:
        problems.append(f"its combiner_name is {getattr(obj, 'combiner_name', None)!r}, not {name!r}")
    if not (isinstance(options, type) and issubclass(options, CombinerOptions)):
        problems.append("its Options is not a CombinerOptions model")
    elif options.model_fields["combiner"].default != name:
        problems.append(f"its Options.combiner is not Literal[{name!r}] = {name!r}")
    if not callable(getattr(obj, "build", None)):
        problems.append("it has no build(options, drafters, target_model, tree, head_dtype)")
    if problems:
        raise UserError(f"combiner '{name}' from {origin} cannot be used: {'; '.join(problems)}")
    return obj


def combiners_in_file(path: Path) -> dict[str, type]:
    """The combiner classes a Python file defines (`--include DIR/combiners/*.py`: the user's own code)."""
    module_name = f"taps_bench_include_{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]}_{path.stem}"
    module = sys.modules.get(module_name)
    if module is None:
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            raise UserError(f"cannot load combiner file {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            del sys.modules[module_name]
            raise UserError(f"cannot load combiner file {path}: {type(exc).__name__}: {exc}") from exc
    found = {}
    for obj in vars(module).values():
        if isinstance(obj, type) and obj.__module__ == module_name and isinstance(obj.__dict__.get("combiner_name"),
                                                                                   str):
            found[obj.combiner_name] = check_combiner(obj, obj.combiner_name, str(path))
    if not found:
        raise UserError(f"combiner file {path} defines no combiner class (a class with combiner_name, Options and "
                        "build)")
    return found


@dataclass
class Registry:
    """Everything taps-bench knows by name. Build one with `Registry.load(include=...)`."""

    cards: dict[str, dict[str, Card]] = field(default_factory=lambda: {k: {} for k in CARD_TYPES})
    # name -> (where it comes from, a loader returning the class): entry points are loaded only when used
    combiners: dict[str, tuple[str, Callable[[], Any]]] = field(default_factory=dict)

    @classmethod
    def load(cls, include: Iterable[Path] = ()) -> Registry:
        reg = cls()
        for kind in CARD_TYPES:
            for path in sorted(builtin_card_dir(kind).glob("*.yaml")):
                reg.add(parse_card(path, kind))
        reg._load_entry_points()
        for directory in include:
            reg.include(Path(directory))
        return reg

    def add(self, card: Card) -> None:
        kind = next(k for k, t in CARD_TYPES.items() if isinstance(card, t))
        # Later sources (plugins, --include) override built-ins of the same name on purpose: that is how a user
        # points `smollm2-135m-instruct` at a local copy without editing the package.
        self.cards[kind][card.name] = card

    def include(self, directory: Path) -> None:
        try:
            found_dir = directory.is_dir()
        except OSError:  # a name too long for the file system: is_dir() raises instead of answering
            found_dir = False
        if not found_dir:
            raise UserError(f"--include {shorten(str(directory), 200)}: not a directory")
        found = 0
        for kind, sub in CARD_DIRS.items():
            for path in sorted((directory / sub).glob("*.yaml")):
                self.add(parse_card(path, kind))
                found += 1
        for path in sorted(directory.glob("*.yaml")):
            self.add(parse_card(path))
            found += 1
        for path in sorted((directory / "combiners").glob("*.py")):
            for name, combiner in combiners_in_file(path).items():
                self.combiners[name] = (str(path), lambda c=combiner: c)
                found += 1
        if not found:
            raise UserError(f"--include {directory}: no cards found (expected {', '.join(CARD_DIRS.values())}/"
                            "*.yaml, *.yaml files with a `kind:` field, or combiners/*.py)")
        self.__dict__.pop("_options_adapter", None)

    def _load_entry_points(self) -> None:
        for kind in CARD_TYPES:
            for ep in metadata.entry_points(group=f"taps_bench.{CARD_DIRS[kind]}"):
                for card in _cards_from_object(ep.load(), kind, f"entry point {ep.name} ({ep.value})"):
                    self.add(card)
        for ep in metadata.entry_points(group=COMBINER_GROUP):
            self.combiners[ep.name] = (f"entry point {ep.name} ({ep.value})", ep.load)

    # -- lookups -------------------------------------------------------------------------------------------

    def names(self, kind: str) -> list[str]:
        return sorted(self.combiners) if kind == "combiner" else sorted(self.cards[kind])

    def get(self, kind: str, name: str, type_: type[C]) -> C:
        try:
            card = self.cards[kind][name]
        except KeyError:
            raise unknown_name(kind, name, self.cards[kind]) from None
        assert isinstance(card, type_)
        return card

    def target(self, name: str) -> TargetCard:
        return self.get("target", name, TargetCard)

    def task(self, name: str) -> TaskCard:
        return self.get("task", name, TaskCard)

    def drafter(self, name: str) -> DrafterCard:
        return self.get("drafter", name, DrafterCard)

    def corpus(self, name: str) -> CorpusCard:
        return self.get("corpus", name, CorpusCard)

    def recipe(self, name: str) -> RecipeCard:
        return self.get("recipe", name, RecipeCard)

    def combiner(self, name: str) -> Any:
        """The combiner class registered as `name` (loaded now if it comes from an entry point)."""
        if name not in self.combiners:
            raise unknown_name("combiner", name, self.combiners)
        origin, load = self.combiners[name]
        return check_combiner(load(), name, origin)

    # -- proposer specs ------------------------------------------------------------------------------------

    @cached_property
    def _options_adapter(self) -> TypeAdapter[Any]:
        models = tuple(self.combiner(n).Options for n in sorted(self.combiners))
        union = models[0] if len(models) == 1 else Annotated[Union[models], Field(discriminator="combiner")]  # noqa: UP007
        return TypeAdapter(union)

    def combiner_options(self, spec: ProposerSpec) -> CombinerOptions:
        """A combiner spec's options, validated by its combiner's typed model (the one place they are checked)."""
        assert spec.combiner is not None
        self.combiner(spec.combiner)  # an unknown name is refused with close names, before the union sees it
        try:
            return self._options_adapter.validate_python(spec.flat())
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = ".".join(str(p) for p in err["loc"][1:] if not isinstance(p, int)) or "options"
            what = "not an option of this combiner" if err["type"] == "extra_forbidden" else str(err["msg"])
            got = f" (got {err['input']!r})" if err["type"] not in ("extra_forbidden", "missing") and \
                "(got " not in what else ""
            raise UserError(f"combiner {spec.combiner}: {loc}: {str(what).removeprefix('Value error, ')}{got} "
                            f"(see `taps-bench list combiners`)") from None

    def normalise(self, spec: ProposerSpec) -> ProposerSpec:
        """The spec with its combiner options validated and complete (defaults filled in, values typed), so that
        equal proposers have equal specs, labels and cell keys however they were written."""
        if spec.drafter:
            return spec
        options = self.combiner_options(spec)
        return ProposerSpec(combiner=spec.combiner, drafters=options.drafters, options=options.settings())

    def describe(self, kind: str) -> list[tuple[str, str]]:
        """(name, one-line description) for `taps-bench list`."""
        if kind == "combiner":
            rows = []
            for n in sorted(self.combiners):
                doc = (self.combiner(n).__doc__ or "").strip()
                rows.append((n, doc.splitlines()[0] if doc else ""))
            return rows
        rows = []
        for n, c in sorted(self.cards[kind].items()):
            line = c.description.strip().splitlines()[0]
            if isinstance(c, DrafterCard) and c.model_free is not None:
                line += " [model-free: any target]"
            elif isinstance(c, DrafterCard):  # where a name resolves: a drafter means a different checkpoint per target
                where = [f"{t} ({'hub' if e.source and e.source.hub else 'path' if e.source else 'recipe'}"
                         f"{'' if e.confirmed else ', unconfirmed'})" for t, e in sorted(c.targets.items())]
                line += f" [{'; '.join(where)}]"
            rows.append((n, line))
        return rows
