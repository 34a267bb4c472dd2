"""The leaderboard's rules are read from leaderboard/schema.yaml: a task the schema does not declare still shows, and
changing a rule in a copy of the schema (pooling, ranking, row kinds, row identity, other tasks) changes what is
computed and marked. The store is filled by hand, as in tests/test_leaderboard.py."""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_leaderboard import BASE_SETTINGS, EVIL, PROV, TREE, fill, sample

from taps_bench.results.store import Store, as_url
from taps_bench.site.board import Board, Schema, collect, data_dir, load_schema
from taps_bench.site.render import best, build

MINE = "my-own-task"  # a task card of the user's own (e.g. added with --include): not in schema.yaml's `tasks`


def add_runs(store: Store, task: str, proposer: str = "math-drafter", seed: int = 0, steps: int = 10) -> None:
    """A baseline and one speculative run of `proposer` on `task` (two questions of 40 tokens each)."""
    settings = {**BASE_SETTINGS, "sampling": {**BASE_SETTINGS["sampling"], "seed": seed}}
    base = store.get_or_create_run("baseline", "tiny", task, "autoregressive", 0.0, settings, PROV)
    run = store.get_or_create_run("speculative", "tiny", task, proposer, 0.0,
                                  {**settings, "drafter_checkpoint": f"/x/{proposer}", "tree": TREE}, PROV)
    for q in ("a", "b"):
        store.add_sample(base, sample(q, 40, 40, 4.0))
        store.add_sample(run, sample(q, 40, steps, 2.0))


@pytest.fixture
def store(tmp_path: Path) -> Store:
    store = Store(as_url(str(tmp_path / "r.db")))
    fill(store)
    return store


def edited(tmp_path: Path, change: Callable[[dict[str, Any]], None]) -> Schema:
    """The shipped schema with `change` applied to its YAML data, written to a file and loaded from there."""
    data = yaml.safe_load((data_dir() / "schema.yaml").read_text())
    change(data)
    path = tmp_path / "schema.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False))
    return load_schema(path)


def tiny(store: Store, schema: Schema | None = None) -> Board:
    return next(b for b in collect(store, schema=schema) if b.target == "tiny")


def test_an_undeclared_task_gets_a_column_charts_and_downloads(store: Store, tmp_path: Path) -> None:
    add_runs(store, MINE, steps=8)  # math-drafter: 80 tokens / 16 steps -> tau 5.0
    add_runs(store, MINE, "chat-drafter", steps=20)  # tau 2.0
    add_runs(store, "lm-eval:gsm8k", steps=4)  # excluded by the schema: never on a board
    board = tiny(store)
    ids = [c.id for c in board.columns]
    # after the declared task columns, before the aggregates; labelled with the task's own name
    assert ids[:6] == ["tau_mt-bench", "tau_gsm8k", "tau_math500", "tau_svamp", f"tau_{MINE}", "tau_avg"]
    assert next(c for c in board.columns if c.id == f"tau_{MINE}").label == MINE
    assert [t.id for t in board.tasks][-1] == MINE and not any("lm-eval" in i for i in ids)
    rows = {r.name: r for r in board.rows}
    assert rows["math-drafter"].values[f"tau_{MINE}"] == pytest.approx(5.0)
    assert rows["chat-drafter"].values[f"tau_{MINE}"] == pytest.approx(2.0) and EVIL not in {
        r.name for r in board.rows if r.values[f"tau_{MINE}"] is not None}
    assert rows["math-drafter"].values["tau_avg"] is None  # Avg τ stays the mean of the paper's tasks
    assert all("lm-eval:gsm8k" not in r.tasks for r in board.rows)
    assert best(load_schema(), board)[f"tau_{MINE}"] == pytest.approx(5.0)

    build(store, tmp_path / "site")
    index = (tmp_path / "site" / "index.html").read_text()
    section = index.split('data-target="tiny"')[1].split("</section>")[0]
    headers = re.findall(r"<th[^>]*>([^<]*)</th>", section.split("</thead>")[0])
    assert headers[4:7] == ["SVAMP", MINE, "Avg τ"]
    assert f">{MINE}</text>" in section.split("τ by drafter and task</h3>")[1]  # a heatmap column
    assert f"{MINE}: acceptance by depth" in section  # and a depth chart
    assert "lm-eval" not in section
    data = tmp_path / "site" / "data"
    table = json.loads(next(data.glob("board-tiny*.json")).read_text())
    assert next(r for r in table if r["name"] == "math-drafter")[f"tau_{MINE}"] == pytest.approx(5.0)
    with next(data.glob("board-tiny*.csv")).open() as fh:
        assert f"tau_{MINE}" in (csv.DictReader(fh).fieldnames or [])


def test_a_task_named_like_a_column_does_not_overwrite_it(store: Store) -> None:
    add_runs(store, "avg")  # its column would be tau_avg, the declared mean's id
    board = tiny(store)
    assert [c.id for c in board.columns].count("tau_avg") == 1 and "tau_avg_" in [c.id for c in board.columns]
    math = next(r for r in board.rows if r.name == "math-drafter")
    assert math.values["tau_avg_"] == pytest.approx(4.0) and math.values["tau_avg"] is None


def test_pooling_is_read_from_the_schema(store: Store, tmp_path: Path) -> None:
    math = next(r for r in tiny(store).rows if r.name == "math-drafter")
    assert math.values["accuracy"] == pytest.approx(0.5) and math.values["speedup"] == pytest.approx(2.0)

    def change(data: dict[str, Any]) -> None:
        data["metrics"]["accuracy"]["pool"] = {"weighted_by": "n_samples"}  # MT-Bench (ungraded) now weighs
        del data["metrics"]["speedup"]["pool"]
        data["metrics"]["tau"]["pool"] = {"over": "samples"}
        data["columns"].append({"id": "tau_all", "label": "τ (all)", "metric": "tau", "task": "all"})

    rows = {r.name: r for r in tiny(store, edited(tmp_path, change)).rows}
    math = rows["math-drafter"]
    assert math.values["accuracy"] == pytest.approx(0.25) and math.values["speedup"] is None
    assert math.values["tau_all"] == pytest.approx(4.0)  # 160 tokens / 40 steps over both tasks
    assert rows["oracle(math-drafter,chat-drafter)"].values["tau_all"] == pytest.approx(4.0)  # oracles show τ


def test_ranking_and_row_kinds_are_read_from_the_schema(store: Store, tmp_path: Path) -> None:
    board = tiny(store)
    marks = best(load_schema(), board)
    assert marks["tau_gsm8k"] == pytest.approx(5.0)  # the combiner's τ
    assert "accuracy" not in marks and marks["speedup"] == pytest.approx(2.0)  # 0.5 for both drafters: a tie
    oracle = next(r for r in board.rows if r.kind == "oracle")
    assert oracle.values["accuracy"] is None

    def change(data: dict[str, Any]) -> None:
        data["rows"]["kinds"]["combiner"]["ranked"] = False
        data["rows"]["kinds"]["oracle"] = {"ranked": True, "pooled": ["tau", "accuracy"]}
        data["metrics"]["speedup"]["mark_best"] = False
        data["ranking"]["mark_all_equal"] = True

    schema = edited(tmp_path, change)
    board = tiny(store, schema)
    marks = best(schema, board)
    assert marks["tau_gsm8k"] == pytest.approx(4.0)  # math-drafter's (and the oracle's): the combiner's 5.0 is out
    assert marks["accuracy"] == pytest.approx(0.5) and "speedup" not in marks  # a tie is marked; speedup never
    oracle = next(r for r in board.rows if r.kind == "oracle")
    assert oracle.values["accuracy"] == pytest.approx(0.5)

    build(store, tmp_path / "site", schema=schema)
    section = (tmp_path / "site" / "index.html").read_text().split('data-target="tiny"')[1]
    combo = re.search(r'<tr class="combiner" data-name="[^"]*">(.*?)</tr>', section, re.S)
    assert combo and combo.group(1).count('class="best"') == 0  # an unranked kind is never marked
    oracle_row = re.search(r'<tr class="oracle" data-name="[^"]*">(.*?)</tr>', section, re.S)
    # a ranked one is (its value, then its interval's whisker)
    assert oracle_row and '<td data-value="4.0" class="best">4.00<span class="ci"' in oracle_row.group(1)


def test_row_identity_and_excluded_tasks_are_read_from_the_schema(tmp_path: Path) -> None:
    store = Store(as_url(str(tmp_path / "r.db")))
    add_runs(store, "gsm8k", seed=0)
    add_runs(store, "gsm8k", seed=1)
    add_runs(store, "lm-eval:gsm8k")
    board = tiny(store)
    assert [len(r.tasks["gsm8k"].runs) for r in board.rows] == [2]  # repeats pool

    def change(data: dict[str, Any]) -> None:
        data["rows"]["keep"] = ["max_new_tokens", "sampling"]  # now the seed tells rows apart
        data["other_tasks"]["exclude"] = []

    board = tiny(store, edited(tmp_path, change))
    measured = [r for r in board.rows if r.kind != "oracle"]  # (the two seeds also make an oracle row)
    assert [len(r.tasks["gsm8k"].runs) for r in measured] == [1, 1]
    assert any("lm-eval:gsm8k" in r.tasks for r in board.rows) and "tau_lm-eval:gsm8k" in [c.id for c in
                                                                                           board.columns]


@pytest.mark.parametrize("change, message", [
    (lambda d: d["rows"]["kinds"]["oracle"].update(pooled=["tau", "speed"]), "unknown metrics speed"),
    (lambda d: d["rows"]["kinds"].pop("published"), "must declare exactly"),
    (lambda d: d["metrics"]["speedup"].update(pool={"over": "samples", "weighted_by": "n_graded"}), "either"),
    (lambda d: d["columns"][0].update(task="gsm8"), "unknown task gsm8"),
    (lambda d: d["ranking"].update(mark_all_eq=True), "mark_all_eq"),
])
def test_a_broken_schema_is_refused(tmp_path: Path, change: Callable[[dict[str, Any]], None], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        edited(tmp_path, change)
