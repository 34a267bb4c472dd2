"""`baseline`, `run` and `sweep-alpha`: decode arms of a task into the store and print what they measured."""

from __future__ import annotations

import json
import math
from typing import Any

import click

from taps_bench.catalog.cards import TreeOverride
from taps_bench.catalog.proposers import ProposerSpec
from taps_bench.cli.app import Context, cli, err, quiet_libraries
from taps_bench.cli.options import (
    Decoding,
    Machine,
    db_url,
    decoding_options,
    draft_vocab_option,
    proposer_options,
    split_names,
    tree_options,
)
from taps_bench.errors import UserError
from taps_bench.measure.session import Loaded, Session, load, open_session

_TABLE = [("arm", "arm"), ("samples", "samples"), ("new_tokens", "tokens"), ("tau", "tau"),
          ("tau_macro", "tau (macro)"), ("tokens_per_s", "tok/s"), ("accuracy", "accuracy"),
          ("draft_s", "draft s"), ("verify_s", "verify s"), ("overhead_s", "other s")]


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _summary_row(label: str, s: dict[str, Any]) -> dict[str, Any]:
    return {"arm": label, "samples": s["n_samples"], "new_tokens": s["new_tokens"], "tau": s["tau"],
            "tau_macro": s["tau_macro"], "tokens_per_s": s["tokens_per_s"], "accuracy": s["accuracy"],
            "draft_s": s["draft_s"], "verify_s": s["verify_s"], "overhead_s": s["overhead_s"]}


def _open(obj: Context, d: Decoding, machine: Machine, check: Any = None) -> Session:
    session = open_session(obj.registry, d.task, d.target, d.limit, d.sampling, d.max_new_tokens, db_url(d.db),
                           machine.data_dir, machine.device, machine.dtype, check=check)
    for note in session.notes:
        err(f"[taps-bench] {note}")
    return session


def _load(session: Session) -> Loaded:
    quiet_libraries()
    return load(session)


@cli.command()
@decoding_options
@click.pass_obj
def baseline(obj: Context, decoding: Decoding, machine: Machine) -> None:
    """Autoregressive baseline of a target on a task (the speedup denominator)."""
    from taps_bench.decoding.proposer import Autoregressive
    from taps_bench.measure.runner import baseline_arm, run_arm
    from taps_bench.results.metrics import summarize
    from taps_bench.results.report import format_table
    from taps_bench.results.summaries import of_examples

    session = _open(obj, decoding, machine)
    loaded = _load(session)
    run_id = run_arm(session.store, loaded.target, session.task, session.examples, Autoregressive(),
                     baseline_arm(session.sampling, session.max_new_tokens), loaded.data_hash, loaded.provenance,
                     show_progress=machine.progress)
    s = summarize(of_examples(session.store.samples(run_id), [ex.id for ex in session.examples]))
    click.echo(format_table([_summary_row("autoregressive", s)], _TABLE))
    if machine.json:
        click.echo(json.dumps({"run_id": run_id, "target": loaded.target.name, "task": session.task.name,
                               "temperature": session.sampling.temperature, "n_samples": s["n_samples"],
                               "new_tokens": s["new_tokens"], "tokens_per_s": s["tokens_per_s"],
                               "accuracy": s["accuracy"], "tau": s["tau"], "device": str(loaded.target.device),
                               "dtype": loaded.provenance["dtype"], "db": session.store.shown}))


def _check(obj: Context, specs: list[ProposerSpec], allow_pickle: bool, build: bool, found: list[Any],
           tree: TreeOverride | None = None) -> Any:
    """The check `open_session` runs once the target card is known: the tree laid over the card's (so that a bad
    combination fails before anything is printed or opened), specs validated, recipes collected."""
    from taps_bench.measure.modelfree import refuse_tree_flags
    from taps_bench.measure.resolve import check_proposer

    def check(card: Any) -> None:
        for spec in specs:  # first: sizes that cannot apply to a model-free drafter's chain need not fit the card
            refuse_tree_flags(obj.registry, spec, tree)
        if tree is not None:
            tree.over(card.tree)
        for spec in specs:
            normalised, recipes = check_proposer(obj.registry, spec, card, allow_pickle, build)
            found.append((normalised, recipes))

    return check


def _prepared(obj: Context, session: Session, loaded: Loaded, checked: list[Any], progress: bool) -> None:
    """The explicit build step: every registered recipe drafter the proposers need and nobody built yet."""
    from taps_bench.measure.resolve import build_recipes

    recipes = list({r.name: r for _, rs in checked for r in rs}.values())
    build_recipes(obj.registry, recipes, loaded.target, session.data_dir, show_progress=progress, log=err)


@cli.command()
@proposer_options
@draft_vocab_option
@click.option("--allow-pickle", is_flag=True, help="Allow loading pytorch_model.bin (pickle) drafters.")
@click.option("--no-build", is_flag=True, help="Fail instead of building a registered but unbuilt drafter.")
@click.option("--no-baseline", is_flag=True,
              help="Decode only the speculative arm (tau, acceptance); speedup and the lossless check use whatever "
                   "baseline samples are already stored.")
@decoding_options
@click.pass_obj
def run(obj: Context, proposer: ProposerSpec | None, tree: TreeOverride, draft_vocab: int | str | None,
        allow_pickle: bool, no_build: bool, no_baseline: bool, decoding: Decoding, machine: Machine) -> None:
    """Measure a drafter (or a combiner of drafters) against its target: speculative and autoregressive arms on the
    same prompts."""
    from taps_bench.measure.resolve import auto_tree, build_proposer, tree_settings

    if proposer is None:
        raise UserError("pass either --drafter NAME or --combiner NAME --drafters a,b")
    checked: list[Any] = []
    session = _open(obj, decoding, machine, check=_check(obj, [proposer], allow_pickle, not no_build, checked,
                                                                 tree))
    loaded = _load(session)
    _prepared(obj, session, loaded, checked, machine.progress)
    # The drafter's card may prefer its own tree (EAGLE-3's are deeper): laid between the target card and the flags.
    shape, chosen = auto_tree(obj.registry, checked[0][0], loaded.target,
                              tree_settings(loaded.target, tree, obj.registry, checked[0][0]), session.task,
                              session.data_dir, session.sampling, allow_pickle, log=err, draft_vocab=draft_vocab)
    built, label, settings = build_proposer(obj.registry, checked[0][0], loaded.target, shape, allow_pickle,
                                            draft_vocab, session.data_dir)
    if chosen:  # how the shape was chosen is provenance, not identity: the same shape given by hand is the same run
        loaded.provenance["tree_auto"] = chosen
    result = measure(session, loaded, built, label, settings, machine.progress, baseline=not no_baseline)
    result |= {"combiner": proposer.combiner, "drafters": list(proposer.names()), "tree": shape.model_dump()}
    if machine.json:
        click.echo(json.dumps(result, default=str))


def measure(session: Session, loaded: Loaded, proposer: Any, label: str, settings: dict[str, Any], progress: bool,
            echo: bool = True, baseline: bool = True) -> dict[str, Any]:
    """Both arms on the same prompts (see `runner.measure`), printed and returned as one result."""
    from taps_bench.measure.runner import Arm
    from taps_bench.measure.runner import measure as measure_arms
    from taps_bench.results.report import format_table
    from taps_bench.results.summaries import speedup_text

    arm = Arm(kind="speculative", proposer=label, sampling=session.sampling, max_new_tokens=session.max_new_tokens,
              settings=settings)
    m = measure_arms(session.store, loaded.target, session.task, session.examples, proposer, arm, loaded.data_hash,
                     loaded.provenance, baseline=baseline, show_progress=progress)
    s = m.summary
    ss, sp = s.speculative, s.speedup
    if echo:
        click.echo(format_table([_summary_row("autoregressive", s.baseline), _summary_row(label, ss)], _TABLE))
        depth_rows = [{"depth": d["depth"], "conditional": d["conditional"], "unconditional": d["unconditional"]}
                      for d in ss["acceptance_by_depth"]]
        click.echo(format_table(depth_rows, [("depth", "depth"), ("conditional", "accept | reached"),
                                             ("unconditional", "accept / steps")]))
        # The interval (95%, bootstrap over prompts) says whether the speedup is more than noise.
        click.echo(f"speedup {speedup_text(sp, 3)} (ratio of sums; mean of per-question ratios "
                   f"{_fmt(sp['mean_of_ratios'])}x)   lossless {_fmt(ss['lossless_rate'])}   mean tree "
                   f"{_fmt(ss['mean_tree_size'])} nodes")
        if sp["cost"]:
            c = sp["cost"]
            click.echo(f"per step: {c['tokens_per_step']:.2f} tokens for verify {c['verify_ratio']:.2f} + draft "
                       f"{c['draft_ratio']:.2f} plain steps -> predicted {c['predicted_speedup']:.2f}x; decoding time: "
                       f"draft {c['draft_share']:.0%}, verify {c['verify_share']:.0%}, other {c['other_share']:.0%}")
        if s.decisions:
            click.echo("routing / accepted-subtree share: " + ", ".join(f"{k} {v:.1%}" for k, v in s.decisions.items()))
    return m.result(loaded.target, loaded.provenance) | {"db": session.store.shown}


@cli.command("sweep-alpha")
@click.option("--drafters", required=True, help="Two drafters a,b: alpha * a + (1 - alpha) * b.")
@click.option("--alphas", default="0,0.25,0.5,0.75,1", show_default=True, help="Comma-separated alphas in [0, 1].")
@tree_options
@decoding_options
@click.pass_obj
def sweep_alpha(obj: Context, drafters: str, alphas: str, tree: TreeOverride, decoding: Decoding,
                machine: Machine) -> None:
    """The weight-averaging curve: tau and speedup of alpha * A + (1 - alpha) * B for each alpha."""
    from taps_bench.measure.resolve import auto_tree, build_proposer, tree_settings
    from taps_bench.results.report import format_table

    try:
        values = [float(a) for a in alphas.split(",") if a.strip()]
    except ValueError:
        values = [math.nan]
    if not values or not all(math.isfinite(a) for a in values):  # float() takes "inf" and "nan"
        raise UserError(f"--alphas must be comma-separated finite numbers in [0, 1] (got {alphas[:60]})")
    names = split_names(drafters)
    specs = [ProposerSpec(combiner="average", drafters=names, alpha=a) for a in values]
    checked: list[Any] = []
    session = _open(obj, decoding, machine, check=_check(obj, specs, False, True, checked, tree))
    loaded = _load(session)
    _prepared(obj, session, loaded, checked, machine.progress)
    # The averages differ from their parents, but one shape for the whole curve keeps it comparable: chosen for the
    # even mix.
    shape, _ = auto_tree(obj.registry, ProposerSpec(combiner="average", drafters=names, alpha=0.5), loaded.target,
                         tree_settings(loaded.target, tree), session.task, session.data_dir, session.sampling, log=err)
    rows = []
    for spec, _ in checked:
        proposer, label, settings = build_proposer(obj.registry, spec, loaded.target, shape)
        r = measure(session, loaded, proposer, label, settings, machine.progress, echo=False)
        rows.append({"alpha": dict(spec.options)["alpha"], "tau": r["tau"], "speedup": r["speedup"],
                     "lossless_rate": r["lossless_rate"], "accuracy": r["accuracy"], "run_id": r["run_id"]})
    click.echo(format_table(rows, [("alpha", "alpha"), ("tau", "tau"), ("speedup", "speedup"),
                                   ("lossless_rate", "lossless"), ("accuracy", "accuracy"), ("run_id", "run")]))
    if machine.json:
        click.echo(json.dumps({"target": loaded.target.name, "task": session.task.name, "drafters": list(names),
                               "tree": shape.model_dump(), "curve": rows}))
