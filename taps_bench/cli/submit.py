"""`submit`, `import` and `verify`: a drafter submission from the contributor's bundle to the maintainer's board."""

from __future__ import annotations

import json
from pathlib import Path

import click

from taps_bench.cli.app import Context, cli, quiet_libraries
from taps_bench.cli.options import Machine, db_option, db_url, machine_options


@cli.command()
@click.argument("card", metavar="CARD")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Where to write the bundle; default NAME.bundle.json next to the card.")
@click.option("--limit", type=int, default=2, show_default=True, help="First N prompts of each task.")
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
@machine_options
@click.pass_obj
def submit(obj: Context, card: str, out: str | None, limit: int, max_new_tokens: int, machine: Machine) -> None:
    """Check a drafter submission card, smoke-test the drafter on every registered task (T=0, both arms, lossless
    required) and write a result bundle to send with the card in a pull request. The checkpoint is an EAGLE-1/2/HASS
    drafter, or an EAGLE-3 one (SafeAILab layout or speculators format) under `method: eagle3`."""
    from taps_bench.measure.submission import submit as submit_card
    from taps_bench.measure.submission import summary_table

    quiet_libraries()
    result = submit_card(Path(card), obj.registry, Path(out) if out else None, limit, max_new_tokens,
                         machine.data_dir, machine.device, machine.dtype, show_progress=machine.progress)
    click.echo(summary_table(result))
    click.echo(f"bundle written to {result.path}; open a pull request with {card} and the bundle")
    if machine.json:
        click.echo(json.dumps({"name": result.card.name, "target": result.card.target, "bundle": str(result.path),
                               "tasks": result.rows}))


@cli.command("import")
@click.argument("bundles", nargs=-1, required=True, metavar="BUNDLE...")
@db_option
@click.pass_obj
def import_cmd(obj: Context, bundles: tuple[str, ...], db: str | None) -> None:
    """Check result bundles (from `taps-bench submit`) as claims and store each as a submission; a bundle that fails
    any check is refused whole, and importing one twice adds nothing."""
    from taps_bench.measure.imports import import_bundles

    c, shown = import_bundles([Path(b) for b in bundles], db_url(db), obj.registry)
    click.echo(f"imported {c.bundles} bundle(s) into {shown}: {c.new} new ({c.runs} runs, {c.samples} samples), "
               f"{c.present} already there; run `taps-bench verify BUNDLE` before publishing")


@cli.command()
@click.argument("bundle", metavar="BUNDLE")
@db_option
@click.option("--sample", type=click.IntRange(min=1), default=None,
              help="Re-decode a seeded random subset of N prompts (default: every temperature-0 prompt).")
@click.option("--tau-prompts", type=click.IntRange(min=0), default=4, show_default=True,
              help="Prompts per task on which tau is re-measured with the drafter (0: do not re-measure).")
@click.option("--checkpoint", type=click.Path(file_okay=False), default=None,
              help="The submitted drafter's directory (from the pull request; EAGLE-3 in either format too); "
                   "default: the card's hub id.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the subsets.")
@click.option("--tolerance", type=float, default=0.05, show_default=True,
              help="Largest relative difference between claimed and re-measured tau.")
@machine_options
@click.pass_obj
def verify(obj: Context, bundle: str, db: str | None, sample: int | None, tau_prompts: int, checkpoint: str | None,
           seed: int, tolerance: float, machine: Machine) -> None:
    """Re-check an imported bundle before publishing: re-decode its temperature-0 prompts with the target's own
    autoregressive engine and compare every claimed output token for token; re-measure tau with the drafter. The
    result is stored with the submission (the leaderboard labels the row verified or not); exit 1 if it fails."""
    from taps_bench.measure.verify import verify as verify_bundle
    from taps_bench.results.report import format_table

    quiet_libraries()
    result = verify_bundle(Path(bundle), obj.registry, db_url(db), Path(checkpoint) if checkpoint else None, sample,
                           tau_prompts, seed, tolerance, machine.data_dir, machine.device, machine.dtype,
                           machine.progress)
    if result["tau"]:
        click.echo(format_table(result["tau"], [("task", "task"), ("prompts", "prompts"), ("claimed", "tau claimed"),
                                                ("measured", "tau re-measured"), ("ok", "within tolerance")]))
    for line in [*result["mismatches"], *result["notes"]]:
        click.echo(f"  {line}")
    verdict = "PASSED" if result["passed"] else "FAILED"
    click.echo(f"verification {verdict}: {result['prompts_rerun']} prompts re-run, {result['samples_compared']} "
               f"claimed samples compared, {result['n_mismatches']} differ; stored with the submission")
    if machine.json:
        click.echo(json.dumps(result))
    if not result["passed"]:
        click.get_current_context().exit(1)  # a failed check is a result, not bad input (exit 2)
