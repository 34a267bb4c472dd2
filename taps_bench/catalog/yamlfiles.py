"""Reading YAML files that users write (cards, matrix specs, submission cards): every problem is one line naming the
file, the line and the field."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from taps_bench.errors import UserError

M = TypeVar("M", bound=BaseModel)


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
        message = explain(err) if explain else str(err["msg"]).removeprefix("Value error, ")
        raise UserError(f"malformed {what} {path}:{yaml_line(text, loc) or 1}: {field_name}: {message}") from exc
