"""`submit`: check a drafter submission, smoke-test it and write its result bundle."""

from __future__ import annotations

import json
from pathlib import Path

import click

from taps_bench.cli.app import Context, cli, quiet_libraries
from taps_bench.cli.options import Machine, machine_options


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
