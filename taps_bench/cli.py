"""The `taps-bench` command line.

Bad input exits 2 with one line saying what is wrong and how to fix it; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from taps_bench.errors import UserError
from taps_bench.paths import write_atomic
from taps_bench.registry import KINDS, Registry

KIND_ALIASES = {f"{k}s": k for k in KINDS} | {"corpora": "corpus"} | {k: k for k in KINDS}
KIND_NAMES = ["targets", "drafters", "combiners", "tasks", "corpora", "recipes"]


class Context:
    def __init__(self, debug: bool, include: tuple[str, ...]) -> None:
        self.debug = debug
        self.include = include
        self._registry: Registry | None = None

    @property
    def registry(self) -> Registry:
        if self._registry is None:
            self._registry = Registry.load(include=[Path(p) for p in self.include])
        return self._registry


def _quiet_libraries() -> None:
    """Keep stdout for results: no transformers progress bars or advisory warnings."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.option("--include", multiple=True, type=click.Path(), metavar="DIR",
              help="Extra cards: DIR/{targets,tasks,drafters,corpora}/*.yaml or *.yaml with a `kind:` field.")
@click.pass_context
def cli(ctx: click.Context, debug: bool, include: tuple[str, ...]) -> None:
    """Benchmark task-aware speculative decoding: drafters, combiners, tasks, targets."""
    ctx.obj = Context(debug, include)


@cli.command("list")
@click.argument("kind", metavar="targets|drafters|combiners|tasks|corpora|recipes")
@click.pass_obj
def list_cmd(obj: Context, kind: str) -> None:
    """List what taps-bench knows, one line each."""
    if kind not in KIND_ALIASES:
        from taps_bench.errors import unknown_name

        raise unknown_name("kind", kind, KIND_NAMES)
    rows = obj.registry.describe(KIND_ALIASES[kind])
    if not rows:
        click.echo(f"(no {kind} registered yet)")
    width = max((len(n) for n, _ in rows), default=0)
    for name, desc in rows:
        click.echo(f"{name:<{width}}  {desc}")


# -- shared options ---------------------------------------------------------------------------------------------


def _common(f: Any) -> Any:
    options = [
        click.option("--task", required=True, help="Task name (see `taps-bench list tasks`)."),
        click.option("--target", default=None, help="Target name; default: the CPU or GPU default for this machine."),
        click.option("--limit", type=int, default=None, help="Take the first N examples (documented order per task)."),
        click.option("--temperature", type=float, default=0.0, show_default=True, help="0 is greedy."),
        click.option("--top-p", type=float, default=1.0, show_default=True),
        click.option("--sample-top-k", type=int, default=0, show_default=True, help="Top-k cut when sampling."),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--max-new-tokens", type=int, default=512, show_default=True),
        click.option("--db", default=None, help="SQLAlchemy URL or SQLite file; default $TAPS_BENCH_DB or the cache."),
    ]
    return _apply(options, _machine_options(f))


def _apply(options: list[Any], f: Any) -> Any:
    for option in reversed(options):
        f = option(f)
    return f


def _machine_options(f: Any) -> Any:
    """Where the data is, what runs the target and how results are reported: every command that loads a target."""
    return _apply([
        click.option("--data-dir", default=None, help="Directory with the datasets; default $TAPS_BENCH_DATA."),
        click.option("--device", default=None, help="cpu, cuda, cuda:N; default CUDA when present."),
        click.option("--dtype", default=None, help="float32, bfloat16, float16; default bf16 on CUDA, else fp32."),
        click.option("--no-progress", is_flag=True, help="No progress bar."),
        click.option("--json", "as_json", is_flag=True, help="Print one JSON object as the last line of stdout."),
    ], f)


def _proposer_options(f: Any) -> Any:
    """What names a proposer (one drafter, or a combiner over several) and its tree: shared by run and lm-eval."""
    options = [
        click.option("--drafter", default=None,
                     help="Drafter name (resolved for the target) or a checkpoint directory."),
        click.option("--combiner", default=None, help="Combine several drafters (see `taps-bench list combiners`)."),
        click.option("--drafters", default=None, help="Comma-separated drafters for --combiner."),
        click.option("--alpha", type=float, default=0.5, show_default=True,
                     help="average: alpha * A + (1 - alpha) * B."),
        click.option("--granularity", default="step", show_default=True,
                     help="confidence/entropy routing: step or prompt."),
        click.option("--budget", default="full", show_default=True,
                     help="merged-tree: full (each keeps its tree) or equal."),
        click.option("--total-tokens", type=int, default=None,
                     help="Tree size incl. root; default from the target card."),
        click.option("--depth", type=int, default=None, help="EAGLE-2 depth (the tree has depth+1 drafted levels)."),
        click.option("--top-k", type=int, default=None, help="EAGLE-2 top-k per expansion; 1 gives a chain."),
    ]
    return _apply(options, f)


def _db_url(db: str | None) -> str:
    from taps_bench.store import as_url, default_db_url

    return default_db_url() if db is None else as_url(db)


def _prepare(obj: Context, task: str, target: str | None, limit: int | None, temperature: float, top_p: float,
             sample_top_k: int, seed: int, max_new_tokens: int, db: str | None, data_dir: str | None,
             device: str | None, dtype: str | None, check: Any = None) -> dict[str, Any]:
    """Validate everything cheap before loading a model, so bad input fails in a second with nothing written.

    `check(target_card)` runs extra validation (the drafter of `run`) before anything is printed or opened."""
    from taps_bench.sampling import Sampling
    from taps_bench.store import Store
    from taps_bench.targets import default_target_name, resolve_device
    from taps_bench.tasks import load_examples, resolve_data_dir

    reg = obj.registry
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be a positive integer (got {limit})")
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1 (got {max_new_tokens})")
    sampling = Sampling(temperature=temperature, top_p=top_p, top_k=sample_top_k, seed=seed)
    task_card = reg.task(task)
    why = ""
    if target is None:
        target, why = default_target_name(reg.cards["target"])  # type: ignore[arg-type]
    target_card = reg.target(target)
    if check is not None:
        check(target_card)
    dev, dt, dev_why = resolve_device(device, dtype)
    directory = resolve_data_dir(data_dir)
    examples = load_examples(task_card, directory, limit)
    store = Store(_db_url(db))
    if why:
        click.echo(f"[taps-bench] {why}", err=True)
    click.echo(f"[taps-bench] target {target_card.name} on {dev} ({str(dt).removeprefix('torch.')}; {dev_why}); "
               f"task {task_card.name}: {len(examples)} examples; results in {_shown(store)}", err=True)
    return {"sampling": sampling, "task": task_card, "target_card": target_card, "device": device, "dtype": dtype,
            "examples": examples, "store": store, "data_file": directory / task_card.source.local,
            "data_dir": directory,
            "max_new_tokens": max_new_tokens}


def _load(p: dict[str, Any]) -> tuple[Any, str, dict[str, Any]]:
    from taps_bench import provenance
    from taps_bench.targets import load_target
    from taps_bench.tasks import data_file_hash

    _quiet_libraries()
    target = load_target(p["target_card"], p["device"], p["dtype"])
    return target, data_file_hash(p["data_file"]), provenance.collect(target)


def _baseline_arm(p: dict[str, Any]) -> Any:
    from taps_bench.runner import Arm

    return Arm(kind="baseline", proposer="autoregressive", sampling=p["sampling"], max_new_tokens=p["max_new_tokens"])


def _summary_rows(label: str, s: dict[str, Any]) -> dict[str, Any]:
    return {"arm": label, "samples": s["n_samples"], "new_tokens": s["new_tokens"], "tau": s["tau"],
            "tau_macro": s["tau_macro"], "tokens_per_s": s["tokens_per_s"], "accuracy": s["accuracy"],
            "draft_s": s["draft_s"], "verify_s": s["verify_s"], "overhead_s": s["overhead_s"]}


@cli.command()
@_common
@click.pass_obj
def baseline(obj: Context, as_json: bool, no_progress: bool, **kw: Any) -> None:
    """Autoregressive baseline of a target on a task (the speedup denominator)."""
    from taps_bench.metrics import summarize
    from taps_bench.proposer import Autoregressive
    from taps_bench.report import format_table
    from taps_bench.runner import only, run_arm

    p = _prepare(obj, **kw)
    target, data_hash, prov = _load(p)
    run_id = run_arm(p["store"], target, p["task"], p["examples"], Autoregressive(), _baseline_arm(p), data_hash,
                     prov, show_progress=not no_progress)
    s = summarize(only(p["store"].samples(run_id), p["examples"]))
    click.echo(format_table([_summary_rows("autoregressive", s)], _TABLE))
    result = {"run_id": run_id, "target": target.name, "task": p["task"].name,
              "temperature": p["sampling"].temperature, "n_samples": s["n_samples"], "new_tokens": s["new_tokens"],
              "tokens_per_s": s["tokens_per_s"], "accuracy": s["accuracy"], "tau": s["tau"],
              "device": str(target.device), "dtype": prov["dtype"], "db": _shown(p["store"])}
    if as_json:
        click.echo(json.dumps(result))


_TABLE = [("arm", "arm"), ("samples", "samples"), ("new_tokens", "tokens"), ("tau", "tau"),
          ("tau_macro", "tau (macro)"), ("tokens_per_s", "tok/s"), ("accuracy", "accuracy"),
          ("draft_s", "draft s"), ("verify_s", "verify s"), ("overhead_s", "other s")]


@cli.command()
@_proposer_options
@click.option("--allow-pickle", is_flag=True, help="Allow loading pytorch_model.bin (pickle) drafters.")
@click.option("--no-build", is_flag=True, help="Fail instead of building a registered but unbuilt drafter.")
@click.option("--no-baseline", is_flag=True,
              help="Decode only the speculative arm (tau, acceptance); speedup and the lossless check use whatever "
                   "baseline samples are already stored.")
@_common
@click.pass_obj
def run(obj: Context, drafter: str | None, combiner: str | None, drafters: str | None, alpha: float,
        granularity: str, budget: str, total_tokens: int | None, depth: int | None, top_k: int | None,
        allow_pickle: bool, no_build: bool, no_baseline: bool, as_json: bool, no_progress: bool, **kw: Any) -> None:
    """Measure a drafter (or a combiner of drafters) against its target: speculative and autoregressive arms on the
    same prompts."""
    from taps_bench.resolve import ProposerSpec, build_proposer, tree_settings

    spec_in = ProposerSpec(drafter=drafter, combiner=combiner, alpha=alpha, granularity=granularity, budget=budget,
                           drafters=tuple(d.strip() for d in (drafters or "").split(",") if d.strip()))
    p = _prepare(obj, **kw, check=lambda card: spec_in.check(obj.registry, card, allow_pickle, build=not no_build))
    target, data_hash, prov = _load(p)
    tree = tree_settings(target, total_tokens, depth, top_k)
    proposer, label, settings = build_proposer(obj.registry, spec_in, target, tree, allow_pickle, not no_build,
                                               p["data_dir"], show_progress=not no_progress)
    result = measure(p, target, data_hash, prov, proposer, label, settings, not no_progress, baseline=not no_baseline)
    result |= {"combiner": combiner, "drafters": list(spec_in.names()), "tree": tree.model_dump()}
    if as_json:
        click.echo(json.dumps(result, default=str))


def measure(p: dict[str, Any], target: Any, data_hash: str, prov: dict[str, Any], proposer: Any, label: str,
            settings: dict[str, Any], progress: bool, echo: bool = True, baseline: bool = True) -> dict[str, Any]:
    """Both arms on the same prompts (see `runner.measure`), printed and returned as one result."""
    from taps_bench.report import format_table
    from taps_bench.runner import Arm
    from taps_bench.runner import measure as measure_arms

    arm = Arm(kind="speculative", proposer=label, sampling=p["sampling"], max_new_tokens=p["max_new_tokens"],
              settings=settings)
    m = measure_arms(p["store"], target, p["task"], p["examples"], proposer, arm, data_hash, prov,
                     baseline=baseline, show_progress=progress)
    sb, ss, sp, decisions = m.baseline, m.speculative, m.speedup, m.decisions
    if echo:
        click.echo(format_table([_summary_rows("autoregressive", sb), _summary_rows(label, ss)], _TABLE))
        depth_rows = [{"depth": d["depth"], "conditional": d["conditional"], "unconditional": d["unconditional"]}
                      for d in ss["acceptance_by_depth"]]
        click.echo(format_table(depth_rows, [("depth", "depth"), ("conditional", "accept | reached"),
                                             ("unconditional", "accept / steps")]))
        click.echo(f"speedup {_fmt(sp['ratio_of_sums'])}x (ratio of sums; mean of per-question ratios "
                   f"{_fmt(sp['mean_of_ratios'])}x)   lossless {_fmt(ss['lossless_rate'])}   mean tree "
                   f"{_fmt(ss['mean_tree_size'])} nodes")
        if decisions:
            click.echo("routing / accepted-subtree share: " + ", ".join(f"{k} {v:.1%}" for k, v in decisions.items()))
    return m.result(target, prov) | {"db": _shown(p["store"])}


@cli.command("sweep-alpha")
@click.option("--drafters", required=True, help="Two drafters a,b: alpha * a + (1 - alpha) * b.")
@click.option("--alphas", default="0,0.25,0.5,0.75,1", show_default=True, help="Comma-separated alphas in [0, 1].")
@click.option("--total-tokens", type=int, default=None)
@click.option("--depth", type=int, default=None)
@click.option("--top-k", type=int, default=None)
@_common
@click.pass_obj
def sweep_alpha(obj: Context, drafters: str, alphas: str, total_tokens: int | None, depth: int | None,
                top_k: int | None, as_json: bool, no_progress: bool, **kw: Any) -> None:
    """The weight-averaging curve: tau and speedup of alpha * A + (1 - alpha) * B for each alpha."""
    from taps_bench.report import format_table
    from taps_bench.resolve import ProposerSpec, build_proposer, tree_settings

    try:
        values = [float(a) for a in alphas.split(",") if a.strip()]
    except ValueError:
        raise UserError(f"--alphas must be comma-separated numbers (got {alphas})") from None
    names = tuple(d.strip() for d in drafters.split(",") if d.strip())
    specs = [ProposerSpec(combiner="average", drafters=names, alpha=a) for a in values]
    p = _prepare(obj, **kw, check=lambda card: [s.check(obj.registry, card, False, True) for s in specs])
    target, data_hash, prov = _load(p)
    tree = tree_settings(target, total_tokens, depth, top_k)
    rows = []
    for spec_in in specs:
        proposer, label, settings = build_proposer(obj.registry, spec_in, target, tree, data_dir=p["data_dir"],
                                                   show_progress=not no_progress)
        r = measure(p, target, data_hash, prov, proposer, label, settings, not no_progress, echo=False)
        rows.append({"alpha": spec_in.alpha, "tau": r["tau"], "speedup": r["speedup"],
                     "lossless_rate": r["lossless_rate"], "accuracy": r["accuracy"], "run_id": r["run_id"]})
    click.echo(format_table(rows, [("alpha", "alpha"), ("tau", "tau"), ("speedup", "speedup"),
                                   ("lossless_rate", "lossless"), ("accuracy", "accuracy"), ("run_id", "run")]))
    if as_json:
        click.echo(json.dumps({"target": target.name, "task": p["task"].name, "drafters": list(names),
                               "tree": tree.model_dump(), "curve": rows}))


@cli.command()
@click.option("--recipe", default=None, help="A named recipe (see `taps-bench list recipes`); sets everything below.")
@click.option("--target", default=None, help="Target name; default: the machine's default target.")
@click.option("--corpus", default=None, help="Corpus spec: name, name:N, or a mix like sharegpt:35k+mathinstruct:35k.")
@click.option("--method", type=str, default=None, help="eagle2 or hass.")
@click.option("--name", default=None, help="Drafter name in the model store (what `run --drafter` takes).")
@click.option("--max-len", type=int, default=None, help="Tokens per conversation (default 512).")
@click.option("--epochs", type=int, default=None)
@click.option("--lr", type=float, default=None)
@click.option("--batch-tokens", type=int, default=None)
@click.option("--seed", type=int, default=None)
@click.option("--init", "init", default=None, help="Start from this drafter (name or directory) instead of scratch.")
@_machine_options
@click.pass_obj
def train(obj: Context, recipe: str | None, target: str | None, corpus: str | None, method: str | None,
          name: str | None, max_len: int | None, epochs: int | None, lr: float | None, batch_tokens: int | None,
          seed: int | None, init: str | None, data_dir: str | None, device: str | None, dtype: str | None,
          no_progress: bool, as_json: bool) -> None:
    """Train a drafter (EAGLE-2 or HASS objective) on a corpus; resumable; lands in the model store."""
    from taps_bench.build import build_drafter
    from taps_bench.cards import RecipeCard
    from taps_bench.corpora import parse_spec
    from taps_bench.targets import default_target_name, load_target
    from taps_bench.tasks import resolve_data_dir
    from taps_bench.train import TrainSettings

    reg = obj.registry
    base = reg.recipe(recipe) if recipe else None
    target = target or (base.target if base else default_target_name(reg.cards["target"])[0])  # type: ignore[arg-type]
    target_card = reg.target(target)
    if base and base.target != target_card.name:
        raise UserError(f"recipe '{base.name}' is for target '{base.target}', not '{target_card.name}'")
    given = {"name": name, "corpus": corpus, "method": method, "max_len": max_len, "epochs": epochs, "lr": lr,
             "batch_tokens": batch_tokens, "seed": seed}
    merged = (base.model_dump(exclude={"origin"}) if base else {"name": "unnamed", "description": "", "corpus": ""})
    merged |= {k: v for k, v in given.items() if v is not None} | {"target": target_card.name}
    if base is None and (name is None or method is None):
        raise UserError("pass --recipe NAME, or --corpus SPEC --method eagle2|hass --name NAME")
    try:
        spec = RecipeCard(**merged)
    except ValueError as exc:
        raise UserError(f"bad training settings: {str(exc).splitlines()[1:3]}") from None
    if not spec.corpus:
        raise UserError("no corpus: pass --recipe NAME or --corpus SPEC (see `taps-bench list corpora`)")
    for part in parse_spec(spec.corpus):
        reg.corpus(part.corpus)
    directory = resolve_data_dir(data_dir)
    _quiet_libraries()
    tgt = load_target(target_card, device, dtype)
    init_drafter = None
    if init:
        from taps_bench.resolve import load_for_target

        init_drafter = load_for_target(reg, init, tgt, data_dir=directory).drafter
    settings = TrainSettings(method=spec.method, epochs=spec.epochs, lr=spec.lr, batch_tokens=spec.batch_tokens,
                             seed=spec.seed)
    out = build_drafter(reg, tgt, spec.name, spec.corpus, settings, spec.max_len, directory, init=init_drafter,
                        init_name=init, show_progress=not no_progress,
                        description=base.description if base and not name else None)
    click.echo(f"drafter '{spec.name}' for {tgt.name} saved in {out}; use it with "
               f"`taps-bench run --drafter {spec.name} --target {tgt.name} --task ...`")
    if as_json:
        import yaml

        click.echo(json.dumps({"name": spec.name, "target": tgt.name, "path": str(out),
                               "training": yaml.safe_load((out / "card.yaml").read_text())["training"]}))


def _shown(store: Any) -> str:
    return str(store.url.render_as_string(hide_password=True))


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


@cli.command()
@click.option("--db", default=None, help="SQLAlchemy URL or SQLite file.")
def show(db: str | None) -> None:
    """List stored runs with their summaries."""
    from taps_bench.report import runs_table
    from taps_bench.store import Store

    click.echo(runs_table(Store(_db_url(db))))


@cli.command()
@click.option("--db", default=None, help="SQLAlchemy URL or SQLite file.")
@click.option("--format", "fmt", type=str, default="csv", show_default=True, help="csv or json.")
@click.option("--what", type=str, default="runs", show_default=True, help="runs or samples.")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Write to a file instead of stdout.")
def export(db: str | None, fmt: str, what: str, out: str | None) -> None:
    """Export runs (with summaries) or samples (raw counters) as CSV or JSON."""
    from taps_bench.report import export as export_text
    from taps_bench.store import Store

    text = export_text(Store(_db_url(db)), fmt, what)
    if out is None:
        click.echo(text, nl=False)
        return
    write_atomic(Path(out), text)


@cli.command()
@click.argument("spec_file", metavar="SPEC")
@click.option("--db", default=None, help="SQLAlchemy URL or SQLite file; default $TAPS_BENCH_DB or the cache.")
@click.option("--executor", default="local", show_default=True,
              help="local (this process, one cell at a time) or ray (a Ray task per cell; pip install ray).")
@click.option("--address", default=None, help="Ray cluster address (--executor ray); default: start a local one.")
@click.option("--retries", type=int, default=2, show_default=True,
              help="--executor ray: resubmit a failing cell (or one whose worker died) this many times.")
@_machine_options
@click.pass_obj
def matrix(obj: Context, spec_file: str, db: str | None, executor: str, address: str | None, retries: int,
           data_dir: str | None, device: str | None, dtype: str | None, no_progress: bool, as_json: bool) -> None:
    """Run a whole matrix (targets x drafters/combiners x tasks x temperatures x repeats) from a YAML spec (a path,
    or a shipped name such as cpu-small); resumable; a failing cell is recorded and the others go on."""
    from taps_bench import matrix as mx
    from taps_bench.report import format_table
    from taps_bench.store import Store
    from taps_bench.targets import resolve_device
    from taps_bench.tasks import resolve_data_dir

    spec = mx.load_spec(mx.find_spec(spec_file))
    if executor not in ("local", "ray"):
        raise UserError(f"unknown --executor '{executor}': choose local or ray")
    if retries < 0:
        raise UserError(f"--retries must be 0 or more (got {retries})")
    mx.check(spec, obj.registry)
    resolve_device(device, dtype)
    directory = resolve_data_dir(data_dir)
    store = Store(_db_url(db))
    n = len(mx.plan(spec))
    click.echo(f"[taps-bench] matrix {spec.name}: {n} cells; results in {_shown(store)}", err=True)
    _quiet_libraries()
    log = lambda m: click.echo(m, err=True)  # noqa: E731
    if executor == "ray":
        from taps_bench.ray_executor import run_ray

        include = [str(Path(p).resolve()) for p in obj.include]
        outcomes = run_ray(spec, obj.registry, store, directory, include, address, device, dtype, retries,
                           show_progress=not no_progress, log=log)
    else:
        outcomes = mx.run_local(spec, obj.registry, store, directory, device, dtype,
                                show_progress=not no_progress, log=log)
    click.echo(format_table(mx.summary_rows(outcomes), mx.SUMMARY_COLUMNS))
    failed = sum(o.status == "failed" for o in outcomes)
    click.echo(f"{n - failed}/{n} cells finished, {failed} failed" + (" (errors stored; re-run to retry them)"
                                                                       if failed else ""))
    if as_json:
        click.echo(json.dumps({"matrix": spec.name, "db": _shown(store), "cells": mx.as_json(outcomes)},
                              default=str))
    if failed:  # not a usage error (2): the matrix ran, some cells did not
        click.get_current_context().exit(1)


@cli.command()
@click.argument("card", metavar="CARD")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Where to write the bundle; default NAME.bundle.json next to the card.")
@click.option("--limit", type=int, default=2, show_default=True, help="First N prompts of each task.")
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
@_machine_options
@click.pass_obj
def submit(obj: Context, card: str, out: str | None, limit: int, max_new_tokens: int, data_dir: str | None,
           device: str | None, dtype: str | None, no_progress: bool, as_json: bool) -> None:
    """Check a drafter submission card, smoke-test the drafter on every task (T=0, both arms, lossless required)
    and write a result bundle to send with the card in a pull request."""
    from taps_bench.bundle import submit as submit_card
    from taps_bench.bundle import summary_table

    _quiet_libraries()
    result = submit_card(Path(card), obj.registry, Path(out) if out else None, limit, max_new_tokens, data_dir,
                         device, dtype, show_progress=not no_progress)
    click.echo(summary_table(result))
    click.echo(f"bundle written to {result.path}; open a pull request with {card} and the bundle")
    if as_json:
        click.echo(json.dumps({"name": result.card.name, "target": result.card.target, "bundle": str(result.path),
                               "tasks": result.rows}))


@cli.command("import")
@click.argument("bundles", nargs=-1, required=True, metavar="BUNDLE...")
@click.option("--db", default=None, help="SQLAlchemy URL or SQLite file; default $TAPS_BENCH_DB or the cache.")
def import_cmd(bundles: tuple[str, ...], db: str | None) -> None:
    """Merge result bundles (from `taps-bench submit`) into the database; importing twice adds nothing."""
    from taps_bench.bundle import merge_bundles, read_bundle
    from taps_bench.store import Store

    data = [read_bundle(Path(b)) for b in bundles]  # all validated before the database is opened
    with Store(_db_url(db)) as store:
        c = merge_bundles(store, data)
        click.echo(f"imported {c.bundles} bundle(s) into {_shown(store)}: runs {c.runs_new} new, "
                   f"{c.runs_existing} already there; samples {c.samples_added} added, {c.samples_present} already "
                   "present")


@cli.group()
def leaderboard() -> None:
    """The static HTML leaderboard."""


@leaderboard.command("build")
@click.option("--db", default=None, help="SQLAlchemy URL or SQLite file; default $TAPS_BENCH_DB or the cache.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory for the site (replaced).")
@click.option("--title", default="taps-bench leaderboard", show_default=True)
@click.pass_obj
def leaderboard_build(obj: Context, db: str | None, out: str, title: str) -> None:
    """Render every stored run as a self-contained static site (open OUT/index.html, also from file://)."""
    from taps_bench import leaderboard as lb
    from taps_bench.store import Store

    target = Path(out).expanduser().resolve()
    if target.exists() and not target.is_dir():
        raise UserError(f"--out {target} is a file; pass a directory (it is replaced by the site)")
    if target.is_dir() and any(target.iterdir()) and not (target / "index.html").is_file():
        raise UserError(f"--out {target} is a non-empty directory that is not a leaderboard; pass a new or an "
                        "earlier leaderboard directory (it is replaced)")
    result = lb.build(Store(_db_url(db)), target, obj.registry, title)
    click.echo(f"leaderboard: {result['boards']} boards, {result['rows']} rows -> {target / 'index.html'}")


@cli.command("lm-eval")
@click.option("--tasks", required=True, help="Comma-separated lm-eval tasks on local data, e.g. gsm8k,minerva_math500.")
@_proposer_options
@click.option("--baseline", is_flag=True,
              help="Also evaluate the plain target (greedy, no drafter) and compare outputs sample for sample; "
                   "alone, evaluate only the plain target.")
@click.option("--target", default=None, help="Target name; default: the CPU or GPU default for this machine.")
@click.option("--limit", type=int, default=None, help="First N documents of each task (lm-eval's --limit).")
@click.option("--num-fewshot", type=int, default=None, help="Override the tasks' few-shot count.")
@click.option("--max-gen-toks", type=int, default=256, show_default=True,
              help="Generation limit for tasks that set none (lm-eval's HF model default).")
@click.option("--apply-chat-template", is_flag=True, help="Render prompts with the target's chat template "
              "(few-shot examples as turns), as lm-eval's --apply_chat_template.")
@click.option("--system-instruction", default=None, help="System message for every prompt (lm-eval's option).")
@click.option("--output", type=click.Path(file_okay=False), default=None,
              help="Directory for lm-eval's results JSON and per-sample JSONL; default $TAPS_BENCH_HOME/lm-eval.")
@click.option("--db", default=None, help="SQLAlchemy URL or SQLite file; default $TAPS_BENCH_DB or the cache.")
@click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed (tasks that sample).")
@click.option("--allow-pickle", is_flag=True, help="Allow loading pytorch_model.bin (pickle) drafters.")
@click.option("--no-build", is_flag=True, help="Fail instead of building a registered but unbuilt drafter.")
@_machine_options
@click.pass_obj
def lm_eval_cmd(obj: Context, tasks: str, drafter: str | None, combiner: str | None, drafters: str | None,
                alpha: float, granularity: str, budget: str, total_tokens: int | None, depth: int | None,
                top_k: int | None, baseline: bool, target: str | None, limit: int | None, num_fewshot: int | None,
                max_gen_toks: int, apply_chat_template: bool, system_instruction: str | None, output: str | None,
                db: str | None, data_dir: str | None, device: str | None, dtype: str | None, seed: int,
                allow_pickle: bool, no_build: bool, no_progress: bool, as_json: bool) -> None:
    """Accuracy with lm-evaluation-harness: run lm-eval's tasks (on local data) through a drafter or combiner and
    report exact match beside tau; results JSON from lm-eval, counters and accuracy in the database."""
    import logging

    from taps_bench import lmeval as lme
    from taps_bench.paths import home

    if not obj.debug:  # lm-eval logs every step at INFO; keep its warnings
        logging.getLogger("lm_eval").setLevel(logging.WARNING)
    _quiet_libraries()
    names = tuple(d.strip() for d in (drafters or "").split(",") if d.strip())
    opts = lme.LmEvalOptions(
        tasks=tuple(t.strip() for t in tasks.split(",") if t.strip()), target=target, spec_drafter=drafter,
        combiner=combiner, drafters=names, alpha=alpha, granularity=granularity, budget=budget,
        total_tokens=total_tokens, depth=depth, top_k=top_k, baseline=baseline, limit=limit, num_fewshot=num_fewshot,
        max_gen_toks=max_gen_toks, apply_chat_template=apply_chat_template, system_instruction=system_instruction,
        output=Path(output) if output else home() / "lm-eval", db=db, data_dir=data_dir, device=device, dtype=dtype,
        seed=seed, allow_pickle=allow_pickle, build=not no_build, show_progress=not no_progress)
    result = lme.run(obj.registry, opts, echo=click.echo, err=lambda m: click.echo(m, err=True))
    if as_json:
        click.echo(json.dumps(result, default=str))


def main(argv: list[str] | None = None) -> int:
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        rc = cli.main(args=argv, prog_name="taps-bench", standalone_mode=False)
    except UserError as exc:
        if debug:
            raise
        click.echo(f"taps-bench: error: {exc}", err=True)
        return 2
    except click.exceptions.Abort:
        click.echo("taps-bench: interrupted; every finished sample is stored, re-run to resume", err=True)
        return 130
    except click.ClickException as exc:
        if debug:
            raise
        click.echo(f"taps-bench: error: {exc.format_message()} (see `taps-bench --help`)", err=True)
        return 2
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    sys.exit(main())
