"""A decoding session: everything a `run`, `baseline` or `sweep-alpha` needs, checked before any model is loaded,
so that bad input fails in a second with nothing written."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from taps_bench.catalog.cards import TargetCard, TaskCard
from taps_bench.catalog.registry import Registry
from taps_bench.data.tasks import Example, data_file_hash, load_examples, resolve_data_dir
from taps_bench.decoding.sampling import Sampling
from taps_bench.measure import provenance
from taps_bench.models.targets import Target, default_target_name, load_target, resolve_device
from taps_bench.results.store import Store


@dataclass
class Session:
    registry: Registry
    task: TaskCard
    target_card: TargetCard
    sampling: Sampling
    max_new_tokens: int
    device: str | None
    dtype: str | None
    data_dir: Path
    examples: list[Example]
    store: Store
    notes: list[str]  # what was chosen for the user and why (the default target, the device), to be printed

    @property
    def data_file(self) -> Path:
        return self.data_dir / self.task.source.local


@dataclass
class Loaded:
    """The session's target, loaded, with what identifies the data and the machine."""

    target: Target
    data_hash: str
    provenance: dict[str, Any]


def open_session(reg: Registry, task: str, target: str | None, limit: int | None, sampling: Sampling,
                 max_new_tokens: int, db_url: str, data_dir: str | None, device: str | None, dtype: str | None,
                 check: Callable[[TargetCard], Any] | None = None) -> Session:
    """Validate names, device, data and database; `check(target_card)` validates more (a proposer) before the
    database is opened."""
    task_card = reg.task(task)
    notes = []
    if target is None:
        target, why = default_target_name(reg.cards["target"])  # type: ignore[arg-type]
        notes += [why] if why else []
    target_card = reg.target(target)
    if check is not None:
        check(target_card)
    dev, dt, dev_why = resolve_device(device, dtype)
    directory = resolve_data_dir(data_dir)
    examples = load_examples(task_card, directory, limit)
    store = Store(db_url)
    notes.append(f"target {target_card.name} on {dev} ({str(dt).removeprefix('torch.')}; {dev_why}); task "
                 f"{task_card.name}: {len(examples)} examples; results in {store.shown}")
    return Session(registry=reg, task=task_card, target_card=target_card, sampling=sampling,
                   max_new_tokens=max_new_tokens, device=device, dtype=dtype, data_dir=directory, examples=examples,
                   store=store, notes=notes)


def load(session: Session) -> Loaded:
    target = load_target(session.target_card, session.device, session.dtype)
    return Loaded(target, data_file_hash(session.data_file), provenance.collect(target))
