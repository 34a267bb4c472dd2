"""Engine speed on this machine, as tables (ratios within one run; never a timed unit test).

  1. the target's forward time against the number of tree tokens (1 ... 128) over a fixed context;
  2. the autoregressive engine against transformers `generate` on the same prompts (goal: not slower);
  3. the time split of a speculative step: draft, verify, everything else (goal: everything else < 10 %).

Usage: TAPS_BENCH_DATA=../shared/data python bench/engine_speed.py [--target smollm2-135m-instruct] [--drafter D]
(--drafter: a drafter name or checkpoint directory; default: a random drafter of the right shape, which measures
the cost of a step, not acceptance).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import DynamicCache

from taps_bench.catalog.cards import TreeOverride
from taps_bench.catalog.registry import Registry
from taps_bench.data.tasks import load_examples, render_prompt, resolve_data_dir
from taps_bench.decoding.eagle2 import EagleProposer
from taps_bench.decoding.engine import generate, prefill, verify
from taps_bench.decoding.proposer import Autoregressive
from taps_bench.decoding.sampling import Sampling
from taps_bench.decoding.tree import DraftTree
from taps_bench.measure import provenance
from taps_bench.measure.resolve import load_for_target, tree_settings
from taps_bench.models.drafter import random_drafter
from taps_bench.models.targets import load_target
from taps_bench.results.report import format_table


def chain(n: int, token: int) -> DraftTree:
    return DraftTree(tokens=torch.full((n,), token), parents=torch.arange(-1, n - 1), logp=torch.zeros(n),
                     entropy=torch.zeros(n))


@torch.inference_mode()
def forward_cost(model, context: list[int], sizes: list[int], repeats: int) -> list[dict]:
    rows = []
    for n in sizes:
        times = []
        for _ in range(repeats):
            cache = DynamicCache(config=model.config)
            prefill(model, torch.tensor(context), cache)
            tree = chain(n, context[-1])
            t0 = time.perf_counter()
            verify(model, tree, cache, len(context))
            times.append(time.perf_counter() - t0)
        rows.append({"tokens": n, "ms": 1000 * statistics.median(times)})
    base = rows[0]["ms"]
    for r in rows:
        r["x_one_token"] = r["ms"] / base
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="smollm2-135m-instruct")
    ap.add_argument("--drafter", default=None)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    reg = Registry.load()
    target = load_target(reg.target(args.target))
    prov = provenance.collect(target)
    print(f"# {target.name} on {prov['device_name']} ({prov['dtype']}, {prov['threads']} threads), torch "
          f"{prov['versions']['torch']}, transformers {prov['versions']['transformers']}, commit {prov['git_commit']}")
    examples = load_examples(reg.task("gsm8k"), resolve_data_dir(None), args.prompts)
    prompts = [target.tokenizer(render_prompt(target.tokenizer, target.card, [{"role": "user", "content": e.turns[0]}]),
                                add_special_tokens=False).input_ids for e in examples]

    # 1. forward cost against tree size, over ~300 tokens of context (the first prompt, repeated)
    context = (prompts[0] * 4)[:300]
    rows = forward_cost(target.model, context, [1, 2, 4, 8, 16, 32, 60, 64, 128], args.repeats)
    print("\n## Target forward vs tree tokens (context 300, median of", args.repeats, "runs)")
    print(format_table(rows, [("tokens", "tree tokens"), ("ms", "ms"), ("x_one_token", "x one token")]))

    # 2. autoregressive engine vs generate, alternating to share the machine's noise
    greedy = Sampling()
    eng_tok = eng_s = hf_tok = hf_s = 0.0
    for ids in prompts:
        for _ in range(2):
            t0 = time.perf_counter()
            ref = target.model.generate(torch.tensor([ids]), max_new_tokens=args.max_new_tokens, do_sample=False,
                                        eos_token_id=list(target.stop_ids), pad_token_id=target.stop_ids[0])
            hf_s += time.perf_counter() - t0
            hf_tok += ref.shape[1] - len(ids)
            out = generate(target.model, ids, Autoregressive(), greedy, args.max_new_tokens, target.stop_ids)
            eng_s += out.counters.total_s
            eng_tok += out.counters.new_tokens
    print("\n## Autoregressive engine vs transformers generate (greedy, same prompts, alternated)")
    print(format_table([{"impl": "taps-bench engine", "tokens": eng_tok, "tok_s": eng_tok / eng_s},
                        {"impl": "transformers generate", "tokens": hf_tok, "tok_s": hf_tok / hf_s}],
                       [("impl", "implementation"), ("tokens", "tokens"), ("tok_s", "tok/s")]))
    print(f"engine / generate: {(eng_tok / eng_s) / (hf_tok / hf_s):.3f}")

    # 3. time split of a speculative step
    print("\n## Speculative step time split")
    split_rows = []
    for label, shape in [("card default", TreeOverride()),
                         ("paper 60/5/10", TreeOverride(total_tokens=60, depth=5, top_k=10)),
                         ("chain 6", TreeOverride(total_tokens=6, depth=5, top_k=1))]:
        tree = tree_settings(target, shape)
        drafter = (load_for_target(reg, args.drafter, target).drafter if args.drafter
                   else random_drafter(target.model.config))
        proposer = EagleProposer(drafter, target.model, tree, head_dtype=target.card.draft_head_dtype)
        tot = {"draft": 0.0, "verify": 0.0, "prefill": 0.0, "total": 0.0, "steps": 0, "tokens": 0}
        for ids in prompts:
            c = generate(target.model, ids, proposer, greedy, args.max_new_tokens, target.stop_ids).counters
            tot["draft"] += c.draft_s
            tot["verify"] += c.verify_s
            tot["prefill"] += c.prefill_s
            tot["total"] += c.total_s
            tot["steps"] += len(c.accept_lengths)
            tot["tokens"] += c.new_tokens
        step_total = tot["total"] - tot["prefill"]
        other = step_total - tot["draft"] - tot["verify"]
        split_rows.append({"tree": f"{label} ({tree.total_tokens}/{tree.depth}/{tree.top_k})",
                           "ms_step": 1000 * step_total / tot["steps"],
                           "draft": 100 * tot["draft"] / step_total, "verify": 100 * tot["verify"] / step_total,
                           "other": 100 * other / step_total, "tau": tot["tokens"] / (tot["steps"] + len(prompts))})
    print(format_table(split_rows, [("tree", "tree"), ("ms_step", "ms/step"), ("draft", "draft %"),
                                    ("verify", "verify %"), ("other", "other %"), ("tau", "tau")]))


if __name__ == "__main__":
    main()
