"""Drafting cost per step on this machine: EAGLE-2 tree drafting over a random drafter, full vocabulary against
reduced draft vocabularies (FR-Spec), as milliseconds and as a fraction of one target forward (a single-token
`extend` over the same context). Drafting cost does not depend on the drafter's weights, so a random drafter of
the target's shape measures it; never a timed unit test (the machines are shared: read the ratios, not the ms).

Each step after the first (which consumes the prompt) commits two tokens, as an accepted draft plus its bonus token
would, so the drafter's cache grows as in decoding. Reduced vocabularies take the most frequent assistant tokens of
the `mixed` recipe's corpus when the data is at hand (TAPS_BENCH_DATA), else the first N ids (the same cost).

Usage: TAPS_BENCH_DATA=../shared/data python bench/draft_speed.py [--target smollm2-135m-instruct] [--context 300]
       [--steps 30] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from taps_bench.catalog.cards import TreeSettings
from taps_bench.catalog.registry import Registry
from taps_bench.data.tasks import resolve_data_dir
from taps_bench.decoding.eagle2 import EagleProposer
from taps_bench.decoding.engine import new_cache
from taps_bench.errors import UserError
from taps_bench.models import forward
from taps_bench.models.drafter import random_drafter
from taps_bench.models.targets import Target, load_target
from taps_bench.results.report import format_table
from taps_bench.training import vocab

SHAPES = (TreeSettings(total_tokens=60, depth=5, top_k=10), TreeSettings(total_tokens=16, depth=4, top_k=4),
          TreeSettings(total_tokens=8, depth=3, top_k=2))
SIZES = (8192, 16384)


def clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def target_forward_ms(target: Target, prompt: torch.Tensor, repeats: int) -> tuple[float, torch.Tensor]:
    """Median ms of one single-token target forward after the prompt (a root-only tree), and the prompt's hidden
    states (what the drafter reads)."""
    w = forward.prepare(target.model)
    cache = new_cache(w, prompt.numel() + 64)
    with torch.inference_mode():
        hidden, _ = forward.prefill(w, prompt, cache)
        one, depth, anc = prompt[-1:], torch.zeros(1, dtype=torch.long), torch.ones(1, 1, dtype=torch.bool)
        times = []
        for _ in range(repeats + 3):
            t0 = clock(w.device)
            forward.extend(w, one, depth, anc, cache, prompt.numel())
            times.append(clock(w.device) - t0)
    return statistics.median(times[3:]) * 1e3, hidden


def draft_ms(proposer: EagleProposer, prompt: torch.Tensor, hidden: torch.Tensor, steps: int) -> float:
    """Median ms of `propose` over `steps` steps, each committing two more tokens."""
    proposer.reset()
    device = hidden.device
    proposer.propose(prompt.cpu(), hidden, int(prompt[-1]))  # the prompt: not a decoding step
    times = []
    for i in range(steps + 2):
        tokens = prompt[[i % prompt.numel(), (i + 1) % prompt.numel()]].cpu()
        feats = hidden[[i % prompt.numel(), (i + 1) % prompt.numel()]]
        t0 = clock(device)
        proposer.propose(tokens, feats, int(prompt[(i + 2) % prompt.numel()]))
        times.append(clock(device) - t0)
    return statistics.median(times[2:]) * 1e3


def vocabularies(reg: Registry, target: Target, log: Any) -> list[tuple[str, torch.Tensor | None, float | None]]:
    """(label, draft ids or None for the full vocabulary, coverage of the corpus's assistant tokens or None)."""
    v = vocab.vocab_size(target)
    try:
        spec, max_len, seed = vocab.corpus_for(reg, None)
        counts = vocab.token_frequencies(target, spec, resolve_data_dir(None), reg, max_len, seed, log)
    except UserError as exc:
        log(f"no corpus at hand ({exc}): reduced vocabularies are the first N ids")
        return [("full", None, None)] + [(str(n), torch.arange(n), None) for n in SIZES]
    out: list[tuple[str, torch.Tensor | None, float | None]] = [("full", None, 1.0)]
    auto = vocab.auto_size(counts)
    for n in sorted({*SIZES, auto}):
        if n < v:
            ids, coverage = vocab.draft_vocabulary(counts, n)
            out.append((f"{n}{' (auto)' if n == auto else ''}", ids, coverage))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="smollm2-135m-instruct")
    ap.add_argument("--context", type=int, default=300, help="prompt tokens before drafting starts")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    reg = Registry.load()
    target = load_target(reg.target(args.target))
    prompt = torch.randint(100, vocab.vocab_size(target), (args.context,),
                           generator=torch.Generator().manual_seed(0)).to(target.device)
    fwd, hidden = target_forward_ms(target, prompt, max(10, args.steps))
    drafter = random_drafter(target.model.config)
    head = target.card.draft_head_dtype
    rows = []
    choices = vocabularies(reg, target, print)
    for shape in SHAPES:
        for label, ids, coverage in choices:
            p = EagleProposer(drafter, target.model, shape, head_dtype=head, draft_ids=ids)
            ms = draft_ms(p, prompt, hidden, args.steps)
            rows.append({"tree": f"{shape.total_tokens}/{shape.depth}/{shape.top_k}", "vocab": label,
                         "coverage": coverage, "draft_ms": ms, "ratio": ms / fwd})
    print(f"target {target.name} on {target.device} ({str(target.dtype).removeprefix('torch.')}, "
          f"{torch.get_num_threads()} threads, draft head {head}); one target forward after {args.context} tokens: "
          f"{fwd:.2f} ms (median of {max(10, args.steps)})")
    print(format_table(rows, [("tree", "tree (total/depth/top-k)"), ("vocab", "draft vocab"),
                              ("coverage", "coverage"), ("draft_ms", "draft ms/step"),
                              ("ratio", "x target forward")]))


if __name__ == "__main__":
    main()
