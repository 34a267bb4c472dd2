"""Combiners: lossless at temperature 0, degenerate cases equal one drafter, a merged tree never accepts less than its
subtrees, routing follows its definition, diagnostics add up, weight averaging and the oracle compute what they say,
and `run --combiner` works end to end and refuses bad input in one line."""

from __future__ import annotations

import json
import random
import zlib
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from conftest import DATA, tiny_target
from test_speculative import check_counters

from taps_bench.catalog.cards import TargetCard, TreeSettings
from taps_bench.catalog.proposers import ProposerSpec
from taps_bench.catalog.registry import Registry
from taps_bench.cli import main
from taps_bench.decoding.combiners import (
    Confidence,
    Entropy,
    MergedTree,
    NodeStats,
    Routed,
    average_weights,
    merge_trees,
    tree_confidence,
    tree_entropy,
)
from taps_bench.decoding.eagle2 import EagleProposer
from taps_bench.decoding.engine import Counters, accept_greedy, generate
from taps_bench.decoding.proposer import Autoregressive
from taps_bench.decoding.sampling import Sampling
from taps_bench.decoding.tree import DraftTree, ancestor_mask, path_to
from taps_bench.errors import UserError
from taps_bench.measure.resolve import build_proposer
from taps_bench.models.drafter import Drafter, random_drafter, save_drafter
from taps_bench.results.oracle import oracle_samples

GREEDY = Sampling()
SHAPES = [TreeSettings(total_tokens=8, depth=3, top_k=2), TreeSettings(total_tokens=12, depth=4, top_k=3),
          TreeSettings(total_tokens=5, depth=4, top_k=1)]
KINDS = ["confidence-step", "confidence-prompt", "entropy-step", "entropy-prompt", "merged-full", "merged-equal",
         "average"]
TIMINGS = ("prefill_s", "draft_s", "verify_s", "total_s")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models are all overhead: one thread is faster than two on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_prompt(seed: int, vocab: int, length: int = 9) -> list[int]:
    g = torch.Generator().manual_seed(3000 + seed)
    return torch.randint(3, vocab, (length,), generator=g).tolist()


def make_combiner(kind: str, drafters: list[tuple[str, Drafter]], model: Any, shape: TreeSettings) -> Any:
    if kind == "average":
        return EagleProposer(average_weights(drafters[0][1], drafters[1][1], 0.3), model, shape, name="average")
    family, how = kind.split("-")
    if family == "merged":
        return MergedTree(drafters, model, shape, budget=how)
    return {"confidence": Confidence, "entropy": Entropy}[family](drafters, model, shape, granularity=how)


def counters_without_timings(c: Counters) -> dict[str, Any]:
    return {k: v for k, v in asdict(c).items() if k not in TIMINGS}


def tap(proposer: Any) -> list[tuple[list[int], int, DraftTree]]:
    """Record, in place, every call to `proposer.propose`: (committed tokens, root, returned tree)."""
    log: list[tuple[list[int], int, DraftTree]] = []
    inner = proposer.propose

    def propose(tokens: torch.Tensor, hidden: torch.Tensor, root: int) -> DraftTree:
        tree = inner(tokens, hidden, root)
        log.append((tokens.tolist(), root, tree))
        return tree

    proposer.propose = propose
    return log


def tap_observe(proposer: Any) -> list[tuple[DraftTree, list[int]]]:
    """Record, in place, every (tree, accepted path) the engine reports to `proposer.observe`."""
    log: list[tuple[DraftTree, list[int]]] = []
    inner = proposer.observe

    def observe(tree: DraftTree, accepted: list[int]) -> None:
        log.append((tree, list(accepted)))
        inner(tree, accepted)

    proposer.observe = observe
    return log


class Favourite(Routed):
    """Routes to one fixed drafter: its tree scores 1, every other tree 0 (identified by the tree object itself)."""

    combiner_name = "favourite"

    def __init__(self, drafters: list[tuple[str, Drafter]], target_model: Any, tree: TreeSettings,
                 granularity: str = "step", favourite: int = 0) -> None:
        super().__init__(drafters, target_model, tree, granularity)
        self.log = tap(self.proposers[favourite])

    def score(self, tree: DraftTree) -> float:
        return 1.0 if self.log and tree is self.log[-1][2] else 0.0


# -- lossless at T=0 --------------------------------------------------------------------------------------------

# (family, seed, vocab, hidden): a small vocabulary gets random drafters some acceptance, a large one little.
TARGETS = [("llama", 0, 16, 32), ("qwen3", 1, 97, 32), ("llama", 2, 97, 64), ("qwen3", 3, 16, 64)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("family", "seed", "vocab", "hidden"), TARGETS[:2])
def test_every_combiner_is_lossless(family, seed, vocab, hidden, kind):
    model = tiny_target(family, seed=seed, vocab=vocab, hidden=hidden)
    drafters = [("a", random_drafter(model.config, 10 + seed, std=0.5)),
                ("b", random_drafter(model.config, 20 + seed, std=0.2))]
    accepted = 0
    for p in range(2):
        prompt = random_prompt(10 * seed + p, vocab, length=4 + 5 * p)
        ar = generate(model, prompt, Autoregressive(), GREEDY, 20, ())
        for shape in SHAPES[:2]:
            out = generate(model, prompt, make_combiner(kind, drafters, model, shape), GREEDY, 20, ())
            assert out.output_ids == ar.output_ids, f"{kind} {shape} prompt {p}"
            assert out.counters.stop_reason == ar.counters.stop_reason
            check_counters(out.counters, out.output_ids, 20)
            per_drafter = shape.total_tokens
            if kind == "merged-full":
                per_drafter = 1 + len(drafters) * (shape.total_tokens - 1)
            assert max(out.counters.tree_sizes) <= per_drafter
            accepted += sum(out.counters.accept_lengths)
    if vocab == 16:
        assert accepted > 0  # acceptance (and so non-trivial cache compaction) was exercised


@pytest.mark.parametrize("kind", ["confidence-step", "entropy-prompt", "merged-full", "merged-equal"])
@pytest.mark.parametrize(("family", "seed", "vocab", "hidden"), TARGETS[2:])
def test_three_drafters_are_lossless(family, seed, vocab, hidden, kind):
    model = tiny_target(family, seed=seed, vocab=vocab, hidden=hidden)
    drafters = [(n, random_drafter(model.config, s, std=std)) for n, s, std in
                [("a", 1, 0.5), ("b", 2, 0.3), ("c", 3, 10.0)]]
    prompt = random_prompt(seed, vocab)
    ar = generate(model, prompt, Autoregressive(), GREEDY, 24, ())
    for shape in (SHAPES[0], SHAPES[2]):
        out = generate(model, prompt, make_combiner(kind, drafters, model, shape), GREEDY, 24, ())
        assert out.output_ids == ar.output_ids, f"{kind} {shape}"
        check_counters(out.counters, out.output_ids, 24)
        if kind == "merged-equal":  # the drafted nodes are split: 7 -> 2 + 2 + 2 (8/3/2), 4 -> 2 + 2 + 2 (at least 1)
            assert max(out.counters.tree_sizes) <= max(shape.total_tokens, 1 + len(drafters))


def test_combiners_stop_on_a_stop_token_like_plain_decoding():
    model = tiny_target("qwen3", seed=4, vocab=16, hidden=32)
    drafters = [("a", random_drafter(model.config, 1, std=0.5)), ("b", random_drafter(model.config, 2, std=0.5))]
    prompt = random_prompt(4, 16)
    free = generate(model, prompt, Autoregressive(), GREEDY, 30, ()).output_ids
    stop = free[9]
    ar = generate(model, prompt, Autoregressive(), GREEDY, 30, (stop,))
    assert ar.counters.stop_reason == "stop_token"
    for kind in KINDS:
        out = generate(model, prompt, make_combiner(kind, drafters, model, SHAPES[1]), GREEDY, 30, (stop,))
        assert out.output_ids == ar.output_ids, kind
        assert out.counters.stop_reason == "stop_token"


# -- degenerate cases equal a single drafter --------------------------------------------------------------------


def test_average_with_alpha_one_or_zero_is_exactly_one_drafter():
    model = tiny_target("llama", seed=5, vocab=16, hidden=32)
    a, b = random_drafter(model.config, 1, std=0.5), random_drafter(model.config, 2, std=0.5)
    shape = SHAPES[1]
    prompt = random_prompt(5, 16)
    for alpha, kept in ((1.0, a), (0.0, b), (1, a), (0, b)):
        merged = average_weights(a, b, alpha)
        mine, theirs = merged.state_for_saving(), kept.state_for_saving()
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(mine[k], theirs[k]) for k in mine), alpha
        got = generate(model, prompt, EagleProposer(merged, model, shape), GREEDY, 24, ())
        want = generate(model, prompt, EagleProposer(kept, model, shape), GREEDY, 24, ())
        assert got.output_ids == want.output_ids
        assert counters_without_timings(got.counters) == counters_without_timings(want.counters)
    assert sum(want.counters.accept_lengths) > 0  # the comparison covers accepted drafts, not only rejections


def test_average_is_the_parameterwise_mix():
    config = tiny_target("qwen3", seed=0, hidden=32).config
    a, b = random_drafter(config, 1), random_drafter(config, 2)
    merged = average_weights(a, b, 0.3)
    sa, sb, sm = a.state_for_saving(), b.state_for_saving(), merged.state_for_saving()
    assert sm.keys() == sa.keys()
    for k in sm:
        torch.testing.assert_close(sm[k], 0.3 * sa[k] + 0.7 * sb[k])
    assert not merged.training
    # the inputs are left alone
    assert all(torch.equal(sa[k], a.state_for_saving()[k]) for k in sa)


@pytest.mark.parametrize("granularity", ["step", "prompt"])
@pytest.mark.parametrize("favourite", [0, 1])
def test_routing_that_always_picks_one_drafter_is_that_drafter(granularity, favourite):
    model = tiny_target("llama", seed=6, vocab=16, hidden=32)
    pair = [("a", random_drafter(model.config, 1, std=0.5)), ("b", random_drafter(model.config, 2, std=0.3))]
    name, kept = pair[favourite]
    for p, shape in enumerate(SHAPES):
        prompt = random_prompt(60 + p, 16)
        routed = Favourite(pair, model, shape, granularity, favourite)
        got = generate(model, prompt, routed, GREEDY, 24, ())
        want = generate(model, prompt, EagleProposer(kept, model, shape), GREEDY, 24, ())
        assert got.output_ids == want.output_ids
        assert counters_without_timings(got.counters) == counters_without_timings(want.counters)
        assert got.diagnostics["choices"] == [name] * len(want.counters.accept_lengths)
        assert got.diagnostics["share"][name] == 1.0


def test_merged_tree_of_a_drafter_with_itself_accepts_what_the_drafter_accepts():
    model = tiny_target("qwen3", seed=7, vocab=16, hidden=32)
    a = random_drafter(model.config, 3, std=0.5)
    for p, shape in enumerate(SHAPES):
        prompt = random_prompt(70 + p, 16)
        single = generate(model, prompt, EagleProposer(a, model, shape), GREEDY, 24, ())
        merged = generate(model, prompt, MergedTree([("a", a), ("a2", a)], model, shape), GREEDY, 24, ())
        assert merged.output_ids == single.output_ids
        assert merged.counters.accept_lengths == single.counters.accept_lengths
        assert merged.counters.accepted_by_depth == single.counters.accepted_by_depth
        assert merged.counters.tree_sizes == [2 * (n - 1) + 1 for n in single.counters.tree_sizes]
        assert merged.counters.drafted_by_depth == [2 * n for n in single.counters.drafted_by_depth]
    assert sum(single.counters.accept_lengths) > 0


# -- a merged tree never accepts less than any of its subtrees --------------------------------------------------


def target_token(path: tuple[int, ...], vocab: int) -> int:
    """The target's greedy next token after a path of tokens: a fixed function of the path alone."""
    return zlib.crc32(repr(path).encode()) % vocab


def token_path(tree: DraftTree, node: int) -> tuple[int, ...]:
    return tuple(int(tree.tokens[i]) for i in path_to(tree, node))


def target_logits(tree: DraftTree, vocab: int, gen: torch.Generator) -> torch.Tensor:
    """Logits rows as the target would produce them: each row's argmax depends only on the node's path (noise aside)."""
    rows = torch.randn(tree.size, vocab, generator=gen)
    for i in range(tree.size):
        rows[i, target_token(token_path(tree, i), vocab)] = rows[i].max() + 1.0
    return rows


def random_subtree(rng: random.Random, root: int, vocab: int, size: int, hit_rate: float) -> DraftTree:
    tokens, parents = [root], [-1]
    for _ in range(size - 1):
        parent = rng.randrange(len(tokens))
        path = [parent]
        while parents[path[-1]] >= 0:
            path.append(parents[path[-1]])
        right = target_token(tuple(tokens[i] for i in reversed(path)), vocab)
        tokens.append(right if rng.random() < hit_rate else rng.randrange(vocab))
        parents.append(parent)
    n = len(tokens)
    logp = -torch.rand(n).cumsum(0) + torch.rand(n)
    logp[0] = 0.0
    return DraftTree(tokens=torch.tensor(tokens), parents=torch.tensor(parents), logp=logp,
                     entropy=torch.rand(n) * 3)


def test_merged_tree_accepts_the_longest_of_its_subtrees():
    rng = random.Random(0)
    gen = torch.Generator().manual_seed(0)
    longer = 0
    for trial in range(400):
        vocab = rng.choice([3, 5, 11])
        root = rng.randrange(vocab)
        subtrees = [random_subtree(rng, root, vocab, rng.randint(1, 12), rng.choice([0.3, 0.6, 0.9]))
                    for _ in range(rng.choice([2, 2, 3, 4]))]
        alone = [accept_greedy(t, target_logits(t, vocab, gen)) for t in subtrees]
        merged = merge_trees(subtrees)
        acc = accept_greedy(merged, target_logits(merged, vocab, gen))
        best = max(len(a.path) for a in alone)
        assert all(len(acc.path) >= len(a.path) for a in alone), trial
        assert len(acc.path) == best, trial
        # the accepted path is one subtree's accepted path, with the same tokens and the same bonus token
        sources = {int(merged.source[i]) for i in acc.path[1:]}
        assert len(sources) <= 1, trial
        k = sources.pop() if sources else next(i for i, a in enumerate(alone) if len(a.path) == best)
        assert token_path(merged, acc.path[-1]) == token_path(subtrees[k], alone[k].path[-1]), trial
        assert acc.next_token == alone[k].next_token == target_token(token_path(merged, acc.path[-1]), vocab)
        longer += len(acc.path) > min(len(a.path) for a in alone)
    assert longer > 50  # merging helped in many trials, so the comparison is not vacuous


# -- merge_trees --------------------------------------------------------------------------------------------------


def test_merge_trees_structure():
    rng = random.Random(1)
    for _ in range(50):
        subtrees = [random_subtree(rng, 4, 7, rng.randint(1, 9), 0.5) for _ in range(rng.randint(1, 4))]
        merged = merge_trees(subtrees)
        sizes = [t.size - 1 for t in subtrees]
        assert merged.size == 1 + sum(sizes)
        assert merged.source is not None
        assert merged.source.tolist() == [0] + [k for k, n in enumerate(sizes) for _ in range(n)]
        parents = merged.parents.tolist()
        assert parents[0] == -1 and all(0 <= parents[i] < i for i in range(1, merged.size))
        assert merged.tokens[0] == 4 and merged.logp[0] == 0 and merged.entropy[0] == 0
        assert merged.tokens[1:].tolist() == [x for t in subtrees for x in t.tokens[1:].tolist()]
        assert torch.equal(merged.logp[1:], torch.cat([t.logp[1:] for t in subtrees]))
        assert torch.equal(merged.entropy[1:], torch.cat([t.entropy[1:] for t in subtrees]))
        mask = ancestor_mask(merged.parents)
        assert mask[:, 0].all()  # everyone sees the shared root
        src = merged.source.tolist()
        offset = 1
        for k, t in enumerate(subtrees):
            block = slice(offset, offset + sizes[k])
            assert torch.equal(mask[block, block], ancestor_mask(t.parents)[1:, 1:])
            assert torch.equal(merged.depths[block], t.depths[1:])
            offset += sizes[k]
        cross = torch.tensor([[src[i] != src[j] for j in range(merged.size)] for i in range(merged.size)])
        cross[0, :] = False
        cross[:, 0] = False
        assert not (mask & cross).any()  # block-diagonal below the root: no attention across subtrees


def test_merge_trees_needs_a_shared_root():
    rng = random.Random(2)
    a, b = random_subtree(rng, 1, 5, 4, 0.5), random_subtree(rng, 2, 5, 4, 0.5)
    with pytest.raises(ValueError, match="root"):
        merge_trees([a, b])
    with pytest.raises(ValueError, match="root"):
        merge_trees([a, a, b])


@pytest.mark.parametrize(("total", "k", "equal_size"), [(9, 2, 9), (12, 2, 11), (10, 3, 10), (2, 3, 4), (7, 3, 7)])
def test_merged_tree_budgets(total, k, equal_size):
    """full: every drafter keeps its own budget (K * (T - 1) drafted nodes); equal: the T - 1 drafted nodes are split
    evenly (rounded down), but every drafter keeps at least one node."""
    model = tiny_target("llama", seed=13, vocab=16, hidden=32)
    drafters = [(f"d{i}", random_drafter(model.config, i, std=0.5)) for i in range(k)]
    shape = TreeSettings(total_tokens=total, depth=3, top_k=min(3, total))  # always more candidates than the budget
    prompt = random_prompt(13, 16)
    full = generate(model, prompt, MergedTree(drafters, model, shape, budget="full"), GREEDY, 12, ())
    equal = generate(model, prompt, MergedTree(drafters, model, shape, budget="equal"), GREEDY, 12, ())
    assert set(full.counters.tree_sizes) == {1 + k * (total - 1)}
    assert set(equal.counters.tree_sizes) == {equal_size}


def test_tree_scores_by_hand():
    tree = DraftTree(tokens=torch.tensor([5, 1, 2]), parents=torch.tensor([-1, 0, 1]),
                     logp=torch.tensor([0.0, -0.1, -2.0]), entropy=torch.tensor([0.0, 1.0, 3.0]))
    assert tree_confidence(tree) == pytest.approx((torch.tensor(-0.1).exp() + torch.tensor(-2.0).exp()) / 2)
    assert tree_entropy(tree) == pytest.approx(2.0)
    root = DraftTree(tokens=torch.tensor([5]), parents=torch.tensor([-1]), logp=torch.zeros(1), entropy=torch.zeros(1))
    assert tree_confidence(root) == 0.0  # an empty tree never wins a confidence vote...
    assert tree_entropy(root) == float("inf")  # ...nor an entropy one


# -- routing follows its definition; every drafter stays in sync ------------------------------------------------


@pytest.mark.parametrize("cls", [Confidence, Entropy])
def test_routing_picks_by_score_and_every_drafter_drafts_from_the_accepted_state(cls):
    model = tiny_target("llama", seed=8, vocab=16, hidden=32)
    drafters = [(n, random_drafter(model.config, s, std=std)) for n, s, std in
                [("a", 1, 0.5), ("b", 2, 0.2), ("c", 3, 1.0)]]
    routed = cls(drafters, model, SHAPES[1], granularity="step")
    outer = tap(routed)
    inner = [tap(p) for p in routed.proposers]
    verified = tap_observe(routed)
    out = generate(model, random_prompt(8, 16), routed, GREEDY, 30, ())
    choices = out.diagnostics["choices"]
    assert len(outer) == len(choices) == len(out.counters.accept_lengths) == len(verified)
    for step, (tokens, root, tree) in enumerate(outer):
        trees = []
        for log in inner:  # every drafter was called with exactly what the combiner was called with
            assert log[step][:2] == (tokens, root)
            trees.append(log[step][2])
        scores = [tree_confidence(t) if cls is Confidence else -tree_entropy(t) for t in trees]
        best = scores.index(max(scores))
        assert choices[step] == drafters[best][0]
        assert tree is trees[best] and verified[step][0] is tree
    assert len(set(choices)) > 1  # the test saw routing change its mind


@pytest.mark.parametrize("cls", [Confidence, Entropy])
def test_per_prompt_routing_decides_once_and_resets_between_prompts(cls):
    model = tiny_target("qwen3", seed=9, vocab=16, hidden=32)
    drafters = [("a", random_drafter(model.config, 1, std=0.5)), ("b", random_drafter(model.config, 2, std=0.5))]
    routed = cls(drafters, model, SHAPES[0], granularity="prompt")
    for p in range(6):
        prompt = random_prompt(90 + p, 16, length=3 + p)
        out = generate(model, prompt, routed, GREEDY, 16, ())
        d = out.diagnostics
        assert d["granularity"] == "prompt"
        assert len(d["choices"]) == len(out.counters.accept_lengths)
        assert len(set(d["choices"])) == 1
        assert d["share"] == {n: float(n == d["choices"][0]) for n, _ in drafters}
        fresh = generate(model, prompt, cls(drafters, model, SHAPES[0], granularity="prompt"), GREEDY, 16, ())
        assert out.output_ids == fresh.output_ids and out.diagnostics == fresh.diagnostics
        assert counters_without_timings(out.counters) == counters_without_timings(fresh.counters)


# -- diagnostics ----------------------------------------------------------------------------------------------


def check_node_stats(nodes: dict[str, dict[str, float]], names: list[str]) -> None:
    assert nodes
    for key, v in nodes.items():
        name, kind = key.rsplit("/", 1)
        assert name in names and kind in ("accepted", "rejected")
        assert v["n"] >= 1
        assert 0 < v["confidence"] <= 1
        assert v["entropy"] >= 0


@pytest.mark.parametrize("kind", ["confidence-step", "entropy-step", "confidence-prompt", "entropy-prompt"])
def test_routed_diagnostics(kind):
    model = tiny_target("llama", seed=10, vocab=16, hidden=32)
    drafters = [("a", random_drafter(model.config, 1, std=0.5)), ("b", random_drafter(model.config, 2, std=0.4))]
    proposer = make_combiner(kind, drafters, model, SHAPES[1])
    out = generate(model, random_prompt(10, 16), proposer, GREEDY, 30, ())
    d = out.diagnostics
    assert d["combiner"] == kind.split("-")[0] and d["granularity"] == kind.split("-")[1]
    assert len(d["choices"]) == len(out.counters.accept_lengths)
    assert set(d["share"]) == {"a", "b"}
    assert sum(d["share"].values()) == pytest.approx(1.0)
    for n in ("a", "b"):
        assert d["share"][n] == pytest.approx(d["choices"].count(n) / len(d["choices"]))
    if kind.endswith("prompt"):
        assert len(set(d["choices"])) == 1
    check_node_stats(d["nodes"], ["a", "b"])
    # node counts: every drafted node of every verified tree is counted once, as accepted or rejected
    assert sum(v["n"] for v in d["nodes"].values()) == sum(out.counters.tree_sizes) - len(out.counters.tree_sizes)
    accepted = sum(v["n"] for k, v in d["nodes"].items() if k.endswith("/accepted"))
    assert accepted == sum(out.counters.accept_lengths) > 0
    json.dumps(d)  # stored with the sample


@pytest.mark.parametrize("granularity", ["step", "prompt"])
def test_routing_records_one_choice_per_verify_step_up_to_the_context_limit(granularity):
    """At the context limit the answer ends without verifying another tree: no routing decision may be recorded for
    a tree that was never verified."""
    model = tiny_target("llama", seed=0, vocab=16, hidden=32)
    drafters = [("a", random_drafter(model.config, 1, std=0.5)), ("b", random_drafter(model.config, 2, std=0.5))]
    prompt = random_prompt(0, 16, length=20)
    ar = generate(model, prompt, Autoregressive(), GREEDY, 50, (), max_context=33)
    routed = Confidence(drafters, model, SHAPES[0], granularity=granularity)
    out = generate(model, prompt, routed, GREEDY, 50, (), max_context=33)
    assert out.output_ids == ar.output_ids and out.counters.stop_reason == "context"
    assert len(out.diagnostics["choices"]) == len(out.counters.accept_lengths)


@pytest.mark.parametrize("budget", ["full", "equal"])
def test_merged_tree_diagnostics(budget):
    model = tiny_target("qwen3", seed=11, vocab=16, hidden=32)
    drafters = [("a", random_drafter(model.config, 1, std=0.5)), ("b", random_drafter(model.config, 2, std=0.5))]
    merged = MergedTree(drafters, model, SHAPES[1], budget=budget)
    seen = tap_observe(merged)
    out = generate(model, random_prompt(11, 16), merged, GREEDY, 30, ())
    d = out.diagnostics
    assert d["combiner"] == "merged-tree" and d["budget"] == budget
    assert merged.name == f"merged-tree-{budget}(a,b)"
    expected = [drafters[int(tree.source[path[1]])][0] for tree, path in seen if len(path) > 1]
    assert d["choices"] == expected
    assert len(expected) == sum(a > 0 for a in out.counters.accept_lengths) > 0
    assert sum(d["share"].values()) == pytest.approx(1.0)
    check_node_stats(d["nodes"], ["a", "b"])
    per_source = {n: sum(v["n"] for k, v in d["nodes"].items() if k.startswith(f"{n}/")) for n in ("a", "b")}
    assert per_source == {n: sum(int((tree.source[1:] == k).sum()) for tree, _ in seen) for k, (n, _) in
                          enumerate(drafters)}
    json.dumps(d)


def test_node_stats_by_hand():
    stats = NodeStats(["a", "b"])
    tree = DraftTree(tokens=torch.tensor([5, 1, 2, 3]), parents=torch.tensor([-1, 0, 1, 0]),
                     logp=torch.tensor([0.0, -0.1, -0.5, -2.0]), entropy=torch.tensor([0.0, 1.0, 2.0, 3.0]),
                     source=torch.tensor([0, 0, 0, 1]))
    stats.add(tree, [0, 1])
    s = stats.summary()
    assert set(s) == {"a/accepted", "a/rejected", "b/rejected"}
    assert s["a/accepted"]["n"] == 1 and s["a/accepted"]["confidence"] == pytest.approx(torch.tensor(-0.1).exp())
    assert s["a/rejected"]["entropy"] == pytest.approx(2.0)
    assert s["b/rejected"]["confidence"] == pytest.approx(torch.tensor(-2.0).exp())
    single = NodeStats(["a", "b"])
    single.add(DraftTree(tokens=tree.tokens, parents=tree.parents, logp=tree.logp, entropy=tree.entropy), [0], 1)
    assert set(single.summary()) == {"b/rejected"} and single.summary()["b/rejected"]["n"] == 3


# -- refusals -----------------------------------------------------------------------------------------------------


def test_average_refuses_different_shapes_and_bad_alpha():
    small = tiny_target("llama", seed=0, hidden=32).config
    big = tiny_target("llama", seed=0, hidden=64).config
    a = random_drafter(small, 1)
    with pytest.raises(UserError, match="different shapes"):
        average_weights(a, random_drafter(big, 2), 0.5)
    with pytest.raises(UserError, match="different shapes"):
        average_weights(a, random_drafter(small, 2, fc_bias=False), 0.5)
    reg = Registry.load()
    for alpha in (1.5, -0.1, float("nan")):
        with pytest.raises(UserError, match="combiner average: alpha: Input should be"):
            reg.normalise(ProposerSpec(combiner="average", drafters=("a", "b"), alpha=alpha))
        with pytest.raises(ValueError, match="alpha"):  # the function itself refuses too (a Python caller)
            average_weights(a, random_drafter(small, 2), alpha)


def test_combiner_options_are_validated_once_by_each_combiners_model():
    """The registry validates a combiner spec with the combiner's own options model (a discriminated union on the
    name): every front end (CLI, matrix specs, lm-eval model_args) goes through here."""
    reg = Registry.load()
    for name in ("confidence", "entropy", "merged-tree"):
        with pytest.raises(UserError, match=rf"combiner {name}: drafters: .*at least two drafters"):
            reg.normalise(ProposerSpec(combiner=name, drafters=("a",)))
        with pytest.raises(UserError, match="must be distinct"):
            reg.normalise(ProposerSpec(combiner=name, drafters=("a", "a")))
    for names in (("a",), ("a", "b", "c")):
        with pytest.raises(UserError, match=r"combiner average: drafters: average takes exactly two drafters"):
            reg.normalise(ProposerSpec(combiner="average", drafters=names))
    with pytest.raises(UserError, match=r"combiner confidence: granularity: Input should be 'step' or 'prompt' "
                                        r"\(got 'sometimes'\)"):
        reg.normalise(ProposerSpec(combiner="confidence", drafters=("a", "b"), granularity="sometimes"))
    with pytest.raises(UserError, match="combiner merged-tree: budget: Input should be 'full' or 'equal'"):
        reg.normalise(ProposerSpec(combiner="merged-tree", drafters=("a", "b"), budget="huge"))
    with pytest.raises(UserError, match="combiner merged-tree: alpha: not an option of this combiner"):
        reg.normalise(ProposerSpec(combiner="merged-tree", drafters=("a", "b"), alpha=0.5))
    with pytest.raises(UserError, match="unknown combiner 'confidense': did you mean confidence"):
        reg.normalise(ProposerSpec(combiner="confidense", drafters=("a", "b")))
    # Defaults are filled in and values typed, so equal proposers have equal specs however they were written.
    spec = reg.normalise(ProposerSpec(combiner="average", drafters=("a", "b"), alpha="1"))
    assert dict(spec.options) == {"alpha": 1.0} and spec == reg.normalise(spec)
    assert dict(reg.normalise(ProposerSpec(combiner="entropy", drafters=("a", "b"))).options) == {
        "granularity": "step"}


def test_a_spec_identity_keeps_the_cell_keys_of_earlier_releases():
    """Matrix cells stored before combiners had options models were keyed by a flat spec with alpha, granularity
    and budget always present: the normalised spec must give the same identity."""
    reg = Registry.load()
    old = {"drafter": None, "combiner": "confidence", "drafters": ["a", "b"], "alpha": 0.5, "granularity": "prompt",
           "budget": "full"}
    assert reg.normalise(ProposerSpec(combiner="confidence", drafters=("a", "b"), granularity="prompt")).identity() \
        == old
    assert ProposerSpec(drafter="x").identity() == {"drafter": "x", "combiner": None, "drafters": [], "alpha": 0.5,
                                                    "granularity": "step", "budget": "full"}


# -- oracle -------------------------------------------------------------------------------------------------------


def sample(example_id: str, turn: int, new_tokens: int, steps: int) -> dict[str, Any]:
    return {"example_id": example_id, "turn": turn, "new_tokens": new_tokens, "steps": steps}


def test_oracle_picks_the_best_pooled_tau_per_question():
    runs = {
        # q1 (two turns): a pools 11/3 = 3.67 (per-turn mean 3.0); b pools 14/4 = 3.5 (mean 3.5): pooled picks a
        "a": [sample("q1", 0, 10, 2), sample("q1", 1, 1, 1), sample("q2", 0, 8, 4), sample("q3", 0, 9, 3)],
        "b": [sample("q1", 0, 7, 2), sample("q1", 1, 7, 2), sample("q2", 0, 9, 3), sample("q3", 0, 6, 3)],
    }
    out, choice = oracle_samples(runs)
    assert choice == {"q1": "a", "q2": "b", "q3": "a"}
    assert out == [runs["a"][0], runs["a"][1], runs["b"][2], runs["a"][3]]
    # the order the runs are given in does not matter
    out2, choice2 = oracle_samples(dict(reversed(runs.items())))
    assert choice2 == choice
    assert sorted(map(repr, out2)) == sorted(map(repr, out))


def test_oracle_ignores_a_drafter_missing_a_turn():
    runs = {"a": [sample("q", 0, 4, 4), sample("q", 1, 4, 4)], "b": [sample("q", 0, 40, 4)]}
    out, choice = oracle_samples(runs)
    assert choice == {"q": "a"} and out == runs["a"]


# -- build_proposer (what `run --combiner` builds), on a tiny target ---------------------------------------------


@pytest.fixture
def tiny_checkpoints(tmp_path: Path) -> tuple[Any, list[Path]]:
    model = tiny_target("llama", seed=12, vocab=16, hidden=32)
    dirs = []
    for i, where in enumerate(["one/drafter-a", "two/drafter-b", "three/drafter-a"]):
        save_drafter(random_drafter(model.config, i, std=0.5), tmp_path / where)
        dirs.append(tmp_path / where)
    card = TargetCard.model_validate({"name": "tiny", "description": "a tiny random test target", "family": "llama",
                                      "source": {"path": "/nonexistent"}})
    return SimpleNamespace(model=model, name="tiny", card=card), dirs


@pytest.mark.parametrize(("combiner", "options", "label", "setting"),
                         [("confidence", {"granularity": "prompt"}, "confidence-prompt", ("granularity", "prompt")),
                          ("entropy", {}, "entropy-step", ("granularity", "step")),
                          ("merged-tree", {"budget": "equal"}, "merged-tree-equal", ("budget", "equal")),
                          ("average", {"alpha": 0.25}, "average", ("alpha", 0.25))])
def test_build_proposer_for_each_combiner(tiny_checkpoints, combiner, options, label, setting):
    target, dirs = tiny_checkpoints
    spec = ProposerSpec(combiner=combiner, drafters=(str(dirs[0]), str(dirs[1])), **options)
    reg = Registry.load()
    proposer, got_label, settings = build_proposer(reg, spec, target, SHAPES[1])
    assert got_label.startswith(label) and "drafter-a" in got_label and "drafter-b" in got_label
    assert settings["combiner"] == combiner and settings[setting[0]] == setting[1]
    assert len(settings["drafters"]) == 2
    prompt = random_prompt(12, 16)
    out = generate(target.model, prompt, proposer, GREEDY, 16, ())
    assert out.output_ids == generate(target.model, prompt, Autoregressive(), GREEDY, 16, ()).output_ids


def test_build_proposer_keeps_drafters_with_the_same_directory_name_apart(tiny_checkpoints):
    """Two checkpoints in directories with the same basename (runs/x/final, runs/y/final) are different drafters:
    both checkpoints must identify the run, and the routing share must not merge them."""
    target, dirs = tiny_checkpoints
    spec = ProposerSpec(combiner="confidence", drafters=(str(dirs[0]), str(dirs[2])))
    proposer, _, settings = build_proposer(Registry.load(), spec, target, SHAPES[1])
    shas = {v["sha256"] for v in settings["drafters"]}
    assert len(shas) == 2, settings["drafters"]
    out = generate(target.model, random_prompt(13, 16), proposer, GREEDY, 16, ())
    assert sum(out.diagnostics["share"].values()) == pytest.approx(1.0)


# -- the command line ---------------------------------------------------------------------------------------------

CPU = "smollm2-135m-instruct"


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setenv("TAPS_BENCH_DB", f"sqlite:///{tmp_path / 'default.sqlite'}")
    monkeypatch.setenv("TAPS_BENCH_DATA", str(DATA))
    return tmp_path


def one_line_failure(capsys: pytest.CaptureFixture[str], args: list[str]) -> str:
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert rc == 2, (rc, out, err)
    assert "Traceback" not in out + err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("taps-bench: error: "), err
    return lines[0]


@pytest.mark.parametrize(("args", "says"), [
    (["--combiner", "bogus", "--drafters", "{a},{b}"], ["unknown combiner 'bogus'", "confidence", "merged-tree"]),
    (["--combiner", "confidance", "--drafters", "{a},{b}"], ["did you mean confidence"]),
    (["--combiner", "confidence", "--drafters", "{a}"], ["at least two drafters"]),
    (["--combiner", "average", "--drafters", "{a},{b},{a}"], ["exactly two drafters"]),
    (["--drafter", "{a}", "--combiner", "confidence", "--drafters", "{a},{b}"], ["either --drafter"]),
    (["--drafters", "{a},{b}"], ["either --drafter"]),
    (["--combiner", "average", "--drafters", "{a},{b}", "--alpha", "1.5"],
     ["combiner average: alpha: Input should be less than or equal to 1 (got 1.5)"]),
    (["--combiner", "entropy", "--drafters", "{a},{b}", "--granularity", "sometimes"],
     ["combiner entropy: granularity: Input should be", "(got 'sometimes')"]),
    (["--combiner", "merged-tree", "--drafters", "{a},{b}", "--budget", "huge"],
     ["combiner merged-tree: budget: Input should be 'full' or 'equal' (got 'huge')"]),
])
def test_run_combiner_bad_input_is_one_line(capsys, cli_env, args, says):
    config = tiny_target("llama", seed=0, hidden=32).config
    a, b = cli_env / "a", cli_env / "b"
    save_drafter(random_drafter(config, 1), a)
    save_drafter(random_drafter(config, 2), b)
    db = cli_env / "r.sqlite"
    line = one_line_failure(capsys, ["run", *[x.format(a=a, b=b) for x in args], "--task", "gsm8k", "--target", CPU,
                                     "--db", db])
    for s in says:
        assert s in line, line
    assert not db.exists()


@pytest.fixture(scope="module")
def smollm_drafters(smollm, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("combiner-drafters")
    for name, seed in (("d1", 1), ("d2", 2)):
        save_drafter(random_drafter(smollm.model.config, seed), root / name)
    return root / "d1", root / "d2"


@pytest.mark.smollm
@pytest.mark.slow
@pytest.mark.parametrize(("combiner", "extra", "label"), [
    ("confidence", [], "confidence-step(d1,d2)"),
    ("entropy", ["--granularity", "prompt"], "entropy-prompt(d1,d2)"),
    ("merged-tree", [], "merged-tree-full(d1,d2)"),
    ("merged-tree", ["--budget", "equal"], "merged-tree-equal(d1,d2)"),
    ("average", ["--alpha", "0.3"], "average(d1,d2;alpha=0.3)"),
])
def test_run_combiner_end_to_end(capsys, cli_env, smollm_drafters, combiner, extra, label):
    from taps_bench.results.store import Store

    d1, d2 = smollm_drafters
    db = cli_env / "r.sqlite"
    rc = main(["run", "--combiner", combiner, "--drafters", f"{d1},{d2}", *extra, "--task", "gsm8k", "--target", CPU,
               "--limit", "1", "--max-new-tokens", "12", "--total-tokens", "6", "--depth", "2", "--top-k", "2",
               "--json", "--no-progress", "--db", str(db)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["lossless_rate"] == 1.0
    assert result["drafter"] == label
    assert result["combiner"] == combiner
    assert result["drafters"] == [str(d1), str(d2)]
    assert [d["name"] for d in result["proposer_settings"]["drafters"]] == ["d1", "d2"]
    decisions = result["decisions"]
    samples = Store(f"sqlite:///{db}").samples(result["run_id"])
    assert len(samples) == 1
    extra_stored = samples[0]["extra"]
    if combiner == "average":
        assert decisions == {} and extra_stored == {}
        assert result["proposer_settings"]["alpha"] == 0.3
        return
    assert extra_stored["combiner"] == combiner
    if combiner != "merged-tree":  # one routing decision per verify step
        assert len(extra_stored["choices"]) == len(samples[0]["accept_lengths"]) > 0
        assert set(decisions) <= {"d1", "d2"} and sum(decisions.values()) == pytest.approx(1.0)
        if "--granularity" in extra:
            assert list(decisions.values()) == [1.0]
    else:  # merged-tree: one decision per step that accepted a drafted token (random drafters may accept none)
        assert len(extra_stored["choices"]) == sum(a > 0 for a in samples[0]["accept_lengths"])
        assert not decisions or sum(decisions.values()) == pytest.approx(1.0)
        assert max(samples[0]["tree_sizes"]) <= (6 if "--budget" in extra else 1 + 2 * 5)
        assert result["proposer_settings"]["budget"] == ("equal" if "--budget" in extra else "full")
