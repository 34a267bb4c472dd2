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
    required) and write a result bundle to send with the card in a pull request."""
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
