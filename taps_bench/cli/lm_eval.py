"""`lm-eval`: lm-evaluation-harness tasks on local data through a drafter or combiner, accuracy beside tau."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from taps_bench.cli.app import Context, cli, quiet_libraries
from taps_bench.cli.options import Machine, db_option, machine_options, proposer_options, split_names


@cli.command("lm-eval")
@click.option("--tasks", required=True, help="Comma-separated lm-eval tasks on local data, e.g. gsm8k,minerva_math500.")
@proposer_options
@click.option("--baseline", is_flag=True,
              help="Also evaluate the plain target (greedy, no drafter) and compare outputs sample for sample; "
                   "alone, evaluate only the plain target.")
@click.option("--target", default=None, help="Target name; default: the CPU or GPU default for this machine.")
@click.option("--limit", type=int, default=None, help="First N documents of each task (lm-eval's --limit).")
@click.option("--num-fewshot", type=int, default=None, help="Override the tasks' few-shot count.")
@click.option("--max-gen-toks", type=int, default=256, show_default=True,
              help="Generation limit for tasks that set none (lm-eval's HF model default).")
@click.option("--apply-chat-template", is_flag=True, help="Render prompts with the target's chat template "
              "(few-shot examples as turns), as lm-eval's --apply_chat_template.")
@click.option("--system-instruction", default=None, help="System message for every prompt (lm-eval's option).")
@click.option("--output", type=click.Path(file_okay=False), default=None,
              help="Directory for lm-eval's results JSON and per-sample JSONL; default $TAPS_BENCH_HOME/lm-eval.")
@db_option
@click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed (tasks that sample).")
@click.option("--allow-pickle", is_flag=True, help="Allow loading pytorch_model.bin (pickle) drafters.")
@click.option("--no-build", is_flag=True, help="Fail instead of building a registered but unbuilt drafter.")
@machine_options
@click.pass_obj
def lm_eval_cmd(obj: Context, tasks: str, output: str | None, no_build: bool, machine: Machine,
                **options: Any) -> None:
    """Accuracy with lm-evaluation-harness: run lm-eval's tasks (on local data) through a drafter or combiner and
    report exact match beside tau; results JSON from lm-eval, counters and accuracy in the database."""
    import logging

    from taps_bench import evaluation as lme
    from taps_bench.paths import home

    if not obj.debug:  # lm-eval logs every step at INFO; keep its warnings
        logging.getLogger("lm_eval").setLevel(logging.WARNING)
    quiet_libraries()
    opts = lme.LmEvalOptions(tasks=split_names(tasks), output=Path(output) if output else home() / "lm-eval",
                             build=not no_build, data_dir=machine.data_dir, device=machine.device,
                             dtype=machine.dtype, show_progress=machine.progress, **options)
    result = lme.run(obj.registry, opts, echo=click.echo, err=lambda m: click.echo(m, err=True))
    if machine.json:
        click.echo(json.dumps(result, default=str))
