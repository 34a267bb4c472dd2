"""Training corpora: registry cards turned into conversations, and mixtures given by counts and a seed.

A corpus spec is `name` (all of it), `name:N` (N conversations) or a mixture such as
`sharegpt:35k+mathinstruct:35k` (the paper's mixed drafters). Sampling is a seeded shuffle, so a spec and a seed
always mean the same conversations; the data hash recorded with every drafter proves it.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

from taps_bench.catalog.cards import CorpusCard, CorpusFile
from taps_bench.catalog.registry import Registry
from taps_bench.errors import UserError

Conversation = list[dict[str, str]]  # [{"role": "user" | "assistant", "content": ...}, ...], user first

# GSM8K solutions carry calculator annotations ("48/2 = <<48/2=24>>24"); chat models never write them, so a drafter
# trained on them would learn a pattern its target never produces.
_CALCULATOR = re.compile(r"<<[^<>]*>>")
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant"}


@dataclass(frozen=True)
class Part:
    corpus: str
    count: int | None  # None: all of it


def parse_spec(spec: str) -> list[Part]:
    """`sharegpt:35k+mathinstruct:35k` -> [Part(sharegpt, 35000), Part(mathinstruct, 35000)]."""
    parts = []
    for chunk in spec.split("+"):
        m = re.fullmatch(r"\s*([A-Za-z0-9._-]+)\s*(?::\s*(\d+(?:\.\d+)?)\s*([kK]?)\s*)?", chunk)
        if not m:
            raise UserError(f"bad corpus spec '{spec}': expected name, name:N or a+b mixtures such as "
                            "sharegpt:35k+mathinstruct:35k")
        count = None
        if m.group(2):
            # Decimal, not float: "64.1k" must be 64100, not 64099.
            n = Decimal(m.group(2)) * (1000 if m.group(3) else 1)
            if n < 1 or n != n.to_integral_value():
                raise UserError(f"bad corpus spec '{spec}': counts must be positive whole numbers")
            count = int(n)
        parts.append(Part(m.group(1), count))
    return parts


def _rows(path: Path, fmt: str) -> list[dict]:
    if fmt == "json":
        return json.loads(path.read_text(encoding="utf-8"))
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _conversation(row: dict, f: CorpusFile) -> Conversation | None:
    if f.style == "sharegpt":
        turns = [(_ROLES.get(str(t.get("from", "")).lower()), str(t.get("value", ""))) for t in row["conversations"]]
        conv: Conversation = []
        for role, text in turns:
            if role is None or not text.strip():
                continue
            if conv and conv[-1]["role"] == role:  # merge consecutive turns of one speaker
                conv[-1]["content"] += "\n\n" + text
            elif conv or role == "user":
                conv.append({"role": role, "content": text})
        if conv and conv[-1]["role"] == "user":
            conv.pop()
        return conv or None
    prompt, answer = str(row[f.prompt_field or ""]), str(row[f.answer_field or ""])
    if f.style == "qa":
        answer = _CALCULATOR.sub("", answer)
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def load_corpus(card: CorpusCard, data_dir: Path) -> tuple[list[Conversation], str]:
    """All conversations of a corpus from its local files, and a hash of the files' bytes."""
    convs: list[Conversation] = []
    digest = hashlib.sha256()
    for f in card.local:
        path = data_dir / f.path
        if not path.is_file():
            raise UserError(f"corpus {card.name}: data file {path} not found; set TAPS_BENCH_DATA or data_dir to "
                            f"the directory holding it (real users: the hub dataset {card.hub})")
        digest.update(path.read_bytes())
        for row in _rows(path, f.format):
            conv = _conversation(row, f)
            if conv:
                convs.append(conv)
    return convs, digest.hexdigest()


def conversations(reg: Registry, spec: str, data_dir: Path, seed: int = 0) -> tuple[list[Conversation], str]:
    """The conversations a spec names (seeded, deterministic) and a hash over the source data and the selection."""
    out: list[Conversation] = []
    digest = hashlib.sha256(f"{spec}|seed={seed}".encode())
    for part in parse_spec(spec):
        convs, data_hash = load_corpus(reg.corpus(part.corpus), data_dir)
        digest.update(data_hash.encode())
        order = list(range(len(convs)))
        random.Random(f"{seed}:{part.corpus}").shuffle(order)
        if part.count is not None:
            if part.count > len(convs):
                print(f"[taps-bench] corpus {part.corpus} has {len(convs)} conversations locally, fewer than the "
                      f"{part.count} asked for: taking all of them")
            order = order[: part.count]
        out.extend(convs[i] for i in order)
    random.Random(f"{seed}:mix").shuffle(out)  # interleave the parts of a mixture
    return out, digest.hexdigest()
