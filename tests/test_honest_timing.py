"""Honest timing: the two arms of a measurement are decoded interleaved after an untimed warm-up, resume after a
kill, and the speedup carries a reproducible bootstrap interval over prompts that flags a measurement slower than
plain decoding wherever a speedup is shown."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from conftest import tiny_target

from taps_bench.catalog.cards import TargetCard
from taps_bench.catalog.proposers import ProposerSpec
from taps_bench.catalog.registry import Registry
from taps_bench.data.tasks import Example, prompt_hash, render_prompt
from taps_bench.decoding.proposer import Autoregressive
from taps_bench.decoding.sampling import Sampling
from taps_bench.matrix.local import Outcome, summary_rows
from taps_bench.matrix.spec import Cell
from taps_bench.measure import runner
from taps_bench.measure.runner import Arm, baseline_arm, measure, open_run
from taps_bench.models.targets import Target
from taps_bench.results.store import Store
from taps_bench.results.summaries import slower_than_plain, speedup_text, summarize_pair

pytestmark = pytest.mark.usefixtures("one_thread")

PROV = {"dtype": "float32", "device_name": "test-cpu", "threads": 1}
MAX_NEW = 6


class CharTokenizer:
    """Just enough of a tokenizer for the runner: a chat template, characters to ids and back."""

    chat_template = "role-tagged"  # render_chat only asks that there is one

    def apply_chat_template(self, messages: list[dict[str, str]], tokenize: bool = False,
                            add_generation_prompt: bool = True, **_: Any) -> str:
        text = "".join(f"<{m['role']}>{m['content']}" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")

    def __call__(self, text: str, add_special_tokens: bool = False) -> SimpleNamespace:
        return SimpleNamespace(input_ids=[3 + ord(c) % 90 for c in text])

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(97 + i % 26) for i in ids)


class Killed(Exception):
    """Stands for the process being killed mid-measurement."""


class Recording:
    """A proposer that logs every decode it starts (the engine resets its proposer once per generate), and can
    raise at the n-th one, as a killed process would stop."""

    def __init__(self, inner: Any, label: str, log: list[str], fail_at: int | None = None) -> None:
        self.inner, self.label, self.log, self.fail_at = inner, label, log, fail_at
        self.name = inner.name

    def reset(self) -> None:
        if self.fail_at is not None and len(self.log) + 1 == self.fail_at:
            raise Killed
        self.log.append(self.label)
        self.inner.reset()

    def propose(self, tokens: torch.Tensor, hidden: torch.Tensor, root: int) -> Any:
        return self.inner.propose(tokens, hidden, root)

    def observe(self, tree: Any, accepted: list[int]) -> None:
        self.inner.observe(tree, accepted)

    def diagnostics(self) -> dict[str, Any]:
        return self.inner.diagnostics()


@pytest.fixture(scope="module")
def target() -> Target:
    card = TargetCard.model_validate({"name": "tiny-chars", "description": "a tiny random test target",
                                      "family": "llama", "source": {"path": "/nonexistent"}})
    return Target(card=card, model=tiny_target(seed=3), tokenizer=CharTokenizer(), device=torch.device("cpu"),
                  dtype=torch.float32, stop_ids=(), checkpoint="test", checkpoint_hash="0" * 64)


@pytest.fixture(scope="module")
def task() -> Any:
    return Registry.load().task("mt-bench")  # two turns: later turns follow each arm's own answers


EXAMPLES = [Example(id=str(i), turns=(f"question {i}?", f"and then {i}?"), gold=None, group=None) for i in range(3)]
KEYS = [(ex.id, t) for ex in EXAMPLES for t in range(len(ex.turns))]


def spec_arm(label: str = "recorded") -> Arm:
    return Arm(kind="speculative", proposer=label, sampling=Sampling(), max_new_tokens=MAX_NEW,
               settings={"label": label})


def run(store: Store, target: Target, task: Any, log: list[str], baseline: bool = True,
        fail_at: int | None = None, label: str = "recorded") -> runner.Measurement:
    """A measurement whose decodes are logged (the baseline's proposer is a recording one too)."""
    base = Recording(Autoregressive(), "base", log, fail_at)
    spec = Recording(Autoregressive(), "spec", log, fail_at)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runner, "Autoregressive", lambda: base)
        return measure(store, target, task, EXAMPLES, spec, spec_arm(label), "data-hash", PROV, baseline=baseline,
                       show_progress=False)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(f"sqlite:///{tmp_path / 'r.sqlite'}")
    yield s
    s.close()


# -- interleaving ----------------------------------------------------------------------------------------------


def test_arms_alternate_sample_by_sample_after_a_warm_up(store: Store, target: Target, task: Any) -> None:
    log: list[str] = []
    m = run(store, target, task, log)
    # One untimed warm-up decode per proposer, then baseline and speculative alternate for every (example, turn).
    assert log == ["base", "spec"] + ["base", "spec"] * len(KEYS)
    base, spec = store.samples(m.baseline_run_id), store.samples(m.run_id)
    assert [(s["example_id"], s["turn"]) for s in base] == KEYS == [(s["example_id"], s["turn"]) for s in spec]
    assert all(s["lossless"] is True for s in spec)  # each compared with the baseline sample decoded just before
    assert m.summary.speculative["lossless_rate"] == 1.0
    result = m.result(target, PROV)
    assert {"speedup_ci95", "tau_ci95", "slower_than_plain"} <= set(result)
    assert result["tau_ci95"] == [1.0, 1.0]  # plain decoding in both arms: tau is 1 on every prompt

    # A repeated measurement decodes nothing, not even the warm-up.
    again: list[str] = []
    assert run(store, target, task, again).run_id == m.run_id and again == []


def test_each_arm_follows_its_own_history(store: Store, target: Target, task: Any) -> None:
    base_id = open_run(store, target, task, baseline_arm(Sampling(), MAX_NEW), "data-hash", PROV)
    store.add_sample(base_id, {"example_id": "0", "turn": 0, "output_ids": [5, 6], "output_text": "STORED",
                               "steps": 2, "total_s": 0.1, "stop_reason": "max_new_tokens"})
    log: list[str] = []
    m = run(store, target, task, log)
    assert log == ["base", "spec", "spec"] + ["base", "spec"] * (len(KEYS) - 1)  # the stored sample is reused
    base, spec = store.done(m.baseline_run_id), store.done(m.run_id)

    def asked(answer: str) -> str:
        history = [{"role": "user", "content": EXAMPLES[0].turns[0]}, {"role": "assistant", "content": answer},
                   {"role": "user", "content": EXAMPLES[0].turns[1]}]
        return prompt_hash(render_prompt(target.tokenizer, target.card, history))

    assert base[("0", 1)]["prompt_hash"] == asked("STORED")
    assert spec[("0", 1)]["prompt_hash"] == asked(spec[("0", 0)]["output_text"]) != asked("STORED")
    assert spec[("0", 0)]["lossless"] is False  # compared with the stored baseline sample, which differs


def test_a_killed_measurement_resumes_and_stores_each_sample_once(store: Store, target: Target, task: Any) -> None:
    log: list[str] = []
    with pytest.raises(Killed):
        run(store, target, task, log, fail_at=6)  # warm-up (2), base 0/0, spec 0/0, base 0/1, then the kill
    assert log == ["base", "spec", "base", "spec", "base"]
    runs = {r["kind"]: r["id"] for r in store.runs()}
    kept = {kind: store.samples(i) for kind, i in runs.items()}
    assert [len(kept["baseline"]), len(kept["speculative"])] == [2, 1]

    resumed: list[str] = []
    m = run(store, target, task, resumed)
    assert resumed == ["base", "spec", "spec"] + ["base", "spec"] * (len(KEYS) - 2)  # only the missing samples
    for kind, run_id in (("baseline", m.baseline_run_id), ("speculative", m.run_id)):
        samples = store.samples(run_id)
        assert sorted((s["example_id"], s["turn"]) for s in samples) == KEYS  # each exactly once
        assert samples[: len(kept[kind])] == kept[kind]  # the ones stored before the kill, as they were
    assert all(s["lossless"] is True for s in store.samples(m.run_id))


def test_without_baseline_only_the_speculative_arm_decodes(store: Store, target: Target, task: Any) -> None:
    first = run(store, target, task, [])
    log: list[str] = []
    m = run(store, target, task, log, baseline=False, label="other")
    assert log == ["spec"] * (1 + len(KEYS))  # warm-up, then every sample of the new arm
    assert m.baseline_run_id == first.baseline_run_id and m.run_id != first.run_id
    assert m.summary.speedup["n_matched"] == len(KEYS) and m.summary.speculative["lossless_rate"] == 1.0


# -- the interval and the flag ---------------------------------------------------------------------------------


def pairs(spec_seconds: list[float], base_seconds: list[float], turns: int = 1) -> tuple[list, list]:
    """Samples of 20 new tokens each; spec in 5 steps (tau 4), base in 20; one sample per example and turn."""
    def make(seconds: list[float], steps: int) -> list[dict[str, Any]]:
        return [{"example_id": str(i), "turn": t, "new_tokens": 20, "steps": steps, "total_s": s / turns,
                 "output_ids": list(range(20))} for i, s in enumerate(seconds) for t in range(turns)]

    return make(spec_seconds, 5), make(base_seconds, 20)


def test_the_interval_contains_the_estimate_and_is_reproducible() -> None:
    spec, base = pairs([0.5, 0.7, 0.4, 0.9, 0.6, 0.55], [1.0, 1.1, 0.9, 1.2, 1.0, 0.95])
    pair = summarize_pair(spec, base, greedy=True)
    sp = pair.speedup
    lo, hi = sp["ci95"]
    assert lo < sp["ratio_of_sums"] < hi and sp["n"] == 6
    assert summarize_pair(list(reversed(spec)), base, greedy=True).speedup["ci95"] == [lo, hi]  # seeded, ordered
    assert pair.speculative["tau_ci95"] == [4.0, 4.0]  # every prompt has tau 4: no spread
    assert not sp["slower_than_plain"]
    # Turns of one example are resampled together: two turns per example still make 6 units, not 12.
    two = summarize_pair(*pairs([0.5, 0.7, 0.4, 0.9, 0.6, 0.55], [1.0, 1.1, 0.9, 1.2, 1.0, 0.95], turns=2), True)
    assert two.speedup["n"] == 6 and two.speedup["ci95"] == pytest.approx([lo, hi])


def test_no_interval_with_a_single_example() -> None:
    pair = summarize_pair(*pairs([0.5], [1.0], turns=2), greedy=True)
    assert pair.speedup["ratio_of_sums"] == pytest.approx(2.0)
    assert pair.speedup["ci95"] is None and pair.speculative["tau_ci95"] is None and pair.speedup["n"] == 1
    assert not pair.speedup["slower_than_plain"] and speedup_text(pair.speedup) == "2.00x"
    empty = summarize_pair([], [], greedy=True)
    assert empty.speedup["ci95"] is None and empty.speedup["n"] == 0 and speedup_text(empty.speedup) == "n/a"


def test_flagged_exactly_when_the_whole_interval_is_below_one() -> None:
    slower = summarize_pair(*pairs([1.2, 1.3, 1.25, 1.4, 1.2], [1.0, 1.1, 1.0, 1.2, 1.05]), greedy=True).speedup
    assert slower["ci95"][1] < 1.0 and slower["slower_than_plain"]
    assert re.fullmatch(r"0\.\d\dx \[0\.\d\d, 0\.\d\d\], slower than plain decoding", speedup_text(slower))
    # A point estimate below 1.0 whose interval reaches above it is noise, not a finding.
    mixed = summarize_pair(*pairs([1.5, 0.6, 1.4, 0.7, 1.3], [1.0, 1.0, 1.0, 1.0, 1.0]), greedy=True).speedup
    assert mixed["ratio_of_sums"] < 1.0 < mixed["ci95"][1] and not mixed["slower_than_plain"]
    assert "slower" not in speedup_text(mixed)
    assert slower_than_plain([0.5, 0.999]) and not slower_than_plain([0.5, 1.0]) and not slower_than_plain(None)


def test_the_matrix_table_shows_the_interval_and_the_flag() -> None:
    cell = Cell("tiny", ProposerSpec(drafter="d"), "gsm8k", 2, 0.0, 0, 0)
    rows = summary_rows([Outcome(cell, "done", {"speedup": 0.8, "speedup_ci95": [0.76, 0.84],
                                                "slower_than_plain": True}),
                         Outcome(cell, "done", {"speedup": 1.5, "speedup_ci95": [1.2, 1.8],
                                                "slower_than_plain": False}),
                         Outcome(cell, "failed", error="boom")])
    assert [(r["speedup_ci95"], r["flag"]) for r in rows] == [("[0.76, 0.84]", "slower than plain"),
                                                              ("[1.20, 1.80]", None), (None, None)]


def test_the_leaderboard_shows_the_interval_and_marks_a_slower_row(tmp_path: Path) -> None:
    from taps_bench.site.board import collect
    from taps_bench.site.render import build

    store = Store(f"sqlite:///{tmp_path / 'board.sqlite'}")
    settings = {"target_checkpoint_sha256": "abc", "target_card": "t", "task_card": "k", "data_sha256": "d",
                "device": "cpu", "dtype": "float32", "max_new_tokens": 20,
                "sampling": {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": 0}}
    base = store.get_or_create_run("baseline", "tiny", "gsm8k", "autoregressive", 0.0, settings, PROV)
    spec_fast, base_samples = pairs([0.5, 0.6, 0.55], [1.0, 1.1, 1.0])
    spec_slow, _ = pairs([1.3, 1.4, 1.35], [1.0, 1.1, 1.0])
    for s in base_samples:
        store.add_sample(base, {**s, "stop_reason": "max_new_tokens"})
    for name, samples in (("fast-drafter", spec_fast), ("slow-drafter", spec_slow)):
        run_id = store.get_or_create_run("speculative", "tiny", "gsm8k", name, 0.0,
                                         {**settings, "drafter_checkpoint": f"/x/{name}"}, PROV)
        for s in samples:
            store.add_sample(run_id, {**s, "stop_reason": "max_new_tokens"})
    board = next(b for b in collect(store) if b.target == "tiny")
    rows = {r.name: r for r in board.rows}
    assert rows["slow-drafter"].slower and not rows["fast-drafter"].slower
    lo, hi = rows["slow-drafter"].intervals["speedup"]
    assert lo <= rows["slow-drafter"].values["speedup"] <= hi < 1.0

    build(store, tmp_path / "site")
    index = (tmp_path / "site" / "index.html").read_text()
    slow = re.search(r'<tr class="drafter" data-name="slow-drafter">(.*?)</tr>', index, re.S)
    fast = re.search(r'<tr class="drafter" data-name="fast-drafter">(.*?)</tr>', index, re.S)
    assert slow and fast
    assert "slower than plain" in slow.group(1) and "slower than plain" not in fast.group(1)
    assert f"[{lo:.2f}, {hi:.2f}]" in slow.group(1)
    details = "".join(p.read_text() for p in (tmp_path / "site" / "drafters").glob("*.html"))
    assert "slower than plain" in details  # the drafter page marks the task too
    store.close()


def test_step_costs_explain_the_speedup_in_plain_decoding_steps() -> None:
    """A speculative step of 1.5 plain steps of verification and 0.5 of drafting, 4 tokens a step: predicted 2.0x."""
    def sample(i: int, steps: int, verify: float, draft: float, total: float, accepts: list[int]) -> dict[str, Any]:
        return {"example_id": str(i), "turn": 0, "new_tokens": 1 + sum(a + 1 for a in accepts), "steps": steps,
                "total_s": total, "prefill_s": 0.1, "verify_s": verify, "draft_s": draft,
                "accept_lengths": accepts, "output_ids": list(range(1 + sum(a + 1 for a in accepts)))}

    # baseline: 12 decode steps of 0.1 s (+ 0.1 s prefill); speculative: 3 steps of 0.15 s verify + 0.05 s draft
    base = [sample(i, 13, 1.2, 0.0, 1.3, [0] * 12) for i in range(3)]
    spec = [sample(i, 4, 0.45, 0.15, 0.1 + 0.45 + 0.15 + 0.03, [3, 3, 3]) for i in range(3)]
    cost = summarize_pair(spec, base, greedy=False).speedup["cost"]
    assert cost["verify_ratio"] == pytest.approx(1.5) and cost["draft_ratio"] == pytest.approx(0.5)
    assert cost["tokens_per_step"] == pytest.approx(4.0) and cost["predicted_speedup"] == pytest.approx(2.0)
    assert cost["other_share"] == pytest.approx(0.03 / 0.63)
    assert summarize_pair([], base, greedy=False).speedup["cost"] is None
