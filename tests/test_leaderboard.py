"""`taps-bench leaderboard build` from a store filled by hand: rows, pooling, best marks, published rows, downloads,
links, escaping. (tests/test_browser.py opens a site built from a real run in Chromium.)"""

from __future__ import annotations

import csv
import json
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from taps_bench.cli import main
from taps_bench.results.store import Store, as_url
from taps_bench.site.board import collect, load_schema
from taps_bench.site.render import build

EVIL = '<script>alert("pwned")</script><img src=x onerror=alert(1)>'
BASE_SETTINGS = {"target_checkpoint_sha256": "abc", "target_card": "t", "task_card": "k", "data_sha256": "d",
                 "device": "cpu", "dtype": "float32", "max_new_tokens": 64,
                 "sampling": {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": 0}}
TREE = {"total_tokens": 16, "depth": 4, "top_k": 4}
PROV = {"device_name": "test-cpu", "threads": 2, "dtype": "float32", "versions": {"torch": "x"}}


def sample(example_id: str, tokens: int, steps: int, seconds: float, turn: int = 0, **extra: Any) -> dict[str, Any]:
    per_step = [tokens // steps - 1] * steps
    return {"example_id": example_id, "turn": turn, "output_ids": list(range(tokens)), "steps": steps,
            "total_s": seconds, "stop_reason": "max_new_tokens", "accept_lengths": per_step,
            "drafted_by_depth": [steps, steps], "accepted_by_depth": [sum(1 for a in per_step if a >= 1),
                                                                      sum(1 for a in per_step if a >= 2)],
            "tree_sizes": [16] * steps, **extra}


def fill(store: Store, target: str = "tiny", temperature: float = 0.0) -> None:
    """Two drafters and a combiner on two tasks; the combiner's name and card are hostile HTML."""
    settings = {**BASE_SETTINGS, "sampling": {**BASE_SETTINGS["sampling"], "temperature": temperature}}
    for task, gold in (("gsm8k", "1"), ("mt-bench", None)):
        base = store.get_or_create_run("baseline", target, task, "autoregressive", temperature, settings, PROV)
        for q in ("a", "b"):
            store.add_sample(base, sample(q, 40, 40, 4.0, gold=gold, correct=(q == "a") if gold else None))
        for name, steps, secs in (("math-drafter", 10, 2.0), ("chat-drafter", 20, 3.0)):
            run = store.get_or_create_run("speculative", target, task, name, temperature,
                                          {**settings, "drafter_checkpoint": f"/x/{name}", "tree": TREE}, PROV)
            for q in ("a", "b"):
                store.add_sample(run, sample(q, 40, steps, secs, gold=gold,
                                             correct=(q == "a") if gold else None))
        combo = store.get_or_create_run(
            "speculative", target, task, EVIL, temperature,
            {**settings, "combiner": "confidence", "granularity": "step", "tree": TREE},
            {**PROV, "drafter_card": {"name": EVIL, "description": f"desc {EVIL}", "links": ["javascript:alert(1)"]}})
        for q in ("a", "b"):
            store.add_sample(combo, sample(q, 40, 8, 2.5, extra={
                "choices": ["math-drafter"] * 6 + ["chat-drafter"] * 2,
                "nodes": {"math-drafter/accepted": {"n": 10, "confidence": 0.8, "entropy": 0.5},
                          "math-drafter/rejected": {"n": 30, "confidence": 0.2, "entropy": 2.0}}}))


class Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.scripts = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self.links += [v or "" for k, v in attrs if k == "href"]
        if tag == "script":
            self.scripts += 1


def parse(path: Path) -> Links:
    p = Links()
    p.feed(path.read_text())
    return p


@pytest.fixture
def site(tmp_path: Path) -> tuple[Path, Store]:
    store = Store(as_url(str(tmp_path / "r.db")))
    fill(store)
    build(store, tmp_path / "site")
    return tmp_path / "site", store


def test_rows_values_and_best_marks(site: tuple[Path, Store]) -> None:
    _, store = site
    boards = collect(store)
    tiny = next(b for b in boards if b.target == "tiny")
    rows = {r.name: r for r in tiny.rows}
    assert set(rows) == {"math-drafter", "chat-drafter", EVIL, "oracle(math-drafter,chat-drafter)"}
    assert rows["math-drafter"].values["tau_gsm8k"] == pytest.approx(4.0)
    assert rows["chat-drafter"].values["tau_gsm8k"] == pytest.approx(2.0)
    # speedup over both tasks: (80 tok / 4 s) / (80 tok / 8 s) per task, pooled = 2.0 for math, 8/6 for chat
    assert rows["math-drafter"].values["speedup"] == pytest.approx(2.0)
    assert rows["chat-drafter"].values["speedup"] == pytest.approx(8 / 6)
    assert rows["math-drafter"].values["accuracy"] == pytest.approx(0.5)  # MT-Bench has no gold: not graded
    assert rows["math-drafter"].values["tau_avg"] is None  # two of four tasks: no average
    assert rows[EVIL].kind == "combiner" and rows[EVIL].tasks["gsm8k"].decisions == {"chat-drafter": 0.25,
                                                                                     "math-drafter": 0.75}
    oracle = rows["oracle(math-drafter,chat-drafter)"]
    assert oracle.values["tau_gsm8k"] == pytest.approx(4.0) and oracle.values["speedup"] is None
    # the llama3 board holds the paper's numbers even with nothing measured on it
    llama = next(b for b in boards if b.target == "llama3-8b-instruct")
    assert not llama.rows and {p.values["tau_gsm8k"] for p in llama.published} >= {5.02, 5.42}


def test_pages_escape_hostile_names_and_links_resolve(site: tuple[Path, Store]) -> None:
    root, _ = site
    pages = [root / "index.html", root / "methodology.html", *sorted((root / "drafters").glob("*.html"))]
    assert len(pages) == 2 + 4
    for page in pages:
        text = page.read_text()
        assert "<script>alert" not in text and "<img src=x" not in text
        parsed = parse(page)
        assert parsed.scripts == 1  # only our own sorting script
        for href in parsed.links:
            if href.startswith(("http://", "https://")):
                continue
            assert not href.startswith("javascript:"), page
            target = href.split("#")[0]
            if target:
                assert (page.parent / target).resolve().is_file(), f"{page.name}: broken link {href}"
    index = (root / "index.html").read_text()
    assert "&lt;script&gt;alert(&#34;pwned&#34;)&lt;/script&gt;" in index
    evil_page = next(p for p in pages if "desc &lt;script&gt;" in p.read_text())
    assert 'href="#"' in evil_page.read_text()  # the javascript: link is shown as text, not followed


def test_best_per_column_and_published_rows_are_marked(site: tuple[Path, Store]) -> None:
    root, _ = site
    index = (root / "index.html").read_text()
    tiny = index.split('data-target="tiny"')[1].split("</section>")[0]
    math_row = re.search(r'<tr class="drafter" data-name="math-drafter">(.*?)</tr>', tiny, re.S)
    assert math_row and '<td data-value="2.0" class="best">2.00×' in math_row.group(1)  # the best speedup
    combo = re.search(r'<tr class="combiner" data-name="[^"]*">(.*?)</tr>', tiny, re.S)
    assert combo and combo.group(1).count('class="best"') == 2  # the best tau on both tasks
    assert 'class="best"' not in tiny.split('<tr class="oracle"')[1].split("</tr>")[0]  # oracles are not ranked
    assert "published" in index and "arXiv" in index


def test_downloads_hold_every_table(site: tuple[Path, Store]) -> None:
    root, _ = site
    schema = load_schema()
    boards = sorted((root / "data").glob("board-*.json"))
    assert len(boards) == 2
    tiny = next(json.loads(p.read_text()) for p in boards if "tiny" in p.name)
    assert {r["name"] for r in tiny} == {"math-drafter", "chat-drafter", EVIL, "oracle(math-drafter,chat-drafter)"}
    assert all(c.id in tiny[0] for c in schema.columns)
    with next(p for p in (root / "data").glob("board-tiny*.csv")).open() as fh:
        assert len(list(csv.DictReader(fh))) == 4
    assert len(list((root / "data").glob("drafter-*.json"))) == 4


def test_rebuild_replaces_the_site_and_refuses_a_foreign_directory(capsys: pytest.CaptureFixture[str],
                                                                    site: tuple[Path, Store],
                                                                    tmp_path: Path) -> None:
    root, _ = site
    (root / "notes.html").write_text("mine")  # the user's own file: no build wrote it, so none deletes it
    marker = root / ".taps-bench-site"
    marker.write_text(marker.read_text() + "drafters/gone.html\n")  # a page an earlier build wrote
    (root / "drafters" / "gone.html").write_text("old")
    rc = main(["leaderboard", "build", "--db", str(tmp_path / "r.db"), "--out", str(root)])
    assert rc == 0 and not (root / "drafters" / "gone.html").exists() and (root / "index.html").is_file()
    assert (root / "notes.html").read_text() == "mine" and "drafters/gone.html" not in marker.read_text()
    foreign = tmp_path / "my-notes"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    capsys.readouterr()
    rc = main(["leaderboard", "build", "--db", str(tmp_path / "r.db"), "--out", str(foreign)])
    err = capsys.readouterr().err
    assert rc == 2 and "not a leaderboard" in err and err.count("\n") == 1
    assert (foreign / "thesis.tex").read_text() == "precious"


def test_schema_declares_the_paper_layout() -> None:
    schema = load_schema()
    assert [c.task for c in schema.columns[:4]] == ["mt-bench", "gsm8k", "math500", "svamp"]
    assert {c.metric for c in schema.columns} >= {"tau", "speedup", "accuracy"}
    assert all(m.definition for m in schema.metrics.values())
