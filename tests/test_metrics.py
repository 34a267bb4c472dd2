"""Metrics derived from raw counters (hand-computed on a small synthetic set) and the report/export output."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import pytest

from taps_bench.errors import UserError
from taps_bench.results.metrics import acceptance_by_depth, compare_outputs, lossless, speedup, summarize
from taps_bench.results.report import export, format_table, format_value, runs_table
from taps_bench.results.store import Store


def s(example_id: str, turn: int, **fields: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "example_id": example_id,
        "turn": turn,
        "prefill_s": 0.0,
        "draft_s": 0.0,
        "verify_s": 0.0,
        "correct": None,
        "lossless": None,
        "stop_reason": "stop_token",
        "drafted_by_depth": [],
        "accepted_by_depth": [],
        "tree_sizes": [],
        "accept_lengths": [],
    }
    out.update(fields)
    out.setdefault("output_ids", list(range(out["new_tokens"])))
    return out


# Speculative run: each sample's new_tokens = 1 (prefill) + sum over verify steps of (accepted + 1 bonus).
SPEC = [
    # 1 + (3 + 4 + 2) = 10 tokens in 4 forwards.
    s("a", 0, new_tokens=10, steps=4, accept_lengths=[2, 3, 1], drafted_by_depth=[6, 6, 6],
      accepted_by_depth=[3, 2, 1], tree_sizes=[7, 7, 7], total_s=2.0, prefill_s=0.2, draft_s=0.6, verify_s=0.9,
      correct=True, lossless=True),
    # 1 + (1 + 3) = 5 tokens in 3 forwards.
    s("a", 1, new_tokens=5, steps=3, accept_lengths=[0, 2], drafted_by_depth=[6, 6, 6],
      accepted_by_depth=[1, 1], tree_sizes=[7, 7], total_s=1.0, prefill_s=0.1, draft_s=0.3, verify_s=0.4),
    # Nothing accepted: 1 + 3 = 4 tokens in 4 forwards; accepted_by_depth left empty to exercise the derivation.
    s("b", 0, new_tokens=4, steps=4, accept_lengths=[0, 0, 0], drafted_by_depth=[6, 6, 6],
      tree_sizes=[7, 7, 7], total_s=2.0, correct=False, lossless=False),
]  # fmt: skip

# Plain decoding of the same prompts: one token per forward, slower.
BASE = [
    s("a", 0, new_tokens=10, steps=10, total_s=4.0),
    s("a", 1, new_tokens=5, steps=5, total_s=2.0),
    s("b", 0, new_tokens=4, steps=4, total_s=2.0),
]


def test_plain_decoding_tau_is_one() -> None:
    out = summarize(BASE)
    assert out["tau"] == 1.0 and out["tau_macro"] == 1.0
    assert out["acceptance_by_depth"] == [] and out["acceptance_histogram"] == {}
    assert out["mean_tree_size"] is None and out["verify_steps"] == 0


def test_summary_hand_computed() -> None:
    out = summarize(SPEC)
    assert out["n_samples"] == 3 and out["n_questions"] == 2
    assert out["new_tokens"] == 19 and out["steps"] == 11 and out["verify_steps"] == 8
    assert out["tau"] == pytest.approx(19 / 11)
    # Question a pools both turns: 15 tokens / 7 forwards; question b: 4 / 4.
    assert out["tau_macro"] == pytest.approx((15 / 7 + 1.0) / 2)
    assert out["mean_accept_length"] == pytest.approx(8 / 8)
    assert out["wall_s"] == pytest.approx(5.0)
    assert out["tokens_per_s"] == pytest.approx(19 / 5)
    assert out["prefill_s"] == pytest.approx(0.3)
    assert out["draft_s"] == pytest.approx(0.9)
    assert out["verify_s"] == pytest.approx(1.3)
    assert out["overhead_s"] == pytest.approx(5.0 - 0.3 - 0.9 - 1.3)
    assert out["acceptance_histogram"] == {0: 4, 1: 1, 2: 2, 3: 1}
    assert out["accuracy"] == 0.5 and out["n_graded"] == 2
    assert out["lossless_rate"] == 0.5 and out["n_lossless_checked"] == 2
    assert out["mean_tree_size"] == 7.0
    assert out["stop_reasons"] == {"stop_token": 3}


def test_acceptance_by_depth_hand_computed() -> None:
    # V = 8 verify steps; A_1 = 3 + 1 + 0 = 4, A_2 = 2 + 1 = 3, A_3 = 1.
    rows = acceptance_by_depth(SPEC)
    assert [r["depth"] for r in rows] == [1, 2, 3]
    assert [r["drafted"] for r in rows] == [18, 18, 18]
    assert [r["reached"] for r in rows] == [8, 4, 3]
    assert [r["accepted"] for r in rows] == [4, 3, 1]
    assert [r["conditional"] for r in rows] == pytest.approx([4 / 8, 3 / 4, 1 / 3])
    assert [r["unconditional"] for r in rows] == pytest.approx([4 / 8, 3 / 8, 1 / 8])


def test_accepted_by_depth_derived_from_accept_lengths() -> None:
    with_counts = SPEC[0]
    without = {**with_counts, "accepted_by_depth": []}
    assert acceptance_by_depth([without]) == acceptance_by_depth([with_counts])


def test_accuracy_none_without_gold() -> None:
    out = summarize(BASE)
    assert out["accuracy"] is None and out["n_graded"] == 0
    assert out["lossless_rate"] is None


def test_empty() -> None:
    out = summarize([])
    assert out["n_samples"] == 0 and out["tau"] is None and out["tokens_per_s"] is None and out["tau_macro"] is None


def test_speedup_formulas() -> None:
    extra = s("c", 0, new_tokens=3, steps=2, total_s=0.1)  # only in the speculative run: not matched
    out = speedup([*SPEC, extra], BASE)
    assert out["n_matched"] == 3 and out["n_spec_only"] == 1 and out["n_base_only"] == 0
    assert out["spec_tokens_per_s"] == pytest.approx(19 / 5)
    assert out["base_tokens_per_s"] == pytest.approx(19 / 8)
    assert out["ratio_of_sums"] == pytest.approx((19 / 5) / (19 / 8))  # 1.6
    # Question a: (15/3) / (15/6) = 2; question b: (4/2) / (4/2) = 1.
    assert out["n_questions"] == 2
    assert out["mean_of_ratios"] == pytest.approx(1.5)


def test_speedup_nothing_matched() -> None:
    out = speedup(SPEC, [])
    assert out["n_matched"] == 0 and out["ratio_of_sums"] is None and out["mean_of_ratios"] is None


def test_lossless() -> None:
    assert lossless([1, 2, 3], (1, 2, 3))
    assert not lossless([1, 2, 3], [1, 2])
    cmp = compare_outputs(
        [s("a", 0, new_tokens=2, output_ids=[1, 2]), s("b", 0, new_tokens=2, output_ids=[1, 3])],
        [s("a", 0, new_tokens=2, output_ids=[1, 2]), s("b", 0, new_tokens=2, output_ids=[1, 2])],
    )
    assert cmp["n_compared"] == 2 and cmp["n_equal"] == 1 and cmp["mismatches"] == [("b", 0)]


# ----------------------------------------------------------------------------------------------------- report


def test_format_value() -> None:
    assert format_value(None) == "-"
    assert format_value(2.9) == "2.90"
    assert format_value(123.456) == "123.5"
    assert format_value(12345.6) == "12346"
    assert format_value(0.004) == "0.004"
    assert format_value(0.0) == "0.00"
    assert format_value(7) == "7"
    assert format_value(True) == "yes"


def test_format_table_alignment() -> None:
    table = format_table([{"name": "x", "v": 1.5}, {"name": "longer", "v": 10.25}], [("name", "Name"), ("v", "V")])
    lines = table.splitlines()
    assert lines[0] == "Name        V"
    assert lines[2] == "x        1.50"
    assert lines[3] == "longer  10.25"


def _store(tmp_path: Path) -> tuple[Store, int, int]:
    store = Store(f"sqlite:///{tmp_path / 'r.sqlite'}")
    common = {"target": "smollm2-135m", "task": "gsm8k", "temperature": 0.0, "provenance": {"git": "abc"}}
    spec = store.get_or_create_run(
        kind="speculative", proposer="mathinstruct-hass", settings={"tree": {"depth": 3}, "max_new_tokens": 64},
        **common,
    )  # fmt: skip
    base = store.get_or_create_run(
        kind="baseline", proposer="autoregressive", settings={"max_new_tokens": 64}, **common
    )
    for x in SPEC:
        store.add_sample(spec, x)
    for x in BASE:
        store.add_sample(base, x)
    return store, spec, base


def test_store_samples_feed_metrics(tmp_path: Path) -> None:
    store, spec, base = _store(tmp_path)
    assert summarize(store.samples(spec))["tau"] == pytest.approx(19 / 11)
    assert speedup(store.samples(spec), store.samples(base))["ratio_of_sums"] == pytest.approx(1.6)


def test_runs_table(tmp_path: Path) -> None:
    store, _, _ = _store(tmp_path)
    table = runs_table(store)
    lines = table.splitlines()
    assert lines[0].split() == [
        "id",
        "kind",
        "target",
        "task",
        "proposer",
        "T",
        "samples",
        "tau",
        "tok/s",
        "accuracy",
    ]
    assert len(lines) == 4
    assert "mathinstruct-hass" in lines[2] and "1.73" in lines[2] and "3.80" in lines[2] and "50.0%" in lines[2]
    assert lines[3].split()[-1] == "-"  # baseline has no gold answers
    empty = Store(f"sqlite:///{tmp_path / 'empty.sqlite'}")
    assert runs_table(empty).startswith("no runs yet")


def test_export_runs_json(tmp_path: Path) -> None:
    store, spec, base = _store(tmp_path)
    data = json.loads(export(store, "json", "runs"))
    by_id = {r["id"]: r for r in data}
    assert by_id[spec]["summary"]["tau"] == pytest.approx(19 / 11)
    assert by_id[spec]["settings"] == {"tree": {"depth": 3}, "max_new_tokens": 64}
    assert by_id[base]["summary"]["tau"] == 1.0


def test_export_runs_csv(tmp_path: Path) -> None:
    store, spec, base = _store(tmp_path)
    rows = list(csv.DictReader(io.StringIO(export(store, "csv", "runs"))))
    by_id = {int(r["id"]): r for r in rows}
    assert float(by_id[spec]["tau"]) == pytest.approx(19 / 11)
    assert by_id[spec]["settings.tree.depth"] == "3"
    assert by_id[base]["settings.tree.depth"] == ""
    assert float(by_id[spec]["acceptance.d2.conditional"]) == pytest.approx(0.75)
    assert by_id[spec]["provenance.git"] == "abc"
    assert by_id[base]["accuracy"] == ""


def test_export_samples(tmp_path: Path) -> None:
    store, spec, _ = _store(tmp_path)
    rows = list(csv.DictReader(io.StringIO(export(store, "csv", "samples", run_ids=[spec]))))
    assert len(rows) == 3
    assert rows[0]["run_kind"] == "speculative" and rows[0]["run_settings.tree.depth"] == "3"
    assert json.loads(rows[0]["accept_lengths"]) == [2, 3, 1]
    assert json.loads(rows[0]["extra"]) == {}
    data = json.loads(export(store, "json", "samples"))
    assert len(data) == 6
    assert data[0]["run"]["proposer"] == "mathinstruct-hass" and data[0]["output_ids"] == list(range(10))


def test_export_rejects_unknowns(tmp_path: Path) -> None:
    store, _, _ = _store(tmp_path)
    with pytest.raises(UserError, match="unknown export format 'xml'"):
        export(store, "xml", "runs")
    with pytest.raises(UserError, match="unknown export table"):
        export(store, "csv", "things")
    with pytest.raises(UserError, match="no run with id 99"):
        export(store, "csv", "runs", run_ids=[99])
