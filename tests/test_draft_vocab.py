"""Reduced draft vocabularies: counting a corpus's assistant tokens, choosing the top N, drafting only from them,
and decoding that stays exactly the target's."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_target

from taps_bench.catalog.cards import TargetCard, TreeSettings
from taps_bench.catalog.proposers import ProposerSpec
from taps_bench.catalog.registry import Registry
from taps_bench.cli import main
from taps_bench.decoding.eagle2 import EagleProposer
from taps_bench.decoding.engine import generate
from taps_bench.decoding.proposer import Autoregressive
from taps_bench.decoding.sampling import Sampling
from taps_bench.errors import UserError
from taps_bench.models.drafter import random_drafter, save_drafter
from taps_bench.training import vocab
from taps_bench.training.features import encode

GREEDY = Sampling()
SHAPES = [TreeSettings(total_tokens=8, depth=3, top_k=2), TreeSettings(total_tokens=16, depth=4, top_k=4),
          TreeSettings(total_tokens=6, depth=5, top_k=1), TreeSettings(total_tokens=60, depth=5, top_k=10)]

pytestmark = pytest.mark.usefixtures("one_thread")


def random_prompt(seed: int, vocab_size: int, length: int = 9) -> list[int]:
    g = torch.Generator().manual_seed(3000 + seed)
    return torch.randint(3, vocab_size, (length,), generator=g).tolist()


def subset(vocab_size: int, n: int, seed: int) -> torch.Tensor:
    return torch.randperm(vocab_size, generator=torch.Generator().manual_seed(seed))[:n]


# -- choosing the vocabulary ---------------------------------------------------------------------------------------


def test_draft_vocabulary_takes_the_most_frequent_ids_and_reports_their_coverage():
    counts = torch.tensor([5, 0, 9, 1, 9, 3])
    ids, coverage = vocab.draft_vocabulary(counts, 2)
    assert ids.tolist() == [2, 4] and coverage == pytest.approx(18 / 27)
    ids, coverage = vocab.draft_vocabulary(counts, 3)
    assert ids.tolist() == [0, 2, 4] and coverage == pytest.approx(23 / 27)
    ids, coverage = vocab.draft_vocabulary(counts, 100)  # more than the vocabulary: all of it
    assert ids.tolist() == list(range(6)) and coverage == 1.0
    assert vocab.draft_vocabulary(torch.tensor([1, 1, 1, 1]), 2)[0].tolist() == [0, 1]  # ties: the lower id
    with pytest.raises(UserError, match="no assistant tokens"):
        vocab.draft_vocabulary(torch.zeros(4, dtype=torch.long), 2)


def test_auto_size_covers_99_percent_rounded_up_to_1024():
    counts = torch.zeros(8000, dtype=torch.long)
    counts[:1500] = 10  # 15000 tokens on 1500 ids, then a tail of 100 ids seen once each
    counts[1500:1600] = 1
    # 99% of 15100 = 14949: 1495 ids of count 10 -> rounded up to 2048
    assert vocab.auto_size(counts) == 2048
    assert vocab.auto_size(counts, coverage=1.0) == 2048  # 1600 ids -> 2048
    assert vocab.auto_size(counts[:1600], coverage=1.0) == 1600  # never more than the vocabulary


def _target(draft_vocab, checkpoint="ckpt"):
    card = TargetCard.model_validate({"name": "t", "description": "d", "family": "llama",
                                      "source": {"path": "/nonexistent"}, "draft_vocab": draft_vocab})
    return SimpleNamespace(card=card, name="t", checkpoint_hash=checkpoint,
                           model=SimpleNamespace(config=SimpleNamespace(vocab_size=8000)))


@pytest.fixture
def fake_counts(monkeypatch, tmp_path):
    """token_frequencies replaced by a fixed count vector; returns the calls it got."""
    counts = torch.zeros(8000, dtype=torch.long)
    counts[:1500] = 10
    counts[1500:1600] = 1
    calls = []

    def fake(target, spec, data_dir, reg=None, max_len=512, seed=0, log=None):
        calls.append((spec, max_len, seed))
        return counts

    monkeypatch.setattr(vocab, "token_frequencies", fake)
    monkeypatch.setattr(vocab, "_MEMO", {})
    return calls


def test_the_card_or_the_flag_chooses_the_size(fake_counts, tmp_path):
    reg = Registry.load()
    auto = vocab.resolve_draft_vocab(reg, _target("auto"), None, None, tmp_path)
    assert auto is not None and auto.ids.numel() == 2048
    assert auto.asked == "auto"
    assert auto.settings() == {"size": 2048, "coverage": 1.0, "corpus": reg.recipe(vocab.FALLBACK_RECIPE).corpus}
    # the fallback corpus is the mixed recipe's, with its length limit and seed; counted once per process
    recipe = reg.recipe(vocab.FALLBACK_RECIPE)
    assert fake_counts == [(recipe.corpus, recipe.max_len, recipe.seed)]
    small = vocab.resolve_draft_vocab(reg, _target("auto"), 1000, None, tmp_path)
    assert small.ids.numel() == 1000 and small.coverage == pytest.approx(10000 / 15100)
    assert vocab.resolve_draft_vocab(reg, _target("auto"), "full", None, tmp_path) is None
    assert vocab.resolve_draft_vocab(reg, _target(None), None, None, tmp_path) is None
    assert vocab.resolve_draft_vocab(reg, _target(None), "auto", None, tmp_path).ids.numel() == 2048
    assert vocab.resolve_draft_vocab(reg, _target(9000), None, None, tmp_path) is None  # N >= vocabulary: full
    assert len(fake_counts) == 1


def test_a_built_drafter_counts_over_its_own_recipe_corpus(fake_counts, tmp_path):
    card = SimpleNamespace(training={"corpus_spec": "mathinstruct:50", "max_len": 128, "seed": 3})
    got = vocab.resolve_draft_vocab(Registry.load(), _target(4096), None, card, tmp_path)
    assert got.corpus == "mathinstruct:50" and fake_counts == [("mathinstruct:50", 128, 3)]


def test_without_corpus_data_the_card_falls_back_to_full_but_the_flag_fails(fake_counts, monkeypatch):
    monkeypatch.delenv("TAPS_BENCH_DATA", raising=False)
    notes: list[str] = []
    reg = Registry.load()
    assert vocab.resolve_draft_vocab(reg, _target("auto"), None, None, None, log=notes.append) is None
    assert len(notes) == 1 and "full vocabulary" in notes[0]
    with pytest.raises(UserError, match="--draft-vocab 4096 needs the corpus"):
        vocab.resolve_draft_vocab(reg, _target(None), 4096, None, None)


@pytest.mark.parametrize("value", [0, -5, "full", "many", 1.5, True])
def test_the_card_field_refuses_bad_sizes(value):
    with pytest.raises(ValueError):
        _target(value)


@pytest.mark.parametrize("value", ["0", "-3", "abc", "1.5", ""])
def test_bad_draft_vocab_flag_is_one_clear_line(capsys, value):
    rc = main(["run", "--drafter", "whatever", "--draft-vocab", value, "--task", "gsm8k", "--target",
               "smollm2-135m-instruct"])
    out, err = capsys.readouterr()
    assert rc == 2 and "Traceback" not in out + err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("taps-bench: error: --draft-vocab must be"), err
    assert repr(value) in lines[0]


# -- counting ------------------------------------------------------------------------------------------------------


@pytest.mark.smollm
def test_token_frequencies_count_only_assistant_tokens(smollm, tmp_path, monkeypatch):
    data = tmp_path / "data"
    (data / "qa").mkdir(parents=True)
    rows = [{"q": "Zebras quietly juggle xylophones?", "a": "Four apples."},
            {"q": "What colour is snow?", "a": "White, like four apples."}]
    (data / "qa" / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cards = tmp_path / "cards" / "corpora"
    cards.mkdir(parents=True)
    (cards / "tiny-qa.yaml").write_text("name: tiny-qa\ndescription: two rows\ndomain: math\nhub: none/none\n"
                                        "local:\n  - {path: qa/rows.jsonl, style: qa, prompt_field: q, "
                                        "answer_field: a}\n")
    reg = Registry.load(include=[tmp_path / "cards"])
    counts = vocab.token_frequencies(smollm, "tiny-qa", data, reg, max_len=256)
    assert counts.shape == (smollm.model.config.vocab_size,) and counts.dtype == torch.long

    want = torch.zeros_like(counts)
    replies, rest = set(), set()
    for r in rows:
        ids, mask = encode(smollm, [{"role": "user", "content": r["q"]}, {"role": "assistant", "content": r["a"]}],
                           256)
        want += torch.bincount(torch.tensor(ids)[torch.tensor(mask)], minlength=counts.numel())
        replies |= {t for t, m in zip(ids, mask, strict=True) if m}
        rest |= {t for t, m in zip(ids, mask, strict=True) if not m}
    assert torch.equal(counts, want) and int(counts.sum()) == sum(int(want[t]) for t in replies)
    tok = smollm.tokenizer
    assert int(counts[tok.convert_tokens_to_ids("<|im_end|>")]) == 2  # each reply's end-of-turn mark
    assert int(counts[tok.convert_tokens_to_ids("<|im_start|>")]) == 0  # the template's, never the reply's
    user_only = rest - replies  # the system prompt, the questions, the template
    assert tok(" snow", add_special_tokens=False)["input_ids"][0] in user_only
    assert all(int(counts[t]) == 0 for t in user_only)
    assert int(counts[tok(" apples", add_special_tokens=False)["input_ids"][0]]) == 2

    # Cached: the second call reads the file and tokenises nothing.
    files = list((vocab.home() / "draft-vocab").glob("*.safetensors"))
    assert len(files) == 1 and not list((vocab.home() / "draft-vocab").glob("*.part"))
    monkeypatch.setattr(vocab, "encode", lambda *a: pytest.fail("recounted a cached corpus"))
    assert torch.equal(vocab.token_frequencies(smollm, "tiny-qa", data, reg, max_len=256), counts)


# -- drafting from a reduced vocabulary ------------------------------------------------------------------------------


class Recorder:
    """Wraps a proposer and keeps every tree it proposed."""

    def __init__(self, inner: EagleProposer) -> None:
        self.inner, self.name, self.trees = inner, inner.name, []

    def reset(self) -> None:
        self.inner.reset()

    def propose(self, tokens, hidden, root):
        tree = self.inner.propose(tokens, hidden, root)
        self.trees.append(tree)
        return tree

    def observe(self, tree, accepted) -> None:
        self.inner.observe(tree, accepted)

    def diagnostics(self):
        return {}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n", [3, 23])
def test_a_reduced_vocabulary_proposer_drafts_only_its_tokens(shape, n):
    model = tiny_target("llama", seed=4, hidden=32)
    ids = subset(97, n, seed=n)
    rec = Recorder(EagleProposer(random_drafter(model.config, 4, std=0.5), model, shape, draft_ids=ids))
    generate(model, random_prompt(n, 97), rec, GREEDY, 16, ())
    allowed = set(ids.tolist())
    assert rec.trees and all(set(t.tokens[1:].tolist()) <= allowed for t in rec.trees)
    assert all(t.size == min(shape.total_tokens, 1 + sum(min(shape.top_k, n) ** (1 + (d > 0))
                                                         for d in range(shape.depth + 1))) for t in rec.trees)


def test_a_permuted_full_vocabulary_drafts_the_same_trees():
    """Every id, in another order: the index map back to target ids must give exactly the full-vocabulary trees."""
    model = tiny_target("qwen3", seed=2, hidden=32)
    drafter = random_drafter(model.config, 2, std=0.5)
    shape = TreeSettings(total_tokens=16, depth=3, top_k=3)
    gen = torch.Generator().manual_seed(0)
    tokens, hidden = torch.randint(0, 97, (7,), generator=gen), torch.randn(7, 32, generator=gen)
    full = EagleProposer(drafter, model, shape).propose(tokens, hidden, 5)
    perm = EagleProposer(drafter, model, shape, draft_ids=torch.randperm(97, generator=gen)).propose(tokens, hidden, 5)
    assert torch.equal(full.tokens, perm.tokens) and torch.equal(full.parents, perm.parents)
    assert torch.allclose(full.logp, perm.logp, atol=1e-5) and torch.allclose(full.entropy, perm.entropy, atol=1e-5)


@pytest.mark.parametrize(("family", "seed"), [("llama", 0), ("qwen3", 1), ("llama", 2)])
@pytest.mark.parametrize("n", [1, 8, 40])
def test_greedy_with_a_reduced_vocabulary_equals_autoregressive(family, seed, n):
    model = tiny_target(family, seed=seed, hidden=32)
    drafter = random_drafter(model.config, seed, std=0.5)
    ids = subset(97, n, seed)
    for p in range(2):
        prompt = random_prompt(10 * seed + p, 97, length=4 + 5 * p)
        ar = generate(model, prompt, Autoregressive(), GREEDY, 20, ())
        for shape in SHAPES:
            out = generate(model, prompt, EagleProposer(drafter, model, shape, draft_ids=ids), GREEDY, 20, ())
            assert out.output_ids == ar.output_ids, (shape, p)


def test_sampling_with_a_reduced_vocabulary_is_deterministic_per_seed():
    """At T > 0 the acceptance rule reads only target probabilities of deterministically chosen drafts: a reduced
    vocabulary changes which drafts there are, nothing else, and a seed still fixes the output."""
    model = tiny_target("llama", seed=6, hidden=32)
    drafter = random_drafter(model.config, 6, std=0.5)
    s = Sampling(temperature=0.8, seed=3)
    shape = TreeSettings(total_tokens=8, depth=3, top_k=2)
    runs = [generate(model, random_prompt(6, 97), EagleProposer(drafter, model, shape, draft_ids=subset(97, 5, 6)),
                     s, 24, ()).output_ids for _ in range(2)]
    assert runs[0] == runs[1] and len(runs[0]) == 24


def test_bad_draft_ids_are_refused():
    model = tiny_target("llama", seed=0, hidden=32)
    drafter = random_drafter(model.config, 0)
    for bad in (torch.tensor([1, 1, 2]), torch.tensor([0, 97]), torch.tensor([-1]), torch.tensor([], dtype=torch.long)):
        with pytest.raises(ValueError, match="draft_ids"):
            EagleProposer(drafter, model, SHAPES[0], draft_ids=bad)


# -- wired through build_proposer ----------------------------------------------------------------------------------


def test_build_proposer_records_the_vocabulary_in_the_settings(tmp_path, monkeypatch):
    from taps_bench.measure.resolve import build_proposer

    model = tiny_target("llama", seed=12, vocab=64, hidden=32)
    save_drafter(random_drafter(model.config, 1, std=0.5), tmp_path / "d")
    counts = torch.arange(64, 0, -1)  # id 0 the most frequent
    monkeypatch.setattr(vocab, "token_frequencies", lambda *a, **k: counts)
    monkeypatch.setattr(vocab, "_MEMO", {})
    settings = {}
    for n in (8, 16, "full"):
        card = TargetCard.model_validate({"name": "tiny", "description": "a tiny random test target",
                                          "family": "llama", "source": {"path": "/nonexistent"}, "draft_vocab": 8})
        target = SimpleNamespace(model=model, name="tiny", card=card, checkpoint_hash="tiny")
        proposer, _, settings[n] = build_proposer(Registry.load(), ProposerSpec(drafter=str(tmp_path / "d")), target,
                                                  SHAPES[1], draft_vocab=None if n == 8 else n, data_dir=tmp_path)
        prompt = random_prompt(12, 64)
        assert generate(model, prompt, proposer, GREEDY, 16, ()).output_ids == \
            generate(model, prompt, Autoregressive(), GREEDY, 16, ()).output_ids
        if n == "full":
            assert proposer.draft_ids is None
        else:
            assert proposer.draft_ids.tolist() == list(range(n))
    assert settings[8]["draft_vocab"]["size"] == 8 and settings[16]["draft_vocab"]["size"] == 16
    assert settings[8]["draft_vocab"]["coverage"] == pytest.approx(sum(range(57, 65)) / sum(range(1, 65)), abs=1e-6)
    assert "draft_vocab" not in settings["full"]  # the full vocabulary keeps the settings runs had before
