"""The decoding forward: equal to the transformers forward (to rounding), and batch-invariant bit for bit.

Batch invariance is the property that makes greedy speculative decoding exact: a node verified inside a tree gets
exactly the logits a one-token forward gives at its position once its ancestors are committed, whatever the tree's
size and shape, the context length, the dtype or the cache's capacity.
"""

from __future__ import annotations

import random

import pytest
import torch
from conftest import tiny_target

from taps_bench.decoding.tree import ancestor_mask
from taps_bench.models.attention import NEAR_DEPTH, Cache
from taps_bench.models.forward import Linear, native_bf16, packing_available, prefill, prepare
from taps_bench.models.forward import extend as extend_

pytestmark = pytest.mark.usefixtures("one_thread")
ONE_DEPTH, ONE_ANCESTOR = torch.zeros(1, dtype=torch.long), torch.ones(1, 1, dtype=torch.bool)


def clone(cache: Cache) -> Cache:
    return Cache([k.clone() for k in cache.keys], [v.clone() for v in cache.values])


def random_tree(rng: random.Random, n: int, max_depth: int) -> tuple[list[int], list[int]]:
    """Parents (parents precede children) and depths of a random tree of n nodes no deeper than max_depth."""
    parents, depths = [-1], [0]
    for i in range(1, n):
        choices = [j for j in range(i) if depths[j] < max_depth]
        parents.append(rng.choice(choices[-4:] if rng.random() < 0.5 else choices))
        depths.append(depths[parents[-1]] + 1)
    return parents, depths


def path_of(parents: list[int], node: int) -> list[int]:
    path = [node]
    while parents[path[-1]] >= 0:
        path.append(parents[path[-1]])
    return path[::-1]


def assert_tree_equals_single_steps(model, context: int, n: int, max_depth: int, seed: int) -> None:
    w = prepare(model)
    vocab = model.config.vocab_size
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab, (context,), generator=g)
    tokens = torch.randint(0, vocab, (n,), generator=g)
    parents, depths = random_tree(rng, n, max_depth)
    with torch.inference_mode():
        committed = w.new_cache(context + n + 3)
        prefill(w, prompt, committed)
        tree_cache = clone(committed)
        _, tree_logits = extend_(w, tokens, torch.tensor(depths), ancestor_mask(torch.tensor(parents)), tree_cache,
                                 context)
        for node in range(n):
            # A cache of another capacity: the capacity must not change a number either.
            single = w.new_cache(context + 2 * NEAR_DEPTH + 7)
            for a, b in zip(single.keys + single.values, committed.keys + committed.values, strict=True):
                a[:, :context] = b[:, :context]
            for step, i in enumerate(path_of(parents, node)):
                _, logits = extend_(w, tokens[i:i + 1], ONE_DEPTH, ONE_ANCESTOR, single, context + step)
            assert torch.equal(logits[0], tree_logits[node]), (
                f"node {node} (depth {depths[node]}, context {context}, tree of {n}): tree logits differ from the "
                f"one-token forward by {(logits[0] - tree_logits[node]).abs().max().item():.3g}")


SHAPES = [  # (family, heads, kv_heads): head_dim 64, GQA groups of 1, 2 and 3 (SmolLM2 has 3)
    ("llama", 4, 2), ("qwen3", 4, 2), ("llama", 6, 2), ("qwen3", 4, 4)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("family", "heads", "kv_heads"), SHAPES)
def test_tree_logits_equal_single_token_logits_bit_for_bit(family, heads, kv_heads, dtype):
    model = tiny_target(family, seed=heads + kv_heads, vocab=300, hidden=64 * heads, layers=2, heads=heads,
                        kv_heads=kv_heads).to(dtype)
    # Contexts below, at and across the attention's far-block boundaries; chains, bushes and the deepest trees.
    for context, n, depth, seed in ((1, 5, 4, 0), (17, 24, 3, 1), (47, 16, NEAR_DEPTH, 2), (200, 33, 6, 3)):
        assert_tree_equals_single_steps(model, context, n, depth, seed)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_forward_matches_transformers(family):
    model = tiny_target(family, seed=3, vocab=300, hidden=128, heads=2, kv_heads=1)
    w = prepare(model)
    ids = torch.randint(0, 300, (40,), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = model(ids[None]).logits[0]
        cache = w.new_cache(64)
        hidden, last = prefill(w, ids[:30], cache)
        assert hidden.shape == (30, 128)
        torch.testing.assert_close(last, want[29], atol=1e-4, rtol=1e-4)
        for t in range(30, 40):
            _, logits = extend_(w, ids[t:t + 1], ONE_DEPTH, ONE_ANCESTOR, cache, t)
            torch.testing.assert_close(logits[0], want[t], atol=1e-4, rtol=1e-4)


def test_tree_deeper_than_the_attention_window_is_refused():
    model = tiny_target("llama", seed=0)
    w = prepare(model)
    n = NEAR_DEPTH + 2
    with torch.inference_mode():
        cache = w.new_cache(64)
        prefill(w, torch.tensor([1, 2, 3]), cache)
        with pytest.raises(ValueError, match="depth"):
            extend_(w, torch.arange(n), torch.arange(n), ancestor_mask(torch.tensor([-1, *range(n - 1)])), cache, 3)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")
# Inner sizes of the targets' projections (SmolLM2's MLP down projection reads 1536): on an AVX-512 Xeon, oneDNN
# computes a single row with K > 1024 by another kernel than two or more rows, which rounds differently.
@pytest.mark.parametrize(("out_features", "in_features"), [(96, 80), (576, 1536), (64, 4096)])
def test_prepacked_linear_is_available_and_row_invariant(out_features: int, in_features: int):
    """oneDNN's pre-packed linear is a private torch API (pinned with torch in pyproject): the speed of the CPU engine
    rests on it, so its absence is a failure here, not a silent fallback. A row's result must not depend on how many
    rows are computed with it, one row included."""
    assert packing_available(torch.float32), "torch.ops.mkldnn._reorder_linear_weight/_linear_pointwise no longer work"
    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(out_features, in_features, generator=g) * 0.05, torch.randn(out_features, generator=g)
    lin = Linear(weight, bias)
    assert lin.packed is not None
    x = torch.randn(64, in_features, generator=g)
    full = lin(x)
    torch.testing.assert_close(full, x @ weight.T + bias, atol=1e-4, rtol=1e-4)
    for rows in (1, 2, 3, 7, 8, 16, 33):
        assert torch.equal(lin(x[:rows]), full[:rows]), f"{rows} rows"


def test_bfloat16_draft_head_is_packed_where_the_cpu_has_bf16_units():
    """The draft head's speed on CPU: bf16 weights packed for the bf16 kernel (not row-invariant on AMX CPUs, which
    only proposals see), never where bf16 is emulated."""
    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(576, 1536, generator=g) * 0.05).bfloat16()
    lin = Linear(weight, exact=False)
    if not native_bf16():
        assert lin.packed is None or lin.upcast
        return
    assert packing_available(torch.bfloat16) and lin.packed is not None and not lin.upcast
    x = torch.randn(16, 1536, generator=g).bfloat16()
    torch.testing.assert_close(lin(x).float(), x.float() @ weight.float().T, atol=2e-2, rtol=2e-2)
    assert torch.equal(lin(x), lin(x))


@pytest.mark.parametrize(("out_features", "in_features"), [(576, 1536), (1536, 576), (64, 96)])
def test_bfloat16_weights_of_the_target_are_row_invariant(out_features: int, in_features: int):
    """bf16 kernels switch with the row count on AMX CPUs (576x1536: rows 33 to ~512 against 700 rows), so the
    target's bf16 weights are computed by the fp32 packed kernel: bf16 in, bf16 out, the same bits at any row count
    up to the longest prompt chunk."""
    g = torch.Generator().manual_seed(1)
    weight = (torch.randn(out_features, in_features, generator=g) * 0.05).bfloat16()
    lin = Linear(weight)
    assert lin.upcast and lin.packed is not None
    x = torch.randn(700, in_features, generator=g).bfloat16()
    full = lin(x)
    assert full.dtype == torch.bfloat16
    torch.testing.assert_close(full.float(), x.float() @ weight.float().T, atol=1e-2, rtol=1e-2)
    counts = (*range(1, 41), 64, 100, 129, 160, 256, 300, 513)
    bad = [rows for rows in counts if not torch.equal(lin(x[:rows]), full[:rows])]
    assert bad == []


def test_unsupported_architecture_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    from taps_bench.errors import UserError

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(UserError, match="GPT2LMHeadModel is not supported"):
        prepare(model)


def test_real_target_tree_equals_single_steps(smollm):
    """SmolLM2-135M (9 heads over 3 KV heads, head_dim 64), a 16-node tree after 300 tokens of context."""
    assert_tree_equals_single_steps(smollm.model, 300, 16, 6, seed=7)


def test_real_target_tree_equals_single_steps_in_bfloat16(shared_home, monkeypatch):
    """The same in bfloat16, the dtype whose products round their output: a kernel that sums in another order for
    one row than for a tree shows only where that flips a bf16 rounding, which a small random probe rarely meets and
    30 layers of SmolLM2 over 16 nodes do."""
    from taps_bench.catalog.registry import Registry
    from taps_bench.models.targets import load_target

    monkeypatch.setenv("TAPS_BENCH_HOME", str(shared_home))
    target = load_target(Registry.load().target("smollm2-135m-instruct"), dtype="bfloat16")
    assert_tree_equals_single_steps(target.model, 300, 16, 6, seed=7)
