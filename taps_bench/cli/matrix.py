"""`matrix`: a whole matrix from a YAML spec, on this machine or on Ray."""

from __future__ import annotations

import json

import click

from taps_bench.cli.app import Context, cli, err, quiet_libraries
from taps_bench.cli.options import Machine, db_option, db_url, machine_options
from taps_bench.errors import UserError


@cli.command()
@click.argument("spec_file", metavar="SPEC")
@db_option
@click.option("--executor", default="local", show_default=True,
              help="local (this process, one cell at a time) or ray (a Ray task per cell; pip install ray).")
@click.option("--address", default=None, help="Ray cluster address (--executor ray); default: start a local one.")
@click.option("--retries", type=int, default=2, show_default=True,
              help="--executor ray: resubmit a failing cell (or one whose worker died) this many times.")
@machine_options
@click.pass_obj
def matrix(obj: Context, spec_file: str, db: str | None, executor: str, address: str | None, retries: int,
           machine: Machine) -> None:
    """Run a whole matrix (targets x drafters/combiners x tasks x temperatures x repeats) from a YAML spec (a path,
    or a shipped name such as cpu-small); resumable; a failing cell is recorded and the others go on."""
    from taps_bench.data.tasks import resolve_data_dir
    from taps_bench.matrix import local
    from taps_bench.matrix import spec as mx
    from taps_bench.models.targets import resolve_device
    from taps_bench.results.report import format_table
    from taps_bench.results.store import Store

    spec = mx.load_spec(mx.find_spec(spec_file))
    if executor not in ("local", "ray"):
        raise UserError(f"unknown --executor '{executor}': choose local or ray")
    if retries < 0:
        raise UserError(f"--retries must be 0 or more (got {retries})")
    spec = mx.check(spec, obj.registry)
    resolve_device(machine.device, machine.dtype)
    directory = resolve_data_dir(machine.data_dir)
    store = Store(db_url(db))
    n = len(mx.plan(spec))
    shown = store.shown
    err(f"[taps-bench] matrix {spec.name}: {n} cells; results in {shown}")
    quiet_libraries()
    if executor == "ray":
        from taps_bench.matrix.ray_executor import run_ray

        outcomes = run_ray(spec, obj.registry, store, directory, obj.include_dirs(), address, machine.device,
                           machine.dtype, retries, show_progress=machine.progress, log=err)
    else:
        outcomes = local.run_local(spec, obj.registry, store, directory, machine.device, machine.dtype,
                                   show_progress=machine.progress, log=err)
    click.echo(format_table(local.summary_rows(outcomes), local.SUMMARY_COLUMNS))
    failed = sum(o.status == "failed" for o in outcomes)
    click.echo(f"{n - failed}/{n} cells finished, {failed} failed" + (" (errors stored; re-run to retry them)"
                                                                       if failed else ""))
    if machine.json:
        click.echo(json.dumps({"matrix": spec.name, "db": shown, "cells": local.as_json(outcomes)}, default=str))
    if failed:  # not a usage error (2): the matrix ran, some cells did not
        click.get_current_context().exit(1)
