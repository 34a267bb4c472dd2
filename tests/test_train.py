"""Drafter training: loss terms, HASS alignment, the training loop, corpora and feature extraction.

Everything runs on tiny random targets (conftest.tiny_target); the tests marked `smollm` only need the SmolLM2
tokenizer (from the TAPS_BENCH_HOME cache), never its weights for a forward pass.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import DATA, tiny_target

from taps_bench.catalog.cards import TreeSettings
from taps_bench.catalog.registry import Registry
from taps_bench.decoding.eagle2 import EagleProposer
from taps_bench.errors import UserError
from taps_bench.models.drafter import load_drafter, random_drafter
from taps_bench.models.forward import prefill, prepare
from taps_bench.training import build
from taps_bench.training.build import recipe_settings
from taps_bench.training.corpora import Part, conversations, load_corpus, parse_spec
from taps_bench.training.features import Sequence, encode, extract, load_sequences
from taps_bench.training.train import (
    TrainSettings,
    alignment_mask,
    batch_losses,
    make_batch,
    regression_loss,
    soft_cross_entropy,
    topk_distillation,
    train,
    vocab_head,
)

SMOL = "smollm2-135m-instruct"


# -- helpers --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    return tiny_target("llama", seed=0, vocab=97, hidden=64)


def make_seqs(target, lengths, seed=0) -> list[Sequence]:
    """Random token sequences with the target's own post-norm hidden states; every token is a loss token."""
    gen = torch.Generator().manual_seed(seed)
    seqs = []
    for n in lengths:
        ids = torch.randint(0, target.config.vocab_size, (n,), generator=gen)
        with torch.inference_mode():
            hidden = target.model(input_ids=ids[None]).last_hidden_state[0]
        seqs.append(Sequence(ids=ids, mask=torch.ones(n, dtype=torch.bool), hidden=hidden.clone()))
    return seqs


def settings(method, **kw) -> TrainSettings:
    kw.setdefault("head_dtype", "float32")  # identical numerics on every CPU
    kw.setdefault("autocast", "off")
    return TrainSettings(method=method, **kw)


def smooth_l1(d: float) -> float:
    return 0.5 * d * d if abs(d) < 1.0 else abs(d) - 0.5


def workdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)  # build_drafter creates it before calling train()
    return path


def comparable(history):
    """History records without the wall-clock fields."""
    return [{k: v for k, v in r.items() if k != "seconds"} for r in history]


def params_equal(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# -- loss terms against direct computations --------------------------------------------------------------------


def test_regression_loss_is_weighted_mean_of_smooth_l1():
    gen = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 3, 4, generator=gen) * 2, torch.randn(2, 3, 4, generator=gen) * 2
    weight = torch.tensor([[1.0, 0.0, 2.0], [0.5, 1.0, 0.0]])
    num = den = 0.0
    for b in range(2):
        for s in range(3):
            per = sum(smooth_l1(float(pred[b, s, h] - target[b, s, h])) for h in range(4)) / 4
            num += float(weight[b, s]) * per
            den += float(weight[b, s])
    assert any(abs(float(d)) >= 1 for d in (pred - target).flatten())  # both SmoothL1 branches are exercised
    assert regression_loss(pred, target, weight).item() == pytest.approx(num / den, rel=1e-6)
    moved = pred.clone()
    moved[0, 1] += 100.0  # a zero-weight position
    moved[1, 2] -= 100.0
    assert regression_loss(moved, target, weight).item() == pytest.approx(num / den, rel=1e-6)


def test_soft_cross_entropy_is_minus_sum_p_log_q():
    gen = torch.Generator().manual_seed(1)
    logq = torch.log_softmax(torch.randn(4, 7, generator=gen), -1)
    p = torch.softmax(torch.randn(4, 7, generator=gen), -1)
    weight = torch.tensor([1.0, 0.0, 3.0, 1.0])
    rows = [-sum(float(p[s, v]) * float(logq[s, v]) for v in range(7)) for s in range(4)]
    expected = sum(float(weight[s]) * rows[s] for s in range(4)) / float(weight.sum())
    assert soft_cross_entropy(logq, p, weight).item() == pytest.approx(expected, rel=1e-6)
    changed = logq.clone()
    changed[1] = torch.log_softmax(torch.randn(7, generator=gen), -1)  # zero weight: no effect
    assert soft_cross_entropy(changed, p, weight).item() == pytest.approx(expected, rel=1e-6)


def test_topk_distillation_sums_over_the_k_largest_p():
    gen = torch.Generator().manual_seed(2)
    logq = torch.log_softmax(torch.randn(3, 8, generator=gen), -1)
    p = torch.softmax(torch.randperm(24, generator=gen).float().view(3, 8) / 4, -1)  # distinct values per row
    weight = torch.tensor([2.0, 1.0, 0.0])
    k = 3
    rows = []
    for s in range(3):
        top = sorted(range(8), key=lambda v: -float(p[s, v]))[:k]
        rows.append(-sum(float(p[s, v]) * float(logq[s, v]) for v in top))
    expected = sum(float(weight[s]) * rows[s] for s in range(3)) / float(weight.sum())
    assert topk_distillation(logq, p, k, weight).item() == pytest.approx(expected, rel=1e-6)
    # k = V is the full soft cross-entropy
    assert topk_distillation(logq, p, 8, weight).item() == pytest.approx(
        soft_cross_entropy(logq, p, weight).item(), rel=1e-6)


# -- alignment masks ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("step", [1, 2, 3])
def test_alignment_mask_follows_the_documented_rule(step):
    length = 6
    m = alignment_mask(length, step)
    assert m.shape == (length, step * length) and m.dtype == torch.bool
    for s in range(length):
        for k in range(1, step + 1):
            for p in range(length):
                want = p <= s - step + 1 if k == 1 else p == s - step + k
                assert bool(m[s, (k - 1) * length + p]) == want, (s, k, p)
    if step == 1:
        assert torch.equal(m, torch.ones(length, length, dtype=torch.bool).tril())


def _record_forward(drafter):
    calls = []
    inner = drafter.forward

    def forward(embeds, features, positions, past, mask):
        out, new = inner(embeds, features, positions, past, mask)
        calls.append(SimpleNamespace(features=features.detach().clone(), feat_grad=features.requires_grad,
                                     positions=positions.clone(), past=None if past is None else past.length,
                                     mask=mask.clone(), out=out, out_grad=out.requires_grad))
        return out, new

    drafter.forward = forward
    return calls


def test_alignment_mask_matches_what_the_eagle2_chain_sees(tiny):
    """Pass j, slot s of training is the depth d = j-1 draft node over n = s-j+2 accepted slots (s = n+d-1)."""
    depth, n = 3, 5
    drafter = random_drafter(tiny.config, seed=3)
    proposer = EagleProposer(drafter, tiny, TreeSettings(total_tokens=depth + 2, depth=depth, top_k=1))
    calls = _record_forward(proposer.drafter)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 97, (n,), generator=gen)
    proposer.propose(tokens, torch.randn(n, 64, generator=gen), root=5)
    assert len(calls) == 1 + depth
    assert torch.equal(calls[0].mask, alignment_mask(n, 1))  # the context pass is causal: alignment pass 1
    length = n + depth + 1
    for d in range(1, depth + 1):
        j, s = d + 1, n + d - 1
        seen = calls[d].mask[0]  # [n + (d - 1) tree slots + itself]
        assert int(calls[d].positions[0]) == s
        row = alignment_mask(length, j)[s].view(j, length)
        assert bool(row[0, :n].all()) and not bool(row[0, n:].any())  # block 1: exactly the accepted context
        for k in range(2, j + 1):  # block k: exactly its ancestor at depth k-1 (k = j: itself)
            assert row[k - 1].nonzero().flatten().tolist() == [s - j + k]
        as_inference = torch.cat([row[0, :n], torch.stack([row[k - 1, s - j + k] for k in range(2, j + 1)])])
        assert torch.equal(seen, as_inference)
        assert int(row.sum()) == int(seen.sum()) == n + d == s + 1


def test_eagle2_tree_nodes_see_context_plus_depth(tiny):
    depth, n = 3, 4
    proposer = EagleProposer(random_drafter(tiny.config, seed=4), tiny, TreeSettings(total_tokens=20, depth=depth,
                                                                                    top_k=2))
    calls = _record_forward(proposer.drafter)
    gen = torch.Generator().manual_seed(1)
    proposer.propose(torch.randint(0, 97, (n,), generator=gen), torch.randn(n, 64, generator=gen), root=7)
    for d in range(1, depth + 1):
        counts = calls[d].mask.sum(-1).tolist()
        assert counts == [n + d] * 2  # the accepted context, d-1 ancestors, itself
        assert int(alignment_mask(n + depth + 1, d + 1)[n + d - 1].sum()) == n + d


# -- one batch: HASS feeds its own predictions; EAGLE-2 is one pass ------------------------------------------


def test_hass_alignment_passes_feed_the_drafters_own_detached_predictions(tiny):
    seqs = make_seqs(tiny, [9, 12], seed=5)
    batch = make_batch(seqs)
    length = batch.ids.shape[1] - 1
    s = settings("hass", noise=0.0, align_steps=3)
    drafter = random_drafter(tiny.config, seed=6).train()
    calls = _record_forward(drafter)
    lm_head = vocab_head(tiny.lm_head, "float32")
    out = batch_losses(drafter, tiny.get_input_embeddings(), lm_head, batch, s)
    assert len(calls) == 3
    hidden = batch.hidden
    assert torch.equal(calls[0].features, hidden[:, :-1])
    for i in (1, 2):
        prev = calls[i - 1].out.detach()
        assert torch.equal(calls[i].features, torch.cat([hidden[:, :1], prev[:, :-1]], dim=1))
        assert not calls[i].feat_grad and calls[i - 1].out_grad  # detached although the output carried grad
    assert [c.past for c in calls] == [None, length, 2 * length]
    for step, c in enumerate(calls, 1):
        assert torch.equal(c.mask[0, 0], alignment_mask(length, step))
    # the loss is the sum of every pass's EAGLE terms plus top-k distillation
    sel = batch.weight > 0
    w = batch.weight[sel]
    total = v_sum = 0.0
    with torch.no_grad():  # a reference value: no graph through lm_head's parameters
        p = torch.softmax(lm_head(hidden[:, 1:][sel]), -1)
        for c in calls:
            logq = torch.log_softmax(lm_head(c.out[sel]), -1)
            v = regression_loss(c.out, hidden[:, 1:], batch.weight)
            total += float(s.v_w * v + s.p_w * soft_cross_entropy(logq, p, w) + s.topk_w * topk_distillation(
                logq, p, s.topk, w))
            v_sum += float(v)
    assert out["loss"].item() == pytest.approx(total, rel=1e-5)
    assert out["v"].item() == pytest.approx(v_sum, rel=1e-5)
    assert out["topk"].item() > 0


def test_noise_only_in_training_mode(tiny):
    batch = make_batch(make_seqs(tiny, [10], seed=7))
    s = settings("eagle2", noise=0.2)
    lm_head = vocab_head(tiny.lm_head, "float32")
    for mode, noisy in (("train", True), ("eval", False)):
        drafter = getattr(random_drafter(tiny.config, seed=8), mode)()
        calls = _record_forward(drafter)
        batch_losses(drafter, tiny.get_input_embeddings(), lm_head, batch, s, torch.Generator().manual_seed(0))
        diff = (calls[0].features - batch.hidden[:, :-1]).abs()
        assert (float(diff.max()) > 0) == noisy
        assert float(diff.max()) <= s.noise / 2 + 1e-6


def test_eagle2_is_one_pass_without_topk(tiny):
    batch = make_batch(make_seqs(tiny, [11], seed=9))
    s = settings("eagle2", noise=0.0, align_steps=3)
    drafter = random_drafter(tiny.config, seed=10).train()
    calls = _record_forward(drafter)
    lm_head = vocab_head(tiny.lm_head, "float32")
    out = batch_losses(drafter, tiny.get_input_embeddings(), lm_head, batch, s)
    assert len(calls) == 1 and calls[0].past is None
    assert out["topk"].item() == 0.0
    assert out["loss"].item() == pytest.approx(s.v_w * out["v"].item() + s.p_w * out["p"].item(), rel=1e-6)


# -- the training loop --------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["eagle2", "hass"])
def test_loss_falls_on_a_fixed_batch(tiny, tmp_path, method):
    seqs = make_seqs(tiny, [24, 32], seed=11)
    s = settings(method, epochs=30, lr=3e-3, batch_tokens=4096)  # one batch per epoch: 30 optimizer steps
    drafter, info = train(None, tiny, seqs, s, workdir(tmp_path), show_progress=False)
    losses = [r["loss"] for r in info["history"]]
    assert len(losses) == 30 and info["steps"] == 30
    assert losses[-1] < 0.5 * losses[0]
    assert not drafter.training


@pytest.mark.parametrize("method", ["eagle2", "hass"])
def test_bf16_autocast_follows_the_float32_loss_curve(tiny, tmp_path, method):
    """Mixed precision (used where the CPU has bf16 units) trains the same drafter, to bf16 rounding."""
    seqs = make_seqs(tiny, [24, 32], seed=11)
    curves = {}
    for mode in ("off", "bfloat16"):
        s = settings(method, epochs=12, lr=3e-3, batch_tokens=4096, autocast=mode)
        _, info = train(None, tiny, seqs, s, workdir(tmp_path / mode), show_progress=False)
        curves[mode] = [r["loss"] for r in info["history"]]
    assert curves["off"] != curves["bfloat16"]  # autocast did change the arithmetic
    for a, b in zip(curves["off"], curves["bfloat16"], strict=True):
        assert b == pytest.approx(a, rel=0.05)
    assert curves["bfloat16"][-1] < 0.7 * curves["bfloat16"][0]


@pytest.mark.parametrize("method", ["eagle2", "hass"])
def test_training_leaves_the_target_untouched_and_gradient_free(method, tmp_path):
    """The target is frozen: no gradient of its (tied) lm_head is computed or accumulated, and its weights stay."""
    target = tiny_target("llama", seed=3, vocab=97, hidden=64)
    target.requires_grad_(True)  # as transformers loads a model
    before = {k: v.clone() for k, v in target.state_dict().items()}
    train(None, target, make_seqs(target, [14, 18], seed=5), settings(method, epochs=1, batch_tokens=40),
          workdir(tmp_path), show_progress=False)
    assert all(p.grad is None and not p.requires_grad for p in target.parameters())
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


def test_training_is_deterministic_per_seed(tiny, tmp_path):
    seqs = make_seqs(tiny, [14, 18, 22], seed=12)
    runs = {}
    for tag, seed in (("a", 0), ("b", 0), ("c", 1)):
        s = settings("hass", epochs=2, batch_tokens=40, seed=seed)
        runs[tag] = train(None, tiny, seqs, s, workdir(tmp_path / tag), show_progress=False)
    (da, ia), (db, ib), (dc, ic) = runs["a"], runs["b"], runs["c"]
    assert [r["loss"] for r in ia["history"]] == [r["loss"] for r in ib["history"]]
    assert params_equal(da, db)
    assert [r["loss"] for r in ia["history"]] != [r["loss"] for r in ic["history"]]
    assert not params_equal(da, dc)


def test_init_seed_draws_the_initial_weights_and_seed_the_rest(tiny, tmp_path):
    """init_seed alone changes where training starts; with it fixed, `seed` (corpus selection, batch order) does
    not: two recipes sharing an init_seed start from identical weights whatever their data seed."""
    seqs = make_seqs(tiny, [14, 18], seed=3)
    starts = {}
    for tag, seed, init_seed in (("a", 0, None), ("b", 5, 0), ("c", 0, 1)):
        s = settings("eagle2", epochs=1, batch_tokens=40, seed=seed, init_seed=init_seed, lr=1e-12)
        starts[tag], _ = train(None, tiny, seqs, s, workdir(tmp_path / tag), show_progress=False)
    # lr 1e-12: the weights after one epoch are the initial weights to within rounding of a vanishing step
    def close(x, y) -> bool:
        return all(torch.allclose(p, q, atol=1e-9) for p, q in zip(x.parameters(), y.parameters(), strict=True))

    assert close(starts["a"], starts["b"])
    assert not close(starts["a"], starts["c"])


def test_cpu_recipes_start_from_independent_initialisations_but_one_pair(registry):
    """Math, chat and mixed recipes of each method start from different weights; the shared-initialisation pair
    differs from sharegpt-hass in its init_seed only."""
    for method in ("eagle2", "hass", "eagle3"):
        seeds = [recipe_settings(registry.recipe(f"{d}-{method}")).initial_seed
                 for d in ("mathinstruct", "sharegpt", "mixed")]
        assert len(set(seeds)) == 3, (method, seeds)
    shared, chat = registry.recipe("sharegpt-hass-shared-init"), registry.recipe("sharegpt-hass")
    math = registry.recipe("mathinstruct-hass")
    assert recipe_settings(shared).initial_seed == recipe_settings(math).initial_seed
    differ = {k for k, v in shared.model_dump().items() if chat.model_dump()[k] != v}
    assert differ == {"name", "description", "init_seed", "origin"}


def test_train_from_flags_alone_or_a_renamed_recipe_needs_no_description(registry):
    """`taps-bench train --corpus ... --method ... --name ...` (the README's longer-training command) and a renamed
    variant of a recipe: the card's required description is the one the build writes, not an error."""
    from taps_bench.training.build import recipe_from_flags

    target = "smollm2-135m-instruct"
    flags = recipe_from_flags(registry, None, target, {"corpus": "mathinstruct:1200", "method": "eagle2",
                                                       "name": "math-4ep", "epochs": 2, "max_len": 384})
    assert (flags.name, flags.method, flags.epochs, flags.description) == ("math-4ep", "eagle2", 2, "")
    renamed = recipe_from_flags(registry, "mathinstruct-hass", target, {"name": "my-hass", "epochs": 4})
    assert (renamed.corpus, renamed.method, renamed.epochs, renamed.description) == ("mathinstruct:1200", "hass", 4, "")
    own = recipe_from_flags(registry, "mathinstruct-hass", target, {})
    assert own.description == registry.recipe("mathinstruct-hass").description


class Killed(Exception):
    pass


def test_resume_after_a_kill_equals_a_straight_run(tiny, tmp_path):
    """Kill the run after epoch 1 was checkpointed; rerunning it gives bit-for-bit the uninterrupted result."""
    seqs = make_seqs(tiny, [14, 18, 22, 26], seed=13)
    s = settings("hass", epochs=3, batch_tokens=48)

    def kill_in_epoch_2(record):  # log() runs before the epoch's checkpoint is written
        if record["epoch"] == 2:
            raise Killed

    with pytest.raises(Killed):
        train(None, tiny, seqs, s, workdir(tmp_path / "a"), show_progress=False, log=kill_in_epoch_2)
    state = torch.load(tmp_path / "a" / "state.pt", weights_only=True)
    assert int(state["epoch"]) == 1 and not (tmp_path / "a" / "state.part").exists()
    resumed, info_a = train(None, tiny, seqs, s, workdir(tmp_path / "a"), show_progress=False)
    straight, info_b = train(None, tiny, seqs, s, workdir(tmp_path / "b"), show_progress=False)
    assert comparable(info_a["history"]) == comparable(info_b["history"])
    assert info_a["tokens_seen"] == info_b["tokens_seen"]
    assert params_equal(resumed, straight)


def test_resume_does_not_reuse_state_of_other_settings(tiny, tmp_path):
    """A work dir holding a finished EAGLE-2 run must not be passed off as a HASS run with another seed (nor as a run
    on other data): `train` refuses to resume from it, and neither the refused state nor the caller's drafter is
    touched, so no drafter trained under other settings can come back labelled with these."""
    seqs = make_seqs(tiny, [14, 18], seed=14)
    work = workdir(tmp_path)
    train(None, tiny, seqs, settings("eagle2", epochs=1, seed=0), work, show_progress=False)
    state_path = work / "state.pt"
    saved = state_path.read_bytes()
    refusal = re.escape(f"{state_path} holds a training run with other settings or data; remove it (or the "
                        "drafter's directory) to start afresh, or train under another name")
    other_data = make_seqs(tiny, [14, 18, 22], seed=15)
    for s, data in ((settings("hass", epochs=1, seed=1), seqs), (settings("eagle2", epochs=1, seed=0), other_data)):
        drafter = random_drafter(tiny.config, seed=3)
        before = {k: v.clone() for k, v in drafter.state_dict().items()}
        with pytest.raises(UserError, match=f"^{refusal}$"):
            train(drafter, tiny, data, s, work, show_progress=False)
        # The drafter handed in was not loaded from the other run's state, and that state was left as it was.
        assert all(torch.equal(before[k], v) for k, v in drafter.state_dict().items())
        assert state_path.read_bytes() == saved


def test_trained_drafter_saves_and_loads_bit_for_bit(tiny, tmp_path):
    seqs = make_seqs(tiny, [12, 16], seed=15)
    s = settings("eagle2", epochs=2)
    drafter, info = train(None, tiny, seqs, s, workdir(tmp_path / "work"), show_progress=False)
    card = {"name": "tiny-eagle", "method": "eagle2", "corpus": "test:2",
            "training": {"steps": info["steps"], "history": info["history"]}}
    out = build.save_trained(drafter, tmp_path / "out", card)
    assert yaml.safe_load((out / "card.yaml").read_text()) == card
    assert not list(out.glob("*.part"))
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 1
    loaded, weights = load_drafter(out)
    assert weights.name == "model.safetensors"
    mine, theirs = drafter.state_for_saving(), loaded.state_for_saving()
    assert mine.keys() == theirs.keys() and "fc.bias" in theirs
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)


# -- corpora ------------------------------------------------------------------------------------------------


def test_parse_spec():
    assert parse_spec("sharegpt:35k+mathinstruct:35k") == [Part("sharegpt", 35000), Part("mathinstruct", 35000)]
    assert parse_spec("mathinstruct") == [Part("mathinstruct", None)]
    assert parse_spec("x:1.5k") == [Part("x", 1500)]
    assert parse_spec("x:20") == [Part("x", 20)]
    for bad in ("a:b", "", "a:0", "a:", "+a", "a:-3"):
        with pytest.raises(UserError):
            parse_spec(bad)


def test_parse_spec_decimal_thousands_are_exact():
    """A decimal count in thousands is read exactly: int(float("64.1") * 1000) would give 64099, the binary
    floating-point product truncated."""
    assert parse_spec("x:64.1k") == [Part("x", 64100)]
    assert parse_spec("x:2.01k") == [Part("x", 2010)]
    assert parse_spec("x:1.001k") == [Part("x", 1001)]


@pytest.fixture(scope="module")
def registry():
    return Registry.load()


def test_conversations_from_the_shared_data(registry, data_dir):
    spec = "mathinstruct:20+sharegpt:10"
    convs, digest = conversations(registry, spec, data_dir, seed=0)
    again, digest_again = conversations(registry, spec, data_dir, seed=0)
    other, digest_other = conversations(registry, spec, data_dir, seed=1)
    assert len(convs) == 30 and convs == again and digest == digest_again
    assert len(other) == 30 and other != convs and digest_other != digest
    assert conversations(registry, "mathinstruct:20+sharegpt:11", data_dir, seed=0)[1] != digest
    for conv in convs:
        assert conv[0]["role"] == "user" and conv[-1]["role"] == "assistant"
        assert [m["role"] for m in conv] == ["user", "assistant"] * (len(conv) // 2)
        assert all(m["content"].strip() for m in conv)
    gsm = [c for c in convs if "\n#### " in c[-1]["content"]]  # GSM8K answers end "#### <number>"
    assert gsm, "seed 0 draws GSM8K rows"
    assert not any(re.search(r"<<[^<>]*>>", c[-1]["content"]) for c in gsm)


def test_gsm8k_calculator_annotations_are_stripped(registry, data_dir):
    raw = (DATA / "gsm8k" / "train.jsonl").read_text(encoding="utf-8")
    assert "<<" in raw
    convs, _ = load_corpus(registry.corpus("mathinstruct"), data_dir)
    gsm = [c for c in convs if "\n#### " in c[-1]["content"]]
    assert len(gsm) >= 7000
    assert not any(re.search(r"<<[^<>]*>>", c[-1]["content"]) for c in gsm)


# -- features -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol(registry):
    from taps_bench.models.targets import load_tokenizer

    card = registry.target(SMOL)
    return card, load_tokenizer(card)


def smol_target(smol, model=None, tag="none"):
    from taps_bench.models.targets import Target

    card, tok = smol
    return Target(card=card, model=model, tokenizer=tok, device=torch.device("cpu"), dtype=torch.float32,
                  stop_ids=(2,), checkpoint="tiny", checkpoint_hash=f"tiny-{tag}")


CONV = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."},
        {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "6, of course.\nDone."}]


def runs(values, mask, want):
    """Maximal runs of consecutive values where mask == want."""
    out, cur = [], []
    for v, m in zip(values, mask, strict=True):
        if m == want:
            cur.append(v)
        elif cur:
            out.append(cur)
            cur = []
    return out + ([cur] if cur else [])


@pytest.mark.smollm
def test_encode_masks_exactly_the_assistant_replies(smol):
    target = smol_target(smol)
    tok = target.tokenizer
    ids, mask = encode(target, CONV, max_len=512)
    assert len(ids) == len(mask)
    full = tok.apply_chat_template([dict(m) for m in CONV], tokenize=False)
    assert tok.decode(ids, skip_special_tokens=False) == full
    replies = [tok.decode(r, skip_special_tokens=False) for r in runs(ids, mask, True)]
    assert replies == ["It is 4.<|im_end|>\n", "6, of course.\nDone.<|im_end|>\n"]
    rest = "".join(tok.decode(r, skip_special_tokens=False) for r in runs(ids, mask, False))
    assert "What is 2+2?" in rest and "And 3+3?" in rest and "You are a helpful AI assistant" in rest
    assert "It is 4." not in rest and "of course" not in rest


@pytest.mark.smollm
def test_encode_truncates_at_max_len(smol):
    target = smol_target(smol)
    ids, mask = encode(target, CONV, max_len=512)
    first = mask.index(True)
    cut = first + 3
    short = encode(target, CONV, max_len=cut)
    assert short == (ids[:cut], mask[:cut])
    assert encode(target, CONV, max_len=first) is None  # no assistant token left: nothing to learn


@pytest.mark.smollm
def test_extract_writes_atomic_resumable_shards(smol, tmp_path, monkeypatch):
    monkeypatch.setenv("TAPS_BENCH_HOME", str(tmp_path))
    model = tiny_target("llama", seed=1, vocab=49152, hidden=32, layers=1, heads=2, kv_heads=1)
    target = smol_target(smol, model=model, tag="1")
    convs = [[{"role": "user", "content": f"Question {i}: what is {i} + {i}?"},
              {"role": "assistant", "content": f"The answer is {2 * i}."}] for i in range(5)]
    directory = extract(target, convs, "test:5", "datahash", max_len=64, shard_size=2, show_progress=False)
    assert directory.parent == tmp_path / "features"
    shards = sorted(p.name for p in directory.glob("shard-*"))
    assert shards == [f"shard-{i:05d}.safetensors" for i in range(3)]
    assert not list(directory.glob("*.part")) and (directory / "complete").is_file()
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["conversations"] == 5 and manifest["shard_size"] == 2

    seqs = load_sequences(directory)
    assert len(seqs) == 5
    for conv, seq in zip(convs, seqs, strict=True):
        ids, mask = encode(target, conv, 64)
        assert seq.ids.tolist() == ids and seq.mask.tolist() == mask
        with torch.inference_mode():
            want = model.model(input_ids=torch.tensor([ids])).last_hidden_state[0]
        assert seq.hidden.dtype == torch.float16 and seq.hidden.shape == want.shape
        torch.testing.assert_close(seq.hidden.float(), want, atol=2e-3, rtol=2e-3)

    def mtimes() -> dict[str, int]:
        return {p.name: p.stat().st_mtime_ns for p in directory.glob("shard-*")}

    before = mtimes()
    assert extract(target, convs, "test:5", "datahash", max_len=64, shard_size=2, show_progress=False) == directory
    assert mtimes() == before  # nothing recomputed
    old = (directory / "shard-00001.safetensors").read_bytes()
    (directory / "shard-00001.safetensors").unlink()
    extract(target, convs, "test:5", "datahash", max_len=64, shard_size=2, show_progress=False)
    after = mtimes()
    assert after.keys() == before.keys()
    assert {k for k in after if after[k] != before[k]} == {"shard-00001.safetensors"}
    assert (directory / "shard-00001.safetensors").read_bytes() == old
    assert [s.ids.tolist() for s in load_sequences(directory)] == [s.ids.tolist() for s in seqs]
    # another corpus spec (or data hash) is another cache directory
    assert extract(target, convs[:2], "test:2", "datahash", max_len=64, shard_size=2,
                   show_progress=False) != directory


def _qa(tag: str, n: int) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": f"{tag} question {i}: what is {i} times {i}?"},
             {"role": "assistant", "content": f"{tag} answer: {i * i}."}] for i in range(n)]


def count_target_forwards(monkeypatch, hook) -> None:
    """Call `hook()` whenever feature extraction runs the target (through the decoding forward's prefill)."""
    import taps_bench.training.features as features

    real = features.prefill

    def counted(*args, **kwargs):
        hook()
        return real(*args, **kwargs)

    monkeypatch.setattr(features, "prefill", counted)


@pytest.mark.smollm
def test_a_mixture_takes_the_features_of_its_parts_from_their_caches(smol, tmp_path, monkeypatch):
    """`a:2+b:2` after `a:4`: only b's sequences (and one spot check of a's cache) run through the target, and the
    shards are identical to a fresh extraction; a cache made with other numerics is never mixed in."""
    monkeypatch.setenv("TAPS_BENCH_HOME", str(tmp_path / "home"))
    model = tiny_target("llama", seed=1, vocab=49152, hidden=32, layers=1, heads=2, kv_heads=1)
    target = smol_target(smol, model=model, tag="mix")
    calls: list[int] = []
    count_target_forwards(monkeypatch, lambda: calls.append(1))
    a, b = _qa("alpha", 4), _qa("beta", 3)
    part_a = extract(target, a, "a:4", "hash-a", max_len=64, shard_size=2, show_progress=False)
    assert len(calls) == 4

    mixture = [a[1], b[0], a[3], b[2]]
    calls.clear()
    mixed = extract(target, mixture, "a:2+b:2", "hash-mix", max_len=64, shard_size=3, show_progress=False)
    assert len(calls) == 2 + 1  # b's two sequences, and a's first reused one recomputed to check the cache
    assert json.loads((mixed / "manifest.json").read_text())["reused_from"] == {part_a.name: 2}

    monkeypatch.setenv("TAPS_BENCH_HOME", str(tmp_path / "fresh"))
    fresh = extract(target, mixture, "a:2+b:2", "hash-mix", max_len=64, shard_size=3, show_progress=False,
                    share=False)
    for got, want in zip(load_sequences(mixed), load_sequences(fresh), strict=True):
        assert torch.equal(got.ids, want.ids) and torch.equal(got.mask, want.mask)
        assert torch.equal(got.hidden, want.hidden)

    # Same checkpoint hash, other numbers (as features made in another dtype or on another device would be):
    # the spot check fails, so every sequence is run through this target.
    monkeypatch.setenv("TAPS_BENCH_HOME", str(tmp_path / "home"))
    other_model = tiny_target("llama", seed=2, vocab=49152, hidden=32, layers=1, heads=2, kv_heads=1)
    other = smol_target(smol, model=other_model, tag="mix")
    mixed2 = extract(other, mixture, "a:2+b:2", "hash-mix-2", max_len=64, shard_size=3, show_progress=False)
    assert json.loads((mixed2 / "manifest.json").read_text())["reused_from"] == {}
    for conv, seq in zip(mixture, load_sequences(mixed2), strict=True):
        with torch.inference_mode():
            want = prefill(prepare(other_model), torch.tensor(encode(other, conv, 64)[0]), None)[0]
        assert torch.equal(seq.hidden, want.to(torch.float16))


@pytest.mark.smollm
def test_two_processes_extracting_one_corpus_run_the_target_once(smol, tmp_path, monkeypatch, capsys):
    import threading
    import time

    monkeypatch.setenv("TAPS_BENCH_HOME", str(tmp_path))
    model = tiny_target("llama", seed=1, vocab=49152, hidden=32, layers=1, heads=2, kv_heads=1)
    target = smol_target(smol, model=model, tag="lock")
    calls: list[int] = []

    def slow_forward(*_: object) -> None:  # long enough that the two extractions would overlap without the lock
        calls.append(1)
        time.sleep(0.05)

    count_target_forwards(monkeypatch, slow_forward)
    convs = _qa("gamma", 4)
    out: list[Path] = []
    workers = [threading.Thread(target=lambda: out.append(
        extract(target, convs, "g:4", "hash-g", max_len=64, shard_size=2, show_progress=False))) for _ in range(2)]
    for w in workers:
        w.start()
        time.sleep(0.02)
    for w in workers:
        w.join()
    assert len(calls) == 4 and len(out) == 2 and out[0] == out[1]
    assert "another process is extracting features of g:4" in capsys.readouterr().err
    assert len(load_sequences(out[0])) == 4


def test_sequences_round_trip_through_make_batch(tiny):
    seqs = make_seqs(tiny, [5, 8], seed=16)
    seqs[0].mask[:2] = False
    batch = make_batch(seqs)
    assert batch.ids.shape == (2, 8) and batch.hidden.shape == (2, 8, 64)
    assert batch.weight.tolist()[0] == [0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]  # target slot s+1; padding is 0
    assert torch.equal(batch.hidden[1], seqs[1].hidden) and float(batch.hidden[0, 5:].abs().sum()) == 0

