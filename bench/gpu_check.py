"""The decoding engine on a lent NVIDIA GPU: a Llama-3-8B-shaped target with random weights (no hub access), as tables.

  a. batch invariance: a random tree's node logits from one `extend` against one-token `extend`s along each node's
     path, bit for bit (counts of mismatching nodes, not an assertion: this is what the GPU kernels do);
  b. lossless: greedy `generate` with `Autoregressive()` against an EAGLE-2 proposer over a random drafter, and against
     scripted trees that hold the true continuation among decoys (a random drafter is almost never accepted, so only
     the scripted trees exercise long accepted paths and cache compaction);
  c. the verify cost against tree tokens (1 ... 128);
  d. autoregressive tokens/s of our engine against transformers `generate`, and the memory-bandwidth bound;
  e. the engine's overhead share: (total - draft - verify) / total.

Random weights with a small std (0.02), built directly on the device in bf16: 8.0e9 parameters, ~16 GB, plus ~9 GB
for the engine's fused qkv / gate_up copies. Takes ~2-4 minutes on one H200 (each section prints its time).
CUDA graphs / torch.compile: not used. The attention's far-key products change shape every 16 positions and the
tree's shape changes every step, so one captured graph would not cover a step; nothing here shows they would pay.

Usage: python bench/gpu_check.py [--device cuda] [--prompts 3] [--max-new-tokens 64]
       python bench/gpu_check.py --tiny --device cpu   (a 3-layer, hidden-256 model: the CPU test of this script)
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared helpers of bench/engine_speed.py
from engine_speed import (
    AR_COLUMNS,
    GREEDY,
    SIZES,
    SPLIT_COLUMNS,
    ar_summary,
    ar_vs_hf,
    bandwidth_rows,
    forward_cost,
    step_split,
)

from taps_bench.catalog.cards import TreeSettings
from taps_bench.decoding.eagle2 import EagleProposer
from taps_bench.decoding.engine import generate
from taps_bench.decoding.proposer import Autoregressive, Proposer
from taps_bench.decoding.tree import DraftTree, ancestor_mask
from taps_bench.measure.provenance import device_name, git_commit
from taps_bench.models import forward
from taps_bench.models.attention import NEAR_DEPTH
from taps_bench.models.drafter import random_drafter
from taps_bench.results.report import format_table

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192)
TINY = dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=4096)
# (context, tree nodes, max depth): across the far-block boundaries, bushy and as deep as the engine allows
INVARIANCE_CASES = ((1, 8, 4), (47, 24, NEAR_DEPTH), (300, 64, 6), (1000, 128, 12))


def build_target(tiny: bool, device: torch.device, dtype: torch.dtype, seed: int) -> Any:
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**(TINY if tiny else LLAMA3_8B), rms_norm_eps=1e-5, tie_word_embeddings=False,
                         rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, initializer_range=0.02,
                         attn_implementation="sdpa")
    torch.manual_seed(seed)
    with torch.device(device):  # allocate (and initialise) on the device, in the dtype: no 32 GB fp32 detour
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config.pad_token_id = config.eos_token_id
    return model.eval()


def random_tree(rng: random.Random, n: int, max_depth: int) -> tuple[list[int], list[int]]:
    """Parents (preceding their children) and depths of a random tree: a chain down to max_depth first (so the
    deepest position is always checked), then nodes under random ones, half of them under recent ones."""
    parents, depths = [-1], [0]
    for i in range(1, n):
        choices = [j for j in range(i) if depths[j] < max_depth]
        parents.append(i - 1 if i <= max_depth else rng.choice(choices[-4:] if rng.random() < 0.5 else choices))
        depths.append(depths[parents[-1]] + 1)
    return parents, depths


@torch.inference_mode()
def invariance(model: Any, context: int, n: int, max_depth: int, seed: int) -> dict[str, Any]:
    """Tree logits against one-token forwards along each node's path. The one-token forwards walk the tree depth
    first in one cache of another capacity: a node at depth k is written at slot context + k, over whatever sibling
    branch was there, so its ancestors are in place when it runs and each node costs one forward."""
    w = forward.prepare(model)
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, model.config.vocab_size, (context,), generator=g).to(w.device)
    tokens = torch.randint(0, model.config.vocab_size, (n,), generator=g).to(w.device)
    parents, depths = random_tree(random.Random(seed), n, max_depth)
    tree_cache = w.new_cache(context + n + 3)
    forward.prefill(w, prompt, tree_cache)
    single = w.new_cache(context + 2 * NEAR_DEPTH + 7)
    for a, b in zip(single.keys + single.values, tree_cache.keys + tree_cache.values, strict=True):
        a[:, :context] = b[:, :context]
    _, tree_logits = forward.extend(w, tokens, torch.tensor(depths), ancestor_mask(torch.tensor(parents)),
                                    tree_cache, context)
    kids: list[list[int]] = [[] for _ in range(n)]
    for i in range(1, n):
        kids[parents[i]].append(i)
    one_depth, one_anc = torch.zeros(1, dtype=torch.long), torch.ones(1, 1, dtype=torch.bool)
    bad, worst, stack = 0, 0.0, [0]
    while stack:
        node = stack.pop()
        _, logits = forward.extend(w, tokens[node:node + 1], one_depth, one_anc, single, context + depths[node])
        if not torch.equal(logits[0], tree_logits[node]):
            bad += 1
            worst = max(worst, (logits[0].float() - tree_logits[node].float()).abs().max().item())
        stack.extend(reversed(kids[node]))
    return {"context": context, "nodes": n, "depth": max(depths), "mismatches": bad, "max_diff": worst}


class ScriptedProposer:
    """Trees that hold the reference continuation a random number of levels deep (0 ... depth), among random decoys
    under random nodes: long accepted paths, rejections at every depth, compaction of scattered paths."""

    name = "scripted"

    def __init__(self, reference: list[int], vocab: int, size: int, depth: int, seed: int) -> None:
        self.reference, self.vocab, self.size, self.depth, self.seed = reference, vocab, size, depth, seed
        self.reset()

    def reset(self) -> None:
        self.emitted = 0
        self.rng = random.Random(self.seed)

    def propose(self, tokens: Tensor, hidden: Tensor, root: int) -> DraftTree:
        # First call: the prompt, and the root is the first emitted token; then each call brings the accepted path
        # (root included), and the tokens emitted since equal its length (the accepted drafts plus the new root).
        self.emitted = 1 if self.emitted == 0 else self.emitted + tokens.numel()
        truth = self.reference[self.emitted:self.emitted + self.rng.randint(0, self.depth)]
        toks, parents = [root, *truth], [-1, *range(len(truth))]
        depths = list(range(len(toks)))
        while len(toks) < self.size:
            p = self.rng.choice([i for i, d in enumerate(depths) if d < self.depth])
            toks.append(self.rng.randrange(self.vocab))
            parents.append(p)
            depths.append(depths[p] + 1)
        n = len(toks)
        return DraftTree(tokens=torch.tensor(toks), parents=torch.tensor(parents), logp=-torch.arange(n).float(),
                         entropy=torch.zeros(n))

    def observe(self, tree: DraftTree, accepted: list[int]) -> None:
        pass

    def diagnostics(self) -> dict[str, Any]:
        return {}


def lossless(model: Any, prompts: list[list[int]], reference: list[list[int]], label: str,
             make: Any, max_new_tokens: int, stop_ids: tuple[int, ...]) -> dict[str, Any]:
    """`make(i)`: the proposer for prompt i. Counts prompts whose greedy output differs from the autoregressive one."""
    bad, first, steps, tokens = 0, None, 0, 0
    for i, ids in enumerate(prompts):
        proposer: Proposer = make(i)
        g = generate(model, ids, proposer, GREEDY, max_new_tokens, stop_ids)
        steps += g.counters.steps - 1
        tokens += g.counters.new_tokens - 1
        if g.output_ids != reference[i]:
            bad += 1
            at = next((j for j, (a, b) in enumerate(zip(g.output_ids, reference[i], strict=False)) if a != b),
                      min(len(g.output_ids), len(reference[i])))
            first = at if first is None else min(first, at)
    return {"proposer": label, "prompts": len(prompts), "mismatches": bad, "first_diff": first,
            "tau": tokens / max(steps, 1)}


def header(device: torch.device, dtype: torch.dtype, tiny: bool, params: int) -> str:
    def version(p: str) -> str:
        try:
            return metadata.version(p)
        except metadata.PackageNotFoundError:
            return "?"

    return (f"# random {'tiny Llama' if tiny else 'Llama-3-8B-shaped'} target ({params / 1e6:.1f}M parameters) on "
            f"{device_name(device)} ({str(dtype).removeprefix('torch.')}, {torch.get_num_threads()} threads), torch "
            f"{version('torch')}, transformers {version('transformers')}, commit {git_commit()}")


def main(argv: list[str] | None = None) -> dict[str, list[dict[str, Any]]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a 3-layer hidden-256 model (CPU test of this script)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="rounds of (c), run pairs per prompt in (d)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sections", default="abcde", help="which of the sections a-e to run (default: all)")
    args = ap.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    start = time.perf_counter()

    def section(title: str) -> None:
        print(f"\n## {title}  [t = {time.perf_counter() - start:.0f} s]", flush=True)

    model = build_target(args.tiny, device, dtype, args.seed)
    config = model.config
    print(header(device, dtype, args.tiny, sum(p.numel() for p in model.parameters())), flush=True)
    stop_ids = (int(config.eos_token_id),)
    g = torch.Generator().manual_seed(args.seed)
    prompts = [torch.randint(3, config.vocab_size, (96 + 64 * i,), generator=g).tolist() for i in range(args.prompts)]
    out: dict[str, list[dict[str, Any]]] = {}

    if "a" in args.sections:
        section("a. Batch invariance: tree logits vs one-token forwards along each path (bit for bit)")
        out["invariance"] = [invariance(model, c, n, d, args.seed + i) for i, (c, n, d) in enumerate(INVARIANCE_CASES)]
        print(format_table(out["invariance"], [("context", "context"), ("nodes", "tree nodes"), ("depth", "depth"),
                                               ("mismatches", "mismatching nodes"), ("max_diff", "max |diff|")]))

    reference = [generate(model, ids, Autoregressive(), GREEDY, args.max_new_tokens, stop_ids).output_ids
                 for ids in prompts] if set("be") & set(args.sections) else []
    eagle = EagleProposer(random_drafter(config), model, TreeSettings(total_tokens=60, depth=5, top_k=10))
    if "b" in args.sections:
        section("b. Lossless: greedy speculative output vs autoregressive output")
        out["lossless"] = [
            lossless(model, prompts, reference, "EAGLE-2 60/5/10, random drafter", lambda i: eagle,
                     args.max_new_tokens, stop_ids),
            lossless(model, prompts, reference, "scripted trees 32 nodes, depth <= 12",
                     lambda i: ScriptedProposer(reference[i], config.vocab_size, 32, 12, args.seed + i),
                     args.max_new_tokens, stop_ids)]
        print(format_table(out["lossless"], [("proposer", "proposer"), ("prompts", "prompts"),
                                             ("mismatches", "prompts differing"),
                                             ("first_diff", "first differing token"), ("tau", "tokens/step")]))

    if "c" in args.sections:
        section("c. Verify cost vs tree tokens (context 300)")
        out["verify_cost"] = forward_cost(model, (prompts[-1] * 4)[:300], SIZES, args.repeats)
        print(format_table(out["verify_cost"], [("tokens", "tree tokens"), ("depth", "depth"), ("ms", "ms"),
                                                ("x_one", "x one token"), ("ci", "95% CI")]))

    if "d" in args.sections:
        section("d. Autoregressive engine vs transformers generate (greedy, random prompts)")
        rows = ar_vs_hf(model, prompts, args.max_new_tokens, stop_ids, args.repeats)
        out["ar"] = [*rows, ar_summary(rows)]
        print(format_table(out["ar"], AR_COLUMNS))
        mean_context = round(sum(len(p) for p in prompts) / len(prompts) + args.max_new_tokens / 2)
        decode = sorted(r["decode_tok_s"] for r in rows)[len(rows) // 2]
        out["bandwidth"] = bandwidth_rows(model, decode, mean_context, megabytes=64 if args.tiny else 1024)
        print(format_table(out["bandwidth"], [("what", "quantity"), ("value", "value")]))

    if "e" in args.sections:
        section("e. Engine overhead: (total - draft - verify) / total, prefill counted as overhead")
        out["overhead"] = [
            {"tree": "autoregressive",
             **step_split(model, Autoregressive(), prompts, args.max_new_tokens, stop_ids, reference)},
            {"tree": "EAGLE-2 60/5/10", **step_split(model, eagle, prompts, args.max_new_tokens, stop_ids, reference)}]
        print(format_table(out["overhead"], [*SPLIT_COLUMNS, ("other_total", "(total-draft-verify)/total %")]))
    if device.type == "cuda":
        print(f"\npeak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB; "
              f"total {time.perf_counter() - start:.0f} s")
    return out


if __name__ == "__main__":
    main()
