"""Speculative decoding with EAGLE-3 drafters: EAGLE-2 trees over the drafter, drafting from three target layers
and over a reduced draft vocabulary, lossless by construction (greedy output equals autoregressive output token
for token); the features the engine hands over are exactly the target's states entering the tapped layers."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_target
from test_eagle3 import random_state

from taps_bench.catalog.cards import TreeSettings
from taps_bench.decoding.eagle3 import Eagle3Proposer
from taps_bench.decoding.engine import generate
from taps_bench.decoding.proposer import Autoregressive
from taps_bench.decoding.sampling import Sampling
from taps_bench.models.eagle3 import Eagle3Config, Eagle3Drafter, load_state

pytestmark = pytest.mark.usefixtures("one_thread")
GREEDY = Sampling(temperature=0.0)


def drafter_parts(config, seed: int, draft_vocab: int | None) -> tuple[Eagle3Config, dict[str, torch.Tensor]]:
    """A random EAGLE-3 drafter's config and weights (SafeAILab names) shaped for a target `config`; the weights and
    the random draft vocabulary come from test_eagle3's helper, which reads its module's vocabulary sizes."""
    import test_eagle3

    vocab = int(config.vocab_size)
    shape = Eagle3Config(hidden_size=config.hidden_size, intermediate_size=2 * config.hidden_size,
                         heads=config.num_attention_heads, kv_heads=config.num_key_value_heads,
                         head_dim=config.hidden_size // config.num_attention_heads, vocab_size=vocab,
                         draft_vocab_size=draft_vocab or vocab, target_hidden_size=config.hidden_size)
    saved = test_eagle3.VOCAB, test_eagle3.DRAFT_VOCAB
    test_eagle3.VOCAB, test_eagle3.DRAFT_VOCAB = vocab, draft_vocab or vocab
    try:
        return shape, random_state(shape, seed)
    finally:
        test_eagle3.VOCAB, test_eagle3.DRAFT_VOCAB = saved


def drafter_for(model, seed: int, draft_vocab: int | None) -> Eagle3Drafter:
    shape, state = drafter_parts(model.config, seed, draft_vocab)
    drafter = Eagle3Drafter(shape)
    load_state(drafter, state)
    return drafter.eval()


def prompt(seed: int, vocab: int, n: int = 11) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize(("seed", "draft_vocab", "shape"), [
    (0, None, (8, 3, 2)), (1, 40, (16, 4, 4)), (2, 12, (6, 5, 1)), (3, None, (24, 2, 6)),
])
def test_greedy_eagle3_decoding_is_lossless(family, seed, draft_vocab, shape):
    model = tiny_target(family, seed=seed, layers=8)
    drafter = drafter_for(model, seed, draft_vocab)
    total, depth, top_k = shape
    proposer = Eagle3Proposer(drafter, model, TreeSettings(total_tokens=total, depth=depth, top_k=top_k))
    trees = []
    original = proposer.propose
    proposer.propose = lambda *a: trees.append(original(*a)) or trees[-1]  # type: ignore[method-assign]
    p = prompt(seed, model.config.vocab_size)
    base = generate(model, p, Autoregressive(), GREEDY, 24, ())
    spec = generate(model, p, proposer, GREEDY, 24, ())
    assert spec.output_ids == base.output_ids
    assert max(spec.counters.tree_sizes) <= total and sum(spec.counters.drafted_by_depth) > 0
    # Every drafted token is a target id that the draft vocabulary maps to (d2t offsets applied at every level).
    allowed = set(range(model.config.vocab_size)) if drafter.d2t is None else set(
        (torch.arange(drafter.config.draft_vocab_size) + drafter.d2t).tolist())
    assert {t for tree in trees for t in tree.tokens[1:].tolist()} <= allowed


def test_the_proposer_is_handed_the_states_entering_its_tapped_layers():
    """What the engine passes an EAGLE-3 proposer at prefill: the target's states entering layers 2, L//2 and L-3
    (transformers' `hidden_states[i]`), concatenated, not the last hidden state."""
    from taps_bench.models.forward import prepare

    model = tiny_target("llama", seed=5, layers=8)
    drafter = drafter_for(model, 5, None)
    proposer = Eagle3Proposer(drafter, model, TreeSettings(total_tokens=8, depth=3, top_k=2))
    assert proposer.taps == (2, 4, 5)  # 2, L//2, L-3 for L = 8
    seen: list[torch.Tensor] = []
    original = proposer.propose

    def spy(tokens, hidden, root):
        seen.append(hidden.clone())
        return original(tokens, hidden, root)

    proposer.propose = spy  # type: ignore[method-assign]
    p = prompt(5, model.config.vocab_size)
    generate(model, p, proposer, GREEDY, 6, ())
    with torch.no_grad():
        states = model(torch.tensor([p]), output_hidden_states=True).hidden_states
    want = torch.cat([states[i][0] for i in (2, 4, 5)], dim=-1)
    prepare(model)
    assert seen[0].shape == want.shape
    torch.testing.assert_close(seen[0], want, rtol=1e-3, atol=1e-3)  # our kernels vs transformers'


@pytest.mark.slow
@pytest.mark.parametrize("config", ["t1", "t07p09"])
def test_sampling_with_a_reduced_draft_vocabulary_keeps_the_target_distribution(config):
    """At T > 0 the emitted tokens follow the target's processed distribution (chi-square on the first three
    tokens and on the pair of the second and third), with the drafter over 6 of the 10 target tokens."""
    from test_sampling import CONFIGS, VOCAB, assert_target_distribution, exact, sample_generate

    model = tiny_target("llama", seed=11, vocab=VOCAB, hidden=16, layers=7, heads=2, kv_heads=1, std=0.3)
    proposer = Eagle3Proposer(drafter_for(model, 4, 6), model, TreeSettings(total_tokens=8, depth=2, top_k=3))
    s = CONFIGS[config]
    p1, p2, p3 = exact(model, s)
    samples = sample_generate(model, proposer, s, 1500, seed=300_000)  # half of test_sampling's: time
    assert_target_distribution(samples, p1, p2, p3)


def test_run_takes_an_eagle3_checkpoint_directory(tmp_path, capsys, monkeypatch):
    """`taps-bench run --drafter DIR` with a SafeAILab-format EAGLE-3 checkpoint: detected, checked against the
    target, decoded losslessly, and recorded as an EAGLE-3 drafter with its draft vocabulary."""
    import json

    from byte_target import write_byte_target
    from conftest import DATA
    from test_eagle3 import write_safeailab
    from transformers import LlamaConfig

    from taps_bench.cli import main

    config = write_byte_target(tmp_path, "tiny-bytes8", layers=8, tree={"total_tokens": 8, "depth": 3, "top_k": 2})
    write_safeailab(tmp_path / "eagle3", *drafter_parts(config, 3, 100))
    monkeypatch.setenv("TAPS_BENCH_DATA", str(DATA))
    rc = main(["--include", str(tmp_path), "run", "--target", "tiny-bytes8", "--drafter", str(tmp_path / "eagle3"),
               "--task", "gsm8k", "--limit", "2", "--max-new-tokens", "12", "--db", str(tmp_path / "r.sqlite"),
               "--no-progress", "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["lossless_rate"] == 1.0 and result["drafter"] == "eagle3"
    from taps_bench.results.store import Store

    with Store(f"sqlite:///{tmp_path / 'r.sqlite'}") as store:
        (spec,) = store.find_runs(kind="speculative")
    assert spec["settings"]["drafter_family"] == "eagle3" and spec["settings"]["draft_vocab_size"] == 100

    # A drafter for another vocabulary is refused with one line, before anything is decoded.
    write_safeailab(tmp_path / "other", *drafter_parts(LlamaConfig(**{**config.to_dict(), "vocab_size": 300}), 3,
                                                       100))
    rc = main(["--include", str(tmp_path), "run", "--target", "tiny-bytes8", "--drafter", str(tmp_path / "other"),
               "--task", "gsm8k", "--limit", "1", "--db", str(tmp_path / "r.sqlite"), "--no-progress"])
    assert rc == 2 and "vocabulary of 300 tokens, the target has 258" in capsys.readouterr().err

    # --draft-vocab is for EAGLE-1/2/HASS drafters: an EAGLE-3 drafter's vocabulary is part of its weights.
    rc = main(["--include", str(tmp_path), "run", "--target", "tiny-bytes8", "--drafter", str(tmp_path / "eagle3"),
               "--task", "gsm8k", "--limit", "1", "--draft-vocab", "64", "--db", str(tmp_path / "r.sqlite"),
               "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "drafts over its own draft vocabulary of 100 tokens" in err and "Traceback" not in err
