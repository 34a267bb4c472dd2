"""Speculative decoding end to end: lossless at temperature 0, full acceptance with an oracle, counters."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest
import torch
from conftest import tiny_target

from taps_bench.catalog.cards import TreeSettings
from taps_bench.decoding.eagle2 import EagleProposer
from taps_bench.decoding.engine import Counters, generate
from taps_bench.decoding.proposer import Autoregressive
from taps_bench.decoding.sampling import Sampling
from taps_bench.decoding.tree import DraftTree
from taps_bench.models.drafter import random_drafter

GREEDY = Sampling()
SHAPES = [TreeSettings(total_tokens=8, depth=3, top_k=2), TreeSettings(total_tokens=16, depth=4, top_k=4),
          TreeSettings(total_tokens=6, depth=5, top_k=1), TreeSettings(total_tokens=60, depth=5, top_k=10)]


pytestmark = pytest.mark.usefixtures("one_thread")


def random_prompt(seed: int, vocab: int, length: int = 9) -> list[int]:
    g = torch.Generator().manual_seed(2000 + seed)
    return torch.randint(3, vocab, (length,), generator=g).tolist()


def make_drafter(kind: str, config: Any, seed: int):
    if kind == "zero":  # predicts the same thing everywhere: a deliberately useless drafter
        drafter = random_drafter(config, seed)
        with torch.no_grad():
            for name, p in drafter.named_parameters():
                if not name.endswith("layernorm.weight"):
                    p.zero_()
        return drafter
    std = {"default": 0.02, "wide": 0.5, "huge": 10.0}[kind]
    return random_drafter(config, seed, std=std)


def check_counters(c: Counters, output_ids: list[int], max_new_tokens: int) -> None:
    verify_steps = len(c.accept_lengths)
    assert c.new_tokens == len(output_ids) <= max_new_tokens
    assert c.steps == 1 + verify_steps == 1 + len(c.tree_sizes)
    emitted = [a + 1 for a in c.accept_lengths]
    assert sum(emitted) + 1 >= c.new_tokens
    if verify_steps:
        assert sum(emitted[:-1]) + 1 < c.new_tokens  # the last verify step emitted at least one token
    assert all(0 <= a < size for a, size in zip(c.accept_lengths, c.tree_sizes, strict=True))
    # drafted_by_depth counts every non-root node; accepted_by_depth is a survival count over steps.
    assert sum(c.drafted_by_depth) == sum(c.tree_sizes) - verify_steps
    assert all(n >= 0 for n in c.drafted_by_depth)
    assert sum(c.accepted_by_depth) == sum(c.accept_lengths)
    assert all(a <= verify_steps for a in c.accepted_by_depth)
    assert all(a >= b for a, b in zip(c.accepted_by_depth, c.accepted_by_depth[1:], strict=False))
    assert len(c.accepted_by_depth) <= len(c.drafted_by_depth)
    assert all(a <= d for a, d in zip(c.accepted_by_depth, c.drafted_by_depth, strict=False))
    for d, n in enumerate(c.accepted_by_depth, start=1):
        assert n == sum(a >= d for a in c.accept_lengths)


# -- lossless greedy with EAGLE-2 trees over random drafters ---------------------------------------------------

# (family, seed, hidden, drafter kind): three seeds and two sizes per family, every drafter kind on both families.
CASES = [("llama", 0, 64, "default"), ("llama", 1, 32, "zero"), ("llama", 2, 64, "huge"),
         ("qwen3", 0, 32, "wide"), ("qwen3", 1, 64, "default"), ("qwen3", 2, 32, "huge"),
         ("llama", 3, 32, "wide"), ("qwen3", 3, 64, "zero")]


@pytest.mark.parametrize(("family", "seed", "hidden", "kind"), CASES)
def test_eagle_greedy_is_lossless(family, seed, hidden, kind):
    model = tiny_target(family, seed=seed, hidden=hidden)
    vocab = model.config.vocab_size
    drafter = make_drafter(kind, model.config, seed)
    stops = (model.config.eos_token_id if model.config.eos_token_id is not None else 2,)
    for p in range(2):
        prompt = random_prompt(10 * seed + p, vocab, length=4 + 5 * p)
        ar = generate(model, prompt, Autoregressive(), GREEDY, 20, stops)
        for shape in SHAPES:
            proposer = EagleProposer(drafter, model, shape)
            out = generate(model, prompt, proposer, GREEDY, 20, stops)
            assert out.output_ids == ar.output_ids, f"{shape} prompt {p}"
            assert out.counters.stop_reason == ar.counters.stop_reason
            check_counters(out.counters, out.output_ids, 20)
            assert max(out.counters.tree_sizes, default=1) <= shape.total_tokens
            assert len(out.counters.drafted_by_depth) <= shape.depth + 1


def test_a_proposer_can_be_reused_across_prompts():
    """reset() must clear the drafter's cache: a second prompt gives the same output as a fresh proposer."""
    model = tiny_target("llama", seed=5, hidden=32)
    drafter = random_drafter(model.config, 5, std=0.5)
    shape = TreeSettings(total_tokens=12, depth=3, top_k=3)
    shared = EagleProposer(drafter, model, shape)
    for p in range(3):
        prompt = random_prompt(50 + p, 97, length=3 + 4 * p)
        a = generate(model, prompt, shared, GREEDY, 16, ())
        b = generate(model, prompt, EagleProposer(drafter, model, shape), GREEDY, 16, ())
        assert a.output_ids == b.output_ids == generate(model, prompt, Autoregressive(), GREEDY, 16, ()).output_ids
        assert a.counters.accept_lengths == b.counters.accept_lengths


# -- an oracle proposer: full acceptance, exact tau ------------------------------------------------------------


class Oracle:
    """Knows the target's greedy continuation and proposes it.

    The tree's main chain is the next `length` true tokens. `layout` "chain" proposes only that; "decoys" puts, at
    every level, a wrong sibling (with its own wrong child) *before* the true node and with a better draft
    log-probability, so the accepted path is never the first branch and never contiguous. With `break_rate`, the
    chain turns wrong at a random depth (partial acceptance). It also records what the engine hands it, to check
    the proposer contract (tokens committed since the last call and their post-norm hidden states).
    """

    name = "oracle"

    def __init__(self, truth: list[int], prompt_len: int, length: int, vocab: int, layout: str = "chain",
                 break_rate: float = 0.0, seed: int = 0) -> None:
        self.truth, self.prompt_len, self.length, self.vocab = truth, prompt_len, length, vocab
        self.layout, self.break_rate, self.rng = layout, break_rate, random.Random(seed)
        self.reset()

    def reset(self) -> None:
        self.committed = 0
        self.seen_tokens: list[torch.Tensor] = []
        self.seen_hidden: list[torch.Tensor] = []
        self.roots: list[int] = []
        self.observed: list[list[int]] = []

    def wrong(self, token: int, k: int = 1) -> int:
        return (token + k) % self.vocab

    def propose(self, tokens: torch.Tensor, hidden: torch.Tensor, root: int) -> DraftTree:
        assert hidden.shape[0] == tokens.numel()
        self.seen_tokens.append(tokens.clone())
        self.seen_hidden.append(hidden.clone())
        self.roots.append(root)
        self.committed += tokens.numel()
        pos = self.committed - self.prompt_len  # index of `root` in the output
        assert self.truth[pos] == root, "the engine's state drifted from the greedy continuation"
        chain = list(self.truth[pos + 1: pos + 1 + self.length])
        if self.break_rate and self.rng.random() < self.break_rate and chain:
            j = self.rng.randrange(len(chain))
            chain[j] = self.wrong(chain[j], 3)
        tokens_, parents, logp = [root], [-1], [0.0]
        parent, score = 0, 0.0
        for tok in chain:
            if self.layout == "decoys":
                tokens_ += [self.wrong(tok), self.wrong(tok, 2)]  # decoy and its child
                parents += [parent, len(tokens_) - 2]
                logp += [score - 0.1, score - 0.2]
            tokens_.append(tok)
            parents.append(parent)
            score -= 0.5
            logp.append(score)
            parent = len(tokens_) - 1
        n = len(tokens_)
        return DraftTree(tokens=torch.tensor(tokens_), parents=torch.tensor(parents), logp=torch.tensor(logp),
                         entropy=torch.zeros(n))

    def observe(self, tree: DraftTree, accepted: list[int]) -> None:
        self.observed.append(list(accepted))

    def diagnostics(self) -> dict[str, Any]:
        return {"calls": len(self.roots)}


def greedy_truth(model, prompt: list[int], n: int, stops: tuple[int, ...] = ()) -> list[int]:
    return generate(model, prompt, Autoregressive(), GREEDY, n, stops).output_ids


def check_hidden_contract(model, prompt: list[int], output: list[int], oracle: Oracle) -> None:
    """Every call got exactly the tokens committed since the last one, with the target's post-norm hidden states."""
    tokens = torch.cat(oracle.seen_tokens).tolist()
    assert tokens[:len(prompt)] == prompt
    assert tokens[len(prompt):] == output[:len(tokens) - len(prompt)]
    for prev, cur in zip(oracle.seen_tokens[1:], oracle.roots[:-1], strict=True):
        assert int(prev[0]) == cur  # each call starts with the previous root
    with torch.inference_mode():
        full = model.model(input_ids=torch.tensor([tokens])).last_hidden_state[0]
    torch.testing.assert_close(torch.cat(oracle.seen_hidden), full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("family", "layout", "length", "max_new"),
                         [("llama", "chain", 4, 31), ("qwen3", "chain", 6, 26), ("llama", "decoys", 3, 29),
                          ("qwen3", "decoys", 5, 37), ("llama", "chain", 1, 12)])
def test_oracle_is_fully_accepted_with_maximal_tau(family, layout, length, max_new):
    model = tiny_target(family, seed=7, hidden=48)
    vocab = model.config.vocab_size
    prompt = random_prompt(70, vocab)
    truth = greedy_truth(model, prompt, max_new + length + 2)
    oracle = Oracle(truth, len(prompt), length, vocab, layout)
    out = generate(model, prompt, oracle, GREEDY, max_new, ())
    c = out.counters
    assert out.output_ids == truth[:max_new]
    assert c.stop_reason == "max_new_tokens"
    assert c.accept_lengths == [length] * len(c.accept_lengths)
    best_steps = 1 + math.ceil((max_new - 1) / (length + 1))
    assert c.steps == best_steps
    assert c.new_tokens / c.steps == pytest.approx(max_new / best_steps)
    per_level = 3 if layout == "decoys" else 1
    assert c.tree_sizes == [1 + per_level * length] * len(c.tree_sizes)
    assert c.accepted_by_depth == [c.steps - 1] * length
    # a decoy sits at its level and its child one level deeper: 2, 3, 3, ..., 3, 1 decoy-tree nodes per depth
    per_depth = [2] + [3] * (length - 1) + [1] if layout == "decoys" else [1] * length
    assert c.drafted_by_depth == [n * (c.steps - 1) for n in per_depth]
    if layout == "decoys":  # the accepted nodes are the third of every level: indices 3, 6, 9...
        assert all(path == [0, *range(3, 3 * length + 1, 3)] for path in oracle.observed)
    check_counters(c, out.output_ids, max_new)
    check_hidden_contract(model, prompt, out.output_ids, oracle)
    assert out.diagnostics == {"calls": c.steps - 1}


@pytest.mark.parametrize(("family", "layout", "seed"), [("llama", "chain", 0), ("qwen3", "decoys", 1),
                                                        ("llama", "decoys", 2), ("qwen3", "chain", 3)])
def test_partially_right_oracle_is_lossless(family, layout, seed):
    """Chains that break at random depths: partial, non-contiguous acceptance, still the greedy output."""
    model = tiny_target(family, seed=seed, hidden=32)
    prompt = random_prompt(80 + seed, 97, length=6)
    truth = greedy_truth(model, prompt, 60)
    oracle = Oracle(truth, len(prompt), 4, 97, layout, break_rate=0.7, seed=seed)
    out = generate(model, prompt, oracle, GREEDY, 48, ())
    assert out.output_ids == truth[:48]
    assert len(set(out.counters.accept_lengths)) > 2  # a mix of acceptance lengths was exercised
    check_counters(out.counters, out.output_ids, 48)
    check_hidden_contract(model, prompt, out.output_ids, oracle)


@pytest.mark.parametrize("layout", ["chain", "decoys"])
def test_stop_token_inside_an_accepted_path(layout):
    """The oracle keeps proposing past the stop token; the engine must cut the output right after it."""
    model = tiny_target("qwen3", seed=8, hidden=32)
    prompt = random_prompt(90, 97)
    free = greedy_truth(model, prompt, 40)
    stop = free[7]  # with chains of 4, output index 7 is a drafted token in the middle of the second tree
    expected = free[:free.index(stop) + 1]
    assert expected == greedy_truth(model, prompt, 30, (stop,))
    oracle = Oracle(free, len(prompt), 4, 97, layout)
    out = generate(model, prompt, oracle, GREEDY, 30, (stop,))
    assert out.output_ids == expected
    assert out.counters.stop_reason == "stop_token"
    check_counters(out.counters, out.output_ids, 30)


def test_eagle_counters_with_some_acceptance():
    """A wide random drafter on a small-vocabulary target gets some tokens accepted; the counters stay consistent."""
    model = tiny_target("llama", seed=9, vocab=12, hidden=32)
    drafter = random_drafter(model.config, 9, std=0.5)
    prompt = random_prompt(9, 12)
    ar = generate(model, prompt, Autoregressive(), GREEDY, 40, ())
    out = generate(model, prompt, EagleProposer(drafter, model, TreeSettings(total_tokens=10, depth=3, top_k=3)),
                   GREEDY, 40, ())
    assert out.output_ids == ar.output_ids
    assert sum(out.counters.accept_lengths) > 0
    check_counters(out.counters, out.output_ids, 40)
    assert ar.counters.steps == ar.counters.new_tokens == 40 and ar.counters.accept_lengths == [0] * 39


@pytest.mark.parametrize("max_context", [30, 37])
def test_lossless_up_to_the_context_limit(max_context):
    """Near the context limit a tree that does not fit must shrink, not end the answer early: plain decoding still
    has room for more tokens there, and the two arms must emit the same tokens."""
    model = tiny_target("llama", seed=0, hidden=32)
    prompt = random_prompt(0, 97, length=20)
    ar = generate(model, prompt, Autoregressive(), GREEDY, 50, (), max_context=max_context)
    assert ar.counters.stop_reason == "context" and len(ar.output_ids) == max_context - len(prompt) + 1
    proposer = EagleProposer(random_drafter(model.config, 0), model, TreeSettings(total_tokens=8, depth=3, top_k=2))
    out = generate(model, prompt, proposer, GREEDY, 50, (), max_context=max_context)
    assert out.output_ids == ar.output_ids
    assert out.counters.stop_reason == "context"


# -- the real target -------------------------------------------------------------------------------------------


def smollm_prompt(target, text: str) -> list[int]:
    from taps_bench.data.tasks import render_prompt

    rendered = render_prompt(target.tokenizer, target.card, [{"role": "user", "content": text}])
    return target.tokenizer(rendered, add_special_tokens=False)["input_ids"]


SMOLLM_PROMPTS = ["What is 17 times 23? Answer briefly.", "Write one sentence about the sea."]


@pytest.fixture(scope="module")
def smollm_ar(smollm):
    return {text: generate(smollm.model, smollm_prompt(smollm, text), Autoregressive(), GREEDY, 32,
                           smollm.stop_ids).output_ids for text in SMOLLM_PROMPTS}


@pytest.mark.smollm
@pytest.mark.parametrize(("text", "shape"), [(SMOLLM_PROMPTS[0], None),
                                             (SMOLLM_PROMPTS[1], TreeSettings(total_tokens=5, depth=3, top_k=1))])
def test_eagle_greedy_is_lossless_on_smollm(smollm, smollm_ar, text, shape):
    target = smollm
    proposer = EagleProposer(random_drafter(target.model.config), target.model, shape or target.card.fallback_tree)
    out = generate(target.model, smollm_prompt(target, text), proposer, GREEDY, 32, target.stop_ids)
    assert out.output_ids == smollm_ar[text]
    check_counters(out.counters, out.output_ids, 32)


@pytest.mark.smollm
@pytest.mark.parametrize("text", SMOLLM_PROMPTS)
def test_oracle_on_smollm(smollm, smollm_ar, text):
    target = smollm
    prompt = smollm_prompt(target, text)
    truth = smollm_ar[text]
    oracle = Oracle(truth, len(prompt), 4, target.model.config.vocab_size, "decoys")
    out = generate(target.model, prompt, oracle, GREEDY, 32, target.stop_ids)
    assert out.output_ids == truth
    c = out.counters
    assert all(a == 4 for a in c.accept_lengths[:-1])  # the last tree may reach past the end of the truth
    check_counters(c, out.output_ids, 32)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_bfloat16_draft_head_stays_lossless(family: str) -> None:
    """Drafting through a bfloat16 copy of the lm_head changes proposals only: the float32 target still decides."""
    model = tiny_target(family, seed=5, vocab=97, hidden=64)
    drafter = random_drafter(model.config, seed=2, std=0.3)
    for seed in range(3):
        prompt = random_prompt(seed, 97)
        base = generate(model, prompt, Autoregressive(), Sampling(), 40, ())
        spec = generate(model, prompt, EagleProposer(drafter, model, TreeSettings(total_tokens=12, depth=3, top_k=3),
                                                     head_dtype="bfloat16"), Sampling(), 40, ())
        assert spec.output_ids == base.output_ids
