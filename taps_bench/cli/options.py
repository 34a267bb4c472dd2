"""Flags shared by several commands, each group collected into one typed object before the command runs (so a
command takes a few objects, not a few dozen parameters)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import click
import yaml

from taps_bench.catalog.cards import TreeOverride
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
        click.option("--temperature", type=float, default=0.0, show_default=True, help="0 is greedy."),
        click.option("--top-p", type=float, default=1.0, show_default=True),
        click.option("--sample-top-k", type=int, default=0, show_default=True, help="Top-k cut when sampling."),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--max-new-tokens", type=int, default=512, show_default=True),
        db_option,
    ], f)
    return machine_options(f)


def _tree(total_tokens: int | None, depth: int | None, top_k: int | None, preset: str | None) -> TreeOverride:
    try:
        return TreeOverride(total_tokens=total_tokens, depth=depth, top_k=top_k, preset=preset)
    except ValueError as exc:
        err = exc.errors()[0] if hasattr(exc, "errors") else {"loc": (), "msg": str(exc)}
        flag = "--" + str(err["loc"][0]).replace("_", "-") if err["loc"] else "tree"
        raise UserError(f"bad tree settings: {flag}: {err['msg']}") from None


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
        raise UserError(f"--option {text!r}: write KEY=VALUE, e.g. --option granularity=prompt")
    return key.strip(), yaml.safe_load(value) if value.strip() else value  # "0.3" -> 0.3, "prompt" -> "prompt"


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
    except ValueError as exc:
        raise UserError(f"bad proposer: {str(exc).splitlines()[-1].strip()}") from None


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
        click.option("--alpha", type=float, default=None, help="average: alpha * A + (1 - alpha) * B (default 0.5)."),
        click.option("--granularity", default=None, help="confidence/entropy routing: step (default) or prompt."),
        click.option("--budget", default=None, help="merged-tree: full (default; each keeps its tree) or equal."),
        click.option("--option", multiple=True, metavar="KEY=VALUE",
                     help="Any other option of the combiner (a plugin's own), repeatable."),
    ], f)
    return tree_options(f)
