"""The local executor: every cell of a matrix in this process, one after another.

A cell is measured with `runner.measure`, which stores every sample as it finishes, so a killed matrix resumes where
it stopped. Each cell's outcome (done, or failed with its error) is kept in the store's `matrix_cells` table: a
failing cell is recorded and the others go on; a restarted matrix skips finished cells without loading their models
and retries failed ones.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from taps_bench.catalog.cards import TaskCard
from taps_bench.catalog.proposers import ProposerSpec
from taps_bench.catalog.registry import Registry
from taps_bench.data.tasks import Example, data_file_hash, load_examples
from taps_bench.decoding.proposer import Proposer
from taps_bench.decoding.sampling import Sampling
from taps_bench.matrix.spec import Cell, MatrixSpec, check, plan
from taps_bench.measure import provenance
from taps_bench.measure.resolve import auto_tree, build_proposer, build_recipes, check_proposer, tree_settings
from taps_bench.measure.runner import Arm, measure, skip_in_bar
from taps_bench.models.targets import Target, load_target
from taps_bench.results.store import Store
from taps_bench.results.summaries import summarize_pair


@dataclass
class Outcome:
    cell: Cell
    status: str  # "done" | "failed" | "skipped" (finished in an earlier invocation)
    result: dict[str, Any] | None = None
    error: str | None = None


@dataclass
class Prepared:
    """Everything a cell needs to decode, loaded."""

    target: Target
    provenance: dict[str, Any]
    task: TaskCard
    examples: list[Example]
    proposer: Proposer
    arm: Arm  # the speculative arm (the baseline arm shares its sampling and length)
    data_hash: str


class Workbench:
    """Loads what cells need and keeps it between cells: one target at a time (memory), one proposer per entry.
    Used by the local executor and, inside each worker process, by the Ray executor."""

    def __init__(self, reg: Registry, data_dir: Path, device: str | None = None, dtype: str | None = None,
                 show_progress: bool = False, log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> None:
        self.reg, self.data_dir, self.device, self.dtype = reg, data_dir, device, dtype
        self.show_progress, self.log = show_progress, log
        self._target: tuple[str, Any, dict[str, Any]] | None = None
        # (entry, task, temperature) -> the tree and, when `--tree auto` chose it, how (provenance, as `run` keeps)
        self._shapes: dict[tuple[Any, str, float], tuple[Any, dict[str, Any]]] = {}
        self._proposers: dict[tuple[Any, Any], tuple[Any, str, dict[str, Any]]] = {}  # (entry, tree) -> built
        self._examples: dict[tuple[str, int | None], list[Any]] = {}

    def prepare(self, spec: MatrixSpec, cell: Cell) -> Prepared:
        if self._target is None or self._target[0] != cell.target:
            self._target, self._shapes, self._proposers = None, {}, {}  # free the old target before the next
            target = load_target(self.reg.target(cell.target), self.device, self.dtype)
            self._target = (cell.target, target, provenance.collect(target))
        _, target, prov = self._target
        where = (cell.entry, cell.task, cell.temperature)
        if where not in self._shapes:
            entry, recipes = check_proposer(self.reg, cell.entry, target.card)
            build_recipes(self.reg, recipes, target, self.data_dir, show_progress=self.show_progress, log=self.log)
            # "auto" is chosen per proposer, task and temperature, calibrated on that task's prompts, as `taps-bench
            # run` chooses it: a cell's tree then does not depend on which cell a (resumed) matrix ran first.
            # A single drafter's card may prefer its own tree, under the spec's `tree` (tree_settings).
            shape, chosen = auto_tree(self.reg, entry, target, tree_settings(target, spec.tree, self.reg, entry),
                                      self.reg.task(cell.task), self.data_dir,
                                      Sampling(temperature=cell.temperature, seed=cell.seed), log=self.log)
            self._shapes[where] = (shape, chosen)
            if (cell.entry, shape) not in self._proposers:  # a fixed tree: one proposer serves every task
                self._proposers[(cell.entry, shape)] = build_proposer(self.reg, entry, target, shape)
        shape, chosen = self._shapes[where]
        proposer, label, settings = self._proposers[(cell.entry, shape)]
        task = self.reg.task(cell.task)
        if (cell.task, cell.limit) not in self._examples:
            self._examples[(cell.task, cell.limit)] = load_examples(task, self.data_dir, cell.limit)
        sampling = Sampling(temperature=cell.temperature, top_p=spec.top_p, top_k=spec.sample_top_k, seed=cell.seed)
        arm = Arm(kind="speculative", proposer=label, sampling=sampling, max_new_tokens=spec.max_new_tokens,
                  settings=settings)
        cell_prov = prov | {"matrix": spec.name} | ({"tree_auto": chosen} if chosen else {})
        return Prepared(target, cell_prov, task, self._examples[(cell.task, cell.limit)], proposer, arm,
                        data_file_hash(self.data_dir / task.source.local))


def samples_per_cell(spec: MatrixSpec, reg: Registry, data_dir: Path) -> dict[str, int]:
    """Samples (prompt x turn, both arms) of one cell of each task: the progress bar's unit."""
    return {t: sum(len(ex.turns) for ex in load_examples(reg.task(t), data_dir, n)) * (2 if spec.baseline else 1)
            for t, n in spec.tasks.items()}


def failure(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0]


def run_local(spec: MatrixSpec, reg: Registry, store: Store, data_dir: Path, device: str | None = None,
              dtype: str | None = None, show_progress: bool = True,
              log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> list[Outcome]:
    """Run every cell in this process, one after another (batch size 1, one device: comparable speedups)."""
    spec = check(spec, reg)
    cells = plan(spec)
    per_cell = samples_per_cell(spec, reg, data_dir)
    bar = tqdm(total=sum(per_cell[c.task] for c in cells), unit="sample", disable=not show_progress,
               file=sys.stderr, dynamic_ncols=True)
    bench = Workbench(reg, data_dir, device, dtype, show_progress, log)
    outcomes: list[Outcome] = []
    for i, cell in enumerate(cells):
        key = cell.key(spec)
        before = bar.n
        bar.set_description(f"cell {i + 1}/{len(cells)} {cell.label()}")
        prior = store.cell(key)
        if prior is not None and prior["status"] == "done":
            skip_in_bar(bar, per_cell[cell.task])
            outcomes.append(Outcome(cell, "skipped", stored_result(store, prior)))
            continue
        try:
            p = bench.prepare(spec, cell)
            m = measure(store, p.target, p.task, p.examples, p.proposer, p.arm, p.data_hash, p.provenance,
                        baseline=spec.baseline, show_progress=show_progress, bar=bar)
            store.record_cell(key, spec.name, cell.identity(spec), "done", run_id=m.run_id,
                              baseline_run_id=m.baseline_run_id)
            outcomes.append(Outcome(cell, "done", m.result(p.target, p.provenance)))
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:  # failure isolation: record the cell's error, go on with the others
            error = failure(exc)
            store.record_cell(key, spec.name, cell.identity(spec), "failed",
                              error=error + "\n" + traceback.format_exc(limit=-3))
            log(f"[taps-bench] cell {cell.label()} failed: {error} (recorded; the matrix goes on)")
            outcomes.append(Outcome(cell, "failed", error=error))
        # A failed cell (or one that stored fewer turns than expected) still moves the bar by its share.
        skip_in_bar(bar, per_cell[cell.task] - (bar.n - before))
    bar.close()
    return outcomes


def stored_result(store: Store, prior: dict[str, Any]) -> dict[str, Any] | None:
    """The summary of a cell finished earlier, from its stored samples (so the final table covers every cell)."""
    if prior["run_id"] is None:
        return None
    limit = prior["cell"].get("limit")
    spec = store.samples(prior["run_id"])
    base = store.samples(prior["baseline_run_id"]) if prior["baseline_run_id"] is not None else []
    if limit is not None:  # the runs may hold more samples from a larger matrix: keep this cell's examples
        ids = list(dict.fromkeys(s["example_id"] for s in spec))[:limit]
        spec = [s for s in spec if s["example_id"] in ids]
        base = [s for s in base if s["example_id"] in ids]
    greedy = prior["cell"]["temperature"] == 0
    pair = summarize_pair(spec, base, greedy)
    ss, sp = pair.speculative, pair.speedup
    return {"n_samples": ss["n_samples"], "tau": ss["tau"], "speedup": sp["ratio_of_sums"],
            "speedup_ci95": sp["ci95"], "slower_than_plain": sp["slower_than_plain"],
            "lossless_rate": ss["lossless_rate"] if greedy else None, "accuracy": ss["accuracy"]}


SUMMARY_COLUMNS = [("target", "target"), ("proposer", "proposer"), ("task", "task"), ("temperature", "T"),
                   ("repeat", "repeat"), ("status", "status"), ("n_samples", "samples"), ("tau", "tau"),
                   ("speedup", "speedup"), ("speedup_ci95", "95% CI"), ("flag", "flag"),
                   ("lossless_rate", "lossless"), ("accuracy", "accuracy"), ("error", "error")]


def summary_rows(outcomes: list[Outcome]) -> list[dict[str, Any]]:
    rows = []
    for o in outcomes:
        r = o.result or {}
        rows.append({"target": o.cell.target, "proposer": o.cell.entry.describe(), "task": o.cell.task,
                     "temperature": o.cell.temperature, "repeat": o.cell.repeat, "status": o.status,
                     **{k: r.get(k) for k in ("n_samples", "tau", "speedup", "lossless_rate", "accuracy")},
                     # The speedup's 95% bootstrap interval over prompts; a cell whose whole interval is below 1.0
                     # is flagged (speculative decoding measurably lost to plain decoding there).
                     "speedup_ci95": "[{:.2f}, {:.2f}]".format(*ci) if (ci := r.get("speedup_ci95")) else None,
                     "flag": "slower than plain" if r.get("slower_than_plain") else None,
                     "error": (o.error or "")[:80] or None})
    return rows


def as_json(outcomes: list[Outcome]) -> list[dict[str, Any]]:
    def entry(e: ProposerSpec) -> dict[str, Any]:
        return {"drafter": e.drafter, "combiner": e.combiner, "drafters": list(e.drafters), **dict(e.options)}

    return [{**asdict(o.cell), "entry": entry(o.cell.entry), "status": o.status, "error": o.error,
             "result": o.result} for o in outcomes]
