"""`show`, `export`, `import` and `leaderboard build`: what is stored, read back."""

from __future__ import annotations

from pathlib import Path

import click

from taps_bench.cli.app import Context, cli
from taps_bench.cli.options import db_option, db_url


@cli.command()
@db_option
def show(db: str | None) -> None:
    """List stored runs with their summaries."""
    from taps_bench.results.report import runs_table
    from taps_bench.results.store import Store

    with Store(db_url(db), readonly=True) as store:  # a mistyped path is refused, never created
        click.echo(runs_table(store))


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

    with Store(db_url(db), readonly=True) as store:
        text = export_text(store, fmt, what)
    if out is None:
        click.echo(text, nl=False)
        return
    write_atomic(Path(out), text)


@cli.group()
def leaderboard() -> None:
    """The static HTML leaderboard."""


@leaderboard.command("build")
@db_option
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Directory for the site: new, empty, or an earlier site (only the files that build wrote are "
                   "replaced; others are kept).")
@click.option("--title", default="taps-bench leaderboard", show_default=True)
@click.option("--report", "reports", multiple=True, metavar="MATRIX",
              help="Also publish `taps-bench report MATRIX` as a page of the site (repeatable).")
@click.pass_obj
def leaderboard_build(obj: Context, db: str | None, out: str, title: str, reports: tuple[str, ...]) -> None:
    """Render every stored run as a self-contained static site (open OUT/index.html, also from file://)."""
    from taps_bench.cli.report import html, study_report
    from taps_bench.results.store import Store
    from taps_bench.site.publish import previous_site
    from taps_bench.site.render import build

    target = Path(out).expanduser().resolve()
    previous_site(target)  # refuses a file or somebody else's directory before the database is even opened
    with Store(db_url(db), readonly=True) as store:
        # Every report is made before the site is touched: a matrix without cells fails the build, not half of it.
        studies = {}
        for spec_file in reports:
            result = study_report(obj, spec_file, store)
            studies[result["matrix"]] = html(result)
        result = build(store, target, obj.registry, title, studies=studies)
    click.echo(f"leaderboard: {result['boards']} boards, {result['rows']} rows -> {target / 'index.html'}")
