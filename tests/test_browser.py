"""The leaderboard in a real browser: a site built from a small real matrix run, opened from file:// in headless
Chromium (Debian's package, driven by Playwright). Checks what a reader sees: the tables' rows, drawn charts,
working links, a quiet console, sorting, and a hostile drafter name and description shown as text, never run.
Two submissions of one drafter's runs (one verified, one not) show as rows of their own with their standing.
The screenshot lands in test-output/leaderboard.png."""

from __future__ import annotations

import os
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
    evil = tmp_path / EVIL_NAME
    shutil.copytree(b, evil)
    (evil / "card.yaml").write_text(f"name: {EVIL_NAME!r}\ndescription: {EVIL_DESCRIPTION!r}\nmethod: hass\n")
    spec = small_spec(tmp_path / "m.yaml", a, evil, max_new_tokens=4, tasks={"gsm8k": 1, "math500": 1,
                                                                             "mt-bench": 1, "svamp": 1})
    db, site = tmp_path / "r.db", tmp_path / "site"
    assert main(["--include", str(tiny_smol), "matrix", str(spec), "--db", str(db), "--no-progress",
                 "--data-dir", str(data_dir)]) == 0
    add_submissions(db, "math-rand")
    assert main(["leaderboard", "build", "--db", str(db), "--out", str(site)]) == 0

    page, errors, dialogs = check_site(browser, site, "tiny-smol", 5, "leaderboard.png")
    # The hostile name is text on the page, not markup; its description too, on its own page.
    page.goto((site / "index.html").as_uri())
    names = page.locator("section.board[data-target='tiny-smol'] table.leaderboard tbody tr").evaluate_all(
        "rows => rows.map(r => r.getAttribute('data-name'))")
    # math-rand: measured at T=0 and T=1, and the two submissions (at T=0)
    assert len(names) == 2 * 5 + 2 and EVIL_NAME in names and names.count("math-rand") == 2 + 2
    assert any(n.startswith("confidence-step(") for n in names)
    assert any(n.startswith("merged-tree-full(") for n in names)
    assert page.locator("table.leaderboard").first.get_by_text(EVIL_NAME).count() >= 1
    assert page.locator("img[src='x']").count() == 0
    evil_page = next(p for p in (site / "drafters").glob("*.html") if "document.title=" in p.read_text())
    page.goto(evil_page.as_uri())
    assert EVIL_DESCRIPTION in page.locator("dd.description").inner_text()
    assert page.title() != "pwned"
    check_standing(page, site)
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
        assert headers[1:6] == ["MT-Bench", "GSM8K", "MATH-500", "SVAMP", "Avg τ"]
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
