"""`taps-bench verify BUNDLE`: the maintainer re-checks an imported submission before publishing it.

At temperature 0 a bundle's outputs are checkable from first principles: they must equal the target's own greedy
outputs, which the maintainer recomputes with the autoregressive engine (no drafter needed). `verify` re-decodes
every greedy prompt of the bundle (or a seeded random subset, `--sample N`) and compares, token for token, both
arms' claimed outputs, and with them the prompt, the decoded text and the graded answer. With the drafter at hand
(the card's hub id, or a directory the maintainer passes with `--checkpoint`; never a path the bundle names) it
also re-measures tau on a seeded subset with the same tree and compares it with what the bundle claims for the same
prompts, within a stated relative tolerance: that catches counters inflated consistently with each other, which
no import check can. The result is stored with the submission; the leaderboard labels the row by it.
"""

from __future__ import annotations

import random
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from taps_bench.catalog.cards import TreeSettings
from taps_bench.catalog.registry import Registry
from taps_bench.catalog.submission import SubmissionCard
from taps_bench.errors import UserError
from taps_bench.measure.imports import check_against_registry
from taps_bench.measure.submission import check_fits, load_submitted
from taps_bench.results import submissions
from taps_bench.results.bundle import read_bundle
from taps_bench.results.claims import ClaimError
from taps_bench.results.metrics import summarize
from taps_bench.results.store import Store

TAU_TOLERANCE = 0.05  # relative: greedy drafting is deterministic on one machine, not bit-stable across machines
COMPARED = ("prompt_hash", "output_ids", "output_text", "gold", "extracted", "correct")


@dataclass
class Checks:
    """What one verification found (stored with the submission as a dict)."""

    prompts_rerun: int = 0
    samples_compared: int = 0
    mismatches: list[str] = field(default_factory=list)
    tau: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.mismatches and all(t["ok"] for t in self.tau)


def choose(keys: list[Any], n: int | None, seed: int) -> list[Any]:
    """`n` keys drawn with a seeded generator (all of them when n is None or not smaller)."""
    keys = sorted(keys)
    return keys if n is None or n >= len(keys) else sorted(random.Random(seed).sample(keys, n))


def greedy_runs(data: dict[str, Any]) -> list[dict[str, Any]]:
    runs = [r for r in data["runs"] if r["temperature"] == 0]
    if not runs:
        raise UserError("the bundle has no temperature-0 runs: verify re-decodes greedy outputs, which only "
                        "temperature 0 makes checkable")
    return runs


def verify(path: Path, reg: Registry, db_url: str, checkpoint: Path | None = None, sample: int | None = None,
           tau_prompts: int = 4, seed: int = 0, tolerance: float = TAU_TOLERANCE, data_dir: str | Path | None = None,
           device: str | None = None, dtype: str | None = None, show_progress: bool = True) -> dict[str, Any]:
    """Verify an imported bundle (see the module docstring); store and return the result."""
    from taps_bench.data.tasks import resolve_data_dir
    from taps_bench.models.targets import load_target

    if sample is not None and sample < 1:
        raise UserError(f"--sample must be a positive number of prompts (got {sample})")
    if tau_prompts < 0 or not 0 < tolerance < 1:
        raise UserError("--tau-prompts must be >= 0 and --tolerance in (0, 1)")
    data, sha = read_bundle(path)
    try:
        check_against_registry(reg, data)
    except ClaimError as exc:
        raise UserError(f"bundle {path}: {exc}") from None
    with Store(db_url) as store:
        sub = submissions.by_hash(store, sha)
        if sub is None:
            raise UserError(f"bundle {path} is not imported into {store.shown}; run `taps-bench import {path}` "
                            "first (verify stores its result with the submission)")
    runs = greedy_runs(data)
    card = SubmissionCard.model_validate(data["submission"])
    chosen = choose(list({(r["task"], s["example_id"]) for r in runs for s in r["samples"]}), sample, seed)
    checks = Checks(prompts_rerun=len(chosen))
    located = locate_drafter(card, checkpoint, checks)
    # Before the target is loaded: a checkpoint of another family than the card's method fails in a second.
    drafter: tuple[Path, Any, Path] | None = None
    if located is not None and tau_prompts:
        drafter = (located, *load_submitted(card, located, f"bundle {path}"))
    # The claims hold at the precision they were measured in: the bundle's, unless the maintainer says otherwise.
    target = load_target(reg.target(card.target), device, dtype or runs[0]["settings"].get("dtype"))
    directory = resolve_data_dir(data_dir)
    with tempfile.TemporaryDirectory(prefix="taps-bench-verify-") as tmp:
        scratch = Store(f"sqlite:///{Path(tmp) / 'verify.sqlite'}")
        try:
            for task in sorted({t for t, _ in chosen}):
                ids = [e for t, e in chosen if t == task]
                task_runs = [r for r in runs if r["task"] == task]
                redo = redecode(scratch, reg, target, task, ids, task_runs, directory, show_progress)
                compare(task_runs, redo, set(ids), checks)
                if drafter is not None:
                    retime(scratch, reg, target, task, choose(ids, tau_prompts, seed + 1), task_runs, drafter,
                           directory, tolerance, checks, show_progress)
        finally:
            scratch.close()
    result = {"passed": checks.passed, "prompts_rerun": checks.prompts_rerun,
              "samples_compared": checks.samples_compared, "mismatches": checks.mismatches[:20],
              "n_mismatches": len(checks.mismatches), "tau": checks.tau, "notes": checks.notes, "seed": seed,
              "sample": sample, "device": str(target.device), "dtype": str(target.dtype).removeprefix("torch.")}
    with Store(db_url) as store:
        submissions.record_verification(store, sub["id"], result)
    return result


def locate_drafter(card: SubmissionCard, checkpoint: Path | None, checks: Checks) -> Path | None:
    """The drafter to re-measure tau with: `--checkpoint`, else the card's hub id; None (noted) when neither."""
    from taps_bench.models.drafter import fetch_from_hub

    if checkpoint is not None:
        if not checkpoint.is_dir():
            raise UserError(f"--checkpoint {checkpoint} is not a directory; pass the submitted drafter's directory")
        return checkpoint
    if card.checkpoint.hub:
        return fetch_from_hub(card.checkpoint.hub, card.checkpoint.revision)
    checks.notes.append("tau not re-measured: the card names a local path (never read); pass --checkpoint DIR")
    return None


def _examples(reg: Registry, task: str, ids: list[str], settings: dict[str, Any], directory: Path) -> list[Any]:
    from taps_bench.data.tasks import data_file_hash, load_examples

    card = reg.task(task)
    if data_file_hash(directory / card.source.local) != settings.get("data_sha256"):
        raise UserError(f"the bundle's {task} runs were measured on other data than {directory / card.source.local} "
                        "(settings.data_sha256 differs); verify needs the same data file")
    by_id = {ex.id: ex for ex in load_examples(card, directory)}
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise UserError(f"the bundle's {task} runs claim example {missing[0]!r:.40}, which the task's data does not "
                        "have")
    return [by_id[i] for i in ids]


def redecode(scratch: Store, reg: Registry, target: Any, task: str, ids: list[str], runs: list[dict[str, Any]],
             directory: Path, show_progress: bool) -> dict[tuple[str, int], dict[str, Any]]:
    """The target's own greedy outputs for these examples (every turn), decoded into the scratch store."""
    from taps_bench.decoding.proposer import Autoregressive
    from taps_bench.decoding.sampling import Sampling
    from taps_bench.measure import provenance
    from taps_bench.measure.runner import baseline_arm, run_arm

    settings = runs[0]["settings"]
    examples = _examples(reg, task, ids, settings, directory)
    arm = baseline_arm(Sampling(**settings["sampling"]), settings["max_new_tokens"])
    run_id = run_arm(scratch, target, reg.task(task), examples, Autoregressive(), arm, settings["data_sha256"],
                     provenance.collect(target), show_progress=show_progress)
    return scratch.done(run_id)


def compare(runs: list[dict[str, Any]], redo: dict[tuple[str, int], dict[str, Any]], ids: set[str],
            checks: Checks) -> None:
    """Every claimed sample of the chosen examples against the re-decoded one, field by field."""
    for run in runs:
        for s in run["samples"]:
            if s["example_id"] not in ids:
                continue
            checks.samples_compared += 1
            mine = redo.get((s["example_id"], s["turn"]))
            wrong = [f for f in COMPARED if mine is None or s.get(f) != mine.get(f)]
            if wrong:
                checks.mismatches.append(f"{run['kind']} {run['task']} example {s['example_id']} turn {s['turn']}: "
                                         f"{', '.join(wrong)} differ from the target's own greedy decoding")


def retime(scratch: Store, reg: Registry, target: Any, task: str, ids: list[str], runs: list[dict[str, Any]],
           drafter: tuple[Path, Any, Path], directory: Path, tolerance: float, checks: Checks,
           show_progress: bool) -> None:
    """Re-measure tau with the submitted drafter (its directory, the loaded drafter of either family and its weights
    file) and the bundle's tree on `ids`; compare with the claim there."""
    from taps_bench.decoding.sampling import Sampling
    from taps_bench.measure import provenance
    from taps_bench.measure.resolve import ResolvedDrafter, eagle_proposer
    from taps_bench.measure.runner import Arm, measure
    from taps_bench.models.targets import sha256_file

    spec = next((r for r in runs if r["kind"] == "speculative"), None)
    if spec is None:
        return
    settings = spec["settings"]
    if "draft_vocab" in settings:
        checks.notes.append(f"{task}: tau not re-measured: the run drafted over a reduced vocabulary")
        return
    checkpoint, model, weights = drafter
    if sha256_file(weights) != settings.get("drafter_sha256"):
        raise UserError(f"--checkpoint {checkpoint}: its weights are not the ones the bundle measured "
                        "(settings.drafter_sha256 differs)")
    check_fits(model, target, spec["proposer"])
    resolved = ResolvedDrafter(name=spec["proposer"], drafter=model, checkpoint=settings["drafter_checkpoint"],
                               checkpoint_sha256=settings["drafter_sha256"], card=None)
    proposer, _ = eagle_proposer(resolved, target, TreeSettings(**settings["tree"]))
    arm = Arm(kind="speculative", proposer=spec["proposer"], sampling=Sampling(**settings["sampling"]),
              max_new_tokens=settings["max_new_tokens"], settings={})
    examples = _examples(reg, task, ids, settings, directory)
    m = measure(scratch, target, reg.task(task), examples, proposer, arm, settings["data_sha256"],
                provenance.collect(target), show_progress=show_progress)
    measured = m.summary.speculative["tau"]
    claimed = summarize([s for s in spec["samples"] if s["example_id"] in set(ids)])["tau"]
    ok = claimed is not None and measured is not None and abs(measured - claimed) <= tolerance * claimed
    checks.tau.append({"task": task, "prompts": len(ids), "claimed": claimed, "measured": measured,
                       "tolerance": tolerance, "ok": ok})
    if not ok:
        print(f"[taps-bench] {task}: tau claimed {claimed} but re-measured {measured}", file=sys.stderr)
