"""Token processing (temperature, top-k, top-p) and the losslessness of speculative sampling.

Lossless means: every token the engine emits is distributed exactly as the target's processed distribution given
the tokens before it. With a tiny target over a 10-token vocabulary the exact distributions of the first generated
tokens can be computed by enumeration, and a chi-square test compares them with samples. Negative controls (samplers
with classic bugs) show that the same test does reject a biased sampler.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from conftest import tiny_target
from scipy.stats import chisquare

from taps_bench.catalog.cards import TreeSettings
from taps_bench.decoding import engine
from taps_bench.decoding.eagle2 import EagleProposer
from taps_bench.decoding.engine import Acceptance, accept_sampling, generate, new_cache, prefill, verify
from taps_bench.decoding.sampling import Sampling, draw, probabilities, select
from taps_bench.decoding.tree import DraftTree, children_of, path_to
from taps_bench.errors import UserError
from taps_bench.models.drafter import random_drafter
from taps_bench.models.forward import prepare

pytestmark = pytest.mark.usefixtures("one_thread")


# -- probabilities ---------------------------------------------------------------------------------------------


def logits_of(probs: list[float]) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float64).log().float()


def test_temperature_scales_logits():
    logits = torch.tensor([1.0, 2.0, 3.0, -1.0])
    for t in (0.5, 1.0, 2.0):
        got = probabilities(logits, Sampling(temperature=t))
        torch.testing.assert_close(got, torch.softmax(logits / t, -1))
    assert got.dtype == torch.float32 and got.device.type == "cpu"


def test_top_k_keeps_the_k_best():
    logits = torch.tensor([1.0, 3.0, 2.0, 0.0, -2.0])
    got = probabilities(logits, Sampling(temperature=1.0, top_k=2))
    want = torch.zeros(5)
    want[[1, 2]] = torch.softmax(torch.tensor([3.0, 2.0]), -1)
    torch.testing.assert_close(got, want)
    # k at least the vocabulary: no cut
    torch.testing.assert_close(probabilities(logits, Sampling(temperature=1.0, top_k=50)), torch.softmax(logits, -1))


@pytest.mark.parametrize(("top_p", "kept"), [(0.45, [0]), (0.55, [0, 1]), (0.75, [0, 1]), (0.85, [0, 1, 2]),
                                             (0.96, [0, 1, 2, 3]), (1.0, [0, 1, 2, 3])])
def test_top_p_keeps_the_smallest_prefix_reaching_p(top_p, kept):
    probs = [0.5, 0.3, 0.15, 0.05]
    order = [2, 0, 3, 1]  # scramble the vocabulary so that sorting and scattering back are exercised
    scrambled = [0.0] * 4
    for rank, pos in enumerate(order):
        scrambled[pos] = probs[rank]
    got = probabilities(logits_of(scrambled), Sampling(temperature=1.0, top_p=top_p))
    want = torch.zeros(4)
    mass = sum(probs[r] for r in kept)
    for r in kept:
        want[order[r]] = probs[r] / mass
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_top_p_applies_after_temperature_and_top_k():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 4.0])
    s = Sampling(temperature=2.0, top_k=3, top_p=0.8)
    got = probabilities(logits, s)
    # temperature 2 then top-3: tokens 4, 0, 1 with weights e^2, e^1, e^0.5 (0.63, 0.23, 0.14)
    w = torch.tensor([math.exp(2), math.exp(1), math.exp(0.5)])
    w = w / w.sum()
    assert w[0] < 0.8 <= w[0] + w[1]  # top-p 0.8 keeps tokens 4 and 0
    want = torch.zeros(5)
    want[4], want[0] = w[0] / (w[0] + w[1]), w[1] / (w[0] + w[1])
    torch.testing.assert_close(got, want)


def test_probabilities_work_row_by_row():
    rows = torch.stack([logits_of([0.5, 0.3, 0.15, 0.05]), logits_of([0.05, 0.15, 0.3, 0.5])])
    got = probabilities(rows, Sampling(temperature=1.0, top_p=0.75))
    torch.testing.assert_close(got, torch.tensor([[0.625, 0.375, 0, 0], [0, 0, 0.375, 0.625]]), atol=1e-6,
                               rtol=1e-5)


def test_select_greedy_and_seeded_draws():
    logits = torch.tensor([0.1, 2.5, 0.3, 2.4])
    assert select(logits, Sampling(), torch.Generator()) == 1
    s = Sampling(temperature=1.0, seed=3)
    a = [select(logits, s, s.generator("q1")) for _ in range(5)]
    assert a == [select(logits, s, s.generator("q1")) for _ in range(5)]
    g1, g2 = s.generator("q1"), s.generator("q1")
    assert [select(logits, s, g1) for _ in range(20)] == [select(logits, s, g2) for _ in range(20)]


@pytest.mark.parametrize("kwargs", [{"temperature": -0.1}, {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": -1}])
def test_bad_settings_are_user_errors(kwargs):
    with pytest.raises(UserError):
        Sampling(**kwargs)


# -- exact distributions of the first generated tokens ---------------------------------------------------------

VOCAB = 10
PROMPT = [3, 7, 1, 8, 5]
CONFIGS = {"t1": Sampling(temperature=1.0), "t07p09": Sampling(temperature=0.7, top_p=0.9),
           "t1k4": Sampling(temperature=1.0, top_k=4)}


@pytest.fixture(scope="module")
def target():
    return tiny_target("llama", seed=11, vocab=VOCAB, hidden=16, layers=1, heads=2, kv_heads=1, std=0.3)


def exact(model, s: Sampling) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """p1[x], p2[x, y], p3[x, y, z]: processed next-token distributions after the prompt, by plain forwards."""
    pairs = torch.cartesian_prod(torch.arange(VOCAB), torch.arange(VOCAB))  # [V*V, 2]
    ids = torch.cat([torch.tensor(PROMPT).expand(len(pairs), -1), pairs], dim=1)
    with torch.inference_mode():
        logits = model(input_ids=ids).logits  # [V*V, P+2, V]
    p1 = probabilities(logits[0, len(PROMPT) - 1], s).double().numpy()
    p2 = probabilities(logits[::VOCAB, len(PROMPT)], s).double().numpy()  # rows x = 0..V-1 (any y)
    p3 = probabilities(logits[:, len(PROMPT) + 1], s).double().numpy().reshape(VOCAB, VOCAB, VOCAB)
    return p1, p2, p3


def chi2_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    """Pearson chi-square of counts against probabilities; cells of probability 0 must be empty, cells with an
    expected count below 5 are pooled (smallest first) into one cell."""
    counts, probs = counts.reshape(-1).astype(float), probs.reshape(-1) / probs.sum()
    zero = probs <= 0
    assert counts[zero].sum() == 0, f"tokens of probability 0 were emitted: {np.nonzero(zero & (counts > 0))}"
    counts, probs = counts[~zero], probs[~zero]
    n = counts.sum()
    expected = n * probs
    order = np.argsort(expected)
    pooled, pool = 0, 0.0
    while pooled < len(order) and (expected[order[pooled]] < 5 or 0 < pool < 5):
        pool += expected[order[pooled]]
        pooled += 1
    rest, small = order[pooled:], order[:pooled]
    f_obs = np.append(counts[rest], counts[small].sum()) if pooled else counts
    f_exp = np.append(expected[rest], pool) if pooled else expected
    assert len(f_obs) >= 3, "too few cells for a meaningful test"
    return float(chisquare(f_obs, f_exp).pvalue)


def assert_target_distribution(samples: np.ndarray, p1: np.ndarray, p2: np.ndarray, p3: np.ndarray) -> None:
    """Samples of three tokens [n, 3] follow the target's processed distribution: chi-square on each of the three
    tokens' marginals and on the joint of the second and third (which a rule that only gets marginals right fails)."""
    vocab = len(p1)
    joint12 = p1[:, None] * p2
    count = np.bincount
    assert chi2_pvalue(count(samples[:, 0], minlength=vocab), p1) > 1e-3
    assert chi2_pvalue(count(samples[:, 1], minlength=vocab), joint12.sum(0)) > 1e-3
    assert chi2_pvalue(count(samples[:, 2], minlength=vocab), np.einsum("xy,xyz->z", joint12, p3)) > 1e-3
    pairs = count(samples[:, 1] * vocab + samples[:, 2], minlength=vocab * vocab)
    assert chi2_pvalue(pairs, np.einsum("xy,xyz->yz", joint12, p3)) > 1e-3


# -- proposers for the sampling tests --------------------------------------------------------------------------


class Greedyish:
    """Proposes, under the root, the target's three most likely tokens (most likely first) and, under the most
    likely one, the target's two most likely continuations: high acceptance, with rejections and corrections."""

    name = "greedyish"

    def __init__(self, model) -> None:
        self.model = model
        self.context: list[int] = []

    def reset(self) -> None:
        self.context = []

    def _top(self, ids: list[int], k: int) -> list[int]:
        with torch.inference_mode():
            logits = self.model(input_ids=torch.tensor([ids])).logits[0, -1]
        return torch.topk(logits, k).indices.tolist()

    def propose(self, tokens: torch.Tensor, hidden: torch.Tensor, root: int) -> DraftTree:
        self.context += tokens.tolist()
        first = self._top([*self.context, root], 3)
        second = self._top([*self.context, root, first[0]], 2)
        return DraftTree(tokens=torch.tensor([root, *first, *second]), parents=torch.tensor([-1, 0, 0, 0, 1, 1]),
                         logp=torch.tensor([0.0, -0.1, -1.0, -2.0, -0.3, -1.5]), entropy=torch.zeros(6))

    def observe(self, tree: DraftTree, accepted: list[int]) -> None:
        pass

    def diagnostics(self) -> dict[str, Any]:
        return {}


def make_proposer(kind: str, model):
    if kind == "eagle":
        drafter = random_drafter(model.config, seed=4, std=0.3)
        return EagleProposer(drafter, model, TreeSettings(total_tokens=8, depth=2, top_k=3))
    return Greedyish(model)


# -- the acceptance rule, many samples (one tree and one verify per first token, then only the rule) -----------

Accept = Callable[[DraftTree, torch.Tensor, Sampling, torch.Generator], Acceptance]


def first_trees(model, proposer, p1: np.ndarray) -> dict[int, tuple[DraftTree, torch.Tensor]]:
    """For every possible first token: the tree the proposer drafts under it and the target's verify logits."""
    out = {}
    for x in np.nonzero(p1 > 0)[0].tolist():
        weights = prepare(model)
        cache = new_cache(weights, 64)
        with torch.inference_mode():
            hidden, _ = prefill(weights, torch.tensor(PROMPT), cache)
            proposer.reset()
            tree = proposer.propose(torch.tensor(PROMPT), hidden, x)
            _, logits = verify(weights, tree, cache, len(PROMPT))
        out[x] = (tree, logits)
    return out


def sample_pairs(trees, p1: np.ndarray, s: Sampling, accept: Accept, n: int, seed: int) -> tuple[np.ndarray, int]:
    """Counts of (first token, second token) over n draws, and how many second tokens were accepted drafts."""
    gen = torch.Generator().manual_seed(seed)
    p1t = torch.tensor(p1, dtype=torch.float32)
    counts = np.zeros((VOCAB, VOCAB), dtype=np.int64)
    accepted = 0
    for _ in range(n):
        x = draw(p1t, gen)
        tree, logits = trees[x]
        acc = accept(tree, logits, s, gen)
        y = int(tree.tokens[acc.path[1]]) if len(acc.path) > 1 else acc.next_token
        accepted += len(acc.path) > 1
        counts[x, y] += 1
    return counts, accepted


N_RULE = 20000


@pytest.mark.parametrize("kind", ["eagle", "greedyish"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_acceptance_rule_is_lossless(target, kind, config):
    s = CONFIGS[config]
    p1, p2, _ = exact(target, s)
    trees = first_trees(target, make_proposer(kind, target), p1)
    assert all(t.size > 1 and len(children_of(t)[0]) >= 2 for t, _ in trees.values())
    counts, accepted = sample_pairs(trees, p1, s, accept_sampling, N_RULE, seed=17)
    assert 0.05 * N_RULE < accepted < 0.98 * N_RULE  # both acceptance and rejection paths were taken
    joint = p1[:, None] * p2
    assert chi2_pvalue(counts, joint) > 1e-3
    assert chi2_pvalue(counts.sum(0), joint.sum(0)) > 1e-3


# Negative controls: classic bugs in the rule. Each must be rejected by the same test.


def accept_first_child(tree: DraftTree, logits: torch.Tensor, s: Sampling, gen: torch.Generator) -> Acceptance:
    """Always takes the best-drafted child (the drafter's distribution, not the target's)."""
    kids = children_of(tree)
    node = 0
    while kids[node]:
        node = kids[node][0]
    return Acceptance(path=path_to(tree, node), next_token=draw(probabilities(logits, s)[node], gen))


def accept_without_residual(tree: DraftTree, logits: torch.Tensor, s: Sampling, gen: torch.Generator) -> Acceptance:
    """Rejects correctly but draws the correction from the full distribution instead of the residual."""
    probs = probabilities(logits, s)
    kids, tokens, node = children_of(tree), tree.tokens.tolist(), 0
    while True:
        p = probs[node].clone()
        for child in kids[node]:
            if torch.rand((), generator=gen).item() < float(p[tokens[child]]) / float(p.sum()):
                node = child
                break
            p[tokens[child]] = 0.0
        else:
            return Acceptance(path=path_to(tree, node), next_token=draw(probs[node], gen))


def accept_without_renormalising(tree: DraftTree, logits: torch.Tensor, s: Sampling,
                                 gen: torch.Generator) -> Acceptance:
    """Zeroes rejected tokens but tests later siblings against the unnormalised residual p(x) (too rarely)."""
    probs = probabilities(logits, s)
    kids, tokens, node = children_of(tree), tree.tokens.tolist(), 0
    while True:
        p = probs[node].clone()
        for child in kids[node]:
            if torch.rand((), generator=gen).item() < float(p[tokens[child]]):
                node = child
                break
            p[tokens[child]] = 0.0
        else:
            return Acceptance(path=path_to(tree, node), next_token=draw(p / p.sum(), gen))


@pytest.mark.parametrize("bad", [accept_first_child, accept_without_residual, accept_without_renormalising])
def test_chi_square_rejects_biased_rules(target, bad):
    s = CONFIGS["t1"]
    p1, p2, _ = exact(target, s)
    trees = first_trees(target, make_proposer("greedyish", target), p1)
    counts, _ = sample_pairs(trees, p1, s, bad, N_RULE, seed=17)
    assert chi2_pvalue(counts, p1[:, None] * p2) < 1e-3


def test_chi_square_detects_a_two_percent_bias(target):
    """Power: shifting 2% absolute probability onto the most likely second token is detected at N_RULE draws."""
    s = CONFIGS["t1"]
    p1, p2, _ = exact(target, s)
    marginal = p1 @ p2
    top = int(marginal.argmax())
    biased = marginal * (1 - 0.02 / (1 - marginal[top]))
    biased[top] = marginal[top] + 0.02
    rng = np.random.default_rng(5)
    rejected = sum(chi2_pvalue(rng.multinomial(N_RULE, biased), marginal) < 1e-3 for _ in range(20))
    assert rejected >= 16
    fair = sum(chi2_pvalue(rng.multinomial(N_RULE, marginal), marginal) < 1e-3 for _ in range(20))
    assert fair <= 1


# -- end to end: the engine's generate, three tokens per sample ------------------------------------------------

N_E2E = 3000


def sample_generate(model, proposer, s: Sampling, n: int, seed: int) -> np.ndarray:
    out = np.zeros((n, 3), dtype=np.int64)
    for i in range(n):
        g = generate(model, PROMPT, proposer, s, 3, (), gen=torch.Generator().manual_seed(seed + i))
        assert len(g.output_ids) == 3
        out[i] = g.output_ids
    return out


@pytest.mark.parametrize(("kind", "config"), [("eagle", "t1"), ("greedyish", "t07p09")])
def test_generate_samples_the_target_distribution(target, kind, config):
    s = CONFIGS[config]
    p1, p2, p3 = exact(target, s)
    samples = sample_generate(target, make_proposer(kind, target), s, N_E2E, seed=100_000)
    assert_target_distribution(samples, p1, p2, p3)


def test_generate_with_a_biased_rule_is_rejected(target, monkeypatch):
    """The end-to-end harness has power too: the engine with a biased rule fails it (fewer samples suffice)."""
    monkeypatch.setattr(engine, "accept_sampling", accept_without_residual)
    s = CONFIGS["t1"]
    p1, p2, _ = exact(target, s)
    samples = sample_generate(target, make_proposer("greedyish", target), s, 800, seed=200_000)
    assert chi2_pvalue(np.bincount(samples[:, 1], minlength=VOCAB), (p1[:, None] * p2).sum(0)) < 1e-3


def test_sampling_is_reproducible_and_seed_dependent(target):
    proposer = make_proposer("eagle", target)
    s = CONFIGS["t1"]
    a = generate(target, PROMPT, proposer, s, 12, (), gen=s.generator("x")).output_ids
    b = generate(target, PROMPT, proposer, s, 12, (), gen=s.generator("x")).output_ids
    c = generate(target, PROMPT, proposer, Sampling(temperature=1.0, seed=1), 12, ()).output_ids
    d = generate(target, PROMPT, proposer, Sampling(temperature=1.0, seed=1), 12, ()).output_ids
    assert a == b and c == d and len(a) == 12
    others = {tuple(generate(target, PROMPT, proposer, s, 12, (), gen=s.generator(k)).output_ids) for k in range(6)}
    assert len(others) > 1
