"""Prompt-lookup decoding (PLD), the model-free proposer and drafter: the matcher on known sequences and against a
brute-force search, the proposer's bookkeeping, greedy output equal to autoregressive token for token on Llama and
Qwen3 targets (with drafts actually accepted), the target's distribution at T > 0 (the chi-square harness of
test_sampling), the routing and merged-tree combiners over PLD and EAGLE drafters, `average` refused, the card
schema, and `run`/`matrix` with `--drafter pld` end to end."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from conftest import DATA, tiny_target
from pydantic import ValidationError
from test_cli import fails
from test_combiners import make_combiner
from test_sampling import (
    CONFIGS,
    N_E2E,
    N_RULE,
    PROMPT,
    VOCAB,
    assert_target_distribution,
    chi2_pvalue,
    exact,
    first_trees,
    sample_generate,
    sample_pairs,
)
from test_sampling import target as target  # the fixture: the tiny target whose distributions are exact
from test_speculative import check_counters, random_prompt

from taps_bench.catalog.cards import DrafterCard, PromptLookup, TargetCard, TreeSettings
from taps_bench.catalog.proposers import ProposerSpec
from taps_bench.catalog.registry import Registry
from taps_bench.cli import main
from taps_bench.decoding import engine
from taps_bench.decoding.combiners import Average, AverageOptions, Confidence
from taps_bench.decoding.engine import Acceptance, accept_sampling, generate
from taps_bench.decoding.pld import (
    NO_MATCH,
    PromptLookupProposer,
    acceptance_rate,
    binary_entropy,
    copy_from,
    copy_outcome,
    find_match,
)
from taps_bench.decoding.proposer import Autoregressive
from taps_bench.decoding.sampling import Sampling, draw, probabilities
from taps_bench.decoding.tree import DraftTree, children_of, path_to
from taps_bench.errors import UserError
from taps_bench.measure.resolve import build_proposer, check_proposer, tree_candidates, tree_settings
from taps_bench.models.drafter import random_drafter, save_drafter
from taps_bench.site.labels import row_labels
from taps_bench.site.rows import Row

pytestmark = pytest.mark.usefixtures("one_thread")

GREEDY = Sampling()
CPU = "smollm2-135m-instruct"
T = torch.tensor


# -- the matcher ---------------------------------------------------------------------------------------------------


def brute_force_match(context: list[int], max_ngram: int, min_ngram: int) -> tuple[int, int]:
    """The definition, position by position: n from the longest down, the latest earlier occurrence first."""
    length = len(context)
    for n in range(min(max_ngram, length - 1), min_ngram - 1, -1):
        for start in range(length - 1, n - 1, -1):  # the occurrence is context[start - n:start], before the suffix
            if context[start - n:start] == context[length - n:]:
                return start, n
    return NO_MATCH


@pytest.mark.parametrize(("context", "max_ngram", "min_ngram", "expected"), [
    # the longest n-gram wins over a more recent shorter one: (1, 2, 3) at 0..2, while "3" alone recurs at 4
    ([1, 2, 3, 9, 3, 8, 1, 2, 3], 3, 1, (3, 3)),
    # of two occurrences the most recent: (1, 2) at 0 and at 3; the copy starts after the second, at token 8
    ([1, 2, 7, 1, 2, 8, 1, 2], 3, 1, (5, 2)),
    ([1, 2, 3, 4, 0, 1, 2, 3, 4], 2, 1, (4, 2)),  # max_ngram caps n: (3, 4) matches, the copy starts at 0
    ([5, 1, 9, 1], 3, 2, NO_MATCH),  # only a 1-gram recurs: below min_ngram
    ([5, 1, 9, 1], 3, 1, (2, 1)),
    ([7, 8, 9], 3, 1, NO_MATCH),  # nothing recurs; the suffix is never its own match
    ([4], 3, 1, NO_MATCH),
    ([4, 4], 3, 1, (1, 1)),  # the only earlier "4" is followed by the last token itself
])
def test_find_match_on_known_sequences(context, max_ngram, min_ngram, expected):
    assert find_match(T(context), max_ngram, min_ngram) == expected
    assert brute_force_match(context, max_ngram, min_ngram) == expected


def test_find_match_equals_the_definition_on_random_sequences():
    rng = random.Random(7)
    for _ in range(400):
        vocab, length = rng.randint(2, 5), rng.randint(1, 40)
        context = [rng.randrange(vocab) for _ in range(length)]
        max_ngram = rng.randint(1, 5)
        min_ngram = rng.randint(1, max_ngram)
        assert find_match(T(context), max_ngram, min_ngram) == brute_force_match(context, max_ngram, min_ngram), \
            (context, max_ngram, min_ngram)


def test_copy_continues_a_repeating_pattern_past_the_end():
    context = T([9, 1, 2, 3, 1, 2, 3])
    assert copy_from(context, 1, 3).tolist() == [1, 2, 3]
    assert copy_from(context, 4, 5).tolist() == [1, 2, 3, 1, 2]  # the copy reaches the end: it copies itself
    assert copy_from(T([4, 4]), 1, 4).tolist() == [4, 4, 4, 4]


def test_copy_outcome_counts_hits_up_to_the_first_miss():
    assert copy_outcome(T([4, 5, 6]), T([4, 5, 7, 8])) == (2, 3)  # a miss at the third token ends the check
    assert copy_outcome(T([4, 5, 6]), T([9])) == (0, 1)
    assert copy_outcome(T([4, 5, 6]), T([4, 5])) == (2, 2)  # the third copied token is not judged
    assert copy_outcome(T([4, 5]), T([4, 5, 6])) == (2, 2)


# -- the proposer -------------------------------------------------------------------------------------------------


def test_the_proposer_drafts_the_copy_as_a_chain_with_an_honest_confidence():
    proposer = PromptLookupProposer(PromptLookup(num_pred_tokens=4))
    prompt = [5, 1, 2, 3, 4, 6, 7, 8, 1, 2]
    tree = proposer.propose(T(prompt), torch.empty(0), 3)  # context ends 1, 2, 3: copied from after its occurrence
    assert tree.tokens.tolist() == [3, 4, 6, 7, 8] and tree.parents.tolist() == [-1, 0, 1, 2, 3]
    rate = acceptance_rate(0, 0, 3)  # no copy judged yet; a 3-gram matched: (0 + 3 + 1) / (0 + 3 + 2)
    assert rate == pytest.approx(0.8)
    assert tree.logp.tolist() == pytest.approx([d * math.log(rate) for d in range(5)])
    assert tree.entropy.tolist() == pytest.approx([0.0] + [binary_entropy(rate)] * 4)
    assert 0 < binary_entropy(rate) < math.log(2)
    # The target accepted 4 and 6, then emitted 9 instead of 7: two hits in three judged copies.
    tree = proposer.propose(T([3, 4, 6]), torch.empty(0), 9)
    assert (proposer.hits, proposer.trials) == (2, 3)
    assert tree.size == 1  # "9" never occurred before: the root alone
    tree = proposer.propose(T([9]), torch.empty(0), 6)  # context ... 4, 6, 9, 6: the 1-gram "6", latest after 9
    assert tree.tokens.tolist() == [6, 9, 6, 9, 6]
    assert float(tree.logp[1]) == pytest.approx(math.log(acceptance_rate(2, 3, 1)))
    d = proposer.diagnostics()["lookup"]
    assert d["steps"] == 3 and d["matched"] == pytest.approx(2 / 3) and d["mean_ngram"] == 2.0
    assert d["copies_judged"] == 3 and d["copy_accept_rate"] == pytest.approx(2 / 3)
    proposer.reset()
    assert proposer.context.numel() == 0 and proposer.diagnostics()["lookup"]["steps"] == 0


def test_the_proposer_keeps_the_context_it_is_given_in_pieces():
    """Fed the prompt, then each step's committed tokens (root first), it drafts what a lookup over the whole
    context drafts: nothing is lost or doubled between calls."""
    rng = random.Random(3)
    options = PromptLookup(max_ngram=2, num_pred_tokens=5)
    proposer = PromptLookupProposer(options)
    context = [rng.randrange(4) for _ in range(12)]
    tokens, root = context[:-1], context[-1]
    for _ in range(30):
        tree = proposer.propose(T(tokens), torch.empty(0), root)
        start, _ = find_match(T(context), options.max_ngram, options.min_ngram)
        expected = [] if start < 0 else copy_from(T(context), start, 5).tolist()
        assert tree.tokens.tolist() == [root, *expected]
        tokens = [root, *[rng.randrange(4) for _ in range(rng.randint(0, 3))]]
        root = rng.randrange(4)
        context += [*tokens[1:], root]


def test_a_budget_caps_the_chain():
    options = PromptLookup(num_pred_tokens=10)
    long_context = T([1, 2, 3] * 8)
    assert PromptLookupProposer(options).propose(long_context, torch.empty(0), 1).size == 11
    assert PromptLookupProposer(options, max_tokens=3).propose(long_context, torch.empty(0), 1).size == 4
    assert PromptLookupProposer(options, max_tokens=0).propose(long_context, torch.empty(0), 1).size == 1


# -- greedy: token for token what autoregressive decoding emits -----------------------------------------------------


def repetitive_prompt(seed: int, vocab: int, period: int = 5, repeats: int = 3) -> list[int]:
    """A random phrase said `repeats` times and begun once more: something to copy from."""
    g = torch.Generator().manual_seed(4000 + seed)
    phrase = torch.randint(3, vocab, (period,), generator=g).tolist()
    return phrase * repeats + phrase[:2]


OPTIONS = [PromptLookup(), PromptLookup(max_ngram=2, num_pred_tokens=4),
           PromptLookup(max_ngram=5, min_ngram=2, num_pred_tokens=16), PromptLookup(max_ngram=1, num_pred_tokens=1)]


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_pld_greedy_is_lossless_and_accepts_copies(family):
    accepted, longest = 0, 0
    # Smaller weights make a random target repeat itself more (its greedy text loops): more for PLD to copy.
    for seed, hidden, std in [(0, 64, 0.5), (1, 32, 0.1), (2, 64, 0.2)]:
        model = tiny_target(family, seed=seed, hidden=hidden, std=std)
        vocab = model.config.vocab_size
        stops = (model.config.eos_token_id if model.config.eos_token_id is not None else 2,)
        for prompt in (repetitive_prompt(seed, vocab), random_prompt(seed, vocab)):
            ar = generate(model, prompt, Autoregressive(), GREEDY, 40, stops)
            for options in OPTIONS:
                out = generate(model, prompt, PromptLookupProposer(options), GREEDY, 40, stops)
                assert out.output_ids == ar.output_ids, (seed, prompt, options)
                assert out.counters.stop_reason == ar.counters.stop_reason
                check_counters(out.counters, out.output_ids, 40)
                assert max(out.counters.tree_sizes, default=1) <= options.num_pred_tokens + 1
                accepted += sum(out.counters.accept_lengths)
                longest = max([longest, *out.counters.accept_lengths])
    # PLD drafted and the target took much of it, several copied tokens in one step: acceptance was exercised.
    assert accepted > 50 and longest >= 4


@pytest.mark.parametrize("max_context", [24, 31])
def test_pld_is_lossless_up_to_the_context_limit(max_context):
    model = tiny_target("qwen3", seed=4, hidden=32)
    prompt = repetitive_prompt(4, 97, period=4, repeats=4)
    ar = generate(model, prompt, Autoregressive(), GREEDY, 50, (), max_context=max_context)
    out = generate(model, prompt, PromptLookupProposer(PromptLookup()), GREEDY, 50, (), max_context=max_context)
    assert out.output_ids == ar.output_ids and out.counters.stop_reason == "context"
    assert max(out.counters.tree_sizes) > 1  # it drafted near the limit, where a chain that does not fit is cut


@pytest.mark.smollm
@pytest.mark.slow
def test_pld_on_smollm_copies_numbers_from_the_question(smollm):
    from test_speculative import smollm_prompt

    prompt = smollm_prompt(smollm, "A shop sells 1234 apples on Monday and 5678 apples on Tuesday. Repeat both "
                                   "numbers, then add 1234 and 5678.")
    ar = generate(smollm.model, prompt, Autoregressive(), GREEDY, 48, smollm.stop_ids)
    out = generate(smollm.model, prompt, PromptLookupProposer(PromptLookup()), GREEDY, 48, smollm.stop_ids)
    assert out.output_ids == ar.output_ids
    assert sum(out.counters.accept_lengths) > 0


# -- sampling: the target's distribution, exactly ------------------------------------------------------------------


@pytest.fixture
def copying(target, monkeypatch) -> list[int]:
    """test_sampling's prompt followed by six tokens of the target's greedy continuation, as the prompt of its
    exact distributions and samples: something worth copying, so that PLD's drafts are often accepted (about 25% at
    T=1 and 40% at T=0.7/top-p 0.9) and often rejected."""
    import test_sampling

    prompt = [*PROMPT, *generate(target, PROMPT, Autoregressive(), GREEDY, 6, ()).output_ids]
    monkeypatch.setattr(test_sampling, "PROMPT", prompt)
    return prompt


def pld_first_trees(model: Any, prompt: list[int]) -> dict[int, tuple[DraftTree, torch.Tensor]]:
    """PLD's tree under every possible first token, with the verify logits (test_sampling.first_trees)."""
    trees = first_trees(model, PromptLookupProposer(PromptLookup(num_pred_tokens=3)), np.ones(VOCAB))
    drafted = {x for x, (t, _) in trees.items() if t.size > 1}
    assert drafted == set(prompt)  # a first token seen in the prompt is a 1-gram match at least; any other is not
    return trees


@pytest.mark.parametrize("config", ["t1", "t07p09"])
def test_pld_acceptance_rule_is_lossless(target, copying, config):
    s = CONFIGS[config]
    p1, p2, _ = exact(target, s)
    trees = {x: v for x, v in pld_first_trees(target, copying).items() if p1[x] > 0}
    counts, accepted = sample_pairs(trees, p1, s, accept_sampling, N_RULE, seed=23)
    assert 0.1 * N_RULE < accepted < 0.9 * N_RULE  # copies accepted and rejected
    joint = p1[:, None] * p2
    assert chi2_pvalue(counts, joint) > 1e-3
    assert chi2_pvalue(counts.sum(0), joint.sum(0)) > 1e-3


def accept_trusting_logp(tree: DraftTree, logits: torch.Tensor, s: Sampling, gen: torch.Generator) -> Acceptance:
    """A rule that takes each node's claimed probability exp(logp[node] - logp[parent]) for the draft's q(x) and
    accepts with min(1, p(x) / q(x)), the residual being p without x: right for a draft of probability 1 only.
    PLD's logp is an acceptance estimate below 1, so this over-accepts its copies."""
    probs, kids, tokens, logp = probabilities(logits, s), children_of(tree), tree.tokens.tolist(), tree.logp.tolist()
    node = 0
    while kids[node]:
        child = kids[node][0]
        q = math.exp(logp[child] - logp[node])
        p = probs[node]
        if torch.rand((), generator=gen).item() < min(1.0, float(p[tokens[child]]) / q):
            node = child
            continue
        residual = p.clone()
        residual[tokens[child]] = 0.0
        return Acceptance(path=path_to(tree, node), next_token=draw(residual / residual.sum(), gen))
    return Acceptance(path=path_to(tree, node), next_token=draw(probs[node], gen))


def test_a_rule_reading_pld_logp_as_its_draft_probability_is_rejected(target, copying):
    """PLD's drafts are deterministic (q one-hot) and the engine's rule treats them so. Taking the confidence PLD
    reports in logp for q would bias the output, and the same harness sees it."""
    s = CONFIGS["t1"]
    p1, p2, _ = exact(target, s)
    trees = {x: v for x, v in pld_first_trees(target, copying).items() if p1[x] > 0}
    counts, _ = sample_pairs(trees, p1, s, accept_trusting_logp, N_RULE, seed=23)
    assert chi2_pvalue(counts, p1[:, None] * p2) < 1e-3


class Counting(PromptLookupProposer):
    """PLD, counting the drafted tokens the engine accepted over all the sequences it decodes."""

    accepted = 0

    def observe(self, tree: DraftTree, accepted: list[int]) -> None:
        self.accepted += len(accepted) - 1


@pytest.mark.parametrize("config", ["t1", "t07p09"])
def test_generate_with_pld_samples_the_target_distribution(target, copying, config):
    s = CONFIGS[config]
    p1, p2, p3 = exact(target, s)
    proposer = Counting(PromptLookup(num_pred_tokens=3))
    samples = sample_generate(target, proposer, s, N_E2E, 300_000)
    assert_target_distribution(samples, p1, p2, p3)
    assert proposer.accepted > 0.1 * N_E2E  # copies were accepted, in samples of two verify steps at most


def test_generate_with_pld_and_a_logp_trusting_rule_is_rejected(target, copying, monkeypatch):
    """The end-to-end harness sees the same bias (fewer samples suffice)."""
    monkeypatch.setattr(engine, "accept_sampling", accept_trusting_logp)
    s = CONFIGS["t1"]
    p1, p2, _ = exact(target, s)
    samples = sample_generate(target, PromptLookupProposer(PromptLookup(num_pred_tokens=3)), s, 1000, 400_000)
    pairs = np.bincount(samples[:, 0] * VOCAB + samples[:, 1], minlength=VOCAB * VOCAB)
    assert chi2_pvalue(pairs, p1[:, None] * p2) < 1e-3


# -- combiners over PLD and EAGLE drafters ---------------------------------------------------------------------------

SHAPE = TreeSettings(total_tokens=8, depth=3, top_k=2)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("kind", ["confidence-step", "confidence-prompt", "entropy-step", "entropy-prompt",
                                  "merged-full", "merged-equal"])
def test_combiners_over_pld_and_eagle_are_lossless(family, kind):
    model = tiny_target(family, seed=6, hidden=32)
    drafters = [("pld", PromptLookup()), ("eagle", random_drafter(model.config, 6))]
    combiner = make_combiner(kind, drafters, model, SHAPE)
    chosen = []
    for seed in range(3):
        for prompt in (repetitive_prompt(10 + seed, 97), random_prompt(10 + seed, 97)):
            ar = generate(model, prompt, Autoregressive(), GREEDY, 30, ())
            out = generate(model, prompt, combiner, GREEDY, 30, ())
            assert out.output_ids == ar.output_ids, (kind, prompt)
            check_counters(out.counters, out.output_ids, 30)
            assert max(out.counters.tree_sizes) <= 1 + (7 if kind != "merged-full" else 7 + 7)
            chosen += out.diagnostics["choices"]
    if kind.endswith("step") or kind.startswith("merged"):  # PLD's copies were chosen (or accepted) at some steps
        assert "pld" in chosen


def test_confidence_over_pld_and_an_eagle3_drafter_is_lossless():
    from test_eagle3_decoding import drafter_for

    model = tiny_target("llama", seed=7, hidden=32, layers=7)  # EAGLE-3 reads layers 2, L//2 and L-3
    combiner = Confidence([("eagle3", drafter_for(model, 7, None)), ("pld", PromptLookup())], model, SHAPE)
    assert combiner.taps is not None  # the EAGLE-3 member's layers; the PLD member is handed a slice it ignores
    for seed in range(2):
        prompt = repetitive_prompt(20 + seed, 97)
        out = generate(model, prompt, combiner, GREEDY, 30, ())
        assert out.output_ids == generate(model, prompt, Autoregressive(), GREEDY, 30, ()).output_ids


# -- resolving `pld` by name ----------------------------------------------------------------------------------------


@pytest.fixture
def tiny(tmp_path: Path) -> tuple[Any, Path]:
    """A tiny random target as `build_proposer` reads one, with an "auto" tree card, and one EAGLE checkpoint."""
    model = tiny_target("llama", seed=12, vocab=16, hidden=32)
    save_drafter(random_drafter(model.config, 1, std=0.5), tmp_path / "eagle")
    card = TargetCard.model_validate({"name": "tiny", "description": "a tiny random test target", "family": "llama",
                                      "source": {"path": "/nonexistent"}, "tree": "auto"})
    return SimpleNamespace(model=model, name="tiny", card=card), tmp_path / "eagle"


def test_pld_resolves_by_name_with_its_chain_as_its_tree(tiny):
    tgt, _ = tiny
    reg = Registry.load()
    spec = ProposerSpec(drafter="pld")
    assert check_proposer(reg, spec, tgt.card) == (spec, [])  # nothing to build
    chain = TreeSettings(total_tokens=11, depth=9, top_k=1)
    assert tree_settings(tgt, None, reg, spec) == chain  # an "auto" card calibrates nothing for it
    proposer, label, settings = build_proposer(reg, spec, tgt, TreeSettings())
    assert label == "pld" and isinstance(proposer, PromptLookupProposer)
    assert settings == {"drafter_family": "pld", "tree": chain.model_dump(), "model_free": {
        "method": "pld", "max_ngram": 3, "min_ngram": 1, "num_pred_tokens": 10}}
    assert row_labels(Row(name=label, kind="drafter", settings=settings), reg)["family"].text == "PLD (model-free)"
    with pytest.raises(UserError, match=r"model-free.*no tree shape to choose"):  # `profile --drafter pld`
        tree_candidates(reg, spec, tgt, None, DATA, GREEDY)
    with pytest.raises(UserError, match=r"model-free.*--draft-vocab"):
        build_proposer(reg, spec, tgt, TreeSettings(), draft_vocab=1000)


@pytest.mark.parametrize(("combiner", "options"), [("confidence", {}), ("entropy", {"granularity": "prompt"}),
                                                   ("merged-tree", {"budget": "equal"})])
def test_combiners_take_pld_by_name(tiny, combiner, options):
    tgt, eagle = tiny
    reg = Registry.load()
    spec = ProposerSpec(combiner=combiner, drafters=("pld", str(eagle)), **options)
    check_proposer(reg, spec, tgt.card)
    proposer, label, settings = build_proposer(reg, spec, tgt, SHAPE)
    assert "pld" in label and settings["drafters"][0] == {"name": "pld", "drafter_family": "pld", "model_free": {
        "method": "pld", "max_ngram": 3, "min_ngram": 1, "num_pred_tokens": 10}}
    assert settings["tree"] == SHAPE.model_dump()
    assert row_labels(Row(name=label, kind="combiner", settings=settings), reg)["family"].text == \
        "PLD (model-free) + ?"  # the checkpoint directory's family is recorded nowhere
    prompt = repetitive_prompt(30, 16)
    out = generate(tgt.model, prompt, proposer, GREEDY, 24, ())
    assert out.output_ids == generate(tgt.model, prompt, Autoregressive(), GREEDY, 24, ()).output_ids


def test_average_over_pld_is_refused_in_one_line(tiny, capsys, monkeypatch, tmp_path):
    tgt, eagle = tiny
    reg = Registry.load()
    spec = ProposerSpec(combiner="average", drafters=("pld", str(eagle)))
    for check in (lambda: check_proposer(reg, spec, tgt.card), lambda: build_proposer(reg, spec, tgt, SHAPE)):
        with pytest.raises(UserError, match=r"drafter 'pld' is model-free .*no weights to average"):
            check()
    with pytest.raises(UserError, match="no weights to average"):  # the combiner itself, called directly
        Average.build(AverageOptions(drafters=("pld", "eagle")), [("pld", PromptLookup()), ("eagle", eagle)],
                      tgt.model, SHAPE)
    monkeypatch.setenv("TAPS_BENCH_DATA", str(DATA))
    db = tmp_path / "r.sqlite"
    line = fails(capsys, "run", "--combiner", "average", "--drafters", f"pld,{eagle}", "--task", "gsm8k",
                 "--target", CPU, "--db", db)
    assert "drafter 'pld' is model-free" in line and "no weights to average" in line
    spec = tmp_path / "m.yaml"  # a matrix says so before any cell runs
    spec.write_text(yaml.safe_dump({"name": "m", "targets": [CPU], "tasks": {"gsm8k": 1}, "proposers": [
        {"drafter": "pld"}, {"combiner": "average", "drafters": ["pld", str(eagle)]}]}))
    line = fails(capsys, "matrix", spec, "--db", db)
    assert "matrix m: proposers[1]: combiner average: drafter 'pld' is model-free" in line
    assert not db.exists()


@pytest.mark.parametrize(("flags", "says"), [(["--total-tokens", "8"], "--total-tokens cannot apply"),
                                             (["--depth", "2", "--top-k", "1"], "--depth, --top-k cannot apply"),
                                             (["--tree", "paper"], "--tree paper cannot apply")])
def test_run_pld_refuses_tree_sizes_in_one_line(capsys, monkeypatch, tmp_path, flags, says):
    monkeypatch.setenv("TAPS_BENCH_DATA", str(DATA))
    db = tmp_path / "r.sqlite"
    line = fails(capsys, "run", "--drafter", "pld", *flags, "--task", "gsm8k", "--target", CPU, "--db", db)
    assert "drafter 'pld' is model-free: it drafts a chain of up to 10 tokens" in line and says in line
    assert not db.exists()


# -- the card ---------------------------------------------------------------------------------------------------------

PLD_CARD = {"name": "p", "description": "prompt lookup", "method": "pld", "model_free": {}}


@pytest.mark.parametrize(("change", "says"), [
    ({"model_free": None}, "is model-free: give its options here"),
    ({"corpus": "sharegpt"}, "has no corpus"),
    ({"targets": {"tiny": {"recipe": "x"}}}, "has no targets"),
    ({"tree": {"depth": 3}}, "it has no tree"),
    ({"model_free": {"max_ngram": 2, "min_ngram": 3}}, "min_ngram 3 is more than max_ngram 2"),
    ({"model_free": {"num_pred_tokens": 17}}, "less than or equal to 16"),
    ({"model_free": {"ngram": 2}}, "Extra inputs are not permitted"),
    ({"method": "eagle2"}, "only a model-free drafter"),
    ({"method": "eagle2", "model_free": None}, "corpus"),
])
def test_the_card_schema_keeps_model_free_and_trained_drafters_apart(change, says):
    card = {k: v for k, v in {**PLD_CARD, **change}.items() if v is not None}
    with pytest.raises(ValidationError, match=says):
        DrafterCard.model_validate(card)


def test_rows_split_by_the_options_and_the_shipped_card_lists(capsys, tmp_path):
    (tmp_path / "drafters").mkdir()
    (tmp_path / "drafters" / "pld-short.yaml").write_text(yaml.safe_dump(
        {**PLD_CARD, "name": "pld-short", "model_free": {"num_pred_tokens": 4}}))
    reg = Registry.load(include=[tmp_path])
    tgt = SimpleNamespace(model=None, name="t", card=reg.target(CPU))
    settings = {n: build_proposer(reg, ProposerSpec(drafter=n), tgt, TreeSettings())[2]
                for n in ("pld", "pld-short")}
    assert settings["pld"] != settings["pld-short"]
    assert settings["pld-short"]["tree"] == {"total_tokens": 5, "depth": 3, "top_k": 1}
    assert main(["--include", str(tmp_path), "list", "drafters"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("pld")]
    assert len(lines) == 2 and all(line.endswith("[model-free: any target]") for line in lines)


# -- end to end on tiny-smol: `run --drafter pld` and a matrix with PLD rows ------------------------------------


@pytest.mark.smollm
def test_run_and_matrix_with_pld(capsys, tmp_path, tiny_smol, data_dir):
    from test_matrix import drafters

    from taps_bench.results.store import Store

    eagle, _ = drafters(tmp_path, tiny_smol)
    db = tmp_path / "r.sqlite"
    common = ["--task", "gsm8k", "--target", "tiny-smol", "--limit", "1", "--max-new-tokens", "16", "--json",
              "--no-progress", "--db", str(db), "--data-dir", str(data_dir)]
    assert main(["--include", str(tiny_smol), "run", "--drafter", "pld", "--tree", "auto", *common]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["lossless_rate"] == 1.0 and result["drafter"] == "pld"
    assert result["tree"] == {"total_tokens": 11, "depth": 9, "top_k": 1}
    assert result["proposer_settings"]["model_free"]["num_pred_tokens"] == 10
    stored = Store(f"sqlite:///{db}").samples(result["run_id"])
    assert stored[0]["extra"]["lookup"]["steps"] == len(stored[0]["accept_lengths"])
    assert main(["--include", str(tiny_smol), "run", "--combiner", "confidence", "--drafters", f"pld,{eagle}",
                 *common]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["lossless_rate"] == 1.0 and result["proposer_settings"]["drafters"][0]["drafter_family"] == "pld"

    spec = tmp_path / "m.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "with-pld", "targets": ["tiny-smol"], "tasks": {"gsm8k": 1, "svamp": 1}, "temperatures": [0, 1],
        "max_new_tokens": 8, "tree": {"total_tokens": 8, "depth": 2, "top_k": 3},  # the EAGLE entries' tree
        "proposers": [{"drafter": "pld"}, {"combiner": "merged-tree", "drafters": ["pld", str(eagle)]}]}))
    assert main(["--include", str(tiny_smol), "matrix", str(spec), "--db", str(db), "--no-progress", "--json",
                 "--data-dir", str(data_dir)]) == 0
    cells = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["cells"]
    assert len(cells) == 2 * 2 * 2 and {c["status"] for c in cells} == {"done"}
    assert all(c["result"]["lossless_rate"] == 1.0 for c in cells if c["temperature"] == 0)
    runs = Store(f"sqlite:///{db}").runs()
    pld_trees = [r["settings"]["tree"] for r in runs if r["proposer"] == "pld"]
    assert pld_trees and all(t == {"total_tokens": 11, "depth": 9, "top_k": 1} for t in pld_trees)  # not the spec's
