"""Matrix runs: targets x proposers (drafters and combiners) x tasks x temperatures x repeats, in one command.

A matrix is a YAML spec (`MatrixSpec`); `plan` expands it into cells in a fixed order (target, proposer, task,
temperature, repeat) so that each target is loaded once and each proposer built once. A cell is measured with
`runner.measure`, which stores every sample as it finishes, so a killed matrix resumes where it stopped. Each cell's
outcome (done, or failed with its error) is kept in the store's `matrix_cells` table: a failing cell is recorded and
the others go on; a restarted matrix skips finished cells without loading their models and retries failed ones.

Repeats differ only by their sampling seed (`seed + repeat`). Greedy decoding does not depend on the seed, so at
temperature 0 a matrix runs one repeat whatever `repeats` says (more would only recompute identical samples).
"""

from __future__ import annotations

import difflib
import hashlib
import sys
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from tqdm import tqdm

from taps_bench.errors import UserError
from taps_bench.registry import PACKAGE_DIR, Registry, read_yaml_mapping, validate_yaml
from taps_bench.resolve import ProposerSpec
from taps_bench.runner import skip_in_bar
from taps_bench.store import Store, canonical_json

if TYPE_CHECKING:  # models are imported when a cell runs, not when a spec is checked
    from taps_bench.cards import TaskCard
    from taps_bench.proposer import Proposer
    from taps_bench.runner import Arm
    from taps_bench.targets import Target
    from taps_bench.tasks import Example

MATRIX_DIR = "matrices"


# One proposer of a matrix: exactly what `taps-bench run` takes (a drafter, or a combiner over drafters).
Entry = ProposerSpec


class TreeOverride(BaseModel):
    """Tree settings that replace the target card's default tree (unset fields keep the card's value)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    total_tokens: int | None = Field(None, ge=1)
    depth: int | None = Field(None, ge=0)
    top_k: int | None = Field(None, ge=1)


class MatrixSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    description: str = ""
    targets: list[str] = Field(min_length=1)
    proposers: list[Entry] = Field(min_length=1)
    tasks: dict[str, int | None] = Field(min_length=1, description="task name -> limit (null: every example)")
    temperatures: list[float] = [0.0]
    repeats: int = Field(1, ge=1)
    seed: int = 0
    top_p: float = Field(1.0, gt=0, le=1)
    sample_top_k: int = Field(0, ge=0)
    max_new_tokens: int = Field(512, ge=1)
    tree: TreeOverride = TreeOverride()
    baseline: bool = True

    @field_validator("tasks")
    @classmethod
    def _limits(cls, tasks: dict[str, int | None]) -> dict[str, int | None]:
        bad = [t for t, n in tasks.items() if n is not None and n < 1]
        if bad:
            raise ValueError(f"limits must be positive integers or null (bad: {', '.join(bad)})")
        return tasks

    @field_validator("temperatures")
    @classmethod
    def _temperatures(cls, temps: list[float]) -> list[float]:
        if not temps or any(t < 0 for t in temps):
            raise ValueError("give at least one temperature, none negative")
        return [float(t) for t in temps]


@dataclass(frozen=True)
class Cell:
    target: str
    entry: Entry
    task: str
    limit: int | None
    temperature: float
    repeat: int
    seed: int

    def identity(self, spec: MatrixSpec) -> dict[str, Any]:
        """Everything that decides the cell's samples (its key is the hash of this)."""
        return {"target": self.target, "proposer": self.entry.model_dump(), "task": self.task, "limit": self.limit,
                "temperature": self.temperature, "seed": self.seed, "top_p": spec.top_p,
                "sample_top_k": spec.sample_top_k, "max_new_tokens": spec.max_new_tokens,
                "tree": spec.tree.model_dump(), "baseline": spec.baseline}

    def key(self, spec: MatrixSpec) -> str:
        return hashlib.sha256(canonical_json(self.identity(spec)).encode()).hexdigest()

    def label(self) -> str:
        return f"{self.entry.describe()} / {self.task} / T={self.temperature:g} / repeat {self.repeat}"


def find_spec(name_or_path: str) -> Path:
    """A spec file by path, or a shipped spec by name (`cpu-small` is `matrices/cpu-small.yaml`)."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    shipped = {p.stem: p for d in (PACKAGE_DIR / "cards" / MATRIX_DIR, PACKAGE_DIR.parent / MATRIX_DIR)
               if d.is_dir() for p in d.glob("*.yaml")}
    if name_or_path in shipped:
        return shipped[name_or_path]
    close = difflib.get_close_matches(name_or_path, sorted(shipped), n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else f"shipped specs: {', '.join(sorted(shipped))}"
    raise UserError(f"no matrix spec file '{name_or_path}' and no shipped spec of that name: {hint}")


def load_spec(path: Path) -> MatrixSpec:
    """Read and validate a spec; any problem is one line naming the file, line and field."""
    data, text = read_yaml_mapping(path, "matrix spec")
    return validate_yaml(MatrixSpec, data, path, text, "matrix spec")


def check(spec: MatrixSpec, reg: Registry) -> None:
    """Names and combinations that can be checked before any model is loaded (drafters are checked when built, so
    that one unbuildable drafter fails its own cells, not the matrix)."""
    for name in spec.targets:
        reg.target(name)
    for name in spec.tasks:
        reg.task(name)
    for entry in spec.proposers:
        if bool(entry.drafter) == bool(entry.combiner):
            raise UserError(f"matrix {spec.name}: each proposer needs either `drafter:` or `combiner:` + `drafters:` "
                            f"(got {entry.model_dump(exclude_defaults=True)})")
        if entry.combiner:
            reg.combiner(entry.combiner)
            if len(entry.drafters) < 2:
                raise UserError(f"matrix {spec.name}: combiner {entry.combiner} needs at least two drafters")


def plan(spec: MatrixSpec) -> list[Cell]:
    """Every cell, in execution order: target, proposer, task, temperature, repeat."""
    cells = []
    for target in spec.targets:
        for entry in spec.proposers:
            for task, limit in spec.tasks.items():
                for temperature in spec.temperatures:
                    for repeat in range(spec.repeats if temperature > 0 else 1):
                        cells.append(Cell(target, entry, task, limit, temperature, repeat, spec.seed + repeat))
    return cells


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
                 show_progress: bool = False) -> None:
        self.reg, self.data_dir, self.device, self.dtype = reg, data_dir, device, dtype
        self.show_progress = show_progress
        self._target: tuple[str, Any, dict[str, Any]] | None = None
        self._proposers: dict[Entry, tuple[Any, str, dict[str, Any]]] = {}
        self._examples: dict[tuple[str, int | None], list[Any]] = {}

    def prepare(self, spec: MatrixSpec, cell: Cell) -> Prepared:
        from taps_bench import provenance
        from taps_bench.resolve import build_proposer, tree_settings
        from taps_bench.runner import Arm
        from taps_bench.sampling import Sampling
        from taps_bench.targets import load_target
        from taps_bench.tasks import data_file_hash, load_examples

        if self._target is None or self._target[0] != cell.target:
            self._target, self._proposers = None, {}  # free the old target before loading the next
            target = load_target(self.reg.target(cell.target), self.device, self.dtype)
            self._target = (cell.target, target, provenance.collect(target))
        _, target, prov = self._target
        if cell.entry not in self._proposers:
            tree = tree_settings(target, spec.tree.total_tokens, spec.tree.depth, spec.tree.top_k)
            self._proposers[cell.entry] = build_proposer(self.reg, cell.entry, target, tree,
                                                         data_dir=self.data_dir, show_progress=self.show_progress)
        proposer, label, settings = self._proposers[cell.entry]
        task = self.reg.task(cell.task)
        if (cell.task, cell.limit) not in self._examples:
            self._examples[(cell.task, cell.limit)] = load_examples(task, self.data_dir, cell.limit)
        sampling = Sampling(temperature=cell.temperature, top_p=spec.top_p, top_k=spec.sample_top_k, seed=cell.seed)
        arm = Arm(kind="speculative", proposer=label, sampling=sampling, max_new_tokens=spec.max_new_tokens,
                  settings=settings)
        return Prepared(target, prov | {"matrix": spec.name}, task, self._examples[(cell.task, cell.limit)],
                        proposer, arm, data_file_hash(self.data_dir / task.source.local))


def samples_per_cell(spec: MatrixSpec, reg: Registry, data_dir: Path) -> dict[str, int]:
    """Samples (prompt x turn, both arms) of one cell of each task: the progress bar's unit."""
    from taps_bench.tasks import load_examples

    return {t: sum(len(ex.turns) for ex in load_examples(reg.task(t), data_dir, n)) * (2 if spec.baseline else 1)
            for t, n in spec.tasks.items()}


def failure(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0]


def run_local(spec: MatrixSpec, reg: Registry, store: Store, data_dir: Path, device: str | None = None,
              dtype: str | None = None, show_progress: bool = True,
              log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> list[Outcome]:
    """Run every cell in this process, one after another (batch size 1, one device: comparable speedups)."""
    from taps_bench.runner import measure

    check(spec, reg)
    cells = plan(spec)
    per_cell = samples_per_cell(spec, reg, data_dir)
    bar = tqdm(total=sum(per_cell[c.task] for c in cells), unit="sample", disable=not show_progress,
               file=sys.stderr, dynamic_ncols=True)
    bench = Workbench(reg, data_dir, device, dtype, show_progress)
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
    from taps_bench.metrics import compare_outputs, speedup, summarize

    if prior["run_id"] is None:
        return None
    limit = prior["cell"].get("limit")
    spec = store.samples(prior["run_id"])
    base = store.samples(prior["baseline_run_id"]) if prior["baseline_run_id"] is not None else []
    if limit is not None:  # the runs may hold more samples from a larger matrix: keep this cell's examples
        ids = list(dict.fromkeys(s["example_id"] for s in spec))[:limit]
        spec = [s for s in spec if s["example_id"] in ids]
        base = [s for s in base if s["example_id"] in ids]
    ss, sp = summarize(spec), speedup(spec, base)
    lossless = compare_outputs(spec, base)["rate"] if prior["cell"]["temperature"] == 0 else None
    return {"n_samples": ss["n_samples"], "tau": ss["tau"], "speedup": sp["ratio_of_sums"], "lossless_rate": lossless,
            "accuracy": ss["accuracy"]}


SUMMARY_COLUMNS = [("target", "target"), ("proposer", "proposer"), ("task", "task"), ("temperature", "T"),
                   ("repeat", "repeat"), ("status", "status"), ("n_samples", "samples"), ("tau", "tau"),
                   ("speedup", "speedup"), ("lossless_rate", "lossless"), ("accuracy", "accuracy"),
                   ("error", "error")]


def summary_rows(outcomes: list[Outcome]) -> list[dict[str, Any]]:
    rows = []
    for o in outcomes:
        r = o.result or {}
        rows.append({"target": o.cell.target, "proposer": o.cell.entry.describe(), "task": o.cell.task,
                     "temperature": o.cell.temperature, "repeat": o.cell.repeat, "status": o.status,
                     **{k: r.get(k) for k in ("n_samples", "tau", "speedup", "lossless_rate", "accuracy")},
                     "error": (o.error or "")[:80] or None})
    return rows


def as_json(outcomes: list[Outcome]) -> list[dict[str, Any]]:
    return [{**asdict(o.cell), "entry": o.cell.entry.model_dump(), "status": o.status, "error": o.error,
             "result": o.result} for o in outcomes]
