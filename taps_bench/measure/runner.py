"""Run one arm (a proposer on a task against a target) sample by sample into the store.

Every sample (prompt x turn) is committed as it finishes; samples already stored under the same run identity are
skipped, so a killed run resumes where it stopped and a repeated command computes nothing new.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from tqdm import tqdm

from taps_bench.catalog.cards import TaskCard
from taps_bench.data.scoring import extract_answer, is_correct
from taps_bench.data.tasks import Example, prompt_hash, render_prompt
from taps_bench.decoding.engine import generate
from taps_bench.decoding.proposer import Autoregressive, Proposer
from taps_bench.decoding.sampling import Sampling
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


def run_arm(store: Store, target: Target, task: TaskCard, examples: list[Example], proposer: Proposer, arm: Arm,
            data_hash: str, provenance: dict[str, Any], reference: dict[tuple[str, int], dict] | None = None,
            show_progress: bool = True, bar: tqdm | None = None) -> int:
    """Decode every (example, turn) not yet stored; return the run id.

    `reference`: stored autoregressive samples by (example_id, turn); at temperature 0 each new sample records
    whether its output equals the reference token for token (the lossless check).
    `bar`: a progress bar shared with the caller (a matrix); its total already counts this arm's samples, and the
    ones already stored are moved into its `initial` so that the time-left estimate counts only real work.
    """
    settings = run_settings(target, card_digest(task), data_hash, arm)
    run_id = store.get_or_create_run(arm.kind, target.name, task.name, arm.proposer, arm.sampling.temperature,
                                     settings, provenance)
    done = store.done(run_id)
    todo = sum(1 for ex in examples for t in range(len(ex.turns)) if (ex.id, t) not in done)
    shared = bar is not None
    if bar is None:
        bar = tqdm(total=todo, desc=f"{arm.proposer} on {task.name}", unit="sample",
                   disable=not show_progress or not todo, file=sys.stderr, dynamic_ncols=True)
    else:
        skip_in_bar(bar, sum(len(ex.turns) for ex in examples) - todo)
    tokens = seconds = 0.0
    for sample in decode_missing(target, task, examples, proposer, arm, done, reference):
        store.add_sample(run_id, sample)
        tokens += sample["new_tokens"]
        seconds += sample["total_s"]
        bar.update(1)
        bar.set_postfix_str(f"{tokens / max(seconds, 1e-9):.1f} tok/s")
    if not shared:
        bar.close()
    return run_id


def decode_missing(target: Target, task: TaskCard, examples: list[Example], proposer: Proposer, arm: Arm,
                   done: dict[tuple[str, int], dict[str, Any]],
                   reference: dict[tuple[str, int], dict] | None = None) -> Iterator[dict[str, Any]]:
    """Yield a new sample for every (example, turn) not in `done`, in order. Later turns are asked after the
    model's own earlier answers (MT-Bench), read from `done` when stored and from the new sample otherwise, so
    `done` needs only each sample's `output_text`."""
    for ex in examples:
        history: list[dict[str, str]] = []
        for turn, text in enumerate(ex.turns):
            history.append({"role": "user", "content": text})
            stored = done.get((ex.id, turn))
            if stored is None:
                stored = _decode_one(target, task, ex, turn, history, proposer, arm, reference)
                yield stored
            history.append({"role": "assistant", "content": stored["output_text"]})


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
                "tau_macro": ss["tau_macro"], "speedup": sp["ratio_of_sums"],
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
    """The autoregressive arm (reused when stored; with baseline=False only stored samples are used), then the
    speculative arm, on the same prompts, with the lossless check at temperature 0."""
    base_id = run_arm(store, target, task, examples if baseline else [], Autoregressive(),
                      baseline_arm(arm.sampling, arm.max_new_tokens), data_hash,
                      provenance, show_progress=show_progress, bar=bar)
    spec_id = run_arm(store, target, task, examples, proposer, arm, data_hash, provenance,
                      reference=store.done(base_id), show_progress=show_progress, bar=bar)
    ids = [ex.id for ex in examples]
    base, spec = of_examples(store.samples(base_id), ids), of_examples(store.samples(spec_id), ids)
    return Measurement(arm=arm, task=task.name, run_id=spec_id, baseline_run_id=base_id,
                       summary=summarize_pair(spec, base, arm.sampling.greedy))


def _decode_one(target: Target, task: TaskCard, ex: Example, turn: int, history: list[dict[str, str]],
                proposer: Proposer, arm: Arm, reference: dict[tuple[str, int], dict] | None) -> dict[str, Any]:
    text = render_prompt(target.tokenizer, target.card, history)
    # The chat template is the single source of special tokens (Llama-3's template writes <|begin_of_text|>).
    prompt_ids = target.tokenizer(text, add_special_tokens=False).input_ids
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
