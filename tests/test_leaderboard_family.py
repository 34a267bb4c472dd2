"""The leaderboard's row labels: the drafter family (EAGLE-1, EAGLE-2, HASS, EAGLE-3; a combiner's members joined)
and the draft vocabulary ("N", or "full (N)"), declared in leaderboard/schema.yaml as `of: row` metrics and derived
from stored data only (a run's settings, its provenance, the card its row shows, the registry for registered
names measured here). The store is filled by hand, as in tests/test_leaderboard.py."""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from test_leaderboard import BASE_SETTINGS, PROV, TREE, sample
from test_site_rules import edited
from test_site_safety import submit

from taps_bench.catalog.registry import Registry
from taps_bench.results.store import Store, as_url
from taps_bench.site.board import Board, RowLabel, collect, load_schema
from taps_bench.site.render import build

LLAMA_VOCAB = 128256
FULL = f"full ({LLAMA_VOCAB})"
WITH_VOCAB = {**PROV, "target_vocab_size": LLAMA_VOCAB}  # what a run's provenance records of its target


def add(store: Store, name: str, settings: dict[str, Any], provenance: dict[str, Any] | None = None,
        steps: int = 10) -> None:
    """A baseline and one speculative run of `name` on gsm8k (two questions of 40 tokens each)."""
    base = store.get_or_create_run("baseline", "tiny", "gsm8k", "autoregressive", 0.0, BASE_SETTINGS, PROV)
    run = store.get_or_create_run("speculative", "tiny", "gsm8k", name, 0.0,
                                  {**BASE_SETTINGS, "tree": TREE, **settings}, provenance or PROV)
    for q in ("a", "b"):
        store.add_sample(base, sample(q, 40, 40, 4.0))
        store.add_sample(run, sample(q, 40, steps, 2.0))


def fill(store: Store) -> None:
    # An EAGLE-3 run records its family and its draft vocabulary (measure.resolve.eagle_proposer).
    add(store, "eagle3-32k", {"drafter_checkpoint": "hub:a/b", "drafter_family": "eagle3",
                              "draft_vocab_size": 32000}, WITH_VOCAB)
    add(store, "eagle3-full", {"drafter_checkpoint": "hub:a/c", "drafter_family": "eagle3",
                               "draft_vocab_size": LLAMA_VOCAB}, WITH_VOCAB, steps=8)
    # EAGLE-2 over a reduced vocabulary: the family from the card its run recorded (a recipe-built drafter).
    add(store, "built-eagle2", {"drafter_checkpoint": "built:x", "draft_vocab": {
        "size": 12288, "coverage": 0.99, "corpus": "mixed"}},
        {**WITH_VOCAB, "drafter_card": {"name": "built-eagle2", "method": "eagle2"}}, steps=20)
    # A registered name whose runs recorded no card: the registry's card says HASS.
    add(store, "mathinstruct-hass", {"drafter_checkpoint": "hub:zbeeb/Hass-MathInstruct_20epochs"}, WITH_VOCAB)
    # A checkpoint directory with its own card.yaml (recorded at measure time); no target vocabulary recorded.
    add(store, "my-eagle1", {"drafter_checkpoint": "path:/x"}, {**PROV, "drafter_card": {"method": "eagle1"}})
    # A model-free drafter records its family and options (measure.modelfree): it scores no vocabulary.
    add(store, "pld", {"drafter_family": "pld", "model_free": {"method": "pld", "max_ngram": 3, "min_ngram": 1,
                                                               "num_pred_tokens": 10}}, WITH_VOCAB, steps=16)
    # Combiners: each member's family; EAGLE-3 members record theirs, registered names are looked up.
    add(store, "confidence(mathinstruct-eagle2,e3)", {"combiner": "confidence", "drafters": [
        {"name": "mathinstruct-eagle2", "checkpoint": "hub:x", "sha256": "1"},
        {"name": "e3", "checkpoint": "path:/e3", "sha256": "2", "drafter_family": "eagle3"}]}, WITH_VOCAB)
    add(store, "confidence(sharegpt-hass,mine)", {"combiner": "confidence", "drafters": [
        {"name": "sharegpt-hass", "checkpoint": "hub:x", "sha256": "1"},
        {"name": "mine", "checkpoint": "path:/mine", "sha256": "3"}]})


@pytest.fixture
def store(tmp_path: Path) -> Store:
    store = Store(as_url(str(tmp_path / "r.db")))
    fill(store)
    return store


def tiny(store: Store, reg: Registry | None = None, schema: Any = None) -> Board:
    return next(b for b in collect(store, schema, reg) if b.target == "tiny")


def texts(board: Board, column: str) -> dict[str, str | None]:
    out = {}
    for r in board.rows:
        value = r.values[column]
        assert value is None or isinstance(value, RowLabel)
        out[r.name] = value.text if isinstance(value, RowLabel) else None
    return out


def test_family_and_draft_vocab_of_each_kind_of_row(store: Store) -> None:
    board = tiny(store, Registry.load())
    family, vocab = texts(board, "family"), texts(board, "draft_vocab")
    assert family == {
        "eagle3-32k": "EAGLE-3", "eagle3-full": "EAGLE-3", "built-eagle2": "EAGLE-2", "mathinstruct-hass": "HASS",
        "my-eagle1": "EAGLE-1", "pld": "PLD (model-free)", "confidence(mathinstruct-eagle2,e3)": "EAGLE-2 + EAGLE-3",
        "confidence(sharegpt-hass,mine)": "HASS + ?",
        "oracle(eagle3-32k,eagle3-full,built-eagle2,mathinstruct-hass,my-eagle1,pld)": None}
    assert vocab == {
        "eagle3-32k": "32000", "eagle3-full": FULL, "built-eagle2": "12288", "mathinstruct-hass": FULL,
        "my-eagle1": "full",  # the full vocabulary, but no target vocabulary size recorded with the run
        "pld": "none (copies)",
        "confidence(mathinstruct-eagle2,e3)": FULL, "confidence(sharegpt-hass,mine)": "full",
        "oracle(eagle3-32k,eagle3-full,built-eagle2,mathinstruct-hass,my-eagle1,pld)": None}
    # Published rows carry the family declared in published.yaml.
    llama = next(b for b in collect(store) if b.target == "llama3-8b-instruct")
    published = {p.name.split("|")[2]: p.values["family"] for p in llama.published}
    assert {k: v.text if v else None for k, v in published.items()} == {
        "HASS MathInstruct": "HASS", "HASS ShareGPT": "HASS", "HASS averaged weights": "HASS",
        "HASS confidence-routed": "HASS + HASS", "HASS merged trees": "HASS + HASS"}


def test_registered_names_need_the_registry_and_cards_win_over_it(store: Store) -> None:
    family = texts(tiny(store), "family")  # no registry: a registered name without a recorded card is unknown
    assert family["mathinstruct-hass"] is None and family["built-eagle2"] == "EAGLE-2"
    assert family["confidence(mathinstruct-eagle2,e3)"] == "? + EAGLE-3"
    assert family["confidence(sharegpt-hass,mine)"] is None  # no member known: no label


def test_a_submitted_row_shows_its_own_cards_family_never_the_registrys(store: Store) -> None:
    submit(store, "mathinstruct-eagle2", card={"name": "mathinstruct-eagle2", "target": "tiny", "method": "hass",
                                               "authors": ["Someone"], "license": "MIT", "description": "x"})
    submit(store, "sharegpt-eagle2", card={"name": "sharegpt-eagle2", "target": "tiny", "method": "other",
                                           "authors": ["Someone"], "license": "MIT", "description": "y"})
    family = texts(tiny(store, Registry.load()), "family")
    assert family["mathinstruct-eagle2"] == "HASS" and family["sharegpt-eagle2"] == "other"


@pytest.mark.parametrize(("settings", "provenance", "family", "vocab"), [
    ({"drafter_family": "<script>alert(1)</script>"}, {}, None, "full"),  # no unknown text is echoed
    ({}, {"drafter_card": {"method": "<b>eagle9</b>"}}, None, "full"),
    ({}, {"drafter_card": {"method": ["eagle2"]}}, None, "full"),  # a malformed card is no card
    ({"drafter_family": "eagle3", "draft_vocab_size": "lots"}, {}, "EAGLE-3", None),
    ({"drafter_family": "eagle3", "draft_vocab_size": True}, {}, "EAGLE-3", None),
    ({"drafter_family": "eagle3", "draft_vocab_size": -5}, {}, "EAGLE-3", None),
    ({"drafter_family": "eagle3", "draft_vocab_size": 1e300}, {}, "EAGLE-3", None),
    ({"draft_vocab": "12288"}, {}, None, None),
    ({}, {"target_vocab_size": "big"}, None, "full"),
    ({"combiner": "confidence", "drafters": "mathinstruct-eagle2"}, {}, None, "full"),
])
def test_hostile_stored_values_make_no_label(tmp_path: Path, settings: dict[str, Any], provenance: dict[str, Any],
                                             family: str | None, vocab: str | None) -> None:
    store = Store(as_url(str(tmp_path / "r.db")))
    add(store, "x", {"drafter_checkpoint": "path:/x", **settings}, {**PROV, **provenance})
    row = tiny(store, Registry.load()).rows[0]
    for column, expected in (("family", family), ("draft_vocab", vocab)):
        value = row.values[column]
        assert (value.text if isinstance(value, RowLabel) else value) == expected, column


def test_the_page_shows_and_sorts_them_and_the_downloads_carry_them(store: Store, tmp_path: Path) -> None:
    build(store, tmp_path / "site", Registry.load())
    index = (tmp_path / "site" / "index.html").read_text()
    section = index.split('data-target="tiny"')[1].split("</section>")[0]
    headers = re.findall(r"<th[^>]*>([^<]*)</th>", section.split("</thead>")[0])
    assert headers[-2:] == ["Family", "Draft vocab"] and headers[1:3] == ["MT-Bench", "GSM8K"]
    row = re.search(r'<tr class="drafter" data-name="eagle3-32k">(.*?)</tr>', section, re.S)
    assert row and '<td data-value="4.0">EAGLE-3</td>' in row.group(1)  # sorts by family, in order of publication
    assert '<td data-value="32000">32000</td>' in row.group(1)
    combo = re.search(r'<tr class="combiner" data-name="confidence\(mathinstruct-eagle2,e3\)">(.*?)</tr>', section,
                      re.S)
    assert combo and f'<td data-value="{LLAMA_VOCAB}">{FULL}</td>' in combo.group(1)
    assert "EAGLE-2 + EAGLE-3</td>" in combo.group(1)
    # Every sort key is a number the page's script reads (parseFloat), or empty (sorts last).
    keys = re.findall(r'<td data-value="([^"]*)">(?:EAGLE|HASS|full|\d|–|\?)', section)
    assert keys and all(k == "" or k == "Infinity" or re.fullmatch(r"[0-9.e-]+", k) for k in keys)
    methodology = (tmp_path / "site" / "methodology.html").read_text()
    assert "Family</dt>" in methodology and "Draft vocab</dt>" in methodology  # defined like every column
    data = tmp_path / "site" / "data"
    table = {r["name"]: r for r in json.loads(next(data.glob("board-tiny*.json")).read_text())}
    assert table["eagle3-32k"]["family"] == "EAGLE-3" and table["eagle3-32k"]["draft_vocab"] == "32000"
    assert table["confidence(sharegpt-hass,mine)"]["family"] == "HASS + ?"
    with next(data.glob("board-tiny*.csv")).open() as fh:
        rows = {r["name"]: r for r in csv.DictReader(fh)}
    assert rows["built-eagle2"]["family"] == "EAGLE-2" and rows["eagle3-full"]["draft_vocab"] == FULL
    pub = json.loads(next(p for p in data.glob("board-llama3*.json")).read_text())
    assert {r["family"] for r in pub} == {"HASS", "HASS + HASS"}


def test_family_sorts_by_publication_then_member_by_member() -> None:
    from taps_bench.site.labels import _family_label

    order = [["eagle1"], ["eagle2"], ["eagle2", "eagle3"], ["eagle2", None], ["hass"], ["hass", "hass"],
             ["eagle3"], [None, "eagle2"]]
    keys = [_family_label(f).sort for f in order]  # type: ignore[union-attr]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d["metrics"]["family"].update(compute="familly"), "a row label computes one of family"),
    (lambda d: d["metrics"]["family"].update(better="higher"), "better: none"),
    (lambda d: d["columns"][-1].update(task="gsm8k"), "row label draft_vocab takes no task"),
    (lambda d: d["detail_columns"].append("family"), "row labels family are no per-task metric"),
    (lambda d: d["columns"].append({"id": "m", "label": "m", "metric": "tau", "mean_of": ["family"]}),
     "needs a task or the mean of earlier columns"),
])
def test_a_broken_row_label_in_the_schema_is_refused(tmp_path: Path, change: Callable[[dict[str, Any]], None],
                                                      message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        edited(tmp_path, change)


def test_the_schema_declares_both_labels() -> None:
    schema = load_schema()
    ids = [c.id for c in schema.columns]
    assert ids[-2:] == ["family", "draft_vocab"]
    assert all(schema.metrics[i].of == "row" and schema.metrics[i].definition for i in ids[-2:])
