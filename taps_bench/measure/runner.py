"""Run arms (a proposer on a task against a target) sample by sample into the store.

Every sample (prompt x turn) is committed as it finishes; samples already stored under the same run identity are
skipped, so a killed run resumes where it stopped and a repeated command computes nothing new.

A measurement decodes its two arms interleaved: for each (example, turn) the baseline sample, then the speculative
one, after an untimed warm-up decode with each proposer. Machine noise (another process, thermal throttling, a
cold cache) then falls on both arms alike instead of on whichever arm happened to run during it, and neither arm
pays for first-call costs (weight packing, allocator growth) the other skipped.
"""

from __future__ import annotations

import hashlib
import math
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from tqdm import tqdm

from taps_bench.catalog.cards import TaskCard, TreeSettings
from taps_bench.data.scoring import extract_answer, is_correct
from taps_bench.data.tasks import Example, prompt_hash, render_prompt
from taps_bench.decoding.engine import generate
from taps_bench.decoding.proposer import Autoregressive, Proposer
from taps_bench.decoding.sampling import Sampling
from taps_bench.errors import UserError
from taps_bench.models.targets import Target
from taps_bench.results.samples import sample_record
from taps_bench.results.store import Store
from taps_bench.results.summaries import PairSummary, of_examples, summarize_pair


@dataclass(frozen=True)
class Arm:
    """What identifies a run: same arm, same samples (the store's run key is derived from this)."""

    kind: str  # "baseline" | "speculative"
    proposer: str  # "autoregressive", a drafter name, or a combiner label
    sampling: Sampling
    max_new_tokens: int
    settings: dict[str, Any] = field(default_factory=dict)  # proposer settings and checkpoint hashes


def card_digest(card: Any) -> str:
    """Hash of a card's content (origin excluded): a changed prompt template makes a new run, not a mixed one."""
    return hashlib.sha256(card.model_dump_json(exclude={"origin"}).encode()).hexdigest()[:16]


def baseline_arm(sampling: Sampling, max_new_tokens: int) -> Arm:
    """The autoregressive arm that a speculative arm with this sampling and length is measured against."""
    return Arm(kind="baseline", proposer="autoregressive", sampling=sampling, max_new_tokens=max_new_tokens)


def run_settings(target: Target, task_digest: str, data_hash: str, arm: Arm,
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """What identifies a run in the store beside its kind, target, task, proposer and temperature: the keys of
    `results.pairing.BASELINE_KEYS` (shared with the baseline arm), then the proposer's settings. `task_digest`
    identifies the prompts (`card_digest` of a task card; lm-eval digests its own task settings), `extra` holds
    front-end settings both arms share (lm-eval's task configuration)."""
    return {
        "target_checkpoint_sha256": target.checkpoint_hash,
        "target_card": card_digest(target.card),
        "task_card": task_digest,
        "data_sha256": data_hash,
        "device": target.device.type,
        "dtype": str(target.dtype).removeprefix("torch."),
        "max_new_tokens": arm.max_new_tokens,
        "sampling": asdict(arm.sampling),
        **(extra or {}),
        **arm.settings,
    }


WARM_UP_TOKENS = 8  # enough to run prefill, a draft and a verify once; too short to cost anything


@dataclass
class Lane:
    """One arm being decoded. `done`: its samples by (example_id, turn), the stored ones at first; every new sample
    is added as it is decoded, so later turns and the lossless check see it. `reference`: the autoregressive
    samples (by the same key) that, at temperature 0, each new sample is compared with token for token (the
    lossless check); a speculative lane passes its baseline lane's `done`, so the baseline sample decoded just
    before is the reference."""

    proposer: Proposer
    arm: Arm
    done: dict[tuple[str, int], dict[str, Any]]
    reference: dict[tuple[str, int], dict[str, Any]] | None = None

    def missing(self, examples: list[Example]) -> int:
        return sum(1 for ex in examples for t in range(len(ex.turns)) if (ex.id, t) not in self.done)


def _non_finite(value: Any, where: str) -> str | None:
    """The key path of the first inf or nan in a settings value, or None."""
    if isinstance(value, float):
        return None if math.isfinite(value) else where
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    return next((bad for k, v in items if (bad := _non_finite(v, f"{where}.{k}" if where else str(k)))), None)


def check_arm(target: Target, arm: Arm) -> None:
    """What no front end may store, checked before a run row exists (every front end measures through here): a
    non-finite setting (JSON has no inf or nan, and such a run can never be found again), or a tree whose top-k
    the target's vocabulary cannot fill."""
    settings = {"sampling": asdict(arm.sampling), **arm.settings}
    if (bad := _non_finite(settings, "")) is not None:
        raise UserError(f"{bad}: not a finite number; pass an ordinary number")
    if isinstance(arm.settings.get("tree"), dict):
        TreeSettings(**arm.settings["tree"]).check_vocab(int(target.model.config.vocab_size), target.name)


def proposer_provenance(proposer: Proposer) -> dict[str, Any]:
    """What a speculative run records about its proposer beside its identity (`measure.resolve` sets it: the card
    of a drafter built by a recipe), so that the leaderboard reads the card from the store, never from disk."""
    return dict(getattr(proposer, "run_provenance", None) or {})


def open_run(store: Store, target: Target, task: TaskCard, arm: Arm, data_hash: str,
             provenance: dict[str, Any]) -> int:
    """The id of the arm's run in the store (created if new)."""
    return store.get_or_create_run(arm.kind, target.name, task.name, arm.proposer, arm.sampling.temperature,
                                   run_settings(target, card_digest(task), data_hash, arm), provenance)


def run_arm(store: Store, target: Target, task: TaskCard, examples: list[Example], proposer: Proposer, arm: Arm,
            data_hash: str, provenance: dict[str, Any], reference: dict[tuple[str, int], dict] | None = None,
            show_progress: bool = True, bar: tqdm | None = None) -> int:
    """One arm alone (`taps-bench baseline`): decode every (example, turn) not yet stored; return the run id.

    `reference`: stored autoregressive samples by (example_id, turn) for the lossless check (see `Lane`).
    `bar`: a progress bar shared with the caller (see `run_lanes`).
    """
    check_arm(target, arm)
    run_id = open_run(store, target, task, arm, data_hash, provenance | proposer_provenance(proposer))
    lane = Lane(proposer, arm, store.done(run_id), reference)
    run_lanes(store, target, task, examples, [(run_id, lane)], f"{arm.proposer} on {task.name}", show_progress, bar)
    return run_id


def run_lanes(store: Store, target: Target, task: TaskCard, examples: list[Example], lanes: list[tuple[int, Lane]],
              desc: str, show_progress: bool = True, bar: tqdm | None = None) -> None:
    """Decode the lanes interleaved (see `decode_interleaved`), storing each sample into its run as it finishes.

    One progress bar counts every lane's samples. `bar`: one shared with the caller (a matrix); its total already
    counts these samples, and the ones already stored are moved into its `initial` so that the time-left estimate
    counts only real work.
    """
    todo = sum(lane.missing(examples) for _, lane in lanes)
    shared = bar is not None
    if bar is None:
        bar = tqdm(total=todo, desc=desc, unit="sample", disable=not show_progress or not todo, file=sys.stderr,
                   dynamic_ncols=True)
    else:
        skip_in_bar(bar, sum(len(ex.turns) for ex in examples) * len(lanes) - todo)
    rates = [[0.0, 0.0] for _ in lanes]  # per lane: tokens, seconds of the samples decoded now
    for i, sample in decode_interleaved(target, task, examples, [lane for _, lane in lanes]):
        store.add_sample(lanes[i][0], sample)
        rates[i][0] += sample["new_tokens"]
        rates[i][1] += sample["total_s"]
        bar.update(1)
        bar.set_postfix_str(_rates([lane.arm.kind for _, lane in lanes], rates))
    if not shared:
        bar.close()


def _rates(kinds: list[str], rates: list[list[float]]) -> str:
    """The bar's postfix: tokens/s of the samples decoded so far, per arm when there are two."""
    shown = [(kind, n / s) for kind, (n, s) in zip(kinds, rates, strict=True) if s > 0]
    if not shown:
        return ""
    if len(kinds) == 1:
        return f"{shown[0][1]:.1f} tok/s"
    return ", ".join(f"{kind} {rate:.1f}" for kind, rate in shown) + " tok/s"


def decode_interleaved(target: Target, task: TaskCard, examples: list[Example],
                       lanes: Sequence[Lane]) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (lane index, new sample) for every (example, turn) a lane lacks: for each (example, turn) in order,
    each lane's sample in lane order, so the arms alternate sample by sample. Before the first, every lane with
    work decodes a few untimed tokens of the first prompt (discarded). Each lane follows its own history: later
    turns are asked after that arm's own earlier answers (MT-Bench), from `done` when stored and from the new
    sample otherwise, so `done` needs only each sample's `output_text` (and `output_ids` for a reference)."""
    busy = [lane for lane in lanes if lane.missing(examples)]
    if busy and examples:
        warm_up(target, examples[0], busy)
    for ex in examples:
        histories: list[list[dict[str, str]]] = [[] for _ in lanes]
        for turn, text in enumerate(ex.turns):
            for i, (lane, history) in enumerate(zip(lanes, histories, strict=True)):
                history.append({"role": "user", "content": text})
                sample = lane.done.get((ex.id, turn))
                if sample is None:
                    sample = _decode_one(target, task, ex, turn, history, lane.proposer, lane.arm, lane.reference)
                    lane.done[(ex.id, turn)] = sample
                    yield i, sample
                history.append({"role": "assistant", "content": sample["output_text"]})


def warm_up(target: Target, example: Example, lanes: Sequence[Lane]) -> None:
    """A short decode of the example's first turn with each lane's proposer, results discarded: the first
    decode of a process pays one-off costs (weight preparation, cache allocation) that no sample should carry."""
    _, prompt_ids = _prompt(target, [{"role": "user", "content": example.turns[0]}])
    for lane in lanes:
        generate(target.model, prompt_ids, lane.proposer, lane.arm.sampling,
                 min(WARM_UP_TOKENS, lane.arm.max_new_tokens), target.stop_ids, lane.arm.sampling.generator("warm-up"))


def decode_missing(target: Target, task: TaskCard, examples: list[Example], proposer: Proposer, arm: Arm,
                   done: dict[tuple[str, int], dict[str, Any]],
                   reference: dict[tuple[str, int], dict] | None = None) -> Iterator[dict[str, Any]]:
    """Yield a new sample for every (example, turn) not in `done`, in order: one arm alone (`decode_interleaved`
    with one lane; `done` is not changed)."""
    for _, sample in decode_interleaved(target, task, examples, [Lane(proposer, arm, dict(done), reference)]):
        yield sample


def skip_in_bar(bar: tqdm, n: int) -> None:
    """Count `n` samples that needed no work: moved into the bar's `initial`, so its rate and time left count only
    samples actually decoded (tqdm's own `update` would fold them into the rate)."""
    if n <= 0 or bar.disable:
        return
    bar.n += n
    bar.initial += n
    bar.last_print_n = bar.n
    bar.refresh()


@dataclass
class Measurement:
    """A speculative arm and its baseline on the same prompts: run ids and derived summaries."""

    arm: Arm
    task: str
    run_id: int
    baseline_run_id: int
    summary: PairSummary

    def result(self, target: Target, provenance: dict[str, Any]) -> dict[str, Any]:
        """The flat result that `run --json` prints and a matrix summarises."""
        ss, sb, sp = self.summary.speculative, self.summary.baseline, self.summary.speedup
        return {"run_id": self.run_id, "baseline_run_id": self.baseline_run_id, "target": target.name,
                "drafter": self.arm.proposer, "decisions": self.summary.decisions, "task": self.task,
                "temperature": self.arm.sampling.temperature, "n_samples": ss["n_samples"], "tau": ss["tau"],
                "tau_ci95": ss["tau_ci95"], "tau_macro": ss["tau_macro"], "speedup": sp["ratio_of_sums"],
                "speedup_ci95": sp["ci95"], "slower_than_plain": sp["slower_than_plain"], "step_cost": sp["cost"],
                "speedup_mean_of_ratios": sp["mean_of_ratios"], "tokens_per_s": ss["tokens_per_s"],
                "baseline_tokens_per_s": sb["tokens_per_s"], "lossless_rate": ss["lossless_rate"],
                "accuracy": ss["accuracy"], "baseline_accuracy": sb["accuracy"],
                "acceptance_by_depth": ss["acceptance_by_depth"], "acceptance_histogram": ss["acceptance_histogram"],
                "time_split_s": {k: ss[k] for k in ("prefill_s", "draft_s", "verify_s", "overhead_s")},
                "mean_tree_size": ss["mean_tree_size"], "proposer_settings": self.arm.settings,
                "device": str(target.device), "dtype": provenance["dtype"]}


def measure(store: Store, target: Target, task: TaskCard, examples: list[Example], proposer: Proposer, arm: Arm,
            data_hash: str, provenance: dict[str, Any], baseline: bool = True, show_progress: bool = True,
            bar: tqdm | None = None) -> Measurement:
    """The autoregressive arm and the speculative arm on the same prompts, decoded interleaved sample by sample
    (module docstring), with the lossless check at temperature 0. Stored samples of either arm are reused; with
    baseline=False the baseline is only read (its stored samples serve the speedup and the lossless check)."""
    base_arm = baseline_arm(arm.sampling, arm.max_new_tokens)
    check_arm(target, arm)
    base_id = open_run(store, target, task, base_arm, data_hash, provenance)
    spec_id = open_run(store, target, task, arm, data_hash, provenance | proposer_provenance(proposer))
    base = Lane(Autoregressive(), base_arm, store.done(base_id))
    spec = Lane(proposer, arm, store.done(spec_id), reference=base.done)
    lanes = ([(base_id, base)] if baseline else []) + [(spec_id, spec)]
    run_lanes(store, target, task, examples, lanes, f"{arm.proposer} vs autoregressive on {task.name}"
              if baseline else f"{arm.proposer} on {task.name}", show_progress, bar)
    ids = [ex.id for ex in examples]
    base_samples, spec_samples = of_examples(store.samples(base_id), ids), of_examples(store.samples(spec_id), ids)
    return Measurement(arm=arm, task=task.name, run_id=spec_id, baseline_run_id=base_id,
                       summary=summarize_pair(spec_samples, base_samples, arm.sampling.greedy))


def _decode_one(target: Target, task: TaskCard, ex: Example, turn: int, history: list[dict[str, str]],
                proposer: Proposer, arm: Arm, reference: dict[tuple[str, int], dict] | None) -> dict[str, Any]:
    text, prompt_ids = _prompt(target, history)
    gen = arm.sampling.generator(task.name, ex.id, turn)
    out = generate(target.model, prompt_ids, proposer, arm.sampling, arm.max_new_tokens, target.stop_ids, gen)
    answer = target.tokenizer.decode(out.output_ids, skip_special_tokens=True)
    gold = ex.gold if turn == len(ex.turns) - 1 else None  # graded on the final turn only
    ref = reference.get((ex.id, turn)) if reference is not None else None
    return sample_record(out, example_id=ex.id, turn=turn, prompt_hash=prompt_hash(text), prompt_tokens=len(prompt_ids),
                         output_text=answer, reference_ids=ref["output_ids"] if ref is not None else None,
                         greedy=arm.sampling.greedy, gold=gold,
                         extracted=extract_answer(task.scorer, answer) if gold is not None else None,
                         correct=is_correct(task.scorer, answer, gold) if gold is not None else None)


def _prompt(target: Target, history: list[dict[str, str]]) -> tuple[str, list[int]]:
    text = render_prompt(target.tokenizer, target.card, history)
    # The chat template is the single source of special tokens (Llama-3's template writes <|begin_of_text|>).
    return text, target.tokenizer(text, add_special_tokens=False).input_ids
