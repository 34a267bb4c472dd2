"""The decoding engine: plain decoding against `transformers.generate`, the tree mask, cache compaction, greedy
acceptance."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_target

from taps_bench.decoding.engine import accept_greedy, compact, generate, new_cache, prefill, verify
from taps_bench.decoding.proposer import Autoregressive
from taps_bench.decoding.sampling import Sampling
from taps_bench.decoding.tree import DraftTree, path_to
from taps_bench.models.attention import Cache
from taps_bench.models.forward import prepare

TASKS = ("mt-bench", "gsm8k", "math500", "svamp")


pytestmark = pytest.mark.usefixtures("one_thread")


def random_prompt(seed: int, vocab: int, length: int = 9) -> list[int]:
    g = torch.Generator().manual_seed(1000 + seed)
    return torch.randint(3, vocab, (length,), generator=g).tolist()


def hf_greedy(model, prompt: list[int], max_new_tokens: int, stop_ids: list[int]) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
                         eos_token_id=stop_ids, pad_token_id=stop_ids[0])
    return out[0, len(prompt):].tolist()


def tree(tokens: list[int], parents: list[int], logp: list[float] | None = None) -> DraftTree:
    n = len(tokens)
    lp = torch.tensor(logp if logp is not None else [-float(i) for i in range(n)])
    return DraftTree(tokens=torch.tensor(tokens), parents=torch.tensor(parents), logp=lp, entropy=torch.zeros(n))


# -- plain decoding equals transformers' greedy generate -------------------------------------------------------

CASES = [("llama", 0, 64), ("llama", 1, 32), ("llama", 2, 96), ("qwen3", 0, 64), ("qwen3", 1, 32), ("qwen3", 2, 96)]


@pytest.mark.parametrize(("family", "seed", "hidden"), CASES)
def test_autoregressive_equals_hf_generate(family, seed, hidden):
    model = tiny_target(family, seed=seed, hidden=hidden)
    vocab = model.config.vocab_size
    eos = model.config.eos_token_id
    eos = eos if eos is not None else 2  # Qwen3Config declares none
    for p in range(2):
        prompt = random_prompt(seed * 10 + p, vocab, length=5 + 4 * p)
        ours = generate(model, prompt, Autoregressive(), Sampling(), 20, (eos,))
        assert ours.output_ids == hf_greedy(model, prompt, 20, [eos])
        # A stop id that does occur in the greedy continuation: both stop there, the stop token included.
        free = generate(model, prompt, Autoregressive(), Sampling(), 20, ()).output_ids
        stop = free[6]
        ours = generate(model, prompt, Autoregressive(), Sampling(), 20, (stop,))
        expected = hf_greedy(model, prompt, 20, [stop])
        assert ours.output_ids == expected == free[:free.index(stop) + 1]
        assert ours.counters.stop_reason == "stop_token"
        assert ours.counters.new_tokens == len(ours.output_ids) == ours.counters.steps


def test_autoregressive_max_new_tokens_one():
    model = tiny_target("llama", seed=3, hidden=32)
    prompt = random_prompt(3, 97)
    out = generate(model, prompt, Autoregressive(), Sampling(), 1, ())
    assert out.output_ids == hf_greedy(model, prompt, 1, [0])
    assert out.counters.steps == 1 and out.counters.stop_reason == "max_new_tokens"


@pytest.mark.smollm
@pytest.mark.parametrize("task", TASKS)
def test_autoregressive_equals_hf_generate_on_smollm(smollm, data_dir, task):
    from taps_bench.catalog.registry import Registry
    from taps_bench.data.tasks import load_examples, render_prompt

    target = smollm
    example = load_examples(Registry.load().task(task), data_dir, limit=1)[0]
    text = render_prompt(target.tokenizer, target.card, [{"role": "user", "content": example.turns[0]}])
    prompt = target.tokenizer(text, add_special_tokens=False)["input_ids"]
    ours = generate(target.model, prompt, Autoregressive(), Sampling(), 24, target.stop_ids)
    assert ours.output_ids == hf_greedy(target.model, prompt, 24, list(target.stop_ids))
    assert len(ours.output_ids) == 24 or ours.output_ids[-1] in target.stop_ids


# -- the 4D tree mask ------------------------------------------------------------------------------------------

#          0
#        /   \
#       1     2
#      / \     \
#     3   4     5
#     |        / \
#     6       7   8
PARENTS = [-1, 0, 0, 1, 1, 2, 3, 5, 5]


def sequential_logits(model, prompt: list[int], path_tokens: list[int]) -> torch.Tensor:
    """Logits after the last of `path_tokens`, fed one at a time after the prompt through a plain causal cache."""
    with torch.inference_mode():
        return model(input_ids=torch.tensor([prompt + path_tokens])).logits[0, -1]


def verify_fresh(model, prompt: list[int], t: DraftTree) -> tuple[torch.Tensor, Cache]:
    weights = prepare(model)
    cache = new_cache(weights, 64)
    with torch.inference_mode():
        prefill(weights, torch.tensor(prompt), cache)
        _, logits = verify(weights, t, cache, len(prompt))
    return logits, cache


@pytest.mark.parametrize(("family", "seed"), [("llama", 0), ("qwen3", 1)])
def test_verify_honours_the_tree_mask(family, seed):
    """Every node is scored as if its path alone followed the prompt (against the transformers forward)."""
    model = tiny_target(family, seed=seed)
    prompt = random_prompt(seed, 97, length=7)
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, 97, (len(PARENTS),), generator=g).tolist()
    t = tree(tokens, PARENTS)
    logits, _cache = verify_fresh(model, prompt, t)
    assert logits.shape == (len(PARENTS), 97)
    for node in range(len(PARENTS)):
        path = path_to(t, node)
        expected = sequential_logits(model, prompt, [tokens[i] for i in path])
        torch.testing.assert_close(logits[node], expected, atol=1e-4, rtol=1e-4, msg=f"node {node} path {path}")


@pytest.mark.parametrize(("family", "seed"), [("llama", 2), ("qwen3", 3)])
def test_siblings_and_cousins_do_not_leak(family, seed):
    model = tiny_target(family, seed=seed)
    prompt = random_prompt(seed, 97, length=6)
    tokens = [11, 12, 13, 14, 15, 16, 17, 18, 19]
    base, _ = verify_fresh(model, prompt, tree(tokens, PARENTS))
    # Change node 4 (sibling of 3, uncle of 6) and node 2 (root of the other subtree): nodes 0, 1, 3 and 6 see none
    # of them, so their logits must not move; nodes under the changed ones must.
    changed = list(tokens)
    changed[4], changed[2] = 40, 50
    other, _ = verify_fresh(model, prompt, tree(changed, PARENTS))
    for node in (0, 1, 3, 6):
        torch.testing.assert_close(other[node], base[node], atol=1e-5, rtol=0, msg=f"node {node} saw a non-ancestor")
    for node in (2, 4, 5, 7, 8):
        assert not torch.allclose(other[node], base[node], atol=1e-3), f"node {node} ignores its own path"


# -- compaction ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("family", "path"), [("llama", [0, 2, 5, 7]), ("qwen3", [0, 1, 4]), ("llama", [0, 1, 3]),
                                              ("qwen3", [0])])
def test_compact_keeps_context_and_accepted_path(family, path):
    model = tiny_target(family, seed=4)
    prompt = random_prompt(4, 97, length=8)
    tokens = [21, 22, 23, 24, 25, 26, 27, 28, 29]
    t = tree(tokens, PARENTS)
    assert path_to(t, path[-1]) == path
    _, cache = verify_fresh(model, prompt, t)
    committed = prompt + [tokens[i] for i in path]
    weights = prepare(model)
    ref = new_cache(weights, 64)
    nxt = tree([31, 32], [-1, 0])
    with torch.inference_mode():
        compact(cache, len(prompt), path)
        prefill(weights, torch.tensor(committed), ref)
        n = len(committed)
        for a, b in zip(cache.keys + cache.values, ref.keys + ref.values, strict=True):
            torch.testing.assert_close(a[:, :n], b[:, :n], atol=1e-5, rtol=1e-5)
        _, got = verify(weights, nxt, cache, n)
        _, want = verify(weights, nxt, ref, n)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[-1], sequential_logits(model, committed, [31, 32]), atol=1e-4, rtol=1e-4)


def test_compact_then_verify_again_matches_sequential():
    """Two verify + compact rounds with non-contiguous paths, then a third tree: still the sequential logits."""
    model = tiny_target("qwen3", seed=5, hidden=32)
    prompt = random_prompt(5, 97, length=5)
    weights = prepare(model)
    cache = new_cache(weights, 64)
    committed = list(prompt)
    with torch.inference_mode():
        prefill(weights, torch.tensor(prompt), cache)
        for round_, path in enumerate(([0, 2, 5, 8], [0, 1, 3, 6])):
            tokens = [40 + 9 * round_ + i for i in range(len(PARENTS))]
            t = tree(tokens, PARENTS)
            verify(weights, t, cache, len(committed))
            compact(cache, len(committed), path)
            committed += [tokens[i] for i in path]
        tokens = [5, 6, 7, 8, 9, 10, 11, 12, 13]
        _, logits = verify(weights, tree(tokens, PARENTS), cache, len(committed))
    for node in (0, 4, 8):
        expected = sequential_logits(model, committed, [tokens[i] for i in path_to(tree(tokens, PARENTS), node)])
        torch.testing.assert_close(logits[node], expected, atol=1e-4, rtol=1e-4)


# -- greedy acceptance -----------------------------------------------------------------------------------------


def logits_with_argmax(best: list[int], vocab: int = 16) -> torch.Tensor:
    logits = torch.zeros(len(best), vocab)
    logits[torch.arange(len(best)), torch.tensor(best)] = 5.0
    return logits


def test_accept_greedy_follows_the_argmax_path():
    #          0(r)
    #        /     \
    #      1:5     2:7
    #       |       |
    #      3:1     4:3
    #               |
    #              5:9
    t = tree([4, 5, 7, 1, 3, 9], [-1, 0, 0, 1, 2, 4])
    acc = accept_greedy(t, logits_with_argmax([7, 1, 3, 0, 9, 4]))
    assert acc.path == [0, 2, 4, 5] and acc.next_token == 4  # the full second branch plus the leaf's bonus


def test_accept_greedy_nothing_matches():
    t = tree([4, 5, 7, 1], [-1, 0, 0, 1])
    acc = accept_greedy(t, logits_with_argmax([8, 5, 5, 5]))
    assert acc.path == [0] and acc.next_token == 8


def test_accept_greedy_stops_at_first_mismatch():
    t = tree([4, 5, 6, 7], [-1, 0, 1, 2])  # a chain
    acc = accept_greedy(t, logits_with_argmax([5, 6, 9, 2]))
    assert acc.path == [0, 1, 2] and acc.next_token == 9


def test_accept_greedy_prefers_the_deeper_branch_when_the_first_one_matches_shallower():
    # Two children carry the target's token (a merged tree can do that); only the second one's child matches too.
    #          0
    #        /   \
    #      1:7   2:7
    #       |     |
    #      3:8   4:3
    t = tree([4, 7, 7, 8, 3], [-1, 0, 0, 1, 2])
    acc = accept_greedy(t, logits_with_argmax([7, 2, 3, 0, 11]))
    assert acc.path == [0, 2, 4] and acc.next_token == 11


def test_accept_greedy_does_not_accept_a_match_under_a_rejected_parent():
    # Node 3's token equals its parent's argmax, but node 1 itself is rejected.
    t = tree([4, 5, 6, 9], [-1, 0, 0, 1])
    acc = accept_greedy(t, logits_with_argmax([6, 9, 1, 0]))
    assert acc.path == [0, 2] and acc.next_token == 1
