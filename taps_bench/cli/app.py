"""The `taps-bench` group and what every command shares: the typed context and the shared flags."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import click

from taps_bench.catalog.registry import Registry


@dataclass
class Context:
    """What the group's own flags say, handed to every command (click's `obj`)."""

    debug: bool
    include: tuple[str, ...]
    _registry: Registry | None = field(default=None, repr=False)

    @property
    def registry(self) -> Registry:
        if self._registry is None:
            self._registry = Registry.load(include=[Path(p) for p in self.include])
        return self._registry

    def include_dirs(self) -> list[str]:
        """The --include directories as absolute paths (for Ray workers and lm-eval model_args)."""
        return [str(Path(p).resolve()) for p in self.include]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.option("--include", multiple=True, type=click.Path(), metavar="DIR",
              help="Extra cards (DIR/{targets,tasks,drafters,corpora,recipes}/*.yaml or *.yaml with a `kind:` field) "
                   "and combiners (DIR/combiners/*.py).")
@click.pass_context
def cli(ctx: click.Context, debug: bool, include: tuple[str, ...]) -> None:
    """Benchmark task-aware speculative decoding: drafters, combiners, tasks, targets."""
    ctx.obj = Context(debug, include)


def quiet_libraries() -> None:
    """Keep stdout for results: no transformers progress bars or advisory warnings."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def err(message: str) -> None:
    click.echo(message, err=True)
