"""`list`: what taps-bench knows, one line each."""

from __future__ import annotations

import click

from taps_bench.catalog.registry import KINDS
from taps_bench.cli.app import Context, cli
from taps_bench.errors import unknown_name

KIND_ALIASES = {f"{k}s": k for k in KINDS} | {"corpora": "corpus"} | {k: k for k in KINDS}
KIND_NAMES = ["targets", "drafters", "combiners", "tasks", "corpora", "recipes"]


@cli.command("list")
@click.argument("kind", metavar="targets|drafters|combiners|tasks|corpora|recipes")
@click.pass_obj
def list_cmd(obj: Context, kind: str) -> None:
    """List what taps-bench knows, one line each."""
    if kind not in KIND_ALIASES:
        raise unknown_name("kind", kind, KIND_NAMES)
    rows = obj.registry.describe(KIND_ALIASES[kind])
    if not rows:
        click.echo(f"(no {kind} registered yet)")
    width = max((len(n) for n, _ in rows), default=0)
    for name, desc in rows:
        click.echo(f"{name:<{width}}  {desc}")
