"""lm-eval's own task definitions pointed at the local data, and taps-bench's scoring of the same rows.

The local copy of a hub dataset comes from the task cards: a card whose `source.hub` (or one of its
`source.hub_aliases`) is the `dataset_path` of an lm-eval task provides its file for the card's split, and
`source.splits` the files of the dataset's other splits (GSM8K's few-shot examples come from its train split).
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from taps_bench.catalog.cards import TaskCard
from taps_bench.catalog.registry import Registry
from taps_bench.errors import UserError

log = logging.getLogger(__name__)

# -- lm-eval's task definitions --------------------------------------------------------------------------------


class _TaskYamlLoader(yaml.SafeLoader):
    """Reads lm-eval task YAMLs for their plain fields: `!function` references stay text."""


_TaskYamlLoader.add_constructor("!function", lambda loader, node: f"!function {loader.construct_scalar(node)}")


def read_task_config(path: Path, _seen: frozenset[Path] = frozenset()) -> dict[str, Any]:
    """A task YAML with its `include`s merged (the including file's keys win), as lm-eval merges them."""
    path = path.resolve()
    if path in _seen:
        raise UserError(f"include cycle at {path}")
    cfg = yaml.load(path.read_text(encoding="utf-8"), Loader=_TaskYamlLoader) or {}  # a SafeLoader
    includes = cfg.pop("include", None)
    merged: dict[str, Any] = {}
    for inc in [includes] if isinstance(includes, str) else list(includes or []):
        merged |= read_task_config(Path(inc) if Path(inc).is_absolute() else path.parent / inc, _seen | {path})
    return merged | cfg


def lm_eval_tasks_dir() -> Path:
    import lm_eval

    return Path(lm_eval.__file__).resolve().parent / "tasks"


def find_task_yaml(name: str) -> Path:
    """The stock YAML that defines task `name` (a quick text scan; lm-eval's index as a fallback)."""
    pattern = re.compile(rf"^task:\s*['\"]?{re.escape(name)}['\"]?\s*$", re.MULTILINE)
    hits = [p for p in sorted(lm_eval_tasks_dir().rglob("*.yaml")) if pattern.search(p.read_text(errors="ignore"))]
    if len(hits) == 1:
        return hits[0]
    from lm_eval.tasks import TaskManager

    entry = TaskManager().task_index.get(name)
    where = entry.get("yaml_path") if isinstance(entry, dict) else getattr(entry, "yaml_path", None)
    if entry is None or not where or where == -1:
        raise UserError(f"lm-eval has no task named '{name}' defined by a YAML file (see `lm_eval ls tasks`)")
    return Path(where)


@dataclass
class LocalTask:
    name: str
    stock_yaml: Path
    config_path: Path  # the generated YAML
    dataset_path: str  # the hub dataset it replaces
    files: dict[str, Path]  # split -> local file
    taps_task: str | None  # the task card whose examples are this task's evaluated rows, in the same order
    eval_split: str = "test"  # the split lm-eval evaluates (its test_split, else its validation_split)

    @property
    def data_file(self) -> Path:
        return self.files.get(self.eval_split) or next(iter(self.files.values()))


# -- which task card holds the local copy of a dataset ---------------------------------------------------------

# The lm-eval task fields that name a split of its dataset; every split named must have a local file.
SPLIT_KEYS = ("test_split", "validation_split", "training_split", "fewshot_split")


def _stand_in_problem(card: TaskCard) -> str | None:
    """Why the card's local file cannot stand in for its hub dataset in lm-eval, or None when it can.

    lm-eval's task definitions read the hub dataset's columns and rows, so the local file must hold exactly those.
    """
    if card.source.hub_fields is not None:
        return "its local file has other columns than the hub dataset (the card declares hub_fields)"
    if card.subset is not None and card.subset.local_only:
        return "its local file holds more rows than the hub split (the card's subset is local_only)"
    return None


def local_datasets(reg: Registry) -> dict[str, list[TaskCard]]:
    """Dataset id (hub id or alias) -> the registered task cards whose local files can stand in for it in lm-eval,
    in registration order (so a card added with --include or a plugin comes after the built-in ones)."""
    found: dict[str, list[TaskCard]] = {}
    for card in reg.cards["task"].values():
        assert isinstance(card, TaskCard)
        if _stand_in_problem(card) is None:
            for dataset in card.source.datasets():
                found.setdefault(dataset, []).append(card)
    return found


def _config_problem(card: TaskCard, dataset_name: str | None) -> str | None:
    # The card's file holds one configuration of the dataset; a task reading another would get the wrong rows.
    # A card without `config` holds the dataset's only one, which the hub calls "default".
    have = card.source.config or "default"
    if dataset_name and dataset_name != have:
        return f"it holds the configuration {have!r}, the task reads {dataset_name!r} (source.config)"
    return None


def _why_not(card: TaskCard, dataset_name: str | None, needed: set[str]) -> str | None:
    """Why `card` cannot provide an lm-eval task's data (its config and splits), or None when it can."""
    problem = _stand_in_problem(card) or _config_problem(card, dataset_name)
    if problem is not None:
        return problem
    missing = sorted(needed - set(card.source.files()))
    if missing:
        return f"it has no local file of the split(s) {', '.join(missing)} (source.splits)"
    return None


def resolve_local_dataset(reg: Registry, name: str, dataset: str, dataset_name: str | None,
                          needed: set[str]) -> TaskCard:
    """The task card that provides lm-eval task `name`'s dataset from local files, or a UserError saying why none
    does. Of several cards that can, the last registered wins, as a later card of the same name overrides an
    earlier one (a user's --include card over the built-in)."""
    candidates = [c for c in reg.cards["task"].values() if isinstance(c, TaskCard) and dataset in c.source.datasets()]
    if not candidates:
        provided = local_datasets(reg)
        known = ", ".join(f"{d} (task {'/'.join(c.name for c in cards)})" for d, cards in sorted(provided.items()))
        raise UserError(f"lm-eval task '{name}' reads the dataset '{dataset}' from the hub, and no registered task "
                        f"card has a local copy of it; the task cards provide {known or 'no datasets'} (a task card "
                        f"whose source.hub or source.hub_aliases is '{dataset}' adds one)")
    reasons = {c.name: _why_not(c, dataset_name, needed) for c in candidates}
    usable = [c for c in candidates if reasons[c.name] is None]
    if not usable:
        why = "; ".join(f"task '{n}': {r}" for n, r in reasons.items())
        raise UserError(f"lm-eval task '{name}' reads the dataset '{dataset}', and no task card's local copy of it "
                        f"can stand in for the hub: {why}")
    if len(usable) > 1:
        log.warning("lm-eval task %s: the task cards %s all provide %s; using %s (the last registered)", name,
                    ", ".join(c.name for c in usable), dataset, usable[-1].name)
    return usable[-1]


# -- lm-eval's tasks on local data -----------------------------------------------------------------------------


def write_local_tasks(names: Sequence[str], data_dir: Path, out_dir: Path,
                      reg: Registry | None = None) -> dict[str, LocalTask]:
    """For each lm-eval task, a YAML in `out_dir` that includes the stock one and reads the local copy of its
    dataset, found among the task cards of `reg` (default: the built-in and plugin cards only, no --include). A task
    whose dataset no task card has a local copy of is refused (nothing may come from the hub)."""
    reg = reg if reg is not None else Registry.load()
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks = {}
    for name in names:
        stock = find_task_yaml(name)
        cfg = read_task_config(stock)
        dataset = str(cfg.get("dataset_path") or "")
        if not dataset:
            raise UserError(f"lm-eval task '{name}' names no dataset (a group or a Python-defined task?); pass "
                            "single tasks such as gsm8k, minerva_math500")
        needed = {str(cfg[k]) for k in SPLIT_KEYS if cfg.get(k)}
        card = resolve_local_dataset(reg, name, dataset, cfg.get("dataset_name"), needed)
        # Only the splits the task reads: a card may list files of splits this task never opens.
        chosen = {split: rel for split, rel in card.source.files().items() if split in needed or not needed}
        files = {split: data_dir / rel for split, rel in chosen.items()}
        for f in files.values():
            if not f.is_file():
                raise UserError(f"lm-eval task '{name}': local data file {f} (task card '{card.name}') not found; "
                                "set TAPS_BENCH_DATA or pass --data-dir")
        override = {"include": str(stock), "task": name, "dataset_path": "json", "dataset_name": None,
                    "dataset_kwargs": {"data_files": {split: str(f) for split, f in files.items()}}}
        path = out_dir / f"{name}.yaml"
        path.write_text("# generated by taps-bench: the stock task, reading local files instead of the hub\n"
                        + yaml.safe_dump(override, sort_keys=False))
        # lm-eval evaluates its test split, else its validation split. taps-bench's scorer can be compared with
        # lm-eval's only when those rows are the card's own file, in the card's order.
        eval_split = str(cfg.get("test_split") or cfg.get("validation_split") or card.source.split)
        tasks[name] = LocalTask(name=name, stock_yaml=stock, config_path=path, dataset_path=dataset, files=files,
                                taps_task=card.name if eval_split == card.source.split else None,
                                eval_split=eval_split)
    return tasks


def go_offline() -> None:
    """No hub access from here on: any attempt fails at once instead of hanging on the network. Also set in the
    libraries' already-imported settings, which read the environment only when first imported."""
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    for module, names in (("huggingface_hub.constants", ("HF_HUB_OFFLINE",)),
                          ("datasets.config", ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))):
        loaded = sys.modules.get(module)
        for name in names:
            if loaded is not None and hasattr(loaded, name):
                setattr(loaded, name, True)


def task_manager(local_dir: Path) -> Any:
    """lm-eval's TaskManager over the generated YAMLs only (they include the stock files by absolute path, so
    indexing lm-eval's ~14k task files is not needed)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(local_dir), include_defaults=False)


# -- comparing with taps-bench's own scoring -------------------------------------------------------------------


def taps_golds(reg: Registry, task: LocalTask, data_dir: Path) -> list[str | None] | None:
    """taps-bench's gold answers of the local file, in file order (lm-eval's doc_id order), or None."""
    if task.taps_task is None or task.taps_task not in reg.cards["task"]:
        return None
    from taps_bench.data.tasks import load_examples

    card = reg.task(task.taps_task)
    if card.subset is not None:  # a declared subset changes the order; the doc index would not match
        return None
    return [ex.gold for ex in load_examples(card, data_dir, None)]


def taps_scoring(reg: Registry, task: LocalTask, data_dir: Path,
                 outputs: dict[int, str]) -> dict[int, dict[str, Any]]:
    """taps-bench's scorer (`scoring.extract_answer` / `is_correct`) on lm-eval's outputs, by doc id."""
    from taps_bench.data.scoring import extract_answer, is_correct

    golds = taps_golds(reg, task, data_dir)
    if golds is None:
        return {}
    scorer = reg.task(str(task.taps_task)).scorer
    return {doc: {"gold": golds[doc], "extracted": extract_answer(scorer, text),
                  "correct": is_correct(scorer, text, golds[doc])} for doc, text in outputs.items()}


