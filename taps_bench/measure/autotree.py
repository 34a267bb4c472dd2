"""`--tree auto`: the tree shape that maximises predicted tokens/s on this device, for this drafter.

Two measurements, one prediction:
1. the device profile (`DeviceProfile`, `taps-bench profile`): one target forward per tree size, timed once per target,
   device, dtype, threads and torch and shared by every drafter (so the drafters of one matrix are ranked against
   one verification curve, not each against its own noisy one), and the proposer's drafting time per (depth, top_k),
   timed per kind of drafting against a one-token forward of its own;
2. calibration: the real proposer drafts one large tree per step (128/7/10) on a few prompts of the task that the
   run does not measure, and every step's tree and accepted path is kept;
3. for each candidate (total_tokens, depth, top_k), the tree EAGLE-2 would have drafted is a sub-tree of the large one
   (the drafter's output at a node depends only on the node's ancestors), so its acceptance at each recorded step is
   the part of the accepted path it contains. Predicted speedup = tau / (verify ratio + draft ratio), the ratios
   being the profile's verify and drafting times over one plain forward.
At T=0 the sub-tree's acceptance is exactly what it would have accepted at that step, as long as the large tree holds
all of the sub-tree (it keeps the best 127 of its candidates, so a sub-tree of up to 64 nodes nearly always is); at
T>0 it is an estimate.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from itertools import product
from pathlib import Path
from typing import Any

import torch

from taps_bench.catalog.cards import TreeSettings
from taps_bench.decoding.engine import features, generate, new_cache, prefill, verify
from taps_bench.decoding.proposer import Proposer
from taps_bench.decoding.sampling import Sampling
from taps_bench.decoding.tree import DraftTree
from taps_bench.measure.provenance import device_name
from taps_bench.models.forward import packing_available, prepare
from taps_bench.models.targets import Target
from taps_bench.paths import home, write_atomic

CALIBRATION_TREE = TreeSettings(total_tokens=128, depth=7, top_k=10)
TOTALS = (2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
DEPTHS = tuple(range(1, CALIBRATION_TREE.depth + 1))
TOP_KS = (1, 2, 3, 4, 6, 8, 10)
# 2: drafting timed in steady state (1: the whole context re-read per call); 3: bfloat16 weights pre-packed where
# the CPU has bf16 units; 4: only the draft head's (the target's bf16 weights broke batch invariance packed);
# 5: the target's bf16 weights upcast into the fp32 kernel on CPU (bf16 kernels are not row-invariant on AMX);
# 6: verification timed once per target (shared by drafters), drafting against its own one-token forward
PROFILE_VERSION = 6
VERIFY_REPEATS = 9  # timed once per target and machine, so it can afford more rounds than a drafting profile


@dataclass
class DeviceProfile:
    """What one forward and one drafting step cost on this machine (milliseconds, medians)."""

    key: dict[str, Any]
    one_token_ms: float
    verify_ms: dict[int, float]  # tree tokens -> one verify forward
    draft_ms: dict[str, float] = field(default_factory=dict)  # "depth/top_k" -> one propose call
    # the one-token forward timed beside the drafting (None: `one_token_ms`); a ratio is taken within one timing
    # session, so a machine a little faster or slower than when verification was timed does not skew drafting's cost
    draft_one_token_ms: float | None = None

    def verify_ratio(self, tokens: int) -> float:
        return self.verify_ms[tokens] / self.one_token_ms

    def draft_ratio(self, depth: int, top_k: int) -> float:
        return self.draft_ms[f"{depth}/{top_k}"] / (self.draft_one_token_ms or self.one_token_ms)


def verify_key(target: Target) -> dict[str, Any]:
    """What verification's cost depends on: the target and the machine, not the drafter."""
    return {"version": PROFILE_VERSION, "target": target.name, "checkpoint": target.checkpoint_hash[:16],
            "device": device_name(target.device), "dtype": str(target.dtype).removeprefix("torch."),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            # which kernels the forward and the draft head get here: the same CPU name may or may not have bf16 units
            "packed": [name for name, dt in (("float32", torch.float32), ("bfloat16", torch.bfloat16))
                       if target.device.type == "cpu" and packing_available(dt)]}


def profile_key(target: Target, drafting: str) -> dict[str, Any]:
    """The verification key and the kind of drafting (`resolve.cost_model`'s label)."""
    return verify_key(target) | {"drafting": drafting}


def _bushy(n: int, token: int) -> DraftTree:
    """A tree of n nodes, each parent with up to 4 children in order: depth ~log4(n), as EAGLE-2 trees are."""
    parents = torch.tensor([-1] + [(i - 1) // 4 for i in range(1, n)])
    return DraftTree(tokens=torch.full((n,), token), parents=parents, logp=torch.zeros(n), entropy=torch.zeros(n))


def _interleaved_ms(calls: dict[Any, Callable[[], Any]], repeats: int) -> dict[Any, float]:
    """Median milliseconds of each call, timed round-robin so that a burst of machine noise falls on all of them,
    then made non-decreasing in the keys' order (isotonic regression, scipy): a bigger tree never costs less, and
    what is left of the noise must not make it look as if it did."""
    from scipy.optimize import isotonic_regression

    for fn in calls.values():
        fn()  # warm-up: first calls allocate
    times: dict[Any, list[float]] = {k: [] for k in calls}
    for _ in range(repeats):
        for key, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)
    medians = [1000 * statistics.median(times[k]) for k in calls]
    return dict(zip(calls, isotonic_regression(medians).x.tolist(), strict=True))


def _prefilled(target: Target, context: Sequence[int], taps: tuple[int, ...] | None) -> tuple[Any, ...]:
    weights = prepare(target.model)
    prompt = torch.tensor(list(context), device=weights.device)
    cache = new_cache(weights, len(context) + max(TOTALS) + 8)
    hidden, _ = prefill(weights, prompt, cache, taps)
    return weights, prompt, cache, hidden


@torch.inference_mode()
def measure_verify(target: Target, context: Sequence[int],
                   repeats: int = VERIFY_REPEATS) -> tuple[float, dict[int, float]]:
    """One verify forward per tree size over `context` (a few hundred tokens): (one-token ms, tree tokens -> ms).
    Timed without feature taps: an EAGLE-3 run's verify also returns three layers' input states, which the forward
    computes anyway (their concatenation is a copy of a few kilobytes)."""
    weights, _, cache, _ = _prefilled(target, context, None)
    root = int(context[-1])
    ms = _interleaved_ms({n: lambda n=n: verify(weights, _bushy(n, root), cache, len(context))
                          for n in (1, *TOTALS)}, repeats)
    return ms[1], {n: ms[n] for n in TOTALS}


@torch.inference_mode()
def measure_drafting(target: Target, make_proposer: Callable[[TreeSettings], Proposer], context: Sequence[int],
                     repeats: int = 5) -> tuple[float, dict[str, float]]:
    """Drafting per (depth, top_k) over `context`, and a one-token target forward timed before and after it:
    (one-token ms, "depth/top_k" -> ms)."""
    # The features the proposer drafts from (EAGLE-3: tapped layers), served by the same forwards a run makes.
    taps = features(make_proposer(TreeSettings(total_tokens=max(TOTALS), depth=1, top_k=1)))
    weights, prompt, cache, hidden = _prefilled(target, context, taps)
    root = int(context[-1])

    def one_token() -> float:
        return _interleaved_ms({1: lambda: verify(weights, _bushy(1, root), cache, len(context), taps)}, repeats)[1]

    before = one_token()
    # Drafting is a fixed part plus one drafter forward per level: timed at the shallowest and deepest depth for each
    # top_k, linear in between (a seventh of the timing, and the levels are alike).
    lo, hi = DEPTHS[0], DEPTHS[-1]
    calls = {}
    for top_k in TOP_KS:
        for depth in (lo, hi):
            proposer = make_proposer(TreeSettings(total_tokens=max(TOTALS), depth=depth, top_k=top_k))
            proposer.reset()
            proposer.propose(prompt.cpu(), hidden, root)  # the context, once: what a run's prefill step does

            # A steady-state step: the drafter consumes one newly committed token, then drafts its tree.
            def draft(proposer: Proposer = proposer) -> None:
                proposer.propose(prompt[-1:].cpu(), hidden[-1:], root)

            calls[(depth, top_k)] = draft
    timed = {}
    for depth in (lo, hi):  # non-decreasing in top_k at each depth
        timed |= _interleaved_ms({k: v for k, v in calls.items() if k[0] == depth}, repeats)
    draft_ms = {f"{d}/{k}": timed[(lo, k)] + (timed[(hi, k)] - timed[(lo, k)]) * (d - lo) / (hi - lo)
                for k in TOP_KS for d in DEPTHS}
    return (before + one_token()) / 2, draft_ms


def measure_profile(target: Target, make_proposer: Callable[[TreeSettings], Proposer], drafting: str,
                    context: Sequence[int], repeats: int = 5) -> DeviceProfile:
    """Both parts of a profile, measured now (`cached_profile` measures each only when it has none)."""
    one, verify_ms = measure_verify(target, context, repeats)
    draft_one, draft_ms = measure_drafting(target, make_proposer, context, repeats)
    return DeviceProfile(key=profile_key(target, drafting), one_token_ms=one, verify_ms=verify_ms,
                         draft_ms=draft_ms, draft_one_token_ms=draft_one)


def _cached_part(path: Path, key: dict[str, Any], parse: Callable[[dict[str, Any]], Any], refresh: bool,
                 measure: Callable[[], tuple[float, dict[Any, float]]], field_name: str,
                 log: Callable[[str], None], what: str) -> tuple[float, dict[Any, float]]:
    """One part of the profile from its cache file, or measured and cached when there is none, it is another key's
    or `refresh`. A damaged file is measured again, never trusted."""
    if path.is_file() and not refresh:
        try:
            raw = json.loads(path.read_text())
            if raw.get("key") == key:
                return parse(raw)
        except (ValueError, KeyError, TypeError, AttributeError):
            pass
    log(f"[taps-bench] profiling {what} on this machine once (cached in {path})")
    one, ms = measure()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps({"key": key, "one_token_ms": one, field_name: ms}, indent=1, sort_keys=True))
    return one, ms


def cached_profile(target: Target, make_proposer: Callable[[TreeSettings], Proposer], drafting: str,
                   context: Sequence[int], log: Callable[[str], None] = print, refresh: bool = False) -> DeviceProfile:
    """The profile from `$TAPS_BENCH_HOME/profiles/`: verification measured (a few seconds) when this target has
    none on this machine yet, drafting (about a minute) when this kind of drafting has none; `refresh` (`taps-bench
    profile --refresh`: after measuring under load, say) measures both again."""
    vkey, key = verify_key(target), profile_key(target, drafting)
    folder = home() / "profiles"
    one, verify_ms = _cached_part(
        folder / f"verify-{_digest(vkey)}.json", vkey,
        lambda raw: (float(raw["one_token_ms"]), {n: float(raw["verify_ms"][str(n)]) for n in TOTALS}),
        refresh, lambda: measure_verify(target, context), "verify_ms", log, f"{target.name}'s verification")
    draft_one, draft_ms = _cached_part(
        folder / f"draft-{_digest(key)}.json", key,
        lambda raw: (float(raw["one_token_ms"]),
                     {s: float(raw["draft_ms"][s]) for s in (f"{d}/{k}" for k in TOP_KS for d in DEPTHS)}),
        refresh, lambda: measure_drafting(target, make_proposer, context), "draft_ms", log, f"drafting ({drafting})")
    return DeviceProfile(key=key, one_token_ms=one, verify_ms=verify_ms, draft_ms=draft_ms,
                         draft_one_token_ms=draft_one)


def _digest(key: dict[str, Any]) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


# -- calibration and prediction ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One calibration step: the large tree drafted and the nodes the target accepted (root first)."""

    parents: list[int]
    logp: list[float]
    depths: list[int]
    accepted: list[int]


class Recording:
    """Wraps a proposer and keeps each step's tree and accepted path (the engine reports them via `observe`)."""

    def __init__(self, inner: Proposer) -> None:
        self.inner, self.name, self.steps = inner, inner.name, []  # type: ignore[var-annotated]
        self.taps = getattr(inner, "taps", None)  # the features the engine must hand it (engine.features)

    def reset(self) -> None:
        self.inner.reset()

    def propose(self, tokens: Any, hidden: Any, root: int) -> DraftTree:
        return self.inner.propose(tokens, hidden, root)

    def observe(self, tree: DraftTree, accepted: list[int]) -> None:
        self.steps.append(Step(tree.parents.tolist(), tree.logp.tolist(), tree.depths.tolist(), list(accepted)))
        self.inner.observe(tree, accepted)

    def diagnostics(self) -> dict[str, Any]:
        return self.inner.diagnostics()


def calibrate(target: Target, proposer: Proposer, prompts: Sequence[list[int]], sampling: Sampling,
              max_new_tokens: int) -> list[Step]:
    recording = Recording(proposer)
    for ids in prompts:
        generate(target.model, ids, recording, sampling, max_new_tokens, target.stop_ids)
    return recording.steps


def sub_tree(step: Step, tree: TreeSettings) -> set[int]:
    """The nodes of the recorded large tree that EAGLE-2 drafts at these settings (see eagle2.py): level 1 is the
    root's top_k children; each later level, the top_k children of each of the previous level's top_k nodes; then
    the best total_tokens - 1 of all of them."""
    children: dict[int, list[int]] = {}
    for node, parent in enumerate(step.parents[1:], start=1):
        children.setdefault(parent, []).append(node)

    def best(nodes: list[int], k: int) -> list[int]:
        return sorted(nodes, key=lambda i: (-step.logp[i], i))[:k]

    frontier = best(children.get(0, []), tree.top_k)
    candidates = list(frontier)
    for _ in range(tree.depth):
        level = [c for f in frontier for c in best(children.get(f, []), tree.top_k)]
        candidates += level
        frontier = best(level, tree.top_k)
    return {0, *best(candidates, tree.total_tokens - 1)}


def predicted_tau(steps: Sequence[Step], tree: TreeSettings) -> float:
    """Mean tokens per step (accepted drafts + the bonus token) the sub-trees would have given."""
    total = 0
    for step in steps:
        kept = sub_tree(step, tree)
        total += 1 + sum(1 for node in step.accepted[1:] if node in kept)  # the path's kept part is a prefix
    return total / max(len(steps), 1)


@dataclass(frozen=True)
class Candidate:
    tree: TreeSettings
    tau: float
    verify_ratio: float
    draft_ratio: float

    @property
    def speedup(self) -> float:
        return self.tau / (self.verify_ratio + self.draft_ratio)


def rank(profile: DeviceProfile, steps: Sequence[Step], drafters_per_step: int = 1) -> list[Candidate]:
    """Every candidate shape, best predicted speedup first. `drafters_per_step`: how many drafters draft each step
    (a merged tree or per-step routing runs all of them)."""
    out = []
    for total, depth, top_k in product(TOTALS, DEPTHS, TOP_KS):
        # More nodes than such a tree has candidates, or more children per node than the tree has room for.
        if total - 1 > top_k * (depth + 1) * top_k or top_k > total:
            continue
        tree = TreeSettings(total_tokens=total, depth=depth, top_k=top_k)
        out.append(Candidate(tree, predicted_tau(steps, tree), profile.verify_ratio(total),
                             drafters_per_step * profile.draft_ratio(depth, top_k)))
    return sorted(out, key=lambda c: (-c.speedup, c.tree.total_tokens, c.tree.depth, c.tree.top_k))


# -- the choice, for a run ---------------------------------------------------------------------------------------


def calibration_prompts(target: Target, task: Any, data_dir: Any, count: int = 3) -> list[list[int]]:
    """The first turns of the task's last `count` examples: prompts a run of the first N examples does not measure
    (unless it measures all of them)."""
    from taps_bench.data.tasks import load_examples, render_prompt

    examples = load_examples(task, data_dir, None)[-count:]
    texts = [render_prompt(target.tokenizer, target.card, [{"role": "user", "content": ex.turns[0]}])
             for ex in examples]
    return [target.tokenizer(t, add_special_tokens=False).input_ids for t in texts]


def choose(target: Target, calibration: Proposer, calibration_settings: dict[str, Any],
           make_cost_proposer: Callable[[TreeSettings], Proposer], drafting: str, drafters_per_step: int,
           prompts: Sequence[list[int]], sampling: Sampling, max_new_tokens: int = 64,
           log: Callable[[str], None] = print) -> tuple[list[Candidate], DeviceProfile]:
    """Candidate shapes, best predicted first, and the profile. `calibration`: the run's proposer built with
    CALIBRATION_TREE; its steps are cached under the settings that identify it (drafter checkpoints), the prompts
    and the sampling."""
    profile = cached_profile(target, make_cost_proposer, drafting, prompts[0] * 4, log)
    key = {"proposer": calibration_settings, "prompts": _digest({"p": list(map(list, prompts))}),
           "sampling": asdict(sampling), "max_new_tokens": max_new_tokens, "target": target.checkpoint_hash[:16],
           "version": PROFILE_VERSION}
    path = home() / "profiles" / f"calibration-{_digest(key)}.json"
    steps = None
    if path.is_file():
        try:
            steps = [Step(**s) for s in json.loads(path.read_text())["steps"]]
        except (ValueError, KeyError, TypeError):
            steps = None
    if steps is None:
        log(f"[taps-bench] --tree auto: calibrating on {len(prompts)} prompts the run does not measure")
        steps = calibrate(target, calibration, prompts, sampling, max_new_tokens)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps({"key": key, "steps": [asdict(s) for s in steps]}))
    ranked = rank(profile, steps, drafters_per_step)
    best = ranked[0]
    log(f"[taps-bench] --tree auto: best {best.tree.total_tokens}/{best.tree.depth}/{best.tree.top_k} "
        f"(predicted tau {best.tau:.2f}, verify {best.verify_ratio:.2f} + draft {best.draft_ratio:.2f} forwards per "
        f"step, predicted speedup {best.speedup:.2f}x)")
    return ranked, profile
