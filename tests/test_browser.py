"""The leaderboard in a real browser: a site built from a small real matrix run, opened from file:// in headless
Chromium (Debian's package, driven by Playwright). Checks what a reader sees: the tables' rows, drawn charts,
working links, a quiet console, sorting, and a hostile drafter name and description shown as text, never run.
Two submissions of one drafter's runs (one verified, one not) show as rows of their own with their standing.
The reading aids: every cell's n and interval (hover text and whisker), ranks that intervals share, the per-task
pages opened from the column headers, the filters, the reproduce commands; and no page or download holds the
database's URL or any absolute local path. The screenshot lands in test-output/leaderboard.png."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
from conftest import REPO
from test_matrix import drafters, small_spec

from taps_bench.cli import main
from taps_bench.results.bundle import run_record
from taps_bench.results.store import Store, as_url
from taps_bench.results.submissions import insert, record_verification
from taps_bench.site.stats import interval_ranks

pytestmark = [pytest.mark.smollm, pytest.mark.usefixtures("one_thread")]

EVIL_NAME = "<img src=x onerror=alert(1)>"
EVIL_DESCRIPTION = "<script>document.title='pwned';alert(2)</script> <b>bold?</b>"


def chromium() -> str:
    """Debian's Chromium: found, or installed with apt when we are root; the test is skipped (saying why) only when
    it cannot be installed here."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("Chromium is not installed and cannot be installed here (needs root and apt-get): "
                    "`apt-get install chromium`")
    env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
    done = subprocess.run("apt-get update -qq && apt-get install -y -qq chromium", shell=True, env=env,
                          capture_output=True, text=True, timeout=900)
    found = shutil.which("chromium")
    if done.returncode != 0 or not found:
        pytest.skip(f"Chromium could not be installed with apt-get: {done.stderr.strip().splitlines()[-1:]}")
    return found


VERIFIED_LABEL, UNVERIFIED_LABEL = "verified (1 prompts re-run)", "unverified"


def add_submissions(db: Path, proposer: str) -> None:
    """Two submissions of `proposer`'s gsm8k runs at T=0 and their baseline, copied from the store: one verified
    (as `taps-bench verify` records it), one not."""
    with Store(as_url(str(db))) as store:
        spec = next(r for r in store.runs() if r["kind"] == "speculative" and r["proposer"] == proposer
                    and r["task"] == "gsm8k" and r["temperature"] == 0)
        base = store.baseline_for(spec)
        assert base is not None
        records = [run_record(store, r["id"], None) for r in (base, spec)]
        for i, check in enumerate(({"passed": True, "prompts_rerun": 1}, None)):
            card = {"name": proposer, "target": spec["target"], "method": "hass", "license": "MIT",
                    "authors": [f"submitter {i}"], "description": f"submission {i}"}
            sid = insert(store, f"{i + 1:064x}", card, {"taps_bench": "test"}, records)
            if check is not None:
                record_verification(store, sid, check)


FAST = "fast-fake"


def add_fast_drafter(db: Path, source: str = "math-rand") -> None:
    """A made-up drafter at T=0: `source`'s runs of every task stored again under another name with half the steps
    (random drafters accept nothing, so every real row has τ = 1), so that one row's interval lies clear above."""
    with Store(as_url(str(db))) as store:
        for run in [r for r in store.runs() if r["kind"] == "speculative" and r["proposer"] == source
                    and r["temperature"] == 0 and r.get("submission_id") is None]:
            prov = {k: v for k, v in run["provenance"].items() if k != "drafter_card"}
            new = store.get_or_create_run("speculative", run["target"], run["task"], FAST, 0.0, run["settings"], prov)
            for s in store.samples(run["id"]):
                kept = {k: v for k, v in s.items() if k not in ("id", "run_id", "created_at")}
                store.add_sample(new, kept | {"steps": max(1, s["new_tokens"] // 2)})


def as_path(href: str) -> Path:
    return Path(unquote(urlparse(href).path))


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the [test] extra")
    path = chromium()
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=["--no-sandbox"])
        yield b
        b.close()


def test_leaderboard_in_chromium(browser, tmp_path: Path, tiny_smol: Path, data_dir: Path) -> None:
    a, b = drafters(tmp_path, tiny_smol)
    # A math drafter, by its card: its rows get a specialisation gap and match the filters by family and training.
    (a / "card.yaml").write_text("name: math-rand\ndescription: random (tests)\nmethod: eagle2\ncorpus: mathinstruct\n")
    evil = tmp_path / EVIL_NAME
    shutil.copytree(b, evil)
    (evil / "card.yaml").write_text(f"name: {EVIL_NAME!r}\ndescription: {EVIL_DESCRIPTION!r}\nmethod: hass\n")
    # Two questions a task: each cell has an interval.
    spec = small_spec(tmp_path / "m.yaml", a, evil, max_new_tokens=4, tasks={"gsm8k": 2, "math500": 2,
                                                                             "mt-bench": 2, "svamp": 2})
    db, site = tmp_path / "r.db", tmp_path / "site"
    assert main(["--include", str(tiny_smol), "matrix", str(spec), "--db", str(db), "--no-progress",
                 "--data-dir", str(data_dir)]) == 0
    add_submissions(db, "math-rand")
    add_fast_drafter(db)
    assert main(["leaderboard", "build", "--db", str(db), "--out", str(site)]) == 0

    page, errors, dialogs = check_site(browser, site, "tiny-smol", 5, "leaderboard.png")
    # The hostile name is text on the page, not markup; its description too, on its own page.
    page.goto((site / "index.html").as_uri())
    names = page.locator("section.board[data-target='tiny-smol'] table.leaderboard tbody tr").evaluate_all(
        "rows => rows.map(r => r.getAttribute('data-name'))")
    # math-rand: measured at T=0 and T=1, and the two submissions (at T=0); the made-up drafter at T=0
    assert len(names) == 2 * 5 + 2 + 1 and EVIL_NAME in names and names.count("math-rand") == 2 + 2
    assert any(n.startswith("confidence-step(") for n in names)
    assert any(n.startswith("merged-tree-full(") for n in names)
    assert page.locator("table.leaderboard").first.get_by_text(EVIL_NAME).count() >= 1
    assert page.locator("img[src='x']").count() == 0
    evil_page = next(p for p in (site / "drafters").glob("*.html") if "document.title=" in p.read_text())
    page.goto(evil_page.as_uri())
    assert EVIL_DESCRIPTION in page.locator("dd.description").inner_text()
    assert page.title() != "pwned"
    check_standing(page, site)
    check_intervals_and_ranks(page, site)
    check_task_pages(page, site)
    check_filters(page, site)
    check_reproduce(page)
    check_nothing_local(site, db, tmp_path)
    assert errors == [] and dialogs == []


def check_standing(page, site: Path) -> None:
    """The submitted rows carry their standing next to their name, on the board and on their own pages; the row
    measured here carries none."""
    page.goto((site / "index.html").as_uri())
    rows = page.locator("section.board[data-target='tiny-smol'][data-temperature='0.0'] table.leaderboard "
                        "tbody tr[data-name='math-rand']")
    labels = [rows.nth(i).locator("span.badge.standing").all_inner_texts() for i in range(rows.count())]
    assert sorted(labels) == [[], [UNVERIFIED_LABEL], [VERIFIED_LABEL]], labels
    for label, how in ((VERIFIED_LABEL, "verified"), (UNVERIFIED_LABEL, "unverified")):
        row = page.locator(f"tr[data-name='math-rand']:has(span.badge.standing.{how})")
        assert row.count() == 1 and row.locator("td").first.inner_text().startswith("math-rand")
        assert row.locator("span.badge.standing").is_visible()
        href = row.locator("td a").first.get_attribute("href")
        page.goto((site / href).as_uri())
        assert page.locator("h1 span.badge.standing").inner_text() == label
        assert page.locator("dd.standing").inner_text() == label
        page.goto((site / "index.html").as_uri())


BOARD = "section.board[data-target='tiny-smol'][data-temperature='0.0']"
INTERVAL = re.compile(r"n=(\d+), 95% CI \[(-?\d+\.\d+), (-?\d+\.\d+)\]")


def column_index(page, name: str) -> int:
    """The 1-based index (for :nth-child) of the board's column headed `name`."""
    return page.locator(f"{BOARD} table.leaderboard thead tr").first.locator("th").all_inner_texts().index(name) + 1


def check_intervals_and_ranks(page, site: Path) -> None:
    """Each τ cell shows n and its 95% interval on hover (the whole cell) and as a whisker; the ranks follow the
    rule from the exact intervals of the download: rows whose intervals overlap share a rank."""
    page.goto((site / "index.html").as_uri())
    gsm8k = column_index(page, "GSM8K")
    cell = page.locator(f"{BOARD} tr[data-name='math-rand']:not(:has(span.badge.standing)) td:nth-child({gsm8k})")
    title = cell.get_attribute("title") or ""
    match = INTERVAL.fullmatch(title)
    assert match and int(match.group(1)) == 2, title  # two questions of GSM8K
    lo, hi = float(match.group(2)), float(match.group(3))
    value = float(cell.get_attribute("data-value") or "nan")
    assert lo - 0.005 <= value <= hi + 0.005
    assert cell.locator("span.ci[title] .whisker .bar").count() == 1 and cell.locator(".whisker .dot").is_visible()
    cell.hover()
    # Every measured τ and speedup cell of the board carries one (the submitted rows have GSM8K only).
    for name in ("MT-Bench", "Avg τ", "Speedup"):
        col = column_index(page, name)
        titles = page.locator(f"{BOARD} tbody tr.drafter td:nth-child({col}):not([data-value=''])").evaluate_all(
            "cells => cells.map(c => c.getAttribute('title'))")
        assert titles and all(t and t.startswith("n=") for t in titles), (name, titles)

    # Ranks by Avg τ: recomputed here by the rule from the download's exact intervals, they are the page's.
    board = json.loads(next((site / "data").glob("board-tiny-smol-t0-*.json")).read_text())
    ranked = [r for r in board if r["rank"] is not None]
    assert len(ranked) >= 4 and all(r["tau_avg_ci_low"] is not None for r in ranked)
    rule = interval_ranks([(r["tau_avg"], [r["tau_avg_ci_low"], r["tau_avg_ci_high"]]) for r in ranked])
    for r, (best, worst) in zip(ranked, rule, strict=True):
        assert r["rank"] == (str(best) if best == worst else f"{best}–{worst}"), (r["name"], r["rank"])
    ranks = {r["name"]: r["rank"] for r in ranked}
    assert ranks.pop(FAST) == "1"  # its interval lies above every other
    # The rest (random drafters: τ = 1 throughout) cannot be told apart: they share the places after it.
    assert all(r.startswith("2") for r in ranks.values()) and any("–" in r for r in ranks.values()), ranks
    overlapping = [(x, y) for x in ranked for y in ranked if x is not y and x["tau_avg_ci_low"] <= y["tau_avg_ci_high"]
                   and y["tau_avg_ci_low"] <= x["tau_avg_ci_high"]]
    for x, y in overlapping:  # they share a place
        bx, by = (tuple(map(int, r["rank"].split("–"))) * 2 for r in (x, y))
        assert bx[0] <= by[-1] and by[0] <= bx[-1], (x["rank"], y["rank"])
    col = column_index(page, "Rank")
    shown = page.locator(f"{BOARD} tbody tr td:nth-child({col})").all_inner_texts()
    assert sorted(t for t in shown if t != "–") == sorted(r["rank"] for r in ranked)
    gap = column_index(page, "Spec. gap")
    math_gap = page.locator(f"{BOARD} tr.drafter[data-name='math-rand']:not(:has(span.badge.standing)) "
                            f"td:nth-child({gap})")
    assert re.fullmatch(r"[+-]\d\.\d\d", math_gap.inner_text().strip()) and math_gap.get_attribute("title")
    regret = column_index(page, "Router regret")
    combined = page.locator(f"{BOARD} tr.combiner td:nth-child({regret})").all_inner_texts()
    assert combined and all(re.fullmatch(r"-?\d\.\d\d", t.strip()) for t in combined), combined


def check_task_pages(page, site: Path) -> None:
    """A task's column header links to its page, which lists every row of the board on that task."""
    page.goto((site / "index.html").as_uri())
    names = page.locator(f"{BOARD} table.leaderboard tbody tr").evaluate_all(
        "rows => rows.filter(r => !r.classList.contains('published')).map(r => r.getAttribute('data-name'))")
    page.locator(f"{BOARD} table.leaderboard thead a.drill", has_text="GSM8K").click()
    assert "/tasks/" in page.url and "GSM8K" in page.locator("h1.task").inner_text()
    listed = page.locator("table.task tbody tr").evaluate_all("rows => rows.map(r => r.getAttribute('data-name'))")
    assert sorted(listed) == sorted(names)  # every row was measured on GSM8K
    titles = page.locator("table.task tbody tr.drafter td .ci[title]").evaluate_all(
        "spans => spans.map(s => s.getAttribute('title'))")
    assert any(INTERVAL.fullmatch(t) for t in titles)
    assert page.locator("table.task tbody tr td.rank").first.inner_text().strip() != ""
    assert page.locator("table.task pre.repro").count() >= 4 and page.locator("svg polyline.series").count() >= 2
    page.locator("table.task tbody tr a").first.click()  # on to a row's own page
    assert "/drafters/" in page.url


def visible_rows(page) -> list[str]:
    return page.locator("section.board table.leaderboard tbody tr").evaluate_all(
        "rows => rows.filter(r => r.offsetParent !== null).map(r => r.getAttribute('data-name'))")


def check_filters(page, site: Path) -> None:
    """Family and training data hide the rows that do not match, temperature the other boards; resetting (or
    choosing "all") shows everything again."""
    page.goto((site / "index.html").as_uri())
    everything = visible_rows(page)
    assert everything.count("math-rand") >= 2 and EVIL_NAME in everything
    page.select_option("form.filters select[name=family]", "EAGLE-2")
    assert set(visible_rows(page)) == {"math-rand"}  # the card says EAGLE-2: measured rows at T=0 and T=1
    page.select_option("form.filters select[name=family]", "")
    assert visible_rows(page) == everything
    page.select_option("form.filters select[name=training]", "mathinstruct")
    assert visible_rows(page).count("math-rand") == 2 and EVIL_NAME not in visible_rows(page)
    page.locator("form.filters button[type=reset]").click()  # the form resets, then the filters apply again
    page.wait_for_function("() => [...document.querySelectorAll('section.board tbody tr')].every(r => !r.hidden)")
    assert visible_rows(page) == everything
    page.select_option("form.filters select[name=temperature]", "1.0")
    assert page.locator(BOARD).is_hidden() and page.locator("section.board[data-temperature='1.0']").first.is_visible()
    page.select_option("form.filters select[name=temperature]", "")
    assert visible_rows(page) == everything


def check_reproduce(page) -> None:
    """Each measured row carries the `taps-bench run` of each of its tasks, well formed and without a local path."""
    rows = page.locator(f"{BOARD} tbody tr.drafter, {BOARD} tbody tr.combiner")
    assert rows.count() >= 4
    for i in range(rows.count()):
        row = rows.nth(i)
        row.locator("details.repro summary").click()
        lines = row.locator("pre.repro").inner_text().strip().splitlines()
        assert len(lines) >= 1 and row.locator("pre.repro").is_visible()
        for line in lines:
            argv = shlex.split(line)
            assert argv[:4] == ["taps-bench", "--include", "<cards>", "run"], line  # tiny-smol's card: --include
            flags = dict(zip(argv[4::2], argv[5::2], strict=True))
            assert flags["--target"] == "tiny-smol" and flags["--task"] in ("gsm8k", "math500", "mt-bench", "svamp")
            assert flags["--temperature"] == "0" and flags["--max-new-tokens"] == "4"
            assert flags["--limit"] in ("1", "2") and flags["--total-tokens"] == "8"
            assert ("--drafter" in flags) != ("--combiner" in flags)
            names = [flags["--drafter"]] if "--drafter" in flags else flags["--drafters"].split(",")
            assert all(n.startswith("<checkpoint:") for n in names), names  # directories given directly
            assert not any(a.startswith(("/", "~")) for a in argv)


LOCAL = re.compile(r"(?<![\w.:/-])/(?:tmp|root|home|work|usr|var|opt|mnt|srv|Users)(?:/|\b)")


def check_nothing_local(site: Path, db: Path, tmp_path: Path) -> None:
    """No page and no download holds the database's path or URL, the build's directories, or an absolute path."""
    files = [p for p in site.rglob("*") if p.is_file()]
    assert any(p.suffix == ".csv" for p in files) and any("/tasks/" in str(p) for p in files)
    for path in files:
        text = path.read_text(errors="replace")
        for needle in (str(db), as_url(str(db)), "sqlite:", str(tmp_path), str(REPO), str(Path.home())):
            assert needle not in text, (path.name, needle)
        assert not LOCAL.search(text), (path.name, LOCAL.search(text))


def check_site(browser, site: Path, target: str, min_rows: int, screenshot: str):
    """What a reader relies on, on every board of `target`: the paper's columns, at least `min_rows` rows (an oracle
    among them),
    drawn charts, sorting, links that resolve, a quiet console. Saves a full-page screenshot in test-output/."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors: list[str] = []
    dialogs: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.goto((site / "index.html").as_uri())

    boards = page.locator(f"section.board[data-target='{target}']")
    assert boards.count() == 2  # T=0 and T=1
    for i in range(boards.count()):
        board = boards.nth(i)
        names = board.locator("table.leaderboard tbody tr").evaluate_all(
            "rows => rows.map(r => r.getAttribute('data-name'))")
        assert len(names) >= min_rows and any(n.startswith("oracle(") for n in names), names
        headers = board.locator("table.leaderboard thead th").all_inner_texts()
        assert headers[1:7] == ["MT-Bench", "GSM8K", "MATH-500", "SVAMP", "Avg τ", "Rank"]
        # Charts are drawn: a heatmap cell per (row, task), depth lines, routing bars.
        assert board.locator("svg rect.cell").count() == len(names) * 4
        assert board.locator("svg polyline.series").count() >= 4
        assert board.locator("svg rect.share").count() >= 4
        assert board.locator("svg").first.bounding_box()["width"] > 100
    # Sorting by GSM8K puts the rows in order of their values.
    first = boards.nth(0)
    first.locator("table.leaderboard thead th", has_text="GSM8K").click()
    values = first.locator("table.leaderboard tbody tr td:nth-child(3)").evaluate_all(
        "cells => cells.map(c => c.getAttribute('data-value')).filter(v => v !== '').map(Number)")
    assert values == sorted(values) and values

    out = REPO / "test-output"
    out.mkdir(exist_ok=True)
    page.screenshot(path=str(out / screenshot), full_page=True)

    # Every link resolves: local files exist, and each page opens with a quiet console.
    hrefs = page.locator("a[href]").evaluate_all("links => links.map(a => a.href)")
    local = sorted({h.split("#")[0] for h in hrefs if h.startswith("file://")})
    assert any("/drafters/" in h for h in local) and any(h.endswith(".csv") for h in local)
    for href in local:
        assert as_path(href).is_file(), href
        if href.endswith(".html"):
            page.goto(href)
            assert page.title() != "pwned"
            for inner in page.locator("a[href^='file:']").evaluate_all("links => links.map(a => a.href)"):
                assert as_path(inner.split("#")[0]).is_file(), (href, inner)
    assert errors == [] and dialogs == []
    return page, errors, dialogs


@pytest.mark.skipif(not os.environ.get("TAPS_BENCH_BROWSER_DB"),
                    reason="set TAPS_BENCH_BROWSER_DB to a database holding `taps-bench matrix cpu-small` results")
def test_site_of_a_real_cpu_matrix(browser, tmp_path: Path) -> None:
    """The same checks on a site built from a real matrix on the CPU target (e.g. the shipped cpu-small spec)."""
    site = tmp_path / "site"
    assert main(["leaderboard", "build", "--db", os.environ["TAPS_BENCH_BROWSER_DB"], "--out", str(site)]) == 0
    check_site(browser, site, "smollm2-135m-instruct", 5, "leaderboard-cpu-small.png")
