"""EAGLE-3 training: training-time test trains the attention the drafter drafts with, the token objective over the
draft vocabulary, the three-layer feature cache, and trained (and zero) EAGLE-3 drafters decode losslessly.

Everything runs on tiny random targets (conftest.tiny_target); the `smollm` tests only need the SmolLM2 tokenizer.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import tiny_target
from test_train import registry, smol, smol_target  # noqa: F401  (module fixtures, used by name)

from taps_bench.catalog.cards import TreeSettings
from taps_bench.decoding.eagle3 import Eagle3Proposer
from taps_bench.decoding.engine import generate
from taps_bench.decoding.proposer import Autoregressive
from taps_bench.decoding.sampling import Sampling
from taps_bench.models.eagle3 import Eagle3Drafter
from taps_bench.models.eagle3_format import load_eagle3
from taps_bench.models.forward import prefill, prepare
from taps_bench.training.build import epoch_summary
from taps_bench.training.features import Sequence, cache_key, extract, load_sequences
from taps_bench.training.train import TrainSettings, fresh_eagle3, make_batch, save_trained, train
from taps_bench.training.ttt import STEP_DECAY, target_distributions, ttt_losses, ttt_mask, unroll

pytestmark = pytest.mark.usefixtures("one_thread")

GREEDY = Sampling(temperature=0.0)
LAYERS = 8  # EAGLE-3 reads the states entering layers 2, L//2, L-3: (2, 4, 5)
TAPS = (2, 4, 5)


@pytest.fixture(scope="module")
def target():
    return tiny_target("llama", seed=0, vocab=97, hidden=64, layers=LAYERS)


def sequences(model, lengths: list[int], seed: int = 0) -> list[Sequence]:
    """Random token sequences with the target's post-norm states and tapped features; every token is a loss token."""
    gen = torch.Generator().manual_seed(seed)
    weights = prepare(model)
    out = []
    for n in lengths:
        ids = torch.randint(0, model.config.vocab_size, (n,), generator=gen)
        with torch.inference_mode():
            last, _, tapped = prefill(weights, ids, None, TAPS)
        out.append(Sequence(ids=ids, mask=torch.ones(n, dtype=torch.bool), hidden=last.clone(),
                            aux=torch.cat(tapped, dim=-1).clone()))
    return out


def settings(**kw) -> TrainSettings:
    base = {"method": "eagle3", "epochs": 3, "lr": 3e-3, "batch_tokens": 256, "autocast": "off",
            "head_dtype": "float32", "ttt_steps": 4}
    return TrainSettings(**(base | kw))


def scrambled(drafter: Eagle3Drafter, seed: int = 3) -> Eagle3Drafter:
    """Weights far from the fresh start, so that every term of the computation matters in a comparison."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in drafter.named_parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g) if "norm" not in name else 0.1 * torch.randn(p.shape,
                                                                                                        generator=g))
    return drafter.eval()


# -- the objective --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("step", [0, 1, 3])
def test_ttt_mask_is_context_plus_the_slots_own_earlier_steps(step):
    mask = ttt_mask(5, step)
    assert mask.shape == (5, 5 * (step + 1))
    for s in range(5):
        for key in range(mask.shape[1]):
            block, p = divmod(key, 5)
            assert bool(mask[s, key]) == (p <= s if block == 0 else p == s)


def test_unrolled_steps_equal_what_decoding_computes_at_each_depth(target):
    """Step j at slot s is the depth-j node of the chain that follows the true tokens from slot s, computed as the
    proposer computes it: the committed context through `fc`, then one node per depth at position s+j attending
    to the context and to its own ancestors, fed back the drafter's own output."""
    drafter = scrambled(fresh_eagle3(target, torch.arange(0, 97, 3), seed=0))
    seq = sequences(target, [12])[0]
    embed = target.get_input_embeddings()
    steps = 4
    with torch.no_grad():
        outs = unroll(drafter, embed, seq.ids[None], seq.aux[None].float(), steps)
        for s in range(seq.ids.numel() - steps - 1):
            n = s + 1
            context, past = drafter(embed(seq.ids[1:n + 1]), seq.aux[:n].float(), torch.arange(n), None,
                                    torch.ones(n, n, dtype=torch.bool).tril(), from_target=True)
            hidden = context[-1:]
            for depth in range(1, steps):
                node = seq.ids[s + 1 + depth: s + 2 + depth]
                hidden, new = drafter(embed(node), hidden, torch.tensor([s + depth]), past,
                                      torch.ones(1, past.length + 1, dtype=torch.bool), from_target=False)
                past = past.cat(new)
                torch.testing.assert_close(outs[depth][0, s], hidden[0], atol=1e-4, rtol=2e-4)
            torch.testing.assert_close(outs[0][0, s], context[-1], atol=1e-4, rtol=2e-4)


def test_target_distribution_is_the_softmax_over_the_draft_vocabulary():
    gen = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(8, 10, bias=False)
    hidden = torch.randn(1, 6, 8, generator=gen)
    weight = torch.tensor([[1.0, 1.0, 0.0, 1.0, 1.0, 1.0]])
    draft_ids = torch.tensor([1, 4, 7])
    got = target_distributions(head, hidden, weight, draft_ids)
    with torch.no_grad():
        logits = head(hidden[0])
    for q in range(6):
        if weight[0, q] == 0:
            assert got.weight[0, q] == 0 and not got.probs[0, q].any()
            continue
        torch.testing.assert_close(got.probs[0, q], torch.softmax(logits[q, draft_ids], -1))
        # a position whose target argmax cannot be drafted carries no loss
        assert got.weight[0, q] == float(int(logits[q].argmax()) in draft_ids.tolist())


def test_the_loss_is_the_decayed_sum_of_per_step_cross_entropies(target):
    drafter = scrambled(fresh_eagle3(target, torch.arange(0, 97, 2), seed=0))
    batch = make_batch(sequences(target, [9, 14]))
    embed, head = target.get_input_embeddings(), target.lm_head
    ids = torch.arange(0, 97, 2)
    targets = target_distributions(head, batch.hidden[:, 1:], batch.weight, ids)
    with torch.no_grad():
        got = ttt_losses(drafter, embed, batch.ids, batch.aux, targets, steps=3)
        outs = unroll(drafter, embed, batch.ids, batch.aux, 3)
    length = batch.ids.shape[1] - 1
    want = torch.zeros(())
    for j, out in enumerate(outs):
        num, den = torch.zeros(()), torch.zeros(())
        for b in range(2):
            for s in range(length - j):
                w = targets.weight[b, s + j]
                if w > 0:
                    logq = torch.log_softmax(drafter.logits(out[b, s]), -1)
                    num += -(targets.probs[b, s + j] * logq).sum() * w
                    den += w
        want += STEP_DECAY ** j * num / den
    torch.testing.assert_close(got["loss"], want, atol=1e-4, rtol=1e-5)
    assert {"acc", "acc1", "acc2"} <= set(got)


def test_eagle3_loss_falls_and_training_is_deterministic(target, tmp_path):
    seqs = sequences(target, [20, 30, 25, 40, 18, 33])
    start = fresh_eagle3(target, torch.arange(0, 97, 2), seed=0)
    a, info = train(start, target, seqs, settings(epochs=4), tmp_path / "a", show_progress=False)
    losses = [h["loss"] for h in info["history"]]
    assert losses[-1] < 0.8 * losses[0]
    assert {"acc1", "acc2", "acc3"} <= set(info["history"][-1])  # agreement per unrolled step is logged
    b, _ = train(fresh_eagle3(target, torch.arange(0, 97, 2), seed=0), target, seqs, settings(epochs=4),
                 tmp_path / "b", show_progress=False)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert "agreement" in epoch_summary(info["history"][-1])


def test_fresh_drafter_drafts_over_the_given_vocabulary_from_the_targets_head(target):
    ids = torch.tensor([3, 5, 40, 96])
    d = fresh_eagle3(target, ids, seed=0)
    assert d.config.draft_vocab_size == 4 and d.config.target_hidden_size == 64
    assert torch.equal(torch.arange(4) + d.d2t, ids) and int(d.t2d.sum()) == 4 and bool(d.t2d[ids].all())
    assert torch.equal(d.lm_head.weight, target.lm_head.weight[ids])
    full = fresh_eagle3(target, None, seed=0)
    assert full.d2t is None and full.config.draft_vocab_size == 97


# -- trained and zero drafters decode losslessly -----------------------------------------------------------------


def prompt(seed: int, n: int = 11) -> list[int]:
    return torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def trained(target, tmp_path_factory):
    """A drafter trained on the target's own greedy continuations (so that it learns to agree with it)."""
    seqs = []
    for seed in range(8):
        out = generate(target, prompt(100 + seed), Autoregressive(), GREEDY, 40, ())
        ids = torch.tensor(prompt(100 + seed) + out.output_ids)
        with torch.inference_mode():
            last, _, tapped = prefill(prepare(target), ids, None, TAPS)
        seqs.append(Sequence(ids=ids, mask=torch.ones(ids.numel(), dtype=torch.bool), hidden=last.clone(),
                             aux=torch.cat(tapped, -1).clone()))
    drafter, _ = train(fresh_eagle3(target, torch.arange(0, 97, 2), seed=0), target, seqs,
                       settings(epochs=8, batch_tokens=512), tmp_path_factory.mktemp("train"), show_progress=False)
    return drafter


@pytest.mark.parametrize("shape", [(8, 7, 1), (16, 5, 3)])
@pytest.mark.parametrize("kind", ["trained", "zero", "zero-qwen3"])
def test_trained_and_zero_drafters_are_lossless(target, trained, kind, shape):
    drafter = trained
    if kind.startswith("zero"):  # every draft score ties: the tree is made of the lowest ids, all wrong but one
        if kind == "zero-qwen3":
            target = tiny_target("qwen3", seed=2, vocab=97, hidden=64, layers=LAYERS)
        drafter = fresh_eagle3(target, torch.arange(0, 97, 5), seed=0)
        with torch.no_grad():
            for p in drafter.parameters():
                p.zero_()
    total, depth, top_k = shape
    proposer = Eagle3Proposer(drafter, target, TreeSettings(total_tokens=total, depth=depth, top_k=top_k))
    for seed in range(3):
        p = prompt(seed)
        base = generate(target, p, Autoregressive(), GREEDY, 30, ())
        spec = generate(target, p, proposer, GREEDY, 30, ())
        assert spec.output_ids == base.output_ids


def test_a_trained_drafter_accepts_more_than_a_fresh_one(target, trained):
    tree = TreeSettings(total_tokens=8, depth=7, top_k=1)

    def tau(drafter: Eagle3Drafter) -> float:
        steps = tokens = 0
        for seed in range(100, 104):  # prompts it was trained on: agreement is what training buys
            out = generate(target, prompt(seed), Eagle3Proposer(drafter, target, tree), GREEDY, 40, ())
            steps += len(out.counters.accept_lengths)
            tokens += sum(out.counters.accept_lengths)
        return tokens / steps

    assert tau(trained) > 1.3 * tau(fresh_eagle3(target, torch.arange(0, 97, 2), seed=0))


def test_save_trained_writes_a_safeailab_checkpoint_that_loads_back(target, trained, tmp_path):
    save_trained(trained, tmp_path / "d", {"name": "d", "method": "eagle3"})
    loaded, _ = load_eagle3(tmp_path / "d")
    assert json.loads((tmp_path / "d" / "config.json").read_text())["draft_vocab_size"] == 49
    assert yaml.safe_load((tmp_path / "d" / "card.yaml").read_text())["method"] == "eagle3"
    for key, value in trained.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


# -- the feature cache ---------------------------------------------------------------------------------------


@pytest.mark.smollm
def test_tapped_features_come_from_the_same_forward_and_keep_other_caches_valid(smol, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("TAPS_BENCH_HOME", str(tmp_path))
    model = tiny_target("llama", seed=1, vocab=49152, hidden=32, layers=LAYERS, heads=2, kv_heads=1)
    target = smol_target(smol, model=model, tag="taps")
    convs = [[{"role": "user", "content": f"What is {i} + {i}?"},
              {"role": "assistant", "content": f"It is {2 * i}."}] for i in range(3)]
    plain = extract(target, convs, "t:3", "h", max_len=64, show_progress=False)
    assert plain.name == cache_key(target, "t:3", 64, "h")  # the key EAGLE-2/HASS caches always had
    forwards: list[int] = []
    import taps_bench.training.features as features

    real = features.prefill
    monkeypatch.setattr(features, "prefill", lambda *a, **k: forwards.append(1) or real(*a, **k))
    tapped = extract(target, convs, "t:3", "h", max_len=64, show_progress=False, taps=TAPS)
    assert tapped != plain and len(forwards) == 3  # one target forward per sequence, for both kinds of feature
    assert json.loads((tapped / "manifest.json").read_text())["taps"] == list(TAPS)
    with_taps, without = load_sequences(tapped), load_sequences(plain)
    assert all(s.aux is None for s in without)
    for a, b in zip(with_taps, without, strict=True):
        assert torch.equal(a.ids, b.ids) and torch.equal(a.hidden, b.hidden)
        with torch.inference_mode():
            states = model(input_ids=a.ids[None], output_hidden_states=True).hidden_states
        want = torch.cat([states[i][0] for i in TAPS], dim=-1)
        assert a.aux is not None and a.aux.dtype == torch.float16
        torch.testing.assert_close(a.aux.float(), want, atol=3e-3, rtol=3e-3)


# -- the command line ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("flags", "named"), [
    (["--draft-vocab", "lots"], "draft_vocab: must be a number of tokens, auto or full"),
    (["--ttt-steps", "0"], "ttt_steps"),
    (["--method", "eagle4"], "method"),
])
def test_bad_eagle3_training_flags_are_one_line_before_any_model_loads(capsys, flags, named):
    from test_cli import fails

    line = fails(capsys, "train", "--recipe", "mathinstruct-eagle3", *flags)
    assert named in line


def test_eagle3_recipes_share_the_hass_recipes_budget():
    from taps_bench.catalog.registry import Registry

    reg = Registry.load()
    for kind in ("mathinstruct", "sharegpt", "mixed"):
        e3, hass = reg.recipe(f"{kind}-eagle3"), reg.recipe(f"{kind}-hass")
        assert e3.method == "eagle3" and e3.ttt_steps == 3  # as many passes as HASS
        budget = ("corpus", "max_len", "epochs", "lr", "batch_tokens", "target")
        assert {k: getattr(e3, k) for k in budget} == {k: getattr(hass, k) for k in budget}
        assert reg.drafter(f"{kind}-eagle3").targets[e3.target].recipe == e3.name
