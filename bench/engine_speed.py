"""Engine speed on this machine, as tables. Ratios come from one run with the arms interleaved, because the machines
are shared and noisy (a ratio measured across two runs mostly measures the neighbours); never a timed unit test.

  a. the target's forward time against the number of tree tokens (1 ... 128, bushy trees) over ~300 tokens of context;
  b. our autoregressive engine against transformers `generate`, prompt by prompt (goal: >= 2x), same tokens checked;
  c. the memory-bandwidth limit: weight bytes read per token over the measured read bandwidth (goal: >= 50 % of it);
  d. the time split of a speculative step over a random drafter: draft, verify, everything else.

Usage: TAPS_BENCH_DATA=../shared/data python bench/engine_speed.py [--target smollm2-135m-instruct] [--prompts 4]
       [--max-new-tokens 64] [--repeats 5] [--dtype float32|bfloat16] [--threads N]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from scipy import stats

from taps_bench.catalog.cards import TreeSettings
from taps_bench.catalog.registry import Registry
from taps_bench.data.tasks import load_examples, render_prompt, resolve_data_dir
from taps_bench.decoding.eagle2 import EagleProposer
from taps_bench.decoding.engine import generate, new_cache, prefill, verify
from taps_bench.decoding.proposer import Autoregressive, Proposer
from taps_bench.decoding.sampling import Sampling
from taps_bench.decoding.tree import DraftTree
from taps_bench.measure import provenance
from taps_bench.models import forward
from taps_bench.models.drafter import random_drafter
from taps_bench.models.targets import load_target
from taps_bench.results.report import format_table

SIZES = (1, 2, 4, 8, 16, 32, 60, 64, 128)
GREEDY = Sampling()


def clock(device: torch.device) -> float:
    """Wall clock once the device has finished its queued work (CUDA kernels run asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def bushy_tree(n: int, vocab: int, seed: int = 0, depth: int = 6) -> DraftTree:
    """n nodes as ceil((n-1)/depth) interleaved chains under the root: as deep as an EAGLE-2 60/5/10 tree (6 levels),
    never deeper than `depth`, whatever n. Random tokens: the cost of a forward does not depend on them."""
    width = max(1, math.ceil((n - 1) / depth))
    parents = [-1] + [i - width if i > width else 0 for i in range(1, n)]
    tokens = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))
    return DraftTree(tokens=tokens, parents=torch.tensor(parents), logp=torch.zeros(n), entropy=torch.zeros(n))


def interval(data: Sequence[Sequence[float]], statistic: Callable[..., float]) -> tuple[float, float]:
    """95 % bootstrap interval of a statistic of paired samples (BCa; percentile when BCa degenerates on few
    samples). (nan, nan) with fewer than 2 samples."""
    if len(data[0]) < 2:
        return math.nan, math.nan
    arrays = tuple(np.asarray(d, dtype=float) for d in data)
    for method in ("BCa", "percentile"):
        with warnings.catch_warnings():  # BCa's degenerate-data warning: the fallback below answers it
            warnings.simplefilter("ignore")
            ci = stats.bootstrap(arrays, statistic, paired=True, vectorized=False, n_resamples=2000, method=method,
                                 rng=np.random.default_rng(0)).confidence_interval
        if np.isfinite(ci.low) and np.isfinite(ci.high):
            break
    return float(ci.low), float(ci.high)


def span(ci: tuple[float, float]) -> str:
    return f"[{ci[0]:.2f}, {ci[1]:.2f}]"


@torch.inference_mode()
def forward_cost(model: Any, context: list[int], sizes: Sequence[int], repeats: int) -> list[dict[str, Any]]:
    """Verify time per tree size over one prefilled context. Sizes are interleaved round by round (one untimed
    warm-up round first), so a noisy stretch of the machine hits every size; a verify writes only slots past the
    context, so every round reuses the same cache."""
    w = forward.prepare(model)
    cache = new_cache(w, len(context) + max(sizes) + 1)
    prefill(w, torch.tensor(context, device=w.device), cache)
    trees = {n: bushy_tree(n, model.config.vocab_size, seed=n) for n in sizes}
    times: dict[int, list[float]] = {n: [] for n in sizes}
    for rnd in range(repeats + 1):
        for n in sizes:
            t0 = clock(w.device)
            verify(w, trees[n], cache, len(context))
            if rnd:
                times[n].append(clock(w.device) - t0)
    one = times[sizes[0]]
    return [{"tokens": n, "depth": trees[n].max_depth, "ms": 1000 * statistics.median(times[n]),
             "x_one": statistics.median(times[n]) / statistics.median(one),
             "ci": span(interval([times[n], one], lambda a, b: np.median(a) / np.median(b)))} for n in sizes]


def hf_greedy(model: Any, ids: list[int], max_new_tokens: int, stop_ids: tuple[int, ...]) -> list[int]:
    x = torch.tensor([ids], device=model.device)
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=list(stop_ids), pad_token_id=stop_ids[0])
    return out[0, len(ids):].tolist()


def ar_vs_hf(model: Any, prompts: list[list[int]], max_new_tokens: int, stop_ids: tuple[int, ...],
             repeats: int) -> list[dict[str, Any]]:
    """Per prompt: `repeats` pairs of runs, the arms alternating which goes first; median wall time of each arm
    (prefill included in both). Decode-only tok/s of our engine comes from its counters."""
    device = forward.prepare(model).device
    for _ in range(2):  # warm-up: weight packing, allocator, first-call paths
        generate(model, prompts[0], Autoregressive(), GREEDY, 8, stop_ids)
        hf_greedy(model, prompts[0], 8, stop_ids)
    rows = []
    for p, ids in enumerate(prompts):
        ours_s, hf_s, decode = [], [], []
        for r in range(repeats):
            for arm in (("ours", "hf") if (p + r) % 2 == 0 else ("hf", "ours")):
                t0 = clock(device)
                if arm == "ours":
                    g = generate(model, ids, Autoregressive(), GREEDY, max_new_tokens, stop_ids)
                    ours_s.append(clock(device) - t0)
                    ours, c = g.output_ids, g.counters
                    decode.append((c.new_tokens - 1) / max(c.total_s - c.prefill_s, 1e-9))
                else:
                    ref = hf_greedy(model, ids, max_new_tokens, stop_ids)
                    hf_s.append(clock(device) - t0)
        rows.append({"prompt": p, "context": len(ids), "tokens": len(ours), "hf_tokens": len(ref),
                     "ours_s": statistics.median(ours_s), "hf_s": statistics.median(hf_s),
                     "decode_tok_s": statistics.median(decode), "same": ours == ref, "output": ours})
    for r in rows:
        r["ours_tok_s"], r["hf_tok_s"] = r["tokens"] / r["ours_s"], r["hf_tokens"] / r["hf_s"]
        r["ratio"] = r["ours_tok_s"] / r["hf_tok_s"]
    return rows


def ar_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Ratio of the arms' total throughputs, with its bootstrap interval over prompts."""
    def ratio(os_: np.ndarray, hs: np.ndarray, ot: np.ndarray, ht: np.ndarray) -> float:
        return float((ot.sum() / os_.sum()) / (ht.sum() / hs.sum()))

    cols = [[r[k] for r in rows] for k in ("ours_s", "hf_s", "tokens", "hf_tokens")]
    return {"prompt": "all", "tokens": sum(cols[2]), "ours_tok_s": sum(cols[2]) / sum(cols[0]),
            "hf_tok_s": sum(cols[3]) / sum(cols[1]), "ratio": ratio(*map(np.asarray, cols)),
            "ci": span(interval(cols, ratio)), "same": f"{sum(r['same'] for r in rows)}/{len(rows)}"}


AR_COLUMNS = [("prompt", "prompt"), ("tokens", "tokens"), ("ours_tok_s", "engine tok/s"),
              ("hf_tok_s", "generate tok/s"), ("ratio", "engine/generate"), ("ci", "95% CI"), ("same", "same tokens")]


def weight_bytes(model: Any) -> int:
    """Bytes one forward of one token reads from weights: every layer's matrices (the packed copies where packed)
    and norms, the final norm, the lm_head, and one row of the embedding."""
    w = forward.prepare(model)

    def nbytes(t: torch.Tensor | None) -> int:
        return 0 if t is None else t.numel() * t.element_size()

    def linear(m: forward.Linear) -> int:
        return nbytes(m.packed if m.packed is not None else m.weight) + nbytes(m.bias)

    total = linear(w.lm_head) + nbytes(w.norm) + nbytes(w.embed[0])
    for layer in w.layers:
        total += sum(linear(m) for m in (layer.qkv, layer.o, layer.gate_up, layer.down))
        total += sum(nbytes(t) for t in (layer.input_norm, layer.post_norm, layer.q_norm, layer.k_norm))
    return total


def read_bandwidth(device: torch.device, megabytes: int = 512, repeats: int = 7) -> dict[str, float]:
    """Best of several reads (`sum`) and copies (`copy_`, read + write counted) of a buffer far larger than any
    cache, in bytes/s."""
    src = torch.ones(megabytes << 18, device=device)  # float32: 4 bytes
    dst = torch.empty_like(src)
    size = src.numel() * 4
    best = {"read": 0.0, "copy": 0.0}
    for _ in range(repeats):
        t0 = clock(device)
        src.sum()
        t1 = clock(device)
        dst.copy_(src)
        t2 = clock(device)
        best["read"] = max(best["read"], size / (t1 - t0))
        best["copy"] = max(best["copy"], 2 * size / (t2 - t1))
    return best


def bandwidth_rows(model: Any, decode_tok_s: float, context: int, megabytes: int = 512) -> list[dict[str, Any]]:
    w = forward.prepare(model)
    bw = read_bandwidth(w.device, megabytes)
    per_token = weight_bytes(model)
    bound = bw["read"] / per_token
    kv = len(w.layers) * w.kv_heads * context * (2 * w.head_dim + 1) * w.embed.element_size()  # values: + ones column
    return [{"what": "weights read per token", "value": f"{per_token / 1e6:.1f} MB"},
            {"what": f"KV read per token at context {context} (not in the bound)", "value": f"{kv / 1e6:.1f} MB"},
            {"what": "read bandwidth (sum, best)", "value": f"{bw['read'] / 1e9:.1f} GB/s"},
            {"what": "copy bandwidth (copy_, best)", "value": f"{bw['copy'] / 1e9:.1f} GB/s"},
            {"what": "bound: read bandwidth / weights per token", "value": f"{bound:.1f} tok/s"},
            {"what": "engine decode (median over prompts, prefill excluded)", "value": f"{decode_tok_s:.1f} tok/s"},
            {"what": "engine / bound (goal >= 50%)", "value": f"{100 * decode_tok_s / bound:.1f}%"}]


def step_split(model: Any, proposer: Proposer, prompts: list[list[int]], max_new_tokens: int,
               stop_ids: tuple[int, ...], reference: list[list[int]] | None = None) -> dict[str, Any]:
    """Where a speculative step's time goes, summed over the prompts (prefill excluded), from the engine's counters.
    `reference`: the autoregressive outputs, to check the speculative ones equal them."""
    generate(model, prompts[0], proposer, GREEDY, 8, stop_ids)  # warm-up
    runs = [generate(model, ids, proposer, GREEDY, max_new_tokens, stop_ids) for ids in prompts]
    draft, verify_s, total, prefill_s = (sum(getattr(g.counters, k) for g in runs)
                                         for k in ("draft_s", "verify_s", "total_s", "prefill_s"))
    steps, step_s = sum(g.counters.steps - 1 for g in runs), total - prefill_s
    tokens = sum(g.counters.new_tokens - 1 for g in runs)  # the first token comes from the prefill
    same = None if reference is None else sum(g.output_ids == r for g, r in zip(runs, reference, strict=True))
    return {"ms_step": 1000 * step_s / steps, "draft": 100 * draft / step_s, "verify": 100 * verify_s / step_s,
            "other": 100 * (step_s - draft - verify_s) / step_s,
            "other_total": 100 * (total - draft - verify_s) / total, "tau": tokens / steps,
            "same": "-" if same is None else f"{same}/{len(runs)}"}


SPLIT_COLUMNS = [("tree", "tree (tokens/depth/top_k)"), ("ms_step", "ms/step"), ("draft", "draft %"),
                 ("verify", "verify %"), ("other", "other %"), ("tau", "tokens/step"), ("same", "same as AR")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5, help="rounds of (a), run pairs per prompt in (b)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="default: the device's")
    ap.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # generate's notes on the checkpoint's sampling defaults, once per call

    reg = Registry.load()
    target = load_target(reg.target(args.target), device=args.device, dtype=args.dtype)
    model = target.model
    prov = provenance.collect(target)
    print(f"# {target.name} on {prov['device_name']} ({prov['dtype']}, {prov['threads']} threads), torch "
          f"{prov['versions']['torch']}, transformers {prov['versions']['transformers']}, commit {prov['git_commit']}")
    examples = load_examples(reg.task("gsm8k"), resolve_data_dir(None), args.prompts)
    prompts = [target.tokenizer(render_prompt(target.tokenizer, target.card, [{"role": "user", "content": e.turns[0]}]),
                                add_special_tokens=False).input_ids for e in examples]

    context = (prompts[0] * (300 // len(prompts[0]) + 1))[:300]
    print(f"\n## a. Target forward vs tree tokens (context 300, median of {args.repeats} interleaved rounds)")
    print(format_table(forward_cost(model, context, SIZES, args.repeats),
                       [("tokens", "tree tokens"), ("depth", "depth"), ("ms", "ms"), ("x_one", "x one token"),
                        ("ci", "95% CI")]))

    rows = ar_vs_hf(model, prompts, args.max_new_tokens, target.stop_ids, args.repeats)
    print(f"\n## b. Autoregressive engine vs transformers generate (greedy, GSM8K, {args.repeats} interleaved pairs "
          "per prompt, median; goal >= 2x)")
    print(format_table([*rows, ar_summary(rows)], AR_COLUMNS))

    mean_context = round(statistics.mean(len(p) + args.max_new_tokens / 2 for p in prompts))
    print("\n## c. Memory-bandwidth limit of one-token decoding")
    print(format_table(bandwidth_rows(model, statistics.median(r["decode_tok_s"] for r in rows), mean_context),
                       [("what", "quantity"), ("value", "value")]))

    print("\n## d. Speculative step time split (random drafter: cost of a step, not acceptance)")
    drafter = random_drafter(model.config)
    split = []
    card = target.card.tree if isinstance(target.card.tree, TreeSettings) else target.card.fallback_tree
    for shape in (card, TreeSettings(total_tokens=60, depth=5, top_k=10),
                  TreeSettings(total_tokens=6, depth=5, top_k=1)):
        proposer = EagleProposer(drafter, model, shape, head_dtype=target.card.draft_head_dtype)
        row = step_split(model, proposer, prompts, args.max_new_tokens, target.stop_ids, [r["output"] for r in rows])
        name = " (card)" if shape == target.card.tree else " (card fallback)" if shape == card else ""
        split.append({"tree": f"{shape.total_tokens}/{shape.depth}/{shape.top_k}{name}", **row})
    print(format_table(split, SPLIT_COLUMNS))


if __name__ == "__main__":
    main()
