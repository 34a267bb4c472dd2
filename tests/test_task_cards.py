"""A task is one card, everywhere: a task card for data that live only in local files (no hub id) loads its examples
and runs with `run`, `matrix` and `submit` through `--include`; lm-eval's local datasets come from the task cards
(the built-in gsm8k/math500 mapping, and a card whose alias names the dataset an lm-eval task reads).

The CLI tests run on the tiny target `tiny-smol` (conftest) with --limit 1 and 4 new tokens, so each takes seconds.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from taps_bench.catalog.registry import Registry, parse_card
from taps_bench.cli import main
from taps_bench.data.tasks import load_examples, load_examples_from_hub
from taps_bench.errors import UserError
from taps_bench.results.store import Store, as_url

pytestmark = pytest.mark.usefixtures("one_thread")

TASK = "local-sums"
# Rows in a shape of the user's own (ids in a field, the gold under another name), as a local-only task would have.
ROWS = [{"qid": "s1", "q": "What is 2 + 3?", "sol": "5"},
        {"qid": "s2", "q": "What is 7 - 4?", "sol": "3"},
        {"qid": "s3", "q": "What is 6 * 2?", "sol": "12"}]
CARD = {"name": TASK, "description": "three sums in a local file, on no hub (tests only)",
        "source": {"local": "local_sums/test.jsonl"},
        "fields": {"id": "qid", "turns": ["q"], "gold": "sol"},
        "prompt": "{text}\n\nFinish with \"The answer is N\".", "scorer": "number"}
# The data directories the shared data hold, for `submit`, which smoke-tests every registered task.
SHARED = ("gsm8k", "math500", "mt_bench", "svamp")


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_card(include: Path, card: dict[str, Any]) -> Path:
    path = include / "tasks" / f"{card['name']}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(card, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def local_task(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> dict[str, Path]:
    """An --include directory with the card, and a data directory holding its file beside the shared data.

    The shared data are linked, not copied, so that `submit` (every registered task) finds them in the same
    directory as the new task's file.
    """
    root = tmp_path_factory.mktemp("local-task")
    write_card(root / "include", CARD)
    data = root / "data"
    write_jsonl(data / CARD["source"]["local"], ROWS)
    for name in SHARED:
        (data / name).symlink_to((data_dir / name).resolve(), target_is_directory=True)
    return {"include": root / "include", "data": data}


@pytest.fixture(scope="module")
def drafter(tiny_smol: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random (correctly shaped) drafter checkpoint for tiny-smol, in a directory of its own."""
    from transformers import AutoConfig

    from taps_bench.models.drafter import random_drafter, save_drafter

    where = tmp_path_factory.mktemp("drafter") / "drafter"
    save_drafter(random_drafter(AutoConfig.from_pretrained(tiny_smol / "model"), 0, std=0.5), where)
    return where


def invoke(*args: Any) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


def last_json(out: str) -> dict[str, Any]:
    return json.loads(out.strip().splitlines()[-1])


def stored(db: Path, task: str) -> dict[str, list[dict[str, Any]]]:
    """Run kind -> its samples, for the runs of `task` in the database."""
    with Store(as_url(str(db))) as store:
        return {r["kind"]: store.samples(r["id"]) for r in store.runs() if r["task"] == task}


# -- (a) a card with no hub id -----------------------------------------------------------------------------------


def test_card_without_hub_loads_its_local_examples(local_task: dict[str, Path], tmp_path: Path) -> None:
    card = Registry.load(include=[local_task["include"]]).task(TASK)
    assert card.source.hub is None and card.source.datasets() == []
    examples = load_examples(card, local_task["data"])
    assert [(e.id, e.gold) for e in examples] == [("s1", "5"), ("s2", "3"), ("s3", "12")]
    assert examples[0].turns == ("What is 2 + 3?\n\nFinish with \"The answer is N\".",)
    assert [e.id for e in load_examples(card, local_task["data"], limit=2)] == ["s1", "s2"]
    # Without the file: the message names the file and the data directory, and no hub (there is none).
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"data file .*local_sums/test.jsonl not found") as missing:
        load_examples(card, tmp_path / "empty")
    assert "on the hub" not in str(missing.value)
    with pytest.raises(UserError, match=f"task '{TASK}': its card names no hub dataset"):
        load_examples_from_hub(card)


@pytest.mark.parametrize(("source", "says"), [
    ({"local": "a.jsonl", "splits": {"test": "b.jsonl"}}, "splits.test: the 'test' split's file is `local`"),
    ({"local": "a.jsonl", "hub_fields": {"turns": ["q"]}}, "hub_fields describes the hub dataset's columns"),
    ({"hub": "me/sums", "hub_aliases": ["me/sums"], "local": "a.jsonl"}, "hub_aliases repeats the hub id"),
])
def test_source_fields_that_contradict_each_other_are_refused(tmp_path: Path, source: dict[str, Any],
                                                              says: str) -> None:
    path = write_card(tmp_path, {**CARD, "source": source})
    with pytest.raises(UserError, match=f"malformed card {path}.*{says}"):
        parse_card(path, "task")


# -- (b, c, d) the new task through the CLI ----------------------------------------------------------------------


@pytest.mark.smollm
def test_run_measures_the_new_task(tiny_smol: Path, local_task: dict[str, Path], drafter: Path,
                                   tmp_path: Path) -> None:
    db = tmp_path / "run.sqlite"
    rc, out, err = invoke("--include", tiny_smol, "--include", local_task["include"], "run", "--task", TASK,
                          "--target", "tiny-smol", "--drafter", drafter, "--limit", 1, "--max-new-tokens", 4,
                          "--data-dir", local_task["data"], "--db", db, "--no-progress", "--json")
    assert rc == 0, err
    assert last_json(out)["task"] == TASK
    runs = stored(db, TASK)
    assert sorted(runs) == ["baseline", "speculative"]
    for samples in runs.values():
        assert [(s["example_id"], s["gold"]) for s in samples] == [("s1", "5")]
        assert samples[0]["output_ids"] and 1 <= len(samples[0]["output_ids"]) <= 4
    assert runs["speculative"][0]["output_ids"] == runs["baseline"][0]["output_ids"]  # lossless at T=0


@pytest.mark.smollm
def test_matrix_runs_a_spec_naming_the_new_task(tiny_smol: Path, local_task: dict[str, Path], drafter: Path,
                                                tmp_path: Path) -> None:
    spec = tmp_path / "local.yaml"
    spec.write_text(yaml.safe_dump({"name": "local", "description": "the local task only", "targets": ["tiny-smol"],
                                    "proposers": [{"drafter": str(drafter)}], "tasks": {TASK: 1},
                                    "temperatures": [0], "max_new_tokens": 4}, sort_keys=False))
    db = tmp_path / "matrix.sqlite"
    rc, out, err = invoke("--include", tiny_smol, "--include", local_task["include"], "matrix", spec, "--db", db,
                          "--no-progress", "--json", "--data-dir", local_task["data"])
    assert rc == 0, err
    cells = last_json(out)["cells"]
    assert [(c["task"], c["status"], c["result"]["n_samples"]) for c in cells] == [(TASK, "done", 1)]
    assert cells[0]["result"]["lossless_rate"] == 1.0
    assert {kind: [s["example_id"] for s in samples] for kind, samples in stored(db, TASK).items()} == {
        "baseline": ["s1"], "speculative": ["s1"]}


@pytest.mark.smollm
def test_submit_smoke_tests_the_new_task_too(tiny_smol: Path, local_task: dict[str, Path], drafter: Path,
                                             tmp_path: Path) -> None:
    card = tmp_path / "card.yaml"
    card.write_text(json.dumps({"name": "tiny-sub", "method": "eagle2", "target": "tiny-smol",
                                "checkpoint": {"path": str(drafter)}, "training_data": "none: random weights",
                                "license": "Apache-2.0", "authors": ["Test Author"]}))
    bundle = tmp_path / "tiny-sub.bundle.json"
    rc, out, err = invoke("--include", tiny_smol, "--include", local_task["include"], "submit", card, "--limit", 1,
                          "--max-new-tokens", 4, "--no-progress", "--json", "--data-dir", local_task["data"])
    assert rc == 0, err
    tasks = {r["task"]: r for r in last_json(out)["tasks"]}
    assert sorted(tasks) == sorted(["gsm8k", "math500", "mt-bench", "svamp", TASK])
    assert tasks[TASK]["lossless"] is True and tasks[TASK]["samples"] == 1
    runs = json.loads(bundle.read_text())["runs"]
    ours = {r["kind"]: r for r in runs if r["task"] == TASK}
    assert sorted(ours) == ["baseline", "speculative"]
    assert all([s["example_id"] for s in r["samples"]] == ["s1"] for r in ours.values())


# -- (e) lm-eval's local datasets come from the task cards -------------------------------------------------------

# What the hard-coded table in taps_bench/evaluation/tasks.py said before the cards said it: dataset -> (task card,
# split -> file). The built-in cards must keep providing exactly these.
BEFORE = {"openai/gsm8k": ("gsm8k", {"test": "gsm8k/test.jsonl", "train": "gsm8k/train.jsonl"}),
          "gsm8k": ("gsm8k", {"test": "gsm8k/test.jsonl", "train": "gsm8k/train.jsonl"}),
          "HuggingFaceH4/MATH-500": ("math500", {"test": "math500/test.jsonl"})}


def test_builtin_cards_provide_the_same_lm_eval_files(tmp_path: Path, data_dir: Path) -> None:
    from taps_bench.evaluation import tasks as lme

    reg = Registry.load()
    provided = lme.local_datasets(reg)
    assert {d: [c.name for c in cards] for d, cards in provided.items()} == {d: [t] for d, (t, _) in BEFORE.items()}
    for dataset, (task, files) in BEFORE.items():
        card = lme.resolve_local_dataset(reg, "t", dataset, None, set(files))
        assert (card.name, card.source.files()) == (task, files)
    # The cards that cannot stand in for their hub dataset say why instead of handing lm-eval the wrong rows.
    with pytest.raises(UserError, match=r"mt-bench.*other columns than the hub dataset"):
        lme.resolve_local_dataset(reg, "t", "HuggingFaceH4/mt_bench_prompts", None, {"train"})
    with pytest.raises(UserError, match=r"svamp.*more rows than the hub split"):
        lme.resolve_local_dataset(reg, "t", "ChilleD/SVAMP", None, {"test"})

    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is in the [lm-eval] and [test] extras")
    # None: the built-in cards, as callers that pass no registry get them (each task costs a scan of lm-eval's
    # task files, so once is enough there).
    for given, names in ((reg, ["gsm8k", "minerva_math500"]), (None, ["gsm8k"])):
        tasks = lme.write_local_tasks(names, data_dir, tmp_path, given)
        for name, dataset in (("gsm8k", "openai/gsm8k"), ("minerva_math500", "HuggingFaceH4/MATH-500")):
            if name not in names:
                continue
            task, files = BEFORE[dataset]
            assert tasks[name].dataset_path == dataset and tasks[name].taps_task == task
            assert tasks[name].files == {split: data_dir / rel for split, rel in files.items()}
            assert tasks[name].data_file == data_dir / files["test"]
            written = yaml.safe_load(tasks[name].config_path.read_text())
            assert written["dataset_path"] == "json" and written["dataset_name"] is None
            assert written["dataset_kwargs"] == {"data_files": {s: str(data_dir / f) for s, f in files.items()}}


ARC_ROWS = {split: [{"id": f"{split}-{i}", "question": f"Which number is larger, {i} or {i + 1}?",
                     "choices": {"text": [str(i), str(i + 1)], "label": ["A", "B"]}, "answerKey": "B"}
                    for i in range(n)] for split, n in (("test", 3), ("validation", 2), ("train", 2))}


def arc_card(**source: Any) -> dict[str, Any]:
    """A local-only task card holding ARC-Easy's rows (in the hub's columns), known to lm-eval by an alias."""
    return {"name": "arc-local", "description": "a few ARC-Easy-shaped rows (tests only)",
            "source": {"hub_aliases": ["allenai/ai2_arc"], "config": "ARC-Easy", "local": "arc/test.jsonl",
                       "splits": {"train": "arc/train.jsonl", "validation": "arc/validation.jsonl"}} | source,
            "fields": {"id": "id", "turns": ["question"], "gold": "answerKey"}, "scorer": "none"}


def test_card_with_an_alias_provides_an_lm_eval_dataset(tmp_path: Path) -> None:
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is in the [lm-eval] and [test] extras")
    from taps_bench.evaluation import tasks as lme

    data = tmp_path / "data"
    for split, rows in ARC_ROWS.items():
        write_jsonl(data / "arc" / f"{split}.jsonl", rows)
    out = tmp_path / "generated"
    # What arc_easy reads (its YAML: dataset_path, dataset_name and the three splits), resolved without lm-eval's
    # task files for the cases that must be refused.
    arc = ("arc_easy", "allenai/ai2_arc", "ARC-Easy", {"train", "validation", "test"})
    # Built-in cards only: arc_easy's dataset is refused, and the refusal lists what the cards do provide.
    with pytest.raises(UserError, match="reads the dataset 'allenai/ai2_arc' from the hub") as refused:
        lme.resolve_local_dataset(Registry.load(), *arc)
    assert "openai/gsm8k (task gsm8k)" in str(refused.value) and "HuggingFaceH4/MATH-500" in str(refused.value)

    write_card(tmp_path / "include", arc_card())
    reg = Registry.load(include=[tmp_path / "include"])
    assert [c.name for c in lme.local_datasets(reg)["allenai/ai2_arc"]] == ["arc-local"]
    lme.go_offline()
    task = lme.write_local_tasks(["arc_easy"], data, out, reg)["arc_easy"]
    assert task.dataset_path == "allenai/ai2_arc" and task.taps_task == "arc-local"
    assert task.files == {split: data / "arc" / f"{split}.jsonl" for split in ("test", "train", "validation")}
    # lm-eval itself reads the card's files: its test documents are the card's rows.
    manager = lme.task_manager(out)
    loaded = manager.load(["arc_easy"])["tasks"] if hasattr(manager, "load") else manager.load_task_or_group(
        ["arc_easy"])
    docs = loaded["arc_easy"].test_docs()
    assert [d["id"] for d in docs] == [r["id"] for r in ARC_ROWS["test"]]
    assert len(loaded["arc_easy"].validation_docs()) == 2

    # The same card holding another configuration, or lacking a split the task reads, is no stand-in.
    for source, says in (({"config": "ARC-Challenge"}, "holds the configuration 'ARC-Challenge'"),
                         ({"splits": {"train": "arc/train.jsonl"}}, "has no local file of the split.*validation")):
        write_card(tmp_path / "other", arc_card(**source))
        with pytest.raises(UserError, match=f"can stand in for the hub: task 'arc-local': it {says}"):
            lme.resolve_local_dataset(Registry.load(include=[tmp_path / "other"]), *arc)
