"""The small matrix written to a real PostgreSQL server: every cell completes, and the leaderboard built from it is
identical to the one built from the same rows in SQLite (so nothing is lost or changed on the way through
PostgreSQL's JSON, float and timestamp types)."""

from __future__ import annotations

import filecmp
import re
from pathlib import Path

import pytest
from test_matrix import drafters, small_spec

from taps_bench.cli import main
from taps_bench.results.store import Store, as_url

pytestmark = [pytest.mark.smollm, pytest.mark.usefixtures("one_thread")]


def copy_store(source: Store, dest: Store) -> None:
    """Every run (same identity and provenance) and sample, in the source's order."""
    for run in source.runs():
        new = dest.get_or_create_run(run["kind"], run["target"], run["task"], run["proposer"], run["temperature"],
                                     run["settings"], run["provenance"])
        for s in source.samples(run["id"]):
            dest.add_sample(new, {k: v for k, v in s.items() if k not in ("id", "run_id", "created_at")})


def without_footer(site: Path) -> None:
    """The footer names the build time; everything else must match byte for byte."""
    for page in site.rglob("*.html"):
        page.write_text(re.sub(r"<footer>.*?</footer>", "", page.read_text(), flags=re.S))


def test_matrix_on_postgres_and_identical_leaderboard(fresh_postgres_url: str, tmp_path: Path, tiny_smol: Path,
                                                      data_dir: Path) -> None:
    a, b = drafters(tmp_path, tiny_smol)
    spec = small_spec(tmp_path / "m.yaml", a, b, max_new_tokens=4)
    assert main(["--include", str(tiny_smol), "matrix", str(spec), "--db", fresh_postgres_url, "--no-progress",
                 "--data-dir", str(data_dir)]) == 0
    pg = Store(fresh_postgres_url)
    assert len(pg.cells("small")) == 32 and {c["status"] for c in pg.cells("small")} == {"done"}
    assert sum(r["n_samples"] for r in pg.runs()) == 4 * 5 * 2 + 5 * 2
    lite = Store(as_url(str(tmp_path / "copy.db")))
    copy_store(pg, lite)
    for db, out in ((fresh_postgres_url, "pg-site"), (str(tmp_path / "copy.db"), "lite-site")):
        assert main(["leaderboard", "build", "--db", db, "--out", str(tmp_path / out)]) == 0
        without_footer(tmp_path / out)
    pages = sorted(p.relative_to(tmp_path / "pg-site") for p in (tmp_path / "pg-site").rglob("*") if p.is_file())
    assert pages == sorted(p.relative_to(tmp_path / "lite-site") for p in (tmp_path / "lite-site").rglob("*")
                           if p.is_file())
    _, mismatch, errors = filecmp.cmpfiles(tmp_path / "pg-site", tmp_path / "lite-site", [str(p) for p in pages],
                                           shallow=False)
    assert not mismatch and not errors, mismatch
    pg.close()
    lite.close()
