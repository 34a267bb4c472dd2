"""The task layer: turn a task card plus a data file into prompts, and prompts into rendered chat text.

Data are read from local files (the directory in `--data-dir` or `$TAPS_BENCH_DATA`) so that tests and CI never
touch the hub; `load_examples_from_hub` is the path real users without the files take. Both map rows the same way,
so a task means the same questions whichever way its data arrived.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from taps_bench.catalog.cards import TargetCard, TaskCard, TaskFields
from taps_bench.catalog.yamlfiles import not_utf8
from taps_bench.data.chat import render_chat
from taps_bench.errors import UserError, shorten

DATA_ENV = "TAPS_BENCH_DATA"
# The placeholder in a card's `prompt` template. It is substituted with str.replace, not str.format, so templates
# may contain literal braces (MATH-500 asks for "\boxed{}").
TEXT_SLOT = "{text}"


@dataclass(frozen=True)
class Example:
    id: str  # stable id (card's id field, else the row index as a string)
    turns: tuple[str, ...]  # user-turn texts, already passed through the card's prompt template
    gold: str | None  # gold answer string (after gold_pattern), None when the task has none
    group: str | None  # e.g. MT-Bench category


# -- where the data live ---------------------------------------------------------------------------------------


def resolve_data_dir(explicit: str | Path | None) -> Path:
    """`--data-dir` if given, else `$TAPS_BENCH_DATA`; a UserError if neither is set or the directory is missing."""
    if explicit is not None and str(explicit) != "":
        raw, origin = str(explicit), "--data-dir"
    else:
        raw, origin = os.environ.get(DATA_ENV, ""), DATA_ENV
        if not raw:
            raise UserError(f"no data directory: set {DATA_ENV} or pass --data-dir (the directory that holds "
                            "gsm8k/, math500/, mt_bench/, svamp/ ...)")
    path = Path(raw).expanduser()
    try:
        found = path.is_dir()
    except OSError:  # a name too long for the file system (is_dir() raises rather than answer)
        found = False
    if not found:
        raise UserError(f"data directory {shorten(str(path), 200)} (from {origin}) does not exist or is not a "
                        "directory")
    return path


def data_file_hash(path: Path) -> str:
    """sha256 of a data file, recorded with every run so results can be tied to the exact bytes they came from."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def prompt_hash(text: str) -> str:
    """sha256 of a rendered prompt: two runs with equal hashes provably asked the model the same thing."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# -- reading rows ----------------------------------------------------------------------------------------------


def _read_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open("rb") as fh:  # bytes, decoded line by line, so that bytes that are not UTF-8 are found by line
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise UserError(f"data file {not_utf8(path, raw, exc, lineno)}") from None
            if not line.strip():
                continue  # a trailing blank line is not a row
            try:
                yield f"{path}:{lineno}", json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"malformed row {path}:{lineno}: not valid JSON ({exc.msg})") from None


def _read_json_array(path: Path) -> Iterator[tuple[str, Any]]:
    """Rows of a file holding one JSON array, each located by the line it starts on.

    Decoding element by element (rather than json.load on the whole file) is what lets an error name a line.
    """
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"data file {not_utf8(path, data, exc)}") from None
    decoder = json.JSONDecoder()
    ws = re.compile(r"\s*")

    def skip(pos: int) -> int:
        match = ws.match(text, pos)
        return match.end() if match else pos

    # Line numbers are counted incrementally: positions only move forward, so each character is scanned once.
    counted = [0, 1]  # [position counted up to, line number there]

    def where(pos: int) -> str:
        if pos >= counted[0]:
            counted[1] += text.count("\n", counted[0], pos)
            counted[0] = pos
            return f"{path}:{counted[1]}"
        return f"{path}:{text.count(chr(10), 0, pos) + 1}"

    pos = skip(0)
    if not text.startswith("[", pos):
        raise UserError(f"malformed data file {where(pos)}: expected a JSON array of rows")
    pos = skip(pos + 1)
    if text.startswith("]", pos):
        return
    while True:
        try:
            row, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise UserError(f"malformed row {where(exc.pos)}: not valid JSON ({exc.msg})") from None
        yield where(pos), row
        pos = skip(end)
        if text.startswith(",", pos):
            pos = skip(pos + 1)
        elif text.startswith("]", pos):
            return
        else:
            raise UserError(f"malformed data file {where(pos)}: expected ',' or ']' after a row")


def _read_rows(path: Path, fmt: str) -> Iterator[tuple[str, Any]]:
    return _read_json_array(path) if fmt == "json" else _read_jsonl(path)


# -- mapping rows to examples ----------------------------------------------------------------------------------


def _as_text(value: Any) -> str:
    # SVAMP stores answers as floats (27.0); an integral float is written as the integer so that gold strings look
    # the same whatever the source's number type. Scorers compare numerically anyway.
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _check_card(card: TaskCard) -> None:
    """Card combinations that pydantic does not see; checked once, before any row is read."""
    if TEXT_SLOT not in card.prompt:
        raise UserError(f"task card '{card.name}': prompt must contain {TEXT_SLOT} (where the question goes)")
    if card.turns > 1 and not card.fields.turns_is_list:
        raise UserError(f"task card '{card.name}': turns: {card.turns} needs fields.turns_is_list (one field "
                        "holding the list of user turns)")
    for fields in (card.fields, card.source.hub_fields):
        if fields is not None and fields.turns_is_list and len(fields.turns) != 1:
            raise UserError(f"task card '{card.name}': with turns_is_list, fields.turns names exactly one field")
    sub = card.subset
    if sub is not None:
        for key in ("first", "last"):
            value = getattr(sub, key)
            if value is not None and value < 1:
                raise UserError(f"task card '{card.name}': subset.{key} must be a positive integer")


def _field(row: Mapping[str, Any], name: str, where: str) -> Any:
    if name not in row or row[name] is None:
        raise UserError(f"malformed row {where}: missing field '{name}'")
    return row[name]


def _to_example(card: TaskCard, fields: TaskFields, row: Any, index: int, where: str) -> Example:
    if not isinstance(row, Mapping):
        raise UserError(f"malformed row {where}: expected a JSON object, got {type(row).__name__}")
    if fields.turns_is_list:
        value = _field(row, fields.turns[0], where)
        if not isinstance(value, (list, tuple)) or not all(isinstance(t, str) for t in value):
            raise UserError(f"malformed row {where}: field '{fields.turns[0]}' must be a list of strings")
        if len(value) < card.turns:
            raise UserError(f"malformed row {where}: field '{fields.turns[0]}' has {len(value)} turns, the task "
                            f"asks {card.turns}")
        texts = list(value[: card.turns])
    else:
        texts = [" ".join(_as_text(_field(row, name, where)) for name in fields.turns)]
    gold: str | None = None
    if fields.gold is not None:
        gold = _as_text(_field(row, fields.gold, where))
        if fields.gold_pattern is not None:
            match = re.search(fields.gold_pattern, gold)
            if match is None:
                raise UserError(f"malformed row {where}: field '{fields.gold}' does not match gold_pattern "
                                f"{fields.gold_pattern!r}")
            gold = match.group(1).strip()
    return Example(
        id=_as_text(_field(row, fields.id, where)) if fields.id is not None else str(index),
        turns=tuple(card.prompt.replace(TEXT_SLOT, t) for t in texts),
        gold=gold,
        group=_as_text(_field(row, fields.group, where)) if fields.group is not None else None,
    )


def _map_rows(card: TaskCard, fields: TaskFields, rows: Iterable[tuple[str, Any]], origin: str) -> list[Example]:
    examples: list[Example] = []
    seen: dict[str, str] = {}
    for index, (where, row) in enumerate(rows):
        example = _to_example(card, fields, row, index, where)
        # Results are stored and resumed by example id, so two rows with one id would silently overwrite each other.
        if example.id in seen:
            raise UserError(f"malformed row {where}: id '{example.id}' already used at {seen[example.id]}")
        seen[example.id] = where
        examples.append(example)
    if not examples:
        raise UserError(f"{origin} holds no rows")
    return examples


# -- subset and limit ------------------------------------------------------------------------------------------


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise UserError("--limit must be a positive integer")


def _apply_subset(card: TaskCard, examples: list[Example]) -> list[Example]:
    """The card's declared subset, applied in the order ids, first, last (each keeps file order)."""
    sub = card.subset
    if sub is None:
        return examples
    if sub.ids is not None:
        wanted = set(sub.ids)
        missing = wanted - {e.id for e in examples}
        if missing:
            shown = ", ".join(sorted(missing)[:5]) + (" ..." if len(missing) > 5 else "")
            raise UserError(f"task '{card.name}': subset names {len(missing)} id(s) not in the data: {shown}")
        examples = [e for e in examples if e.id in wanted]
    if sub.first is not None:
        examples = examples[: sub.first]
    if sub.last is not None:
        examples = examples[-sub.last :]
    return examples


def _apply_limit(card: TaskCard, examples: list[Example], limit: int | None) -> list[Example]:
    """`file`: the first N. `round_robin`: one from each group in turn (groups in order of first appearance).

    The round-robin result is returned in pick order, so `--limit n` is always a prefix of `--limit n+1`. Without a
    limit every example is returned in file order.
    """
    if limit is None:
        return examples
    if card.limit_order == "file":
        return examples[:limit]
    queues: dict[str | None, list[Example]] = {}
    for example in examples:
        queues.setdefault(example.group, []).append(example)
    picked: list[Example] = []
    depth = 0
    while len(picked) < limit and any(depth < len(q) for q in queues.values()):
        for queue in queues.values():
            if depth < len(queue) and len(picked) < limit:
                picked.append(queue[depth])
        depth += 1
    return picked


# -- public entry points ---------------------------------------------------------------------------------------


def load_examples(card: TaskCard, data_dir: str | Path | None, limit: int | None = None) -> list[Example]:
    """The task's examples from `card.source.local` under the data directory: declared subset first, then limit."""
    _check_limit(limit)
    _check_card(card)
    root = resolve_data_dir(data_dir)
    path = root / card.source.local
    if not path.is_file():
        # Pointing at the hub only helps when the card names a hub dataset; a local-only task's file is the user's.
        where = f" (the data are published on the hub as {card.source.hub})" if card.source.hub else ""
        raise UserError(
            f"task '{card.name}': data file {path} not found; set {DATA_ENV} or pass --data-dir to the directory "
            f"that holds {card.source.local}{where}")
    examples = _map_rows(card, card.fields, _read_rows(path, card.source.format), str(path))
    return _apply_limit(card, _apply_subset(card, examples), limit)


def load_examples_from_hub(card: TaskCard, limit: int | None = None) -> list[Example]:
    """The same examples from the hub dataset `card.source.hub` (needs network access; never used in tests)."""
    _check_limit(limit)
    _check_card(card)
    src = card.source
    if src.hub is None:  # checked before importing `datasets`: a card without a hub id fails at once
        raise UserError(f"task '{card.name}': its card names no hub dataset (source.hub), so its data can only be "
                        f"read from the local file {src.local}; set {DATA_ENV} or pass --data-dir")
    import datasets  # imported here: it is slow to import and the local path never needs it

    try:
        ds = datasets.load_dataset(src.hub, src.config, split=src.split)
    except Exception as exc:  # the hub raises many kinds (network, auth, missing split); all are the user's to fix
        raise UserError(f"task '{card.name}': cannot load {src.hub} (config {src.config}, split {src.split}) "
                        f"from the hub: {exc}") from exc
    origin = f"{src.hub}[{src.split}]"
    rows = ((f"{origin} row {i}", row) for i, row in enumerate(ds))
    examples = _map_rows(card, src.hub_fields or card.fields, rows, origin)
    if card.subset is not None and not card.subset.local_only:
        examples = _apply_subset(card, examples)
    return _apply_limit(card, examples, limit)


def render_prompt(tokenizer: Any, target: TargetCard, history: list[dict[str, str]]) -> str:
    """Render a conversation that ends with a user turn through the target's chat template, ready to generate.

    The target's declared system prompt is sent only when it is set: with None the template's own default (if
    any) applies, which is what the target's authors intended.
    """
    if not history or history[-1].get("role") != "user":
        raise ValueError("history must be non-empty and end with a user turn")
    for message in history:
        if message.get("role") not in ("user", "assistant") or not isinstance(message.get("content"), str):
            raise ValueError(f"bad history message {message!r}: role must be user/assistant, content a string")
    return render_chat(tokenizer, target, history, generation_prompt=True)
