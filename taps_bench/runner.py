"""Run one arm (a proposer on a task against a target) sample by sample into the store.

Every sample (prompt x turn) is committed as it finishes; samples already stored under the same run identity are
skipped, so a killed run resumes where it stopped and a repeated command computes nothing new.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

from tqdm import tqdm

from taps_bench.cards import TaskCard
from taps_bench.engine import generate
from taps_bench.proposer import Proposer
from taps_bench.sampling import Sampling
from taps_bench.scoring import extract_answer, is_correct
from taps_bench.store import Store
from taps_bench.targets import Target
from taps_bench.tasks import Example, prompt_hash, render_prompt


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


def run_settings(target: Target, task: TaskCard, data_hash: str, arm: Arm) -> dict[str, Any]:
    return {
        "target_checkpoint_sha256": target.checkpoint_hash,
        "target_card": card_digest(target.card),
        "task_card": card_digest(task),
        "data_sha256": data_hash,
        "device": target.device.type,
        "dtype": str(target.dtype).removeprefix("torch."),
        "max_new_tokens": arm.max_new_tokens,
        "sampling": asdict(arm.sampling),
        **arm.settings,
    }


def run_arm(store: Store, target: Target, task: TaskCard, examples: list[Example], proposer: Proposer, arm: Arm,
            data_hash: str, provenance: dict[str, Any], reference: dict[tuple[str, int], dict] | None = None,
            show_progress: bool = True) -> int:
    """Decode every (example, turn) not yet stored; return the run id.

    `reference`: stored autoregressive samples by (example_id, turn); at temperature 0 each new sample records
    whether its output equals the reference token for token (the lossless check).
    """
    settings = run_settings(target, task, data_hash, arm)
    run_id = store.get_or_create_run(arm.kind, target.name, task.name, arm.proposer, arm.sampling.temperature,
                                     settings, provenance)
    done = store.done(run_id)
    todo = sum(1 for ex in examples for t in range(len(ex.turns)) if (ex.id, t) not in done)
    bar = tqdm(total=todo, desc=f"{arm.proposer} on {task.name}", unit="sample", disable=not show_progress or not todo,
               file=sys.stderr, dynamic_ncols=True)
    tokens = seconds = 0.0
    for ex in examples:
        history: list[dict[str, str]] = []
        for turn, text in enumerate(ex.turns):
            history.append({"role": "user", "content": text})
            stored = done.get((ex.id, turn))
            if stored is None:
                stored = _decode_one(target, task, ex, turn, history, proposer, arm, reference)
                store.add_sample(run_id, stored)
                tokens += stored["new_tokens"]
                seconds += stored["total_s"]
                bar.update(1)
                bar.set_postfix_str(f"{tokens / max(seconds, 1e-9):.1f} tok/s")
            # MT-Bench turn 2 is asked after the model's own turn-1 answer.
            history.append({"role": "assistant", "content": stored["output_text"]})
    bar.close()
    return run_id


def _decode_one(target: Target, task: TaskCard, ex: Example, turn: int, history: list[dict[str, str]],
                proposer: Proposer, arm: Arm, reference: dict[tuple[str, int], dict] | None) -> dict[str, Any]:
    text = render_prompt(target.tokenizer, target.card, history)
    # The chat template is the single source of special tokens (Llama-3's template writes <|begin_of_text|>).
    prompt_ids = target.tokenizer(text, add_special_tokens=False).input_ids
    gen = arm.sampling.generator(task.name, ex.id, turn)
    out = generate(target.model, prompt_ids, proposer, arm.sampling, arm.max_new_tokens, target.stop_ids, gen)
    answer = target.tokenizer.decode(out.output_ids, skip_special_tokens=True)
    final_turn = turn == len(ex.turns) - 1
    gold = ex.gold if final_turn else None
    ref = reference.get((ex.id, turn)) if reference is not None else None
    c = out.counters
    return {
        "example_id": ex.id, "turn": turn, "prompt_hash": prompt_hash(text), "prompt_tokens": len(prompt_ids),
        "output_ids": out.output_ids, "output_text": answer, "new_tokens": c.new_tokens, "steps": c.steps,
        "accept_lengths": c.accept_lengths, "drafted_by_depth": c.drafted_by_depth,
        "accepted_by_depth": c.accepted_by_depth, "tree_sizes": c.tree_sizes, "prefill_s": c.prefill_s,
        "draft_s": c.draft_s, "verify_s": c.verify_s, "total_s": c.total_s, "stop_reason": c.stop_reason,
        "extracted": extract_answer(task.scorer, answer) if gold is not None else None, "gold": gold,
        "correct": is_correct(task.scorer, answer, gold) if gold is not None else None,
        "lossless": (out.output_ids == ref["output_ids"]) if ref is not None and arm.sampling.greedy else None,
        "extra": out.diagnostics,
    }
