"""Combiners over EAGLE-3 drafters, and over a mix of EAGLE-2/HASS and EAGLE-3 drafters of one target.

One target forward serves the whole mix: the combiner declares the union of the target states its members read
(index L is the post-norm last hidden state, as in HF's `hidden_states`) and hands each member exactly what it would
get alone. Every combiner stays lossless (greedy output equals autoregressive output token for token; at T = 1 the
output follows the target's distribution), weight averaging works for EAGLE-3 drafters of one configuration and
vocabulary, and is refused, in one line, across families or draft vocabularies."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from conftest import tiny_target
from test_eagle3_decoding import drafter_for, drafter_parts
from test_speculative import check_counters

from taps_bench.catalog.cards import TargetCard, TreeSettings
from taps_bench.catalog.proposers import ProposerSpec
from taps_bench.catalog.registry import Registry
from taps_bench.decoding import engine
from taps_bench.decoding.combiners import Average, AverageOptions, Confidence, Entropy, MergedTree, average_weights
from taps_bench.decoding.combiners.base import Multi
from taps_bench.decoding.eagle2 import EagleProposer
from taps_bench.decoding.eagle3 import Eagle3Proposer
from taps_bench.decoding.engine import generate, new_cache, prefill, verify
from taps_bench.decoding.proposer import Autoregressive
from taps_bench.decoding.sampling import Sampling
from taps_bench.decoding.tree import DraftTree
from taps_bench.errors import UserError
from taps_bench.measure.resolve import build_proposer
from taps_bench.models import forward
from taps_bench.models.drafter import Drafter, random_drafter, save_drafter
from taps_bench.models.eagle3 import Eagle3Drafter, load_state

pytestmark = pytest.mark.usefixtures("one_thread")

GREEDY = Sampling()
SHAPES = [TreeSettings(total_tokens=8, depth=3, top_k=2), TreeSettings(total_tokens=12, depth=4, top_k=3)]
KINDS = ["confidence-step", "confidence-prompt", "entropy-step", "entropy-prompt", "merged-full", "merged-equal"]
# EAGLE-3 drafters read layers 2, L//2 and L-3, so the targets have at least 7 layers; a 16-token vocabulary gives
# random drafters some acceptance. EAGLE-2 drafters at std 0.1 are about as unsure as the random EAGLE-3 ones, so
# routing goes both ways.
TARGETS = [("llama", 1, 8), ("qwen3", 2, 7)]
VOCAB = 16
AnyDrafter = Drafter | Eagle3Drafter


def random_prompt(seed: int, length: int = 9) -> list[int]:
    return torch.randint(0, VOCAB, (length,), generator=torch.Generator().manual_seed(500 + seed)).tolist()


def target(family: str, seed: int, layers: int) -> Any:
    return tiny_target(family, seed=seed, vocab=VOCAB, hidden=32, layers=layers)


def same_vocabulary(model: Any, seed: int, like: Eagle3Drafter) -> Eagle3Drafter:
    """A random EAGLE-3 drafter of `like`'s configuration and draft vocabulary (d2t/t2d), other weights."""
    drafter = drafter_for(model, seed, like.config.draft_vocab_size)
    assert like.d2t is not None and drafter.d2t is not None and like.t2d is not None and drafter.t2d is not None
    drafter.d2t.copy_(like.d2t)
    drafter.t2d.copy_(like.t2d)
    return drafter


def pair(model: Any, mix: str, seed: int) -> list[tuple[str, AnyDrafter]]:
    """Two drafters of `model`: two EAGLE-3 ones (a reduced draft vocabulary and the full one), or an EAGLE-2 one and
    an EAGLE-3 one over a reduced draft vocabulary."""
    reduced = drafter_for(model, 10 + seed, 10)
    if mix == "eagle3+eagle3":
        return [("e3a", reduced), ("e3b", drafter_for(model, 20 + seed, None))]
    return [("e2", random_drafter(model.config, 30 + seed, std=0.1)), ("e3", reduced)]


def make(kind: str, drafters: list[tuple[str, AnyDrafter]], model: Any, shape: TreeSettings) -> Any:
    family, how = kind.split("-")
    if family == "merged":
        return MergedTree(drafters, model, shape, budget=how)
    return {"confidence": Confidence, "entropy": Entropy}[family](drafters, model, shape, granularity=how)


def spy(proposer: Any) -> list[torch.Tensor]:
    """Record, in place, the features every call to `proposer.propose` is handed."""
    seen: list[torch.Tensor] = []
    inner = proposer.propose

    def propose(tokens: torch.Tensor, hidden: torch.Tensor, root: int) -> DraftTree:
        seen.append(hidden.clone())
        return inner(tokens, hidden, root)

    proposer.propose = propose
    return seen


# -- lossless at T=0 --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mix", ["eagle3+eagle3", "eagle2+eagle3"])
@pytest.mark.parametrize(("family", "seed", "layers"), TARGETS)
def test_every_combiner_over_eagle3_drafters_is_lossless(family, seed, layers, mix, kind):
    model = target(family, seed, layers)
    drafters = pair(model, mix, seed)
    accepted, chosen = 0, set()
    for p in range(2):
        prompt = random_prompt(10 * seed + p, length=4 + 5 * p)
        ar = generate(model, prompt, Autoregressive(), GREEDY, 20, ())
        for shape in SHAPES:
            combiner = make(kind, drafters, model, shape)
            eagle3 = (2, layers // 2, layers - 3)
            assert combiner.taps == ((*eagle3, layers) if mix == "eagle2+eagle3" else eagle3)
            out = generate(model, prompt, combiner, GREEDY, 20, ())
            assert out.output_ids == ar.output_ids, f"{kind} {shape} prompt {p}"
            assert out.counters.stop_reason == ar.counters.stop_reason
            check_counters(out.counters, out.output_ids, 20)
            bound = 1 + 2 * (shape.total_tokens - 1) if kind == "merged-full" else shape.total_tokens
            assert max(out.counters.tree_sizes) <= bound
            accepted += sum(out.counters.accept_lengths)
            chosen |= set(out.diagnostics["choices"])
    assert accepted > 0  # accepted drafts (and so cache compaction on both families' caches) were exercised
    if kind.endswith("-step") or kind.startswith("merged"):
        assert chosen == {n for n, _ in drafters}, chosen  # both members' trees were verified and accepted from


@pytest.mark.parametrize(("family", "seed", "layers"), TARGETS)
def test_average_of_two_eagle3_drafters_is_lossless(family, seed, layers):
    model = target(family, seed, layers)
    a = drafter_for(model, 40 + seed, 10)
    b = same_vocabulary(model, 50 + seed, a)
    accepted = 0
    for p, shape in enumerate(SHAPES):
        prompt = random_prompt(20 + 10 * seed + p)
        ar = generate(model, prompt, Autoregressive(), GREEDY, 20, ())
        proposer = Average.build(AverageOptions(drafters=("a", "b"), alpha=0.3), [("a", a), ("b", b)], model, shape)
        assert isinstance(proposer, Eagle3Proposer) and proposer.name == "average(a,b;alpha=0.3)"
        out = generate(model, prompt, proposer, GREEDY, 20, ())
        assert out.output_ids == ar.output_ids
        check_counters(out.counters, out.output_ids, 20)
        accepted += sum(out.counters.accept_lengths)
    assert accepted > 0


# -- weight averaging of EAGLE-3 drafters -----------------------------------------------------------------------


def test_average_of_eagle3_drafters_is_the_parameterwise_mix_and_keeps_the_vocabulary():
    model = target("llama", 3, 8)
    a = drafter_for(model, 1, 10)
    b = same_vocabulary(model, 2, a)
    merged = average_weights(a, b, 0.3)
    assert isinstance(merged, Eagle3Drafter) and merged.config == a.config and not merged.training
    sa, sb, sm = a.state_dict(), b.state_dict(), merged.state_dict()
    assert sm.keys() == sa.keys()
    for k in sm:
        if k in ("d2t", "t2d"):
            assert torch.equal(sm[k], sa[k]) and sm[k].dtype == sa[k].dtype  # a vocabulary is copied, not mixed
        else:
            torch.testing.assert_close(sm[k], 0.3 * sa[k] + 0.7 * sb[k])
    for alpha, kept in ((1.0, a), (0.0, b)):  # exactly one of them, bit for bit
        got, want = average_weights(a, b, alpha).state_dict(), kept.state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want), alpha


def test_averaging_across_families_or_vocabularies_is_refused_in_one_line():
    model = target("llama", 4, 8)
    e2, e3 = random_drafter(model.config, 1, std=0.1), drafter_for(model, 2, 10)
    for a, b in ((e2, e3), (e3, e2)):
        with pytest.raises(UserError, match="different architectures cannot be averaged parameter-wise") as err:
            average_weights(a, b, 0.5)
        assert "EAGLE-1/2/HASS" in str(err.value) and "EAGLE-3" in str(err.value) and "\n" not in str(err.value)
    options = AverageOptions(drafters=("x", "y"))
    with pytest.raises(UserError, match="different architectures"):
        Average.build(options, [("x", e2), ("y", e3)], model, SHAPES[0])
    # Two EAGLE-3 drafters of one shape but other draft vocabularies (another d2t; another size; none).
    for other in (drafter_for(model, 3, 10), drafter_for(model, 3, 12), drafter_for(model, 3, None)):
        with pytest.raises(UserError, match="different draft vocabularies") as err:
            average_weights(e3, other, 0.5)
        assert "cannot be averaged parameter-wise" in str(err.value) and "\n" not in str(err.value)
    # One vocabulary, another configuration (the layers it reads).
    shape, state = drafter_parts(model.config, 4, 10)
    elsewhere = Eagle3Drafter(replace(shape, aux_layers=(1, 3, 6)))
    load_state(elsewhere, state)
    assert elsewhere.d2t is not None and e3.d2t is not None and elsewhere.t2d is not None and e3.t2d is not None
    elsewhere.d2t.copy_(e3.d2t)
    elsewhere.t2d.copy_(e3.t2d)
    with pytest.raises(UserError, match=r"different configurations .*aux_layers"):
        average_weights(e3, elsewhere, 0.5)


# -- features: one forward serves the mix, each member gets what it gets alone -----------------------------------


def test_index_l_is_the_post_norm_last_hidden_state():
    model = target("qwen3", 5, 7)
    w = forward.prepare(model)
    ids = torch.tensor(random_prompt(5))
    hidden, logits = forward.prefill(w, ids, w.new_cache(64))
    tapped_hidden, tapped_logits, (last, first) = forward.prefill(w, ids, w.new_cache(64), (7, 0))
    assert torch.equal(last, hidden) and torch.equal(tapped_hidden, hidden) and torch.equal(tapped_logits, logits)
    torch.testing.assert_close(first, w.embed[ids])
    with torch.no_grad():
        states = model(ids[None], output_hidden_states=True).hidden_states
    assert len(states) == 8  # HF: the embeddings, the input of layers 1..6, and the post-norm output
    torch.testing.assert_close(last, states[7][0], rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="tap at layer 8"):
        forward.prefill(w, ids, w.new_cache(64), (8,))


def test_a_mixed_combiner_hands_each_member_what_it_gets_alone():
    """An EAGLE-2 drafter, an EAGLE-3 drafter reading 2, L//2, L-3 and one reading (5, 1, 4), in that order: the
    combiner taps the union once, and each member's features, at prefill and at every verify, are bit for bit what
    the engine hands that drafter's own proposer."""
    layers = 8
    model = target("llama", 6, layers)
    shape, state = drafter_parts(model.config, 7, 10)
    shuffled = Eagle3Drafter(replace(shape, aux_layers=(5, 1, 4)))
    load_state(shuffled, state)
    drafters: list[tuple[str, AnyDrafter]] = [("e2", random_drafter(model.config, 1, std=0.1)),
                                              ("e3", drafter_for(model, 2, None)), ("e3s", shuffled.eval())]
    tree = SHAPES[0]
    combiner = MergedTree(drafters, model, tree)
    assert combiner.taps == (1, 2, 4, 5, 8)
    assert [getattr(p, "taps", None) for p in combiner.proposers] == [None, (2, 4, 5), (5, 1, 4)]
    inside = [spy(p) for p in combiner.proposers]
    prompt = random_prompt(6)
    generate(model, prompt, combiner, GREEDY, 12, ())
    alone = [EagleProposer(drafters[0][1], model, tree), Eagle3Proposer(drafters[1][1], model, tree),
             Eagle3Proposer(drafters[2][1], model, tree)]
    for i, single in enumerate(alone):
        seen = spy(single)
        generate(model, prompt, single, GREEDY, 12, ())
        assert seen[0].shape == inside[i][0].shape and torch.equal(seen[0], inside[i][0]), drafters[i][0]
        assert inside[i][0].is_contiguous()

    # A verify step: the same tree through the target with the combiner's taps and with each member's own.
    w = forward.prepare(model)
    ids = torch.tensor(prompt)
    draft = DraftTree(tokens=torch.tensor([3, 4, 5, 6]), parents=torch.tensor([-1, 0, 0, 1]), logp=torch.zeros(4),
                      entropy=torch.zeros(4))

    def features_of(taps: tuple[int, ...] | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cache = new_cache(w, 64)
        first, _ = prefill(w, ids, cache, taps)
        nodes, logits = verify(w, draft, cache, len(prompt), taps)
        return first, nodes, logits

    mixed_prefill, mixed_nodes, mixed_logits = features_of(combiner.taps)
    for i, taps in enumerate([None, (2, 4, 5), (5, 1, 4)]):
        own_prefill, own_nodes, own_logits = features_of(taps)
        assert torch.equal(combiner.features_for(i, mixed_prefill), own_prefill)
        assert torch.equal(combiner.features_for(i, mixed_nodes), own_nodes)
        assert torch.equal(mixed_logits, own_logits)  # the taps never change what the target verifies with


def test_a_combiner_of_eagle2_drafters_only_declares_no_taps():
    model = target("llama", 7, 8)
    drafters: list[tuple[str, AnyDrafter]] = [("a", random_drafter(model.config, 1)),
                                              ("b", random_drafter(model.config, 2))]
    combiner = Confidence(drafters, model, SHAPES[0])
    assert engine.features(combiner) is None
    hidden = torch.randn(3, 32)
    assert combiner.features_for(0, hidden) is hidden and combiner.features_for(1, hidden) is hidden
    two = Multi([("x", drafter_for(model, 1, None)), ("y", drafter_for(model, 2, 10))], model, SHAPES[0])
    assert two.taps == (2, 4, 5)  # EAGLE-3 only: no index L tapped, every member reads all of it
    assert two.features_for(1, hidden) is hidden


# -- T = 1: the output follows the target's distribution ---------------------------------------------------------


@pytest.mark.slow
def test_sampling_through_a_mixed_routing_combiner_keeps_the_target_distribution():
    """Chi-square on the first three emitted tokens and on the pair of the second and third, with per-step
    confidence routing between an EAGLE-2 drafter and an EAGLE-3 drafter over 6 of the 10 target tokens."""
    from test_sampling import CONFIGS, PROMPT, assert_target_distribution, exact
    from test_sampling import VOCAB as V

    model = tiny_target("llama", seed=11, vocab=V, hidden=16, layers=7, heads=2, kv_heads=1, std=0.3)
    drafters: list[tuple[str, AnyDrafter]] = [("e2", random_drafter(model.config, 4, std=0.3)),
                                              ("e3", drafter_for(model, 4, 6))]
    combiner = Confidence(drafters, model, TreeSettings(total_tokens=6, depth=2, top_k=2), granularity="step")
    s = CONFIGS["t1"]
    p1, p2, p3 = exact(model, s)
    n = 800
    samples = np.zeros((n, 3), dtype=np.int64)
    chosen: set[str] = set()
    accepted = 0
    for i in range(n):
        g = generate(model, PROMPT, combiner, s, 3, (), gen=torch.Generator().manual_seed(400_000 + i))
        samples[i] = g.output_ids
        chosen |= set(g.diagnostics["choices"])
        accepted += sum(g.counters.accept_lengths)
    assert chosen == {"e2", "e3"}  # both members' trees were verified
    assert 0.05 * n < accepted  # acceptance and, with 3 tokens, rejections and corrections were exercised
    assert_target_distribution(samples, p1, p2, p3)


# -- build_proposer: combiners take checkpoints of both families -------------------------------------------------


@pytest.fixture
def mixed_checkpoints(tmp_path: Path) -> tuple[Any, dict[str, Path]]:
    from test_eagle3 import write_safeailab

    model = target("llama", 8, 8)
    save_drafter(random_drafter(model.config, 1, std=0.1), tmp_path / "hass")
    write_safeailab(tmp_path / "e3a", *drafter_parts(model.config, 2, 10))
    write_safeailab(tmp_path / "e3b", *drafter_parts(model.config, 3, None))
    card = TargetCard.model_validate({"name": "tiny", "description": "a tiny random test target", "family": "llama",
                                      "source": {"path": "/nonexistent"}})
    return SimpleNamespace(model=model, name="tiny", card=card), {k: tmp_path / k for k in ("hass", "e3a", "e3b")}


@pytest.mark.parametrize(("combiner", "options", "members"), [
    ("confidence", {"granularity": "step"}, ("hass", "e3a")),
    ("entropy", {"granularity": "prompt"}, ("e3a", "hass")),
    ("merged-tree", {"budget": "full"}, ("e3a", "e3b")),
    ("merged-tree", {"budget": "equal"}, ("hass", "e3b")),
])
def test_build_proposer_takes_eagle3_checkpoints_and_records_each_family(mixed_checkpoints, combiner, options,
                                                                          members):
    tiny, dirs = mixed_checkpoints
    spec = ProposerSpec(combiner=combiner, drafters=tuple(str(dirs[m]) for m in members), **options)
    proposer, label, settings = build_proposer(Registry.load(), spec, tiny, SHAPES[0])
    assert label.startswith(combiner) and all(m in label for m in members)
    recorded = settings["drafters"]
    assert [d["name"] for d in recorded] == list(members)
    for d in recorded:
        if d["name"] == "hass":  # EAGLE-1/2/HASS members are recorded as before (absent family: that one)
            assert set(d) == {"name", "checkpoint", "sha256"}
        else:
            assert d["drafter_family"] == "eagle3" and d["draft_vocab_size"] == (10 if d["name"] == "e3a" else VOCAB)
    prompt = random_prompt(8)
    out = generate(tiny.model, prompt, proposer, GREEDY, 16, ())
    assert out.output_ids == generate(tiny.model, prompt, Autoregressive(), GREEDY, 16, ()).output_ids


def test_build_proposer_refuses_to_average_across_families(mixed_checkpoints):
    tiny, dirs = mixed_checkpoints
    spec = ProposerSpec(combiner="average", drafters=(str(dirs["hass"]), str(dirs["e3a"])))
    with pytest.raises(UserError, match="different architectures cannot be averaged") as err:
        build_proposer(Registry.load(), spec, tiny, SHAPES[0])
    assert "\n" not in str(err.value)
    spec = ProposerSpec(combiner="average", drafters=(str(dirs["e3a"]), str(dirs["e3b"])))
    with pytest.raises(UserError, match="different draft vocabularies"):
        build_proposer(Registry.load(), spec, tiny, SHAPES[0])
