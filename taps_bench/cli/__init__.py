"""The `taps-bench` command line: thin front ends over the layers below.

Each command collects its flags into typed objects (`cli.options`), validates everything cheap before a model is
loaded, announces what it is about to do (a drafter build, the default target), calls one function of `measure`,
`matrix`, `evaluation`, `training`, `results` or `site`, and prints. Bad input exits 2 with one line saying what is
wrong and how to fix it; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import sys

import click

from taps_bench.cli import catalog, decode, export, lm_eval, matrix, profile, report, results, submit, train  # noqa: F401
from taps_bench.cli.app import cli
from taps_bench.errors import Interrupted, UserError


def main(argv: list[str] | None = None) -> int:
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        rc = cli.main(args=argv, prog_name="taps-bench", standalone_mode=False)
    except UserError as exc:
        if debug:
            raise
        click.echo(f"taps-bench: error: {exc}", err=True)
        return 2
    except click.exceptions.Abort as exc:
        # click turns KeyboardInterrupt into Abort; a command that cannot resume says so through its cause.
        said = exc.__cause__ if isinstance(exc.__cause__, Interrupted) else None
        click.echo(f"taps-bench: {said or 'interrupted; every finished sample is stored, re-run to resume'}",
                   err=True)
        return 130
    except click.ClickException as exc:
        if debug:
            raise
        click.echo(f"taps-bench: error: {exc.format_message()} (see `taps-bench --help`)", err=True)
        return 2
    return rc if isinstance(rc, int) else 0


__all__ = ["cli", "main"]
