"""Task cards, data loading, subsets and limits, prompt rendering."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from taps_bench.catalog.cards import TargetCard, TaskCard
from taps_bench.catalog.registry import Registry, builtin_card_dir, parse_card
from taps_bench.data.tasks import (
    Example,
    data_file_hash,
    load_examples,
    load_examples_from_hub,
    prompt_hash,
    render_prompt,
    resolve_data_dir,
)
from taps_bench.errors import UserError

DATA = Path(os.environ.get("TAPS_BENCH_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
TASKS = ("mt-bench", "gsm8k", "math500", "svamp")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def reg() -> Registry:
    return Registry.load()


def card(reg: Registry, name: str) -> TaskCard:
    return reg.task(name)


def make_card(tmp_path: Path, **over: Any) -> TaskCard:
    """A small task card over a file in tmp_path, for the error paths."""
    data: dict[str, Any] = {
        "name": "toy",
        "description": "toy task",
        "source": {"hub": "someone/toy", "local": "toy.jsonl"},
        "fields": {"id": "id", "turns": ["q"], "gold": "a"},
        "scorer": "number",
    }
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return TaskCard.model_validate(data)


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


# -- cards -----------------------------------------------------------------------------------------------------


def test_builtin_task_cards_validate(reg: Registry) -> None:
    for name in TASKS:
        path = builtin_card_dir("task") / f"{name}.yaml"
        parsed = parse_card(path, "task")
        assert isinstance(parsed, TaskCard) and parsed.name == name
    assert set(TASKS) <= set(reg.names("task"))


def test_card_facts(reg: Registry) -> None:
    mt = card(reg, "mt-bench")
    assert (mt.turns, mt.scorer, mt.limit_order) == (2, "none", "round_robin")
    assert (card(reg, "gsm8k").source.hub, card(reg, "gsm8k").source.config) == ("openai/gsm8k", "main")
    assert card(reg, "math500").source.hub == "HuggingFaceH4/MATH-500"
    sv = card(reg, "svamp")
    assert sv.source.hub == "ChilleD/SVAMP" and sv.subset is not None and sv.subset.last == 300
    assert "not verified" in sv.subset.note.lower()


# -- counts and row mapping ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "count"), [("mt-bench", 80), ("gsm8k", 1319), ("math500", 500), ("svamp", 300)])
def test_counts(reg: Registry, name: str, count: int) -> None:
    examples = load_examples(card(reg, name), DATA)
    assert len(examples) == count
    assert len({e.id for e in examples}) == count
    assert all(isinstance(e, Example) for e in examples)


def test_mt_bench_rows(reg: Registry) -> None:
    examples = load_examples(card(reg, "mt-bench"), DATA)
    assert all(len(e.turns) == 2 and e.gold is None for e in examples)
    assert examples[0].id == "81" and examples[0].group == "writing"
    assert examples[0].turns[0].startswith("Compose an engaging travel blog post about a recent trip to Hawaii")
    assert len({e.group for e in examples}) == 8


def test_gsm8k_gold(reg: Registry) -> None:
    examples = load_examples(card(reg, "gsm8k"), DATA)
    first = examples[0]
    assert first.id == "0" and first.gold == "18"
    assert first.turns[0].startswith("Janet’s ducks lay 16 eggs per day.")
    assert "The answer is N" in first.turns[0]  # the card's instruction was applied
    # Gold is exactly the text after "#### ", commas kept (the scorer strips them).
    raw = [json.loads(line) for line in (DATA / "gsm8k" / "test.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [e.gold for e in examples] == [r["answer"].split("#### ")[-1].strip() for r in raw]
    assert any(e.gold is not None and "," in e.gold for e in examples)


def test_math500_rows(reg: Registry) -> None:
    examples = load_examples(card(reg, "math500"), DATA)
    first = examples[0]
    assert first.id == "test/precalculus/807.json"
    assert first.gold == r"\left( 3, \frac{\pi}{2} \right)"
    assert first.turns[0].endswith(r"put your final answer within \boxed{}.")
    assert first.turns[0].startswith("Convert the point $(0,3)$ in rectangular coordinates")


def test_svamp_subset_and_question(reg: Registry) -> None:
    examples = load_examples(card(reg, "svamp"), DATA)
    assert [e.id for e in examples] == [f"chal-{i}" for i in range(701, 1001)]
    raw = {r["ID"]: r for r in json.loads((DATA / "svamp" / "SVAMP.json").read_text(encoding="utf-8"))}
    for e in examples[:5]:
        row = raw[e.id]
        assert e.turns[0].startswith(row["Body"] + " " + row["Question"] + "\n")
        assert e.gold == str(int(row["Answer"]))  # 27.0 in the file is written "27"


# -- limit -----------------------------------------------------------------------------------------------------


def test_limit_file_order_is_deterministic(reg: Registry) -> None:
    gsm = card(reg, "gsm8k")
    a = [e.id for e in load_examples(gsm, DATA, limit=5)]
    b = [e.id for e in load_examples(gsm, DATA, limit=5)]
    assert a == b == ["0", "1", "2", "3", "4"]
    sv = [e.id for e in load_examples(card(reg, "svamp"), DATA, limit=3)]
    assert sv == ["chal-701", "chal-702", "chal-703"]  # subset first, then limit


def test_limit_round_robin(reg: Registry) -> None:
    mt = card(reg, "mt-bench")
    eight = load_examples(mt, DATA, limit=8)
    assert [e.id for e in eight] == [e.id for e in load_examples(mt, DATA, limit=8)]
    assert len({e.group for e in eight}) == 8
    assert [e.id for e in eight] == ["81", "91", "101", "111", "121", "131", "141", "151"]
    nine = load_examples(mt, DATA, limit=9)
    assert nine[:8] == eight and nine[8].id == "82"  # a larger limit extends a smaller one
    assert len(load_examples(mt, DATA, limit=1000)) == 80


@pytest.mark.parametrize("bad", [0, -1, True])
def test_limit_must_be_positive(reg: Registry, bad: int) -> None:
    with pytest.raises(UserError, match="--limit must be a positive integer"):
        load_examples(card(reg, "gsm8k"), DATA, limit=bad)


# -- data directory and files ----------------------------------------------------------------------------------


def test_data_dir_from_env(reg: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TAPS_BENCH_DATA", str(DATA))
    assert resolve_data_dir(None) == DATA
    assert len(load_examples(card(reg, "mt-bench"), None, limit=2)) == 2


def test_data_dir_unset(reg: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TAPS_BENCH_DATA", raising=False)
    with pytest.raises(UserError, match="TAPS_BENCH_DATA") as info:
        load_examples(card(reg, "gsm8k"), None)
    assert "--data-dir" in str(info.value)


def test_data_dir_missing(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        resolve_data_dir(tmp_path / "nowhere")


def test_missing_file_names_the_path(reg: Registry, tmp_path: Path) -> None:
    gsm = card(reg, "gsm8k")
    with pytest.raises(UserError) as info:
        load_examples(gsm, tmp_path)
    message = str(info.value)
    assert str(tmp_path / "gsm8k" / "test.jsonl") in message
    assert "TAPS_BENCH_DATA" in message and "--data-dir" in message and "openai/gsm8k" in message
    assert "\n" not in message


def test_malformed_row_missing_field(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "toy.jsonl", [{"id": 1, "q": "one", "a": "1"}, {"id": 2, "a": "2"}])
    with pytest.raises(UserError, match=re.escape(f"{path}:2: missing field 'q'")):
        load_examples(make_card(tmp_path), tmp_path)


def test_malformed_row_bad_json(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "toy.jsonl", [{"id": 1, "q": "one", "a": "1"}, "", '{"id": 2, "q": '])
    with pytest.raises(UserError, match=re.escape(f"{path}:3: not valid JSON")):
        load_examples(make_card(tmp_path), tmp_path)


def test_malformed_row_in_json_array(tmp_path: Path) -> None:
    rows = [{"id": "a", "q": "one", "a": 1.0}, {"id": "b", "q": "two"}]
    path = tmp_path / "toy.json"
    path.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    toy = make_card(tmp_path, source={"local": "toy.json", "format": "json"})
    with pytest.raises(UserError, match=re.escape(f"{path}:7: missing field 'a'")):
        load_examples(toy, tmp_path)
    path.write_text(json.dumps(rows[:1], indent=2), encoding="utf-8")
    assert load_examples(toy, tmp_path) == [Example(id="a", turns=("one",), gold="1", group=None)]


def test_malformed_turns_and_gold(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "toy.jsonl", [{"id": 1, "t": ["only one"]}])
    two = make_card(tmp_path, fields={"id": "id", "turns": ["t"], "turns_is_list": True, "gold": None}, turns=2,
                    scorer="none")
    with pytest.raises(UserError, match=re.escape("toy.jsonl:1: field 't' has 1 turns")):
        load_examples(two, tmp_path)
    write_jsonl(tmp_path / "toy.jsonl", [{"id": 1, "q": "x", "a": "no marker"}])
    patterned = make_card(tmp_path, fields={"gold_pattern": r"####\s*(.+)$"})
    with pytest.raises(UserError, match=re.escape("toy.jsonl:1: field 'a' does not match gold_pattern")):
        load_examples(patterned, tmp_path)


def test_duplicate_ids_rejected(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "toy.jsonl", [{"id": 1, "q": "x", "a": "1"}, {"id": 1, "q": "y", "a": "2"}])
    with pytest.raises(UserError, match="id '1' already used"):
        load_examples(make_card(tmp_path), tmp_path)


def test_row_index_ids_and_declared_subset(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "toy.jsonl", [{"q": f"q{i}", "a": str(i)} for i in range(6)])
    toy = make_card(tmp_path, fields={"id": None}, subset={"ids": ["4", "1"]})
    assert [e.id for e in load_examples(toy, tmp_path)] == ["1", "4"]  # file order, not the order declared
    firsts = make_card(tmp_path, fields={"id": None}, subset={"first": 4, "last": 2})
    assert [e.id for e in load_examples(firsts, tmp_path)] == ["2", "3"]
    unknown = make_card(tmp_path, fields={"id": None}, subset={"ids": ["9"]})
    with pytest.raises(UserError, match="not in the data: 9"):
        load_examples(unknown, tmp_path)


def test_prompt_template_keeps_braces_and_needs_slot(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "toy.jsonl", [{"id": 1, "q": "What is {x}?", "a": "1"}])
    boxed = make_card(tmp_path, prompt="Q: {text}\nAnswer in \\boxed{}.")
    assert load_examples(boxed, tmp_path)[0].turns == ("Q: What is {x}?\nAnswer in \\boxed{}.",)
    with pytest.raises(UserError, match="prompt must contain"):
        load_examples(make_card(tmp_path, prompt="no slot"), tmp_path)


# -- hub path (a stand-in `datasets` module: tests never reach the hub) ----------------------------------------


def test_hub_path_maps_rows_like_local(reg: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Any, ...]] = []
    svamp_rows = [{"ID": f"chal-{i}", "Body": "Tom has 3 apples.", "Question": "How many?", "Answer": 3.0}
                  for i in range(5)]
    mt_rows = [{"prompt": ["a", "b"], "prompt_id": 7, "category": "writing", "reference": []}]

    def load_dataset(hub: str, config: str | None, split: str) -> list[dict[str, Any]]:
        calls.append((hub, config, split))
        return svamp_rows if hub == "ChilleD/SVAMP" else mt_rows

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    svamp = load_examples_from_hub(card(reg, "svamp"), limit=None)
    assert len(svamp) == 5 and svamp[0].gold == "3"  # hub split taken as is: the 300-subset is local_only
    assert svamp[0].turns == (card(reg, "svamp").prompt.replace("{text}", "Tom has 3 apples. How many?"),)
    mt = load_examples_from_hub(card(reg, "mt-bench"))
    assert mt == [Example(id="7", turns=("a", "b"), gold=None, group="writing")]
    assert calls == [("ChilleD/SVAMP", None, "test"), ("HuggingFaceH4/mt_bench_prompts", None, "train")]


def test_local_path_does_not_import_datasets() -> None:
    code = ("import sys; from taps_bench.catalog.registry import Registry; "
            "from taps_bench.data.tasks import load_examples; "
            f"load_examples(Registry.load().task('gsm8k'), {str(DATA)!r}, limit=2); "
            "assert 'datasets' not in sys.modules, 'datasets was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=60)


# -- hashes ----------------------------------------------------------------------------------------------------


def test_hashes() -> None:
    # The sha256 recorded in shared/data/README.md for this file.
    assert data_file_hash(DATA / "gsm8k" / "test.jsonl") == (
        "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14")
    assert prompt_hash("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert prompt_hash("é") != prompt_hash("e")


# -- rendering -------------------------------------------------------------------------------------------------


class RecordingTokenizer:
    """Stands in for a tokenizer: records what render_prompt asks of the chat template."""

    chat_template = "{{ messages }}"

    def __init__(self) -> None:
        self.calls: list[tuple[list[dict[str, str]], dict[str, Any]]] = []

    def apply_chat_template(self, messages: list[dict[str, str]], **kwargs: Any) -> str:
        self.calls.append((messages, kwargs))
        return "|".join(f"{m['role']}:{m['content']}" for m in messages)


def target(**over: Any) -> TargetCard:
    data = {"name": "t", "description": "d", "family": "llama", "source": {"hub": "x/y"}, **over}
    return TargetCard.model_validate(data)


def test_render_prompt_system_and_kwargs() -> None:
    tok = RecordingTokenizer()
    history = [{"role": "user", "content": "hi"}]
    assert render_prompt(tok, target(), history) == "user:hi"
    sys_target = target(system_prompt="be brief", chat_template="T", chat_template_kwargs={"enable_thinking": False})
    assert render_prompt(tok, sys_target, history) == "system:be brief|user:hi"
    _, kwargs = tok.calls[-1]
    assert kwargs == {"enable_thinking": False, "chat_template": "T", "tokenize": False,
                      "add_generation_prompt": True}
    assert history == [{"role": "user", "content": "hi"}]  # the caller's list is not modified
    with pytest.raises(ValueError, match="end with a user turn"):
        render_prompt(tok, target(), [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    bare = RecordingTokenizer()
    bare.chat_template = ""
    with pytest.raises(UserError, match="no chat template"):
        render_prompt(bare, target(), history)


@pytest.mark.smollm
def test_render_every_task_with_smollm2(reg: Registry) -> None:
    from taps_bench.models.targets import load_tokenizer

    smol = reg.target("smollm2-135m-instruct")
    tok = load_tokenizer(smol)
    default_system = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    hashes = set()
    for name in TASKS:
        first = load_examples(card(reg, name), DATA, limit=1)[0]
        history = [{"role": "user", "content": first.turns[0]}]
        text = render_prompt(tok, smol, history)
        assert text.startswith(default_system)
        assert f"<|im_start|>user\n{first.turns[0]}<|im_end|>" in text
        assert text.endswith("<|im_start|>assistant\n")
        hashes.add(prompt_hash(text))
        if len(first.turns) > 1:
            answer = "Aloha! Hawaii is a wonderful place to visit."
            history += [{"role": "assistant", "content": answer}, {"role": "user", "content": first.turns[1]}]
            second = render_prompt(tok, smol, history)
            assert second.startswith(text)  # turn 2 extends the turn-1 prompt
            assert f"<|im_start|>assistant\n{answer}<|im_end|>" in second
            assert f"<|im_start|>user\n{first.turns[1]}<|im_end|>" in second
            assert second.endswith("<|im_start|>assistant\n")
            assert second.count(default_system) == 1
            hashes.add(prompt_hash(second))
    assert len(hashes) == len(TASKS) + 1
