"""One registry per kind (targets, drafters, combiners, tasks, corpora).

Built-ins are YAML cards at the top of the repository (shipped inside the wheel as `taps_bench/cards/<dir>`) or, for
combiners, classes decorated with `@register_combiner`. Third parties add their own through the entry-point groups
`taps_bench.<kind>s` (an entry point may name a directory of cards, a card, a list of cards, or a callable returning
any of those; for combiners, a class) or through `--include DIR` (cards in `DIR/<kind>s/*.yaml`, or any `*.yaml` with a
`kind:` field).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from taps_bench.cards import CARD_DIRS, CARD_TYPES, Card, CorpusCard, DrafterCard, RecipeCard, TargetCard, TaskCard
from taps_bench.errors import UserError, unknown_name

KINDS = ("target", "drafter", "combiner", "task", "corpus", "recipe")
PACKAGE_DIR = Path(__file__).resolve().parent

C = TypeVar("C", bound=Card)
M = TypeVar("M", bound=BaseModel)

_COMBINERS: dict[str, type] = {}


def register_combiner(name: str) -> Callable[[type], type]:
    """Class decorator: `@register_combiner("confidence")` makes a combiner available by name."""

    def wrap(cls: type) -> type:
        if name in _COMBINERS and _COMBINERS[name] is not cls:
            raise ValueError(f"combiner '{name}' registered twice ({_COMBINERS[name]} and {cls})")
        cls.combiner_name = name  # type: ignore[attr-defined]
        _COMBINERS[name] = cls
        return cls

    return wrap


def builtin_card_dir(kind: str) -> Path:
    """The built-in cards: `taps_bench/cards/<dir>` in a wheel, `<repo>/<dir>` in a source or editable install."""
    sub = CARD_DIRS[kind]
    packaged = PACKAGE_DIR / "cards" / sub
    return packaged if packaged.is_dir() else PACKAGE_DIR.parent / sub


def yaml_line(text: str, key_path: tuple[Any, ...]) -> int | None:
    """1-based line of the YAML node at `key_path` (for error messages), or None."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = None
    for key in key_path:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if k.value == str(key)), None)
            if match is None:
                break
            line, node = match[0].start_mark.line + 1, match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            break
    return line if line is not None else (node.start_mark.line + 1 if node is not None else None)


def read_yaml_mapping(path: Path, what: str) -> tuple[dict[str, Any], str]:
    """A YAML file holding a mapping, and its text; unreadable or malformed YAML is one line with file:line."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UserError(f"malformed {what} {where}: {getattr(exc, 'problem', None) or exc}") from exc
    if not isinstance(data, dict):
        raise UserError(f"malformed {what} {path}:1: expected a mapping of fields, got {type(data).__name__}")
    return dict(data), text


def validate_yaml(model: type[M], data: dict[str, Any], path: Path, text: str, what: str,
                  explain: Callable[[dict[str, Any]], str] | None = None) -> M:
    """`model` validated from `data` read out of `path`; the first error is one line naming the file, the line of
    the offending field and the field (plus `explain(error)` when given: a hint on how to fix it)."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = tuple(err["loc"])
        field_name = ".".join(str(p) for p in loc) or "(top level)"
        message = explain(err) if explain else err["msg"]
        raise UserError(f"malformed {what} {path}:{yaml_line(text, loc) or 1}: {field_name}: {message}") from exc


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


@dataclass
class Registry:
    """Everything taps-bench knows by name. Build one with `Registry.load(include=...)`."""

    cards: dict[str, dict[str, Card]] = field(default_factory=lambda: {k: {} for k in CARD_TYPES})
    combiners: dict[str, type] = field(default_factory=dict)

    @classmethod
    def load(cls, include: Iterable[Path] = ()) -> Registry:
        reg = cls()
        for kind in CARD_TYPES:
            for path in sorted(builtin_card_dir(kind).glob("*.yaml")):
                reg.add(parse_card(path, kind))
        reg._load_entry_points()
        reg._load_combiners()
        for directory in include:
            reg.include(Path(directory))
        return reg

    def add(self, card: Card) -> None:
        kind = next(k for k, t in CARD_TYPES.items() if isinstance(card, t))
        # Later sources (plugins, --include) override built-ins of the same name on purpose: that is how a user
        # points `smollm2-135m-instruct` at a local copy without editing the package.
        self.cards[kind][card.name] = card

    def include(self, directory: Path) -> None:
        if not directory.is_dir():
            raise UserError(f"--include {directory}: not a directory")
        found = 0
        for kind, sub in CARD_DIRS.items():
            for path in sorted((directory / sub).glob("*.yaml")):
                self.add(parse_card(path, kind))
                found += 1
        for path in sorted(directory.glob("*.yaml")):
            self.add(parse_card(path))
            found += 1
        if not found:
            raise UserError(f"--include {directory}: no cards found (expected {', '.join(CARD_DIRS.values())}/"
                            "*.yaml or *.yaml files with a `kind:` field)")

    def _load_entry_points(self) -> None:
        for kind in CARD_TYPES:
            for ep in metadata.entry_points(group=f"taps_bench.{CARD_DIRS[kind]}"):
                for card in _cards_from_object(ep.load(), kind, f"entry point {ep.name} ({ep.value})"):
                    self.add(card)

    def _load_combiners(self) -> None:
        try:  # the built-in combiners register themselves on import (they arrive with the combiners module)
            import taps_bench.combiners  # noqa: F401
        except ModuleNotFoundError as exc:
            if exc.name != "taps_bench.combiners":
                raise
        self.combiners.update(_COMBINERS)
        for ep in metadata.entry_points(group="taps_bench.combiners"):
            self.combiners[ep.name] = ep.load()

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

    def combiner(self, name: str) -> type:
        if name not in self.combiners:
            raise unknown_name("combiner", name, self.combiners)
        return self.combiners[name]

    def describe(self, kind: str) -> list[tuple[str, str]]:
        """(name, one-line description) for `taps-bench list`."""
        if kind == "combiner":
            return [(n, (c.__doc__ or "").strip().splitlines()[0] if c.__doc__ else "") for n, c in
                    sorted(self.combiners.items())]
        rows = []
        for n, c in sorted(self.cards[kind].items()):
            line = c.description.strip().splitlines()[0]
            if isinstance(c, DrafterCard):  # where a name resolves: a drafter means a different checkpoint per target
                where = [f"{t} ({'hub' if e.source and e.source.hub else 'path' if e.source else 'recipe'}"
                         f"{'' if e.confirmed else ', unconfirmed'})" for t, e in sorted(c.targets.items())]
                line += f" [{'; '.join(where)}]"
            rows.append((n, line))
        return rows
