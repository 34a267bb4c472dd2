"""Flags shared by several commands, each group collected into one typed object before the command runs (so a
command takes a few objects, not a few dozen parameters)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import click
import yaml
from pydantic import ValidationError

from taps_bench.catalog.cards import MAX_TOP_K, MAX_TREE_DEPTH, MAX_TREE_TOKENS, TreeOverride, top_k_problem
from taps_bench.catalog.proposers import ProposerSpec
from taps_bench.decoding.sampling import Sampling
from taps_bench.errors import UserError


def _apply(options: list[Callable[[Any], Any]], f: Any) -> Any:
    for option in reversed(options):
        f = option(f)
    return f


def _collect(name: str, keys: tuple[str, ...], build: Callable[..., Any]) -> Callable[[Any], Any]:
    """Wrap a command so that the flags `keys` arrive as one object `name` (made by `build(**flags)`)."""

    def decorate(f: Any) -> Any:
        @functools.wraps(f)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            kwargs[name] = build(**{k: kwargs.pop(k) for k in keys})
            return f(*args, **kwargs)

        return wrapper

    return decorate


class FiniteFloat(click.ParamType):
    """A float flag that refuses inf and nan: float() takes them, and nothing non-finite is a valid setting (nor
    may one reach a run's stored settings)."""

    name = "float"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{str(value)[:40]!r} is not a number", param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number; pass an ordinary number such as 0.7", param, ctx)
        return number


FINITE = FiniteFloat()


def db_option(f: Any) -> Any:
    return click.option("--db", default=None,
                        help="SQLAlchemy URL or SQLite file; default $TAPS_BENCH_DB or the cache.")(f)


def db_url(db: str | None) -> str:
    from taps_bench.results.store import as_url, default_db_url

    return default_db_url() if db is None else as_url(db)


@dataclass(frozen=True)
class Machine:
    """Where the data is, what runs the target and how results are reported: every command that loads a target."""

    data_dir: str | None
    device: str | None
    dtype: str | None
    progress: bool
    json: bool


def machine_options(f: Any) -> Any:
    f = _collect("machine", ("data_dir", "device", "dtype", "no_progress", "as_json"),
                 lambda data_dir, device, dtype, no_progress, as_json: Machine(data_dir, device, dtype,
                                                                               not no_progress, as_json))(f)
    return _apply([
        click.option("--data-dir", default=None, help="Directory with the datasets; default $TAPS_BENCH_DATA."),
        click.option("--device", default=None, help="cpu, cuda, cuda:N; default CUDA when present."),
        click.option("--dtype", default=None, help="float32, bfloat16, float16; default bf16 on CUDA, else fp32."),
        click.option("--no-progress", is_flag=True, help="No progress bar."),
        click.option("--json", "as_json", is_flag=True, help="Print one JSON object as the last line of stdout."),
    ], f)


@dataclass(frozen=True)
class Decoding:
    """What a decoding command measures: task, target, prompts, sampling, length, database."""

    task: str
    target: str | None
    limit: int | None
    sampling: Sampling
    max_new_tokens: int
    db: str | None


def _decoding(task: str, target: str | None, limit: int | None, temperature: float, top_p: float,
              sample_top_k: int, seed: int, max_new_tokens: int, db: str | None) -> Decoding:
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be a positive integer (got {limit})")
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1 (got {max_new_tokens})")
    return Decoding(task, target, limit, Sampling(temperature=temperature, top_p=top_p, top_k=sample_top_k, seed=seed),
                    max_new_tokens, db)


def decoding_options(f: Any) -> Any:
    """--task ... --db, collected into `decoding`, plus the machine options."""
    f = _collect("decoding", ("task", "target", "limit", "temperature", "top_p", "sample_top_k", "seed",
                              "max_new_tokens", "db"), _decoding)(f)
    f = _apply([
        click.option("--task", required=True, help="Task name (see `taps-bench list tasks`)."),
        click.option("--target", default=None, help="Target name; default: the CPU or GPU default for this machine."),
        click.option("--limit", type=int, default=None, help="Take the first N examples (documented order per task)."),
        click.option("--temperature", type=FINITE, default=0.0, show_default=True, help="0 is greedy."),
        click.option("--top-p", type=FINITE, default=1.0, show_default=True),
        click.option("--sample-top-k", type=int, default=0, show_default=True, help="Top-k cut when sampling."),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--max-new-tokens", type=int, default=512, show_default=True),
        db_option,
    ], f)
    return machine_options(f)


# Why each bound exists, said with the flag that broke it.
_TREE_BOUNDS = {"total_tokens": f"1 to {MAX_TREE_TOKENS} (tokens verified in one forward)",
                "depth": f"0 to {MAX_TREE_DEPTH} (the engine verifies trees of at most {MAX_TREE_DEPTH + 1} levels)",
                "top_k": f"1 to {MAX_TOP_K} (children per node)"}


def _tree(total_tokens: int | None, depth: int | None, top_k: int | None, preset: str | None) -> TreeOverride:
    given = {"total_tokens": total_tokens, "depth": depth, "top_k": top_k}
    for key, value in given.items():  # checked here, flag by flag, so the message names the flag and its value
        if value is not None and not _in_bounds(key, value):
            raise UserError(f"bad tree settings: --{key.replace('_', '-')} {value}: must be {_TREE_BOUNDS[key]}")
    if (problem := top_k_problem(top_k, total_tokens)) is not None:
        raise UserError(f"bad tree settings: --top-k {top_k}: "
                        f"{problem.replace('top_k', '--top-k').replace('total_tokens', '--total-tokens')}")
    return TreeOverride(total_tokens=total_tokens, depth=depth, top_k=top_k, preset=preset)


def _in_bounds(key: str, value: int) -> bool:
    low = 0 if key == "depth" else 1
    high = {"total_tokens": MAX_TREE_TOKENS, "depth": MAX_TREE_DEPTH, "top_k": MAX_TOP_K}[key]
    return low <= value <= high


def tree_options(f: Any) -> Any:
    """--tree, --total-tokens, --depth, --top-k, collected into `tree` (a TreeOverride of the target card's tree)."""
    f = _collect("tree", ("total_tokens", "depth", "top_k", "preset"), _tree)(f)
    return _apply([
        click.option("--tree", "preset", type=click.Choice(["auto", "paper"]), default=None,
                     help="auto: the shape predicted fastest for this device and drafter (taps-bench profile); "
                          "paper: 60/5/10. Default: the target card's tree."),
        click.option("--total-tokens", type=int, default=None,
                     help="Tree size incl. root; default from the target card."),
        click.option("--depth", type=int, default=None, help="EAGLE-2 depth (the tree has depth+1 drafted levels)."),
        click.option("--top-k", type=int, default=None, help="EAGLE-2 top-k per expansion; 1 gives a chain."),
    ], f)


def _draft_vocab(draft_vocab: str | None) -> int | str | None:
    if draft_vocab is None:
        return None
    value = draft_vocab.strip().lower()
    if value in ("auto", "full"):
        return value
    if value.isdigit() and int(value) >= 1:
        return int(value)
    raise UserError(f"--draft-vocab must be a positive number of tokens, auto or full (got {draft_vocab!r})")


def draft_vocab_option(f: Any) -> Any:
    """--draft-vocab N|auto|full, collected into `draft_vocab` (None when not given: the target card decides)."""
    f = _collect("draft_vocab", ("draft_vocab",), _draft_vocab)(f)
    return click.option("--draft-vocab", default=None, metavar="N|auto|full",
                        help="Tokens the drafter scores: the N most frequent of its corpus's replies; auto: enough "
                             "for 99% of them; full: all. Lossless either way. Default: the target card's.")(f)


def split_names(text: str | None) -> tuple[str, ...]:
    return tuple(d.strip() for d in (text or "").split(",") if d.strip())


def _option_pair(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--option {text[:60]!r}: write KEY=VALUE, e.g. --option granularity=prompt")
    try:
        parsed = yaml.safe_load(value) if value.strip() else value  # "0.3" -> 0.3, "prompt" -> "prompt"
    except yaml.YAMLError:
        parsed = value  # not YAML ("a: b: c"): the combiner's model says whether the text is valid
    if isinstance(parsed, float) and not math.isfinite(parsed):  # YAML reads .inf and .nan as floats
        raise UserError(f"--option {key.strip()}={value}: not a finite number; pass an ordinary number")
    return key.strip(), parsed


def _proposer(drafter: str | None, combiner: str | None, drafters: str | None, alpha: float | None,
              granularity: str | None, budget: str | None, option: tuple[str, ...]) -> ProposerSpec | None:
    if not drafter and not combiner:
        return None
    given = {k: v for k, v in (("alpha", alpha), ("granularity", granularity), ("budget", budget)) if v is not None}
    given |= dict(_option_pair(o) for o in option)
    if drafter and (combiner or drafters or given):
        raise UserError("pass either --drafter NAME or --combiner NAME --drafters a,b (combiner options go with "
                        "--combiner)")
    try:
        return ProposerSpec(drafter=drafter, combiner=combiner, drafters=split_names(drafters), **given)
    except ValidationError as exc:  # its str() ends with a URL line, not with what is wrong
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise UserError(f"bad proposer: {where + ': ' if where else ''}"
                        f"{str(err['msg']).removeprefix('Value error, ')}") from None


def proposer_options(f: Any) -> Any:
    """What names a proposer (one drafter, or a combiner over several with its options), collected into
    `proposer` (a ProposerSpec, or None when neither --drafter nor --combiner is given), and its tree."""
    f = _collect("proposer", ("drafter", "combiner", "drafters", "alpha", "granularity", "budget", "option"),
                 _proposer)(f)
    f = _apply([
        click.option("--drafter", default=None,
                     help="Drafter name (resolved for the target) or a checkpoint directory."),
        click.option("--combiner", default=None, help="Combine several drafters (see `taps-bench list combiners`)."),
        click.option("--drafters", default=None, help="Comma-separated drafters for --combiner."),
        click.option("--alpha", type=FINITE, default=None, help="average: alpha * A + (1 - alpha) * B (default 0.5)."),
        click.option("--granularity", default=None, help="confidence/entropy routing: step (default) or prompt."),
        click.option("--budget", default=None, help="merged-tree: full (default; each keeps its tree) or equal."),
        click.option("--option", multiple=True, metavar="KEY=VALUE",
                     help="Any other option of the combiner (a plugin's own), repeatable."),
    ], f)
    return tree_options(f)
