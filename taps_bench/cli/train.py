"""`train`: build a drafter from a recipe (or flags) into the model store."""

from __future__ import annotations

import json

import click

from taps_bench.cli.app import Context, cli, quiet_libraries
from taps_bench.cli.options import Machine, machine_options


@cli.command()
@click.option("--recipe", default=None, help="A named recipe (see `taps-bench list recipes`); sets everything below.")
@click.option("--target", default=None, help="Target name; default: the machine's default target.")
@click.option("--corpus", default=None, help="Corpus spec: name, name:N, or a mix like sharegpt:35k+mathinstruct:35k.")
@click.option("--method", type=str, default=None, help="eagle2, hass or eagle3.")
@click.option("--name", default=None, help="Drafter name in the model store (what `run --drafter` takes).")
@click.option("--max-len", type=int, default=None, help="Tokens per conversation (default 512).")
@click.option("--epochs", type=int, default=None)
@click.option("--lr", type=float, default=None)
@click.option("--batch-tokens", type=int, default=None)
@click.option("--seed", type=int, default=None, help="Seed of the corpus selection and batch order.")
@click.option("--init-seed", type=int, default=None, help="Seed of the initial weights (default: --seed).")
@click.option("--ttt-steps", type=int, default=None, help="EAGLE-3: unrolled steps of training-time test (7).")
@click.option("--draft-vocab", default=None, help="EAGLE-3: draft vocabulary size N, auto or full (default auto).")
@click.option("--init", "init", default=None, help="Start from this drafter (name or directory) instead of scratch.")
@machine_options
@click.pass_obj
def train(obj: Context, recipe: str | None, target: str | None, init: str | None, machine: Machine,
          **given: object) -> None:
    """Train a drafter (EAGLE-2, HASS or EAGLE-3 objective) on a corpus; resumable; lands in the model store."""
    import yaml

    from taps_bench.data.tasks import resolve_data_dir
    from taps_bench.measure.resolve import load_for_target
    from taps_bench.models.targets import default_target_name, load_target
    from taps_bench.training.build import build_drafter, recipe_from_flags, recipe_settings

    reg = obj.registry
    if target is None:
        target = reg.recipe(recipe).target if recipe else default_target_name(reg.cards["target"])[0]  # type: ignore
    spec = recipe_from_flags(reg, recipe, target, given)
    directory = resolve_data_dir(machine.data_dir)
    quiet_libraries()
    tgt = load_target(reg.target(spec.target), machine.device, machine.dtype)
    init_drafter = load_for_target(reg, init, tgt).drafter if init else None
    out = build_drafter(reg, tgt, spec.name, spec.corpus, recipe_settings(spec), spec.max_len, directory,
                        init=init_drafter, init_name=init, show_progress=machine.progress,
                        description=spec.description or None, draft_vocab=spec.draft_vocab)
    click.echo(f"drafter '{spec.name}' for {tgt.name} saved in {out}; use it with "
               f"`taps-bench run --drafter {spec.name} --target {tgt.name} --task ...`")
    if machine.json:
        click.echo(json.dumps({"name": spec.name, "target": tgt.name, "path": str(out),
                               "training": yaml.safe_load((out / "card.yaml").read_text())["training"]}))
