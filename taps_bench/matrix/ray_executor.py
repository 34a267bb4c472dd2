"""The Ray executor: each matrix cell is a Ray task on its own device; the driver alone writes the database.

A cell task is a Ray generator: it yields a ("run", identity) message per arm, then ("sample", run key, sample) for each
sample it decodes (the arms interleaved, prompt by prompt), so results stream back while the cell runs and a worker that
dies mid-cell loses only the sample in progress. Before submitting a cell the driver hands it what is already stored for
that target, task and temperature (which samples exist, and their answer texts: MT-Bench's turn 2 is asked after turn
1's answer), so a restarted matrix, or a retried cell, decodes only what is missing. A cell that raises or whose worker
dies is resubmitted up to `retries` times, then recorded as failed. Tasks ask for one GPU when the cluster has GPUs,
else one CPU, and each runs at batch size 1, so speedups stay comparable with the local executor's.

Ray is optional: `pip install ray` to use `--executor ray`; the local executor needs nothing of this.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm

from taps_bench.catalog.proposers import ProposerSpec
from taps_bench.catalog.registry import Registry
from taps_bench.errors import UserError
from taps_bench.matrix.local import Outcome, Workbench, failure, samples_per_cell, stored_result
from taps_bench.matrix.spec import Cell, MatrixSpec, check, plan
from taps_bench.results.schema import run_key
from taps_bench.results.store import Store

_BENCH: dict[str, Workbench] = {}  # per worker process: keeps the loaded target and drafters between cells


def decode_cell(spec_json: str, cell_json: str, include: list[str], data_dir: str, device: str | None,
                dtype: str | None, stored: dict[str, dict[str, str]]) -> Iterator[tuple[Any, ...]]:
    """Runs in a worker: both arms of one cell, yielding what the driver stores. `stored` maps run key ->
    "example_id|turn" -> output_text of the samples already in the database."""
    import torch

    from taps_bench.decoding.proposer import Autoregressive
    from taps_bench.measure.runner import (
        Lane,
        baseline_arm,
        card_digest,
        decode_interleaved,
        proposer_provenance,
        run_settings,
    )

    # One task per CPU: as many torch threads as CPUs Ray gave this task (its batch-size-1 device).
    cpus = int(float(os.environ.get("TAPS_BENCH_TASK_CPUS", "1")))
    torch.set_num_threads(max(1, cpus))
    spec = MatrixSpec.model_validate_json(spec_json)
    cell = cell_from_json(cell_json)
    key = "|".join([*include, data_dir, str(device), str(dtype)])
    if key not in _BENCH:
        _BENCH.clear()
        _BENCH[key] = Workbench(Registry.load(include=[Path(p) for p in include]), Path(data_dir), device, dtype)
    p = _BENCH[key].prepare(spec, cell)
    base = baseline_arm(p.arm.sampling, p.arm.max_new_tokens)
    lanes: list[Lane] = []
    keys: list[str] = []
    for arm, proposer in ([(base, Autoregressive())] if spec.baseline else []) + [(p.arm, p.proposer)]:
        identity = {"kind": arm.kind, "target": p.target.name, "task": p.task.name, "proposer": arm.proposer,
                    "temperature": arm.sampling.temperature,
                    "settings": run_settings(p.target, card_digest(p.task), p.data_hash, arm)}
        rk = run_key(**identity)
        yield ("run", rk, identity, p.provenance | proposer_provenance(proposer))
        done = {(k.rsplit("|", 1)[0], int(k.rsplit("|", 1)[1])): {"output_text": text}
                for k, text in stored.get(rk, {}).items()}
        lanes.append(Lane(proposer, arm, done))
        keys.append(rk)
    # The arms interleaved sample by sample, as the local executor decodes them (runner.measure): noise on the
    # worker's device falls on both alike. The driver stores each baseline sample before the speculative one of
    # the same prompt, so its lossless check finds it.
    for i, sample in decode_interleaved(p.target, p.task, p.examples, lanes):
        yield ("sample", keys[i], sample)


def cell_from_json(text: str) -> Cell:
    import json

    d = json.loads(text)
    return Cell(d["target"], ProposerSpec.model_validate(d["entry"]), d["task"], d["limit"], d["temperature"],
                d["repeat"], d["seed"])


def cell_to_json(cell: Cell) -> str:
    import json

    return json.dumps({"target": cell.target, "entry": cell.entry.flat(), "task": cell.task,
                       "limit": cell.limit, "temperature": cell.temperature, "repeat": cell.repeat,
                       "seed": cell.seed})


def _stored_for(store: Store, cell: Cell) -> dict[str, dict[str, str]]:
    """What the database holds for the cell's target, task and temperature (run key -> sample -> answer text)."""
    out: dict[str, dict[str, str]] = {}
    for run in store.find_runs(target=cell.target, task=cell.task, temperature=cell.temperature):
        out[run["key"]] = {f"{s['example_id']}|{s['turn']}": s["output_text"] or "" for s in store.samples(run["id"])}
    return out


def run_ray(spec: MatrixSpec, reg: Registry, store: Store, data_dir: Path, include: list[str],
            address: str | None = None, device: str | None = None, dtype: str | None = None,
            retries: int = 2, show_progress: bool = True, num_cpus: int | None = None,
            log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> list[Outcome]:
    try:
        import ray
    except ImportError:
        raise UserError("--executor ray needs Ray: pip install ray (or use --executor local)") from None
    spec = check(spec, reg)
    cells = plan(spec)
    per_cell = samples_per_cell(spec, reg, data_dir)
    if not ray.is_initialized():
        try:
            ray.init(address=address, num_cpus=None if address else num_cpus, include_dashboard=False,
                     log_to_driver=False, configure_logging=False)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise UserError(f"cannot connect to the Ray cluster at {address}: {failure(exc)}") from None
    gpus = ray.cluster_resources().get("GPU", 0)
    resources = {"num_gpus": 1, "num_cpus": 1} if gpus else {"num_cpus": 1}
    task = ray.remote(max_retries=0)(decode_cell).options(
        **resources, runtime_env={"env_vars": {"TAPS_BENCH_TASK_CPUS": "1", "OMP_NUM_THREADS": "1"}})
    slots = int(gpus or ray.cluster_resources().get("CPU", 1))
    spec_json = spec.model_dump_json()

    bar = tqdm(total=sum(per_cell[c.task] for c in cells), unit="sample", disable=not show_progress,
               file=sys.stderr, dynamic_ncols=True)
    inbox: queue.Queue[tuple[Any, ...]] = queue.Queue()

    def consume(i: int, cell: Cell, stored: dict[str, dict[str, str]]) -> None:
        """A thread per running cell: forwards the cell's stream to the driver's inbox (the driver writes)."""
        try:
            gen = task.remote(spec_json, cell_to_json(cell), include, str(data_dir), device, dtype, stored)
            for ref in gen:
                inbox.put((i, *ray.get(ref)))
            inbox.put((i, "end"))
        except Exception as exc:  # a raising cell, or its worker's death (WorkerCrashedError)
            inbox.put((i, "error", failure(exc), traceback.format_exc(limit=-3)))

    todo = []
    outcomes: dict[int, Outcome] = {}
    for i, cell in enumerate(cells):
        prior = store.cell(cell.key(spec))
        if prior is not None and prior["status"] == "done":
            outcomes[i] = Outcome(cell, "skipped", stored_result(store, prior))
            _skip(bar, per_cell[cell.task])
        else:
            todo.append(i)
    attempts = dict.fromkeys(todo, 0)
    runs: dict[int, dict[str, int]] = {i: {} for i in todo}  # cell -> run key -> run id
    counted = dict.fromkeys(todo, 0)
    running = 0
    pending = list(todo)
    while pending or running:
        while pending and running < slots:
            i = pending.pop(0)
            attempts[i] += 1
            threading.Thread(target=consume, args=(i, cells[i], _stored_for(store, cells[i])), daemon=True).start()
            running += 1
        i, kind, *rest = inbox.get()
        cell = cells[i]
        if kind == "run":
            rk, identity, prov = rest
            runs[i][rk] = store.get_or_create_run(**identity, provenance=prov)
        elif kind == "sample":
            rk, sample = rest
            run = store.get_run(runs[i][rk])
            _fill_lossless(store, run, sample)
            store.add_sample(runs[i][rk], sample)
            counted[i] += 1
            bar.update(1)
        elif kind == "end":
            running -= 1
            ids = list(runs[i].values())
            base_id = ids[0] if spec.baseline else None
            store.record_cell(cell.key(spec), spec.name, cell.identity(spec), "done", run_id=ids[-1],
                              baseline_run_id=base_id)
            outcomes[i] = Outcome(cell, "done", stored_result(store, store.cell(cell.key(spec)) or {}))
            _skip(bar, per_cell[cell.task] - counted[i])
        else:  # error
            running -= 1
            error, trace = rest
            if attempts[i] <= retries:
                log(f"[taps-bench] cell {cell.label()} failed ({error}); retrying ({attempts[i]}/{retries})")
                pending.append(i)
                continue
            store.record_cell(cell.key(spec), spec.name, cell.identity(spec), "failed", error=f"{error}\n{trace}")
            log(f"[taps-bench] cell {cell.label()} failed after {attempts[i]} attempts: {error} (recorded)")
            outcomes[i] = Outcome(cell, "failed", error=error)
            _skip(bar, per_cell[cell.task] - counted[i])
    bar.close()
    return [outcomes[i] for i in range(len(cells))]


def _skip(bar: tqdm, n: int) -> None:
    from taps_bench.measure.runner import skip_in_bar

    skip_in_bar(bar, n)


def _fill_lossless(store: Store, run: dict[str, Any] | None, sample: dict[str, Any]) -> None:
    """At T=0, compare a speculative sample with the stored baseline sample, as the local executor does."""
    if run is None or run["kind"] != "speculative" or run["temperature"] != 0:
        return
    base = store.baseline_for(run)
    ref = store.sample(base["id"], sample["example_id"], sample["turn"]) if base is not None else None
    if ref is not None:
        sample["lossless"] = ref["output_ids"] == list(sample["output_ids"])
