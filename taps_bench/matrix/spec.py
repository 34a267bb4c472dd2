"""A matrix spec: targets x proposers (drafters and combiners) x tasks x temperatures x repeats, as YAML.

`plan` expands a spec into cells in a fixed order (target, proposer, task, temperature, repeat) so that each target
is loaded once and each proposer built once per tree (`matrix.local` and `matrix.ray_executor` run them). A cell's
key is the hash of everything that decides its samples, so a restarted matrix finds the cells it finished.

Repeats differ only by their sampling seed (`seed + repeat`). Greedy decoding does not depend on the seed, so at
temperature 0 a matrix runs one repeat whatever `repeats` says (more would only recompute identical samples).
"""

from __future__ import annotations

import difflib
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from taps_bench.catalog.cards import TreeOverride
from taps_bench.catalog.proposers import ProposerSpec
from taps_bench.catalog.registry import Registry
from taps_bench.catalog.yamlfiles import read_yaml_mapping, validate_yaml
from taps_bench.errors import UserError
from taps_bench.measure.modelfree import refuse_in_combiner
from taps_bench.paths import shipped_dir
from taps_bench.results.schema import canonical_json

MATRIX_DIR = "matrices"


class MatrixSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    description: str = ""
    targets: list[str] = Field(min_length=1)
    # exactly what `taps-bench run` takes: a drafter, or a combiner over drafters with its options
    proposers: list[ProposerSpec] = Field(min_length=1)
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
    entry: ProposerSpec
    task: str
    limit: int | None
    temperature: float
    repeat: int
    seed: int

    def identity(self, spec: MatrixSpec) -> dict[str, Any]:
        """Everything that decides the cell's samples (its key is the hash of this)."""
        return {"target": self.target, "proposer": self.entry.identity(), "task": self.task, "limit": self.limit,
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
    shipped = {p.stem: p for p in shipped_dir(MATRIX_DIR).glob("*.yaml")}
    if name_or_path in shipped:
        return shipped[name_or_path]
    close = difflib.get_close_matches(name_or_path, sorted(shipped), n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else f"shipped specs: {', '.join(sorted(shipped))}"
    raise UserError(f"no matrix spec file '{name_or_path}' and no shipped spec of that name: {hint}")


def load_spec(path: Path) -> MatrixSpec:
    """Read and validate a spec; any problem is one line naming the file, line and field."""
    data, text = read_yaml_mapping(path, "matrix spec")
    return validate_yaml(MatrixSpec, data, path, text, "matrix spec")


def check(spec: MatrixSpec, reg: Registry) -> MatrixSpec:
    """Names and options that can be checked before any model is loaded; returns the spec with every proposer
    normalised (options validated and complete, so cell keys do not depend on how a spec writes them). Drafters
    are checked when their cell runs, so that one unbuildable drafter fails its own cells, not the matrix."""
    for name in spec.targets:
        reg.target(name)
    for name in spec.tasks:
        reg.task(name)
    proposers = []
    for i, entry in enumerate(spec.proposers):
        try:
            proposers.append(reg.normalise(entry))
            refuse_in_combiner(reg, proposers[-1])  # `average` over a model-free drafter: no cell could run
        except UserError as exc:
            raise UserError(f"matrix {spec.name}: proposers[{i}]: {exc}") from None
    return spec.model_copy(update={"proposers": proposers})


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


