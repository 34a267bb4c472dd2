"""`--tree auto`: the sub-tree simulation is exact, the ranking follows the profile, the profile is cached."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_target

from taps_bench.catalog.cards import TreeOverride, TreeSettings
from taps_bench.decoding.eagle2 import EagleProposer
from taps_bench.decoding.engine import new_cache, prefill
from taps_bench.decoding.sampling import Sampling
from taps_bench.measure import autotree, provenance
from taps_bench.measure.autotree import CALIBRATION_TREE, DeviceProfile, Step, predicted_tau, rank, sub_tree
from taps_bench.models.drafter import random_drafter
from taps_bench.models.forward import prepare

pytestmark = pytest.mark.usefixtures("one_thread")


def paths(tokens: list[int], parents: list[int], nodes: set[int] | None = None) -> set[tuple[int, ...]]:
    """Each node as the token path from the root: comparable between trees whatever their node numbering."""
    out = set()
    for node in nodes if nodes is not None else range(len(tokens)):
        path, i = [], node
        while i >= 0:
            path.append(tokens[i])
            i = parents[i]
        out.add(tuple(reversed(path)))
    return out


@pytest.mark.parametrize("shape", [(16, 4, 4), (8, 3, 2), (4, 1, 3), (24, 7, 10), (12, 5, 1), (64, 2, 6), (24, 7, 2),
                                   (16, 5, 2), (20, 3, 3)])
def test_sub_tree_is_the_tree_eagle2_drafts_at_those_settings(shape):
    model = tiny_target("llama", seed=1, vocab=211, hidden=64)
    drafter = random_drafter(model.config, seed=3, std=0.3)
    weights = prepare(model)
    prompt = torch.randint(3, 211, (12,), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        hidden, _ = prefill(weights, prompt, new_cache(weights, 64))

        def draft(tree: TreeSettings):
            proposer = EagleProposer(drafter, model, tree)
            return proposer.propose(prompt, hidden, int(prompt[-1]))

        big = draft(CALIBRATION_TREE)
        small = draft(TreeSettings(total_tokens=shape[0], depth=shape[1], top_k=shape[2]))
    step = Step(big.parents.tolist(), big.logp.tolist(), big.depths.tolist(), [0])
    kept = sub_tree(step, TreeSettings(total_tokens=shape[0], depth=shape[1], top_k=shape[2]))
    simulated = paths(big.tokens.tolist(), big.parents.tolist(), kept)
    drafted = paths(small.tokens.tolist(), small.parents.tolist())
    assert simulated <= drafted  # never a node EAGLE-2 would not draft
    # And all of them while the large tree holds them all: it keeps its best 127 of 710 candidates, so a deep, narrow
    # tree (24/7/2) can lose its deepest, least likely nodes (its predicted tau is then a slight underestimate).
    if shape[0] <= 20 and shape[1] <= 5:
        assert simulated == drafted


def test_predicted_tau_of_the_calibration_tree_is_what_it_accepted():
    model = tiny_target("qwen3", seed=2, vocab=97, hidden=64)
    target = type("T", (), {"model": model, "stop_ids": ()})()
    drafter = random_drafter(model.config, seed=0, std=0.3)
    # A drafter that agrees with the target often enough to accept something: the target's own lm_head helps.
    steps = autotree.calibrate(target, EagleProposer(drafter, model, CALIBRATION_TREE),
                               [[5, 6, 7, 8], [9, 10, 11]], Sampling(), 24)
    actual = sum(len(s.accepted) for s in steps) / len(steps)  # accepted nodes incl. root = tokens per step
    assert predicted_tau(steps, CALIBRATION_TREE) == pytest.approx(actual)
    # A chain of one drafted token can never accept more than one.
    assert predicted_tau(steps, TreeSettings(total_tokens=2, depth=1, top_k=1)) <= 2.0


def profile(verify: dict[int, float], draft: float) -> DeviceProfile:
    return DeviceProfile(key={}, one_token_ms=10.0, verify_ms=verify,
                         draft_ms={f"{d}/{k}": draft * (d + 1) for d in autotree.DEPTHS for k in autotree.TOP_KS})


def test_rank_prefers_small_trees_when_verification_is_expensive():
    # Every recorded step accepted a deep chain: bigger trees always accept more.
    chain = Step(parents=[-1, *range(7)], logp=[0.0, *[-0.1 * i for i in range(1, 8)]], depths=list(range(8)),
                 accepted=list(range(8)))
    steps = [chain] * 5
    cheap = profile({n: 10.0 for n in autotree.TOTALS}, draft=0.1)
    steep = profile({n: 10.0 * n for n in autotree.TOTALS}, draft=0.1)
    best_cheap, best_steep = rank(cheap, steps)[0], rank(steep, steps)[0]
    assert best_cheap.tau == pytest.approx(8.0)  # depth 7 chain: all of it
    assert best_steep.tree.total_tokens <= 3
    ranked = rank(steep, steps)
    assert [c.speedup for c in ranked] == sorted((c.speedup for c in ranked), reverse=True)
    assert ranked[0].speedup == pytest.approx(ranked[0].tau / (ranked[0].verify_ratio + ranked[0].draft_ratio))


def test_tree_override_presets():
    card = TreeSettings(total_tokens=16, depth=4, top_k=4)
    assert TreeOverride().over(card) == card
    assert TreeOverride().over("auto") == "auto"
    assert TreeOverride(preset="auto").over(card) == "auto"
    assert TreeOverride(preset="paper").over(card) == TreeSettings(total_tokens=60, depth=5, top_k=10)
    assert TreeOverride(top_k=2).over("auto") == TreeSettings(total_tokens=60, depth=5, top_k=2)
    with pytest.raises(ValueError):
        TreeOverride(depth=16)  # deeper than the engine's attention window


def test_profile_is_measured_once_then_read_back(monkeypatch):
    model = tiny_target("llama", seed=0, vocab=97, hidden=64)
    target = type("T", (), {"model": model, "name": "tiny", "checkpoint_hash": "0" * 64,
                            "device": torch.device("cpu"), "dtype": torch.float32})()
    drafter = random_drafter(model.config)
    calls = []

    def make(tree):
        calls.append(tree)
        return EagleProposer(drafter, model, tree)

    monkeypatch.setattr(autotree, "TOP_KS", (1, 2))
    first = autotree.cached_profile(target, make, "test", list(range(3, 40)), log=lambda _: None)
    assert calls and list(first.verify_ms) == list(autotree.TOTALS)
    assert all(a <= b for a, b in zip(list(first.verify_ms.values()), list(first.verify_ms.values())[1:], strict=False))
    n = len(calls)
    again = autotree.cached_profile(target, make, "test", list(range(3, 40)), log=lambda _: None)
    assert len(calls) == n and again == first
    for part in ("draft", "verify"):
        path = next((autotree.home() / "profiles").glob(f"{part}-*.json"))
        path.write_text("{not json")
        autotree.cached_profile(target, make, "test", list(range(3, 40)), log=lambda _: None)
        assert json.loads(path.read_text())["key"]["target"] == "tiny"  # a damaged part is measured again
    assert len(calls) > n


def test_verification_is_timed_once_per_target_and_shared_by_every_drafter(monkeypatch):
    """Verification's cost is the target's: a second kind of drafting times only its drafting, and every drafter is
    ranked against the same verify curve (each timing its own would give two drafters of one matrix different trees
    from noise alone). Drafting's ratio is taken against the one-token forward timed beside it."""
    model = tiny_target("llama", seed=0, vocab=97, hidden=64)
    target = type("T", (), {"model": model, "name": "tiny", "checkpoint_hash": "0" * 64,
                            "device": torch.device("cpu"), "dtype": torch.float32})()
    drafter = random_drafter(model.config)
    timed = []
    for part in ("verify", "drafting"):
        measure = getattr(autotree, f"measure_{part}")
        monkeypatch.setattr(autotree, f"measure_{part}",
                            lambda *a, part=part, measure=measure, **k: timed.append(part) or measure(*a, **k))
    monkeypatch.setattr(autotree, "TOP_KS", (1, 2))
    make = lambda tree: EagleProposer(drafter, model, tree)  # noqa: E731
    a = autotree.cached_profile(target, make, "eagle2 vocab=97", list(range(3, 40)), log=lambda _: None)
    b = autotree.cached_profile(target, make, "eagle3 vocab=40", list(range(3, 40)), log=lambda _: None)
    assert timed == ["verify", "drafting", "drafting"]
    assert a.verify_ms == b.verify_ms and a.one_token_ms == b.one_token_ms and a.key != b.key
    assert b.draft_one_token_ms and b.draft_ratio(1, 1) == b.draft_ms["1/1"] / b.draft_one_token_ms
    autotree.cached_profile(target, make, "eagle3 vocab=40", list(range(3, 40)), log=lambda _: None, refresh=True)
    assert timed[3:] == ["verify", "drafting"]  # --refresh measures both parts again


def test_a_profile_belongs_to_the_cpu_model_it_was_timed_on(monkeypatch):
    """Timings are per processor: the key names the CPU model (not just `x86_64`), so a cache carried to another
    machine is measured again there."""
    model = tiny_target("llama", seed=0, vocab=97, hidden=64)
    target = type("T", (), {"model": model, "name": "tiny", "checkpoint_hash": "0" * 64,
                            "device": torch.device("cpu"), "dtype": torch.float32})()
    keys = []
    for cpu in ("AMD EPYC 9654", "Intel(R) Xeon(R) Platinum 8480+"):
        monkeypatch.setattr(autotree, "device_name", lambda _device, cpu=cpu: cpu)
        keys.append(autotree.profile_key(target, "test"))
    assert [k["device"] for k in keys] == ["AMD EPYC 9654", "Intel(R) Xeon(R) Platinum 8480+"]
    assert autotree._digest(keys[0]) != autotree._digest(keys[1])
    monkeypatch.undo()
    assert autotree.profile_key(target, "test")["device"] == provenance.device_name(target.device)


def test_calibration_and_profile_hand_an_eagle3_proposer_its_tapped_features():
    """`--tree auto` runs the proposer through a recording wrapper and times it in the profile: both must see the
    proposer's `taps` (an EAGLE-3 drafter reads three target layers, not the last hidden state), and the recorded
    steps are those of a plain run with the same tree."""
    from types import SimpleNamespace

    from test_eagle3_decoding import drafter_for

    from taps_bench.decoding.eagle3 import Eagle3Proposer
    from taps_bench.decoding.engine import generate

    model = tiny_target("llama", seed=4, layers=8)
    drafter = drafter_for(model, 4, 40)
    target = SimpleNamespace(model=model, name="tiny", stop_ids=(), checkpoint_hash="tiny", device=torch.device("cpu"),
                             dtype=torch.float32)
    tree = TreeSettings(total_tokens=12, depth=3, top_k=3)
    prompts = [[1, 5, 9, 2, 7, 3], [4, 4, 8, 1, 6]]
    steps = autotree.calibrate(target, Eagle3Proposer(drafter, model, tree), prompts, Sampling(), 16)
    plain = sum(len(generate(model, p, Eagle3Proposer(drafter, model, tree), Sampling(), 16, ()).counters
                    .accept_lengths) for p in prompts)
    assert len(steps) == plain and any(len(s.accepted) > 1 for s in steps)
    profile = autotree.measure_profile(target, lambda t: Eagle3Proposer(drafter, model, t), "eagle3 vocab=40",
                                       list(range(1, 40)), repeats=1)
    assert profile.draft_ms and all(ms > 0 for ms in profile.draft_ms.values())
