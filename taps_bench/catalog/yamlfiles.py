"""Reading YAML files that users write (cards, matrix specs, submission cards): every problem is one line naming the
file, the line and the field."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from taps_bench.errors import UserError, shorten

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
        raise UserError(f"cannot read {what} {shorten(str(path), 200)}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"cannot read {what} {not_utf8(path, path.read_bytes(), exc)}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UserError(f"malformed {what} {where}: {getattr(exc, 'problem', None) or exc}") from exc
    if not isinstance(data, dict):
        raise UserError(f"malformed {what} {path}:1: expected a mapping of fields, got {type(data).__name__}")
    return dict(data), text


def input_path(data: Any, loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """An error location as a path through the input: without the names pydantic gives the members of a union
    (`tree.TreeSettings.depth` is `tree.depth` in the card), which are no key of the card."""
    path, node = [], data
    for i, part in enumerate(loc):
        # A missing field is no key of the input either, but it is the last part of its location, and it is named
        # like a field (a member's name is a class name, `literal[...]` or `function-after[...]`).
        tag = isinstance(part, str) and (part[:1].isupper() or "[" in part)
        in_input = isinstance(node, dict) and part in node
        if not in_input and (tag or (isinstance(node, dict) and i < len(loc) - 1)):
            continue
        path.append(part)
        if isinstance(node, dict):
            node = node.get(part)
        else:
            node = node[part] if isinstance(node, list) and isinstance(part, int) and part < len(node) else None
    return tuple(path)


def not_utf8(path: Path, data: bytes, exc: UnicodeDecodeError, first_line: int = 1) -> str:
    """`PATH:LINE: ...`: where a file stops being UTF-8 and how to fix it (cards and data files are read as UTF-8).
    `data` is the file's bytes from line `first_line` on."""
    line = data.count(b"\n", 0, exc.start) + first_line
    return f"{path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x}); save the file as UTF-8"


def validate_yaml(model: type[M], data: dict[str, Any], path: Path, text: str, what: str,
                  explain: Callable[[dict[str, Any]], str] | None = None) -> M:
    """`model` validated from `data` read out of `path`; the first error is one line naming the file, the line of
    the offending field and the field (plus `explain(error)` when given: a hint on how to fix it)."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = input_path(data, tuple(err["loc"]))
        field_name = ".".join(str(p) for p in loc) or "(top level)"
        message = explain(err) if explain else str(err["msg"]).removeprefix("Value error, ")
        raise UserError(f"malformed {what} {path}:{yaml_line(text, loc) or 1}: {field_name}: {message}") from exc
