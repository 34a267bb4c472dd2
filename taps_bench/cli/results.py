"""`show`, `export`, `import` and `leaderboard build`: what is stored, read back."""

from __future__ import annotations

from pathlib import Path

import click

from taps_bench.cli.app import Context, cli
from taps_bench.cli.options import db_option, db_url
from taps_bench.errors import UserError


@cli.command()
@db_option
def show(db: str | None) -> None:
    """List stored runs with their summaries."""
    from taps_bench.results.report import runs_table
    from taps_bench.results.store import Store

    click.echo(runs_table(Store(db_url(db))))


@cli.command()
@db_option
@click.option("--format", "fmt", type=str, default="csv", show_default=True, help="csv or json.")
@click.option("--what", type=str, default="runs", show_default=True, help="runs or samples.")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Write to a file instead of stdout.")
def export(db: str | None, fmt: str, what: str, out: str | None) -> None:
    """Export runs (with summaries) or samples (raw counters) as CSV or JSON."""
    from taps_bench.paths import write_atomic
    from taps_bench.results.report import export as export_text
    from taps_bench.results.store import Store

    text = export_text(Store(db_url(db)), fmt, what)
    if out is None:
        click.echo(text, nl=False)
        return
    write_atomic(Path(out), text)


@cli.command("import")
@click.argument("bundles", nargs=-1, required=True, metavar="BUNDLE...")
@db_option
def import_cmd(bundles: tuple[str, ...], db: str | None) -> None:
    """Merge result bundles (from `taps-bench submit`) into the database; importing twice adds nothing."""
    from taps_bench.results.bundle import merge_bundles, read_bundle
    from taps_bench.results.store import Store

    data = [read_bundle(Path(b)) for b in bundles]  # every bundle validated before the database is even opened
    with Store(db_url(db)) as store:
        c = merge_bundles(store, data)
        click.echo(f"imported {c.bundles} bundle(s) into {store.shown}: runs {c.runs_new} new, "
                   f"{c.runs_existing} already there; samples {c.samples_added} added, {c.samples_present} already "
                   "present")


@cli.group()
def leaderboard() -> None:
    """The static HTML leaderboard."""


@leaderboard.command("build")
@db_option
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory for the site (replaced).")
@click.option("--title", default="taps-bench leaderboard", show_default=True)
@click.pass_obj
def leaderboard_build(obj: Context, db: str | None, out: str, title: str) -> None:
    """Render every stored run as a self-contained static site (open OUT/index.html, also from file://)."""
    from taps_bench.results.store import Store
    from taps_bench.site.render import build

    target = Path(out).expanduser().resolve()
    if target.exists() and not target.is_dir():
        raise UserError(f"--out {target} is a file; pass a directory (it is replaced by the site)")
    if target.is_dir() and any(target.iterdir()) and not (target / "index.html").is_file():
        raise UserError(f"--out {target} is a non-empty directory that is not a leaderboard; pass a new or an "
                        "earlier leaderboard directory (it is replaced)")
    result = build(Store(db_url(db)), target, obj.registry, title)
    click.echo(f"leaderboard: {result['boards']} boards, {result['rows']} rows -> {target / 'index.html'}")
