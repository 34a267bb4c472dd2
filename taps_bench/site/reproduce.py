"""The `taps-bench run` command line that reproduces a leaderboard row on one task, rebuilt from what its runs
stored: target, task, proposer (a drafter, or a combiner with its drafters and options), sampling, length, tree,
draft vocabulary, device, dtype and how many questions it holds (`--limit`: the first N).

Every argument is shell-quoted (names come from anybody's bundle), and none is a local path: a drafter that was
given as a checkpoint directory shows as the placeholder `<checkpoint:NAME>`, and a target or task that the
registry building the site does not know (its card came with `--include DIR`) adds `--include <cards>`."""

from __future__ import annotations

import json
import re
import shlex
from typing import Any

import yaml

from taps_bench.catalog.registry import Registry
from taps_bench.results.pairing import BASELINE_KEYS
from taps_bench.site.rows import Row, TaskResult, finite_number

PROGRAM = "taps-bench"
CARDS = "<cards>"  # the --include directory a card came from: a local path, never shown
NOT_OPTIONS = {"combiner", "drafters", "tree", "draft_head_dtype", *BASELINE_KEYS}  # a combiner's other settings
OWN_FLAGS = {"alpha": (int, float), "granularity": str, "budget": str}  # options `run` has a flag of its own for
_WORD = re.compile(r"[A-Za-z0-9_.:+-]{1,64}")  # a stored device or dtype shown as is; anything else is left out
REGISTERED = ("hub:", "built:")  # checkpoints a drafter name resolved to: the name resolves again


def checkpoint_placeholder(name: Any) -> str:
    return f"<checkpoint:{str(name)[:80]}>"


def drafter_arg(name: Any, checkpoint: Any, reg: Registry | None) -> str:
    """The name to pass for a drafter: its registered name, else the placeholder of a checkpoint directory."""
    if isinstance(name, str) and reg is not None and name in reg.cards["drafter"]:
        return name
    if isinstance(name, str) and isinstance(checkpoint, str) and checkpoint.startswith(REGISTERED):
        return name
    return checkpoint_placeholder(name)


def _number(value: Any) -> str | None:
    number = finite_number(value)
    if number is None:
        return None
    return str(int(number)) if number.is_integer() else repr(number)


def _option_value(value: Any) -> str | None:
    """How `--option KEY=VALUE` writes a stored option so that `run` reads it back the same (as YAML)."""
    if isinstance(value, str):
        try:
            same = yaml.safe_load(value) == value
        except yaml.YAMLError:
            same = False
        return value if same else json.dumps(value)
    if value is None or isinstance(value, (bool, int, float, list, dict)):
        try:
            return json.dumps(value, allow_nan=False)  # JSON is YAML
        except (TypeError, ValueError):
            return None
    return None


def proposer_args(row: Row, reg: Registry | None) -> list[str]:
    settings = row.settings
    if row.kind == "drafter":
        args = ["--drafter", drafter_arg(row.name, settings.get("drafter_checkpoint"), reg)]
        vocab = settings.get("draft_vocab")
        size = _number(vocab.get("size")) if isinstance(vocab, dict) else None
        if size is not None:
            args += ["--draft-vocab", size]
        elif "drafter_checkpoint" in settings and "draft_vocab_size" not in settings and vocab is None \
                and settings.get("drafter_family") != "eagle3":
            args += ["--draft-vocab", "full"]  # stored without a reduced vocabulary: the full one
        return args
    members = settings.get("drafters") if isinstance(settings.get("drafters"), list) else []
    names = [drafter_arg(m.get("name"), m.get("checkpoint"), reg) if isinstance(m, dict) else
             checkpoint_placeholder("?") for m in members]
    args = ["--combiner", str(settings.get("combiner")), "--drafters", ",".join(names)]
    for key in sorted(k for k in settings if k not in NOT_OPTIONS):
        value = settings[key]
        if key in OWN_FLAGS and isinstance(value, OWN_FLAGS[key]) and not isinstance(value, bool):
            shown = _number(value) if isinstance(value, (int, float)) else value
            if shown is not None:
                args += [f"--{key}", shown]
                continue
        if (text := _option_value(value)) is not None:
            args += ["--option", f"{key}={text}"]
    return args


def command(row: Row, target: str, task: str, launch: dict[str, Any], reg: Registry | None) -> str:
    """One `taps-bench run` line for one launch of the row on one task (see TaskResult.launches)."""
    args = [PROGRAM]
    if reg is not None and (target not in reg.cards["target"] or task not in reg.cards["task"]):
        args += ["--include", CARDS]
    args += ["run", "--target", target, "--task", task, *proposer_args(row, reg)]
    tree = row.settings.get("tree")
    for key in ("total_tokens", "depth", "top_k"):
        if isinstance(tree, dict) and (value := _number(tree.get(key))) is not None:
            args += [f"--{key.replace('_', '-')}", value]
    sampling = launch.get("sampling") if isinstance(launch.get("sampling"), dict) else {}
    for key, flag in (("temperature", "--temperature"), ("top_p", "--top-p"), ("top_k", "--sample-top-k"),
                      ("seed", "--seed")):
        if (value := _number(sampling.get(key))) is not None:
            args += [flag, value]
    for key, value in (("--max-new-tokens", row.settings.get("max_new_tokens")), ("--limit", launch.get("limit"))):
        if (shown := _number(value)) is not None:
            args += [key, shown]
    for key in ("device", "dtype"):
        if isinstance(launch.get(key), str) and _WORD.fullmatch(launch[key]):
            args += [f"--{key}", launch[key]]
    return " ".join(shlex.quote(a) for a in args)


def task_commands(row: Row, target: str, task: str, result: TaskResult, reg: Registry | None) -> list[str]:
    if row.kind not in ("drafter", "combiner"):  # oracles are computed from other rows; published rows are copied
        return []
    return [command(row, target, task, launch, reg) for launch in result.launches]


def row_commands(row: Row, target: str, reg: Registry | None) -> list[str]:
    """The commands of every task of the row, one per launch, in task order."""
    return [c for task, result in sorted(row.tasks.items()) for c in task_commands(row, target, task, result, reg)]
