"""One sample record (what the store keeps of one generation), built in one place from the engine's output."""

from __future__ import annotations

from typing import Any, Protocol


class CountersLike(Protocol):
    new_tokens: int
    steps: int
    accept_lengths: list[int]
    drafted_by_depth: list[int]
    accepted_by_depth: list[int]
    tree_sizes: list[int]
    prefill_s: float
    draft_s: float
    verify_s: float
    total_s: float
    stop_reason: str


class GenerationLike(Protocol):
    """What the decoding engine returns (`decoding.engine.Generation`); the results layer needs only this shape."""

    output_ids: list[int]
    counters: CountersLike
    diagnostics: dict[str, Any]


COUNTER_FIELDS = ("new_tokens", "steps", "accept_lengths", "drafted_by_depth", "accepted_by_depth", "tree_sizes",
                  "prefill_s", "draft_s", "verify_s", "total_s", "stop_reason")


def sample_record(gen: GenerationLike, *, example_id: str, turn: int, prompt_hash: str, prompt_tokens: int,
                  output_text: str, reference_ids: list[int] | None = None, greedy: bool = False,
                  extracted: str | None = None, gold: str | None = None, correct: bool | None = None,
                  extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The store's sample for one generation. `reference_ids`: the autoregressive output of the same prompt; at
    temperature 0 (`greedy`) the sample records whether its output equals it token for token (the lossless check).
    `extra` is added to the proposer's diagnostics."""
    c = gen.counters
    return {
        "example_id": example_id, "turn": turn, "prompt_hash": prompt_hash, "prompt_tokens": prompt_tokens,
        "output_ids": list(gen.output_ids), "output_text": output_text,
        **{name: getattr(c, name) for name in COUNTER_FIELDS},
        "extracted": extracted, "gold": gold, "correct": correct,
        "lossless": (list(gen.output_ids) == list(reference_ids)) if reference_ids is not None and greedy else None,
        "extra": {**gen.diagnostics, **(extra or {})},
    }
