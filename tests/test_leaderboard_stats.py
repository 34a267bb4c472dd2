"""The leaderboard's statistics on hand-made rows: the rank rule (overlapping intervals share a rank), the
specialisation gap, the router regret, the stratified intervals behind them; and the reading aids that must never
leak: the reproduce command (well formed, quoted, no local path) and the redaction of stored paths."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_leaderboard import BASE_SETTINGS, PROV, TREE
from test_leaderboard import sample as stored_sample

from taps_bench.results.store import Store, as_url
from taps_bench.results.summaries import bootstrap_interval, stratified_ratio_interval, summarize_pair
from taps_bench.site.board import collect, data_dir, load_schema
from taps_bench.site.redact import redact, redact_text
from taps_bench.site.reproduce import command
from taps_bench.site.rows import Row, TaskResult
from taps_bench.site.schema import Schema
from taps_bench.site.stats import derive, interval_ranks, rank_label, router_regret, specialisation_gap

MATH, CHAT = ("gsm8k", "math500", "svamp"), ("mt-bench",)


# -- the rank rule ------------------------------------------------------------------------------------------------


def test_rows_whose_intervals_overlap_share_a_rank() -> None:
    entries = [(3.0, [2.8, 3.2]), (2.9, [2.7, 3.1]), (2.0, [1.9, 2.1]), (1.0, None)]
    # A and B overlap: places 1-2 for both; C is below both and above D; D (no interval: its point) is last.
    assert interval_ranks(entries) == [(1, 2), (1, 2), (3, 3), (4, 4)]
    assert [rank_label(*r).text for r in interval_ranks(entries)] == ["1–2", "1–2", "3", "4"]
    # Touching intervals overlap; a chain A~B~C with A clear of C: A is 1-2, B 1-3, C 2-3.
    chain = [(3.0, [2.5, 3.5]), (2.4, [2.0, 2.5]), (1.8, [1.5, 2.1])]
    assert interval_ranks(chain) == [(1, 2), (1, 3), (2, 3)]
    # Lower is better: the same rule on the other side.
    assert interval_ranks([(1.0, [0.9, 1.1]), (2.0, [1.9, 2.1])], higher=False) == [(1, 1), (2, 2)]
    # Points only: the plain order, ties shared.
    assert interval_ranks([(1.0, None), (2.0, None), (2.0, None)]) == [(3, 3), (1, 2), (1, 2)]
    assert rank_label(1, 3).sort < rank_label(2, 2).sort < rank_label(2, 3).sort


def row(name: str, kind: str = "drafter", settings: dict[str, Any] | None = None, **values: Any) -> Row:
    r = Row(name=name, kind=kind, settings=settings or {}, slug=name)
    for col, (v, ci) in values.items():
        r.values[col], r.intervals[col] = v, ci
    return r


def test_the_board_ranks_only_ranked_rows_by_the_declared_column() -> None:
    schema = load_schema()
    rows = [row("a", tau_avg=(3.0, [2.8, 3.2])), row("b", "combiner", tau_avg=(2.9, [2.7, 3.1])),
            row("c", tau_avg=(2.0, [1.9, 2.1])), row("oracle(a,c)", "oracle", tau_avg=(9.0, [9.0, 9.0])),
            row("none", tau_avg=(None, None)), row("claim", tau_avg=(8.0, [8.0, 8.0]))]
    rows[-1].submission, rows[-1].standing = {"id": 1}, "unverified"  # a claim nobody re-ran competes with nothing
    derive(schema, schema.columns, rows)
    ranks = {r.name: r.values["rank"] for r in rows}
    assert {k: v.text for k, v in ranks.items() if v is not None} == {"a": "1–2", "b": "1–2", "c": "3"}
    assert ranks["oracle(a,c)"] is None and ranks["none"] is None and ranks["claim"] is None
    assert rows[0].counts["rank"] == 3
    assert str(ranks["a"]) == repr(1.002)  # the sort key the page's script reads


# -- the specialisation gap ---------------------------------------------------------------------------------------

TASK_DOMAINS = {**{t: "math" for t in MATH}, "mt-bench": "chat"}


def test_the_gap_is_own_domain_minus_off_domain() -> None:
    taus = {"gsm8k": 4.0, "math500": 3.0, "svamp": 5.0, "mt-bench": 2.5, "mine": 9.0}
    assert specialisation_gap(taus, "math", TASK_DOMAINS) == pytest.approx(4.0 - 2.5)  # "mine" has no domain
    assert specialisation_gap(taus, "chat", TASK_DOMAINS) == pytest.approx(2.5 - 4.0)
    assert specialisation_gap({"gsm8k": 4.0, "svamp": 5.0}, "math", TASK_DOMAINS) is None  # nothing off-domain


def samples(question_steps: dict[str, int], tokens: int = 40, run: int = 1) -> list[dict[str, Any]]:
    """One sample per question ("RUN:QUESTION", as the board keys them) of `tokens` new tokens in that many steps."""
    return [{"example_id": f"{run}:{q}", "turn": 0, "new_tokens": tokens, "steps": steps, "total_s": 1.0}
            for q, steps in question_steps.items()]


def measured(name: str, per_task: dict[str, dict[str, int]], kind: str = "drafter", run: int = 1,
             **settings: Any) -> Row:
    r = Row(name=name, kind=kind, settings={"tree": TREE, "max_new_tokens": 64, **settings}, slug=name)
    for task, steps in per_task.items():
        ss = samples(steps, run=run)
        pair = summarize_pair(ss, [], greedy=True)
        r.tasks[task] = TaskResult(summary=pair.speculative, speedup=pair.speedup, by_depth=[], decisions={},
                                   nodes={}, runs=[run], samples=ss)
    return r


def test_a_math_drafters_gap_comes_with_a_stratified_interval() -> None:
    schema = load_schema()
    per_task = {"gsm8k": {"a": 10, "b": 8}, "math500": {"a": 10, "b": 10}, "svamp": {"a": 8, "b": 10},
                "mt-bench": {"a": 20, "b": 16}}
    math = measured("math", per_task)
    math.provenance = [{"drafter_card": {"name": "math", "corpus": "mathinstruct:1200"}}]  # the recipe's spec
    mixed = measured("mixed", per_task)
    mixed.provenance = [{"drafter_card": {"name": "mixed", "corpus": "sharegpt:600+mathinstruct:600"}}]
    bare = measured("bare", per_task)  # no card: no domain
    derive(schema, schema.columns, [math, mixed, bare])
    own = (80 / 18 + 80 / 20 + 80 / 18) / 3  # per task: 80 tokens / its steps
    assert math.values["spec_gap"] == pytest.approx(own - 80 / 36)
    lo, hi = math.intervals["spec_gap"]
    assert lo <= math.values["spec_gap"] <= hi and math.counts["spec_gap"] == 8
    assert mixed.values["spec_gap"] is None and bare.values["spec_gap"] is None


def test_the_gap_reads_the_corpus_of_the_card_the_row_shows(tmp_path: Path) -> None:
    """From the store: a run whose card names a chat corpus gets chat's gap; the schema says which corpus is which
    when the registry is not given."""
    store = Store(as_url(str(tmp_path / "r.db")))
    for task, steps in (("mt-bench", 8), ("gsm8k", 20)):
        base = store.get_or_create_run("baseline", "tiny", task, "autoregressive", 0.0, BASE_SETTINGS, PROV)
        run = store.get_or_create_run("speculative", "tiny", task, "chatty", 0.0,
                                      {**BASE_SETTINGS, "drafter_checkpoint": "path:/x/chatty", "tree": TREE},
                                      {**PROV, "drafter_card": {"name": "chatty", "corpus": "sharegpt"}})
        for q in ("a", "b"):
            store.add_sample(base, stored_sample(q, 40, 40, 4.0))
            store.add_sample(run, stored_sample(q, 40, steps, 2.0))
    board = next(b for b in collect(store) if b.target == "tiny")
    chatty = next(r for r in board.rows if r.name == "chatty")
    assert chatty.values["spec_gap"] == pytest.approx(5.0 - 2.0)
    store.close()


# -- the router regret --------------------------------------------------------------------------------------------


def test_the_regret_is_the_oracle_of_the_combiners_own_drafters_minus_the_combiner() -> None:
    schema = load_schema()
    members = [{"name": "m", "sha256": "1"}, {"name": "c", "sha256": "2"}]
    # Per question, the oracle takes the better single drafter: gsm8k a: m (8 steps), b: c (10); mt-bench a: c, b: m.
    m = measured("m", {"gsm8k": {"a": 8, "b": 20}, "mt-bench": {"a": 20, "b": 10}}, run=1, drafter_sha256="1")
    c = measured("c", {"gsm8k": {"a": 20, "b": 10}, "mt-bench": {"a": 10, "b": 20}}, run=2, drafter_sha256="2")
    combo = measured("confidence(m,c)", {"gsm8k": {"a": 10, "b": 10}, "mt-bench": {"a": 20, "b": 20}},
                     kind="combiner", run=3, combiner="confidence", drafters=members)
    derive(schema, schema.columns, [m, c, combo])
    oracle = {"gsm8k": 80 / 18, "mt-bench": 80 / 20}
    own = {"gsm8k": 80 / 20, "mt-bench": 80 / 40}
    assert router_regret(oracle, own) == pytest.approx(((80 / 18 - 4.0) + (4.0 - 2.0)) / 2)
    assert combo.values["router_regret"] == pytest.approx(router_regret(oracle, own))
    lo, hi = combo.intervals["router_regret"]
    assert lo <= combo.values["router_regret"] <= hi and combo.counts["router_regret"] == 4
    assert m.values["router_regret"] is None  # a single drafter has none

    # Without a member's single row, or with rows of another tree, there is no oracle of its own drafters.
    for others in ([m], [m, measured("c", {"gsm8k": {"a": 1, "b": 1}}, run=2, drafter_sha256="2",
                                     tree={**TREE, "depth": 9})]):
        again = measured("confidence(m,c)", {"gsm8k": {"a": 10, "b": 10}}, kind="combiner", run=3,
                         combiner="confidence", drafters=members)
        derive(schema, schema.columns, [*others, again])
        assert again.values["router_regret"] is None
    assert router_regret({"gsm8k": 3.0}, {"svamp": 2.0}) is None


# -- the intervals ------------------------------------------------------------------------------------------------


def test_the_stratified_interval_is_the_bootstrap_of_one_stratum_and_needs_two_questions_each() -> None:
    rows = [[40.0, 10.0], [40.0, 20.0], [30.0, 10.0]]
    assert stratified_ratio_interval([([1.0], rows)]) == bootstrap_interval(
        rows, lambda n, m, axis=-1: n.sum(axis) / m.sum(axis))
    mean = stratified_ratio_interval([([0.5], rows), ([0.5], [[40.0, 20.0], [40.0, 8.0]])])
    assert mean is not None and mean[0] <= (110 / 40 + 80 / 28) / 2 <= mean[1]
    assert stratified_ratio_interval([([0.5], rows), ([0.5], [[40.0, 20.0]])]) is None
    assert stratified_ratio_interval([]) is None
    with pytest.raises(ValueError, match="numerator and a denominator"):
        stratified_ratio_interval([([1.0, -1.0], rows)])


def test_avg_tau_carries_its_interval_and_n() -> None:
    schema = load_schema()
    r = measured("m", {t: {"a": 10, "b": 20} for t in (*MATH, *CHAT)})
    from taps_bench.site.board import _values

    r.values = _values(schema, schema.columns, r, True, {})
    assert r.counts["tau_avg"] == 8 and r.intervals["tau_avg"] is not None
    lo, hi = r.intervals["tau_avg"]
    assert lo <= r.values["tau_avg"] <= hi and r.counts["tau_gsm8k"] == 2


# -- reproduce and redact -----------------------------------------------------------------------------------------


LAUNCH = {"sampling": {"temperature": 0.7, "top_p": 0.9, "top_k": 0, "seed": 3}, "device": "cpu",
          "dtype": "float32", "limit": 5}


def test_the_reproduce_command_is_quoted_and_names_no_path() -> None:
    hub = Row(name="mathinstruct-hass", kind="drafter", settings={
        "drafter_checkpoint": "hub:zbeeb/x", "tree": TREE, "max_new_tokens": 64, "draft_head_dtype": "target"})
    line = command(hub, "llama3-8b-instruct", "gsm8k", LAUNCH, None)
    assert shlex.split(line) == ["taps-bench", "run", "--target", "llama3-8b-instruct", "--task", "gsm8k",
                                 "--drafter", "mathinstruct-hass", "--draft-vocab", "full", "--total-tokens", "16",
                                 "--depth", "4", "--top-k", "4", "--temperature", "0.7", "--top-p", "0.9",
                                 "--sample-top-k", "0", "--seed", "3", "--max-new-tokens", "64", "--limit", "5",
                                 "--device", "cpu", "--dtype", "float32"]
    evil = "x'; rm -rf / #"
    combo = Row(name="c", kind="combiner", settings={
        "combiner": "confidence", "granularity": "prompt", "weird": "0.5", "nested": {"a": [1]}, "tree": TREE,
        "drafters": [{"name": evil, "checkpoint": "path:/home/me/runs/x"},
                     {"name": "mathinstruct-hass", "checkpoint": "built:/root/.cache/x"}]})
    argv = shlex.split(command(combo, "t", "gsm8k", {**LAUNCH, "device": "cpu; reboot"}, None))
    assert argv[argv.index("--drafters") + 1] == f"<checkpoint:{evil}>,mathinstruct-hass"
    assert argv[argv.index("--granularity") + 1] == "prompt"
    options = [argv[i + 1] for i, a in enumerate(argv) if a == "--option"]
    assert options == ['nested={"a": [1]}', 'weird="0.5"']  # read back as YAML: the string stays a string
    assert yaml.safe_load(options[1].split("=", 1)[1]) == "0.5"
    assert "--device" not in argv and not any(a.startswith(("/", "~")) or "/home" in a for a in argv)


def test_stored_paths_are_cut_to_their_last_component() -> None:
    stored = {"drafter_checkpoint": "path:/home/me/runs/math-rand", "target": "built:/root/.cache/m/final",
              "db": "sqlite:////tmp/x/r.db", "url": "https://huggingface.co/org/x", "hub": "hub:org/name",
              "list": ["file:///tmp/a/b.json", "C:\\Users\\me\\d", "~/runs/x", "tree 16/4/4"],
              "/tmp/key": 1}
    assert redact(stored) == {"drafter_checkpoint": "path:…/math-rand", "target": "built:…/final",
                              "db": "sqlite:…/r.db", "url": "https://huggingface.co/org/x", "hub": "hub:org/name",
                              "list": ["…/b.json", "…/d", "…/x", "tree 16/4/4"], "…/key": 1}
    assert redact_text("tokens / s, n/a") == "tokens / s, n/a"


# -- the schema ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d["columns"].insert(0, {"id": "r", "label": "R", "metric": "rank", "by": "tau_avg"}),
     "ranks by an earlier measured column"),
    (lambda d: d["columns"].append({"id": "r", "label": "R", "metric": "rank", "by": "family"}),
     "ranks by an earlier measured column"),
    (lambda d: d["columns"].append({"id": "g", "label": "G", "metric": "specialisation_gap", "by": "family"}),
     "compares a per-task metric"),
    (lambda d: d["columns"].append({"id": "g", "label": "G", "metric": "router_regret", "task": "gsm8k",
                                    "by": "tau"}), "takes `by` and no task"),
    (lambda d: d["columns"].append({"id": "x", "label": "X", "metric": "tau", "task": "gsm8k", "by": "tau"}),
     "only a board statistic takes `by`"),
    (lambda d: d["detail_columns"].append("rank"), "board statistics rank are no per-task metric"),
    (lambda d: d["metrics"]["rank"].update(compute="median"), "a board statistic computes one of"),
])
def test_a_broken_board_statistic_is_refused(change: Any, message: str) -> None:
    data = yaml.safe_load((data_dir() / "schema.yaml").read_text())
    change(data)
    with pytest.raises(ValueError, match=message):
        Schema.model_validate(data)
