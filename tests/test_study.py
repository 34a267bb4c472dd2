"""`taps-bench report`'s statistics (results.study), claims (results.study_claims) and command (cli.report).

The intervals are checked against cases with a known answer: per-prompt tau drawn from a normal distribution of
known mean and spread, whose 95% interval must cover the mean in about 95% of repeated draws, be about
2 * 1.96 * sigma / sqrt(n) wide, and halve when n quadruples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from taps_bench.catalog.proposers import ProposerSpec
from taps_bench.cli import main
from taps_bench.matrix.spec import check, load_spec, plan
from taps_bench.results.metrics import summarize
from taps_bench.results.store import Store, as_url
from taps_bench.results.study import (
    FAILS,
    HOLDS,
    NOT_MEASURED,
    NOT_SEPARATED,
    cell_estimate,
    compare,
    paired_speedup,
    paired_tau,
    pool_repeats,
    verdict,
)
from taps_bench.results.study_claims import claims, tables
from taps_bench.results.study_text import cell_text, markdown, no_paths
from taps_bench.results.summaries import tau_interval

STEPS = 1000  # target forwards per synthetic sample: its tau is new_tokens / STEPS to three decimals


def sample(example_id: Any, tau: float, turn: int = 0, total_s: float = 1.0, steps: int = STEPS) -> dict[str, Any]:
    """A speculative sample of the given tau (new tokens / forwards, the prefill one of them)."""
    n = max(1, round(tau * steps))
    return {"example_id": str(example_id), "turn": turn, "new_tokens": n, "steps": steps, "total_s": total_s,
            "accept_lengths": [0] * (steps - 1), "output_ids": list(range(n)), "stop_reason": "max_new_tokens"}


def baseline(example_id: Any, new_tokens: int, total_s: float, turn: int = 0) -> dict[str, Any]:
    return {"example_id": str(example_id), "turn": turn, "new_tokens": new_tokens, "steps": new_tokens,
            "total_s": total_s, "accept_lengths": [], "output_ids": list(range(new_tokens)),
            "stop_reason": "max_new_tokens"}


def draws(rng: np.random.Generator, n: int, mean: float = 2.5, sigma: float = 0.4) -> list[dict[str, Any]]:
    return [sample(i, t) for i, t in enumerate(rng.normal(mean, sigma, n))]


# -- intervals with a known answer --------------------------------------------------------------------------------


def test_tau_interval_covers_the_true_mean_about_95_percent_of_the_time() -> None:
    mean, sigma, n, reps = 2.5, 0.4, 100, 200
    rng = np.random.default_rng(20260101)
    covered, widths = 0, []
    for _ in range(reps):
        lo, hi = tau_interval(draws(rng, n, mean, sigma))
        covered += lo <= mean <= hi
        widths.append(hi - lo)
    assert 0.90 <= covered / reps <= 0.99, covered  # binomial sd at 95%: 1.5 points
    expected = 2 * 1.96 * sigma / np.sqrt(n)
    assert np.mean(widths) == pytest.approx(expected, rel=0.1)


def test_intervals_shrink_as_n_grows() -> None:
    rng = np.random.default_rng(7)
    width = {n: np.mean([np.diff(tau_interval(draws(rng, n)))[0] for _ in range(20)]) for n in (100, 400)}
    assert width[400] / width[100] == pytest.approx(0.5, abs=0.08)  # 1 / sqrt(4)


def test_cell_estimate_both_counts_speedup_and_too_few_prompts() -> None:
    spec = [sample(i, 2.0 + 0.1 * i, total_s=1.0) for i in range(5)]
    base = [baseline(i, s["new_tokens"], 2.0) for i, s in enumerate(spec)]
    cell = cell_estimate(spec, base)
    assert cell["n"] == 5 and cell["tau"] == pytest.approx(summarize(spec)["tau"])
    # EAGLE's count: the same tokens over the verify steps only, steps - 1 per sample.
    assert cell["tau_eagle"] == pytest.approx(sum(s["new_tokens"] for s in spec) / (5 * (STEPS - 1)))
    assert cell["tau_ci95"][0] <= cell["tau"] <= cell["tau_ci95"][1]
    assert cell["speedup"] == pytest.approx(2.0) and cell["speedup_n"] == 5
    one = cell_estimate(spec[:1])
    assert one["tau_ci95"] is None and one["speedup"] is None and one["speedup_n"] == 0


def test_eagle_count_hand_computed() -> None:
    # 1 + (3 + 4 + 2) = 10 tokens in 4 forwards (3 verify steps); 1 + (1 + 3) = 5 tokens in 3 forwards (2 verify).
    spec = [{**sample("a", 1.0, steps=4), "new_tokens": 10, "accept_lengths": [2, 3, 1]},
            {**sample("a", 1.0, turn=1, steps=3), "new_tokens": 5, "accept_lengths": [0, 2]}]
    summary = summarize(spec)
    assert summary["tau"] == pytest.approx(15 / 7) and summary["tau_eagle"] == pytest.approx(15 / 5)
    assert summarize([baseline("a", 8, 1.0)])["tau_eagle"] is None  # plain decoding has no verify step


def test_cell_shows_conditional_acceptance_per_depth_hand_computed() -> None:
    # Accept lengths 2, 3, 1, 0, 2 over 5 verify steps: 4 reach depth 1, 3 of those depth 2, 1 of those depth 3,
    # none of that one depth 4; depth 5 was drafted but no accepted path reached depth 4, so it has no rate.
    spec = [{**sample("a", 1.0, steps=4), "new_tokens": 10, "accept_lengths": [2, 3, 1],
             "drafted_by_depth": [3, 3, 3, 3, 3]},
            {**sample("b", 1.0, steps=3), "new_tokens": 5, "accept_lengths": [0, 2],
             "drafted_by_depth": [2, 2, 2, 2, 2]}]
    cell = cell_estimate(spec)
    assert cell["acceptance"] == pytest.approx([4 / 5, 3 / 4, 1 / 3, 0.0])
    assert "acc 0.80/0.75/0.33/0.00;" in cell_text(cell)
    assert "acc" not in cell_text(cell_estimate([sample("c", 1.0)]))  # nothing accepted: no rates to show


def test_repeats_pool_into_their_prompt_and_keep_their_own_baseline() -> None:
    r0 = ([sample("a", 2.0), sample("b", 3.0)], [baseline("a", 10, 1.0), baseline("b", 10, 1.0)])
    r1 = ([sample("a", 2.2), sample("b", 3.2)], [baseline("a", 10, 2.0), baseline("b", 10, 2.0)])
    spec, base = pool_repeats([r0, r1])
    assert len(spec) == 4 and len({(s["example_id"], s["turn"]) for s in spec}) == 4
    assert cell_estimate(spec, base)["n"] == 2  # two prompts, not four samples


# -- paired comparisons and verdicts ------------------------------------------------------------------------------


def test_identical_proposers_are_not_separated() -> None:
    a = draws(np.random.default_rng(1), 40)
    result = compare(a, [dict(s) for s in a])
    ci = result["tau"]["difference_ci95"]
    assert ci[0] <= 0 <= ci[1] and result["tau"]["ratio"] == pytest.approx(1.0)
    assert result["tau_verdict"] == NOT_SEPARATED and result["speedup_verdict"] == NOT_MEASURED


def test_pairing_separates_a_small_gain_that_prompt_difficulty_hides() -> None:
    rng = np.random.default_rng(3)
    hard = rng.normal(3.0, 1.0, 40)  # prompts differ a lot; A beats B on each by 0.1 +- 0.02
    a = [sample(i, h + 0.1 + rng.normal(0, 0.02)) for i, h in enumerate(hard)]
    b = [sample(i, h) for i, h in enumerate(hard)]
    result = paired_tau(a, b)
    assert result["n"] == 40 and result["difference"] == pytest.approx(0.1, abs=0.02)
    assert verdict(result["difference_ci95"]) == HOLDS
    lo_a, _ = tau_interval(a)
    _, hi_b = tau_interval(b)
    assert lo_a < hi_b  # unpaired, the two cells' intervals overlap
    assert verdict(paired_tau(b, a)["difference_ci95"]) == FAILS


def test_only_prompts_both_arms_have_are_paired() -> None:
    a = [sample(i, 3.0) for i in range(6)]
    b = [sample(i, 2.0) for i in range(3, 9)]
    assert paired_tau(a, b)["n"] == 3 and paired_tau(a, [])["n"] == 0
    assert compare(a, [])["tau_verdict"] == NOT_MEASURED


def test_a_claim_can_hold_for_tau_and_fail_for_speed() -> None:
    rng = np.random.default_rng(5)
    # A accepts more (tau 3.0 vs 2.0) but its steps cost so much that it is slower: 1.2x against B's 1.6x, each
    # against its own baseline (same tokens, plain decoding 1.2 and 1.6 times as long).
    a = [sample(i, 3.0 + rng.normal(0, 0.05)) for i in range(30)]
    b = [sample(i, 2.0 + rng.normal(0, 0.05)) for i in range(30)]
    base_a = [baseline(i, s["new_tokens"], 1.2 * (1 + rng.normal(0, 0.02))) for i, s in enumerate(a)]
    base_b = [baseline(i, s["new_tokens"], 1.6 * (1 + rng.normal(0, 0.02))) for i, s in enumerate(b)]
    result = compare(a, b, base_a, base_b)
    assert result["tau_verdict"] == HOLDS and result["speedup_verdict"] == FAILS
    sp = paired_speedup(a, base_a, b, base_b)
    assert sp["a"] == pytest.approx(1.2, rel=0.02) and sp["b"] == pytest.approx(1.6, rel=0.02)
    assert sp["ratio"] == pytest.approx(0.75, rel=0.03) and sp["ratio_ci95"][1] < 1


# -- claims from rows ---------------------------------------------------------------------------------------------

MATH, CHAT = ProposerSpec(drafter="mathinstruct-eagle2"), ProposerSpec(drafter="sharegpt-eagle2")
ROLES = {"mathinstruct-eagle2": {"method": "eagle2", "domain": "math"},
         "sharegpt-eagle2": {"method": "eagle2", "domain": "chat"}}
PAIR = ["mathinstruct-eagle2", "sharegpt-eagle2"]


def combiner(name: str, **options: Any) -> ProposerSpec:
    return ProposerSpec.model_validate({"combiner": name, "drafters": PAIR, **options})


def cells(rows: dict[ProposerSpec, dict[str, float]], n: int = 12, seed: int = 0) -> list[dict[str, Any]]:
    """Measured cells of these proposers at these per-task taus (prompt difficulty shared, as on real prompts)."""
    rng = np.random.default_rng(seed)
    hard = {t: rng.normal(0, 0.3, n) for t in ("gsm8k", "mt-bench")}
    out = []
    for proposer, taus in rows.items():
        for task, tau in taus.items():
            spec = [sample(i, tau + h + rng.normal(0, 0.02), total_s=1.0) for i, h in enumerate(hard[task])]
            base = [baseline(i, s["new_tokens"], float(tau + h)) for i, (s, h) in enumerate(zip(spec, hard[task],
                                                                                                  strict=True))]
            out.append({"target": "t", "temperature": 0.0, "task": task, "proposer": proposer, "samples": spec,
                        "baseline": base})
    return out


def test_specialisation_holds_in_the_claimed_direction_on_each_task() -> None:
    measured = cells({MATH: {"gsm8k": 3.0, "mt-bench": 2.0}, CHAT: {"gsm8k": 2.4, "mt-bench": 2.6}})
    found = [c for c in claims(measured, ROLES) if c["claim"] == "specialisation"]
    assert {c["task"]: (c["a"], c["b"], c["tau_verdict"]) for c in found} == {
        "gsm8k": ("mathinstruct-eagle2", "sharegpt-eagle2", HOLDS),
        "mt-bench": ("sharegpt-eagle2", "mathinstruct-eagle2", HOLDS)}
    assert all(c["speedup_verdict"] == HOLDS for c in found)
    # A math drafter that is not better on math fails its claim there.
    worse = cells({MATH: {"gsm8k": 2.0}, CHAT: {"gsm8k": 2.6}})
    assert [c["tau_verdict"] for c in claims(worse, ROLES) if c["claim"] == "specialisation"] == [FAILS]


def test_specialisation_names_its_pair_when_a_method_has_several() -> None:
    """Two chat drafters of one method (the averaging study's pair): each statement names which two it compares."""
    other = ProposerSpec(drafter="sharegpt-eagle2-b")
    roles = {**ROLES, "sharegpt-eagle2-b": {"method": "eagle2", "domain": "chat"}}
    measured = cells({MATH: {"gsm8k": 3.0}, CHAT: {"gsm8k": 2.4}, other: {"gsm8k": 2.5}})
    found = [c["statement"] for c in claims(measured, roles) if c["claim"] == "specialisation"]
    assert len(found) == len(set(found)) == 2
    assert any("above sharegpt-eagle2-b)" in f for f in found)
    alone = cells({MATH: {"gsm8k": 3.0}, CHAT: {"gsm8k": 2.4}})
    assert [c["statement"] for c in claims(alone, ROLES) if c["claim"] == "specialisation"] == [
        "eagle2: math drafter above chat drafter on gsm8k"]


def test_claims_whose_rows_are_missing_are_not_measured() -> None:
    out = claims(cells({MATH: {"gsm8k": 3.0}, CHAT: {"gsm8k": 2.4}}), ROLES)
    missing = {c["claim"]: c for c in out if c["tau_verdict"] == NOT_MEASURED}
    assert set(missing) == {"averaging", "routing", "merged trees"}
    assert all(c["note"] and c["speedup_verdict"] == NOT_MEASURED for c in missing.values())
    merged = [c for c in out if c["claim"] == "merged trees"]
    assert {c["statement"] for c in merged} == {"merged trees (budget full) above confidence routing",
                                               "merged trees (budget equal) above confidence routing"}
    assert claims(cells({MATH: {"gsm8k": 3.0}}), ROLES)[0]["tau_verdict"] == NOT_MEASURED  # no chat drafter


def test_every_claim_of_a_full_matrix() -> None:
    conf, ent = combiner("confidence", granularity="prompt"), combiner("entropy", granularity="prompt")
    avg, full, equal = combiner("average", alpha=0.5), combiner("merged-tree", budget="full"), \
        combiner("merged-tree", budget="equal")
    taus = {MATH: 3.0, CHAT: 2.4, avg: 1.8, conf: 3.0, ent: 2.5, full: 3.4, equal: 3.0}
    measured = cells({p: {"gsm8k": t} for p, t in taus.items()})
    out = {c["statement"]: c["tau_verdict"] for c in claims(measured, ROLES)}
    assert out == {
        "eagle2: math drafter above chat drafter on gsm8k": HOLDS,
        "parent mathinstruct-eagle2 above average(mathinstruct-eagle2, sharegpt-eagle2; alpha=0.5) on gsm8k": HOLDS,
        "parent sharegpt-eagle2 above average(mathinstruct-eagle2, sharegpt-eagle2; alpha=0.5) on gsm8k": HOLDS,
        "confidence(mathinstruct-eagle2, sharegpt-eagle2; granularity=prompt) above average(mathinstruct-eagle2, "
        "sharegpt-eagle2; alpha=0.5) on gsm8k": HOLDS,
        "confidence(mathinstruct-eagle2, sharegpt-eagle2; granularity=prompt) above the best single drafter "
        "(mathinstruct-eagle2) on gsm8k": NOT_SEPARATED,
        "confidence(mathinstruct-eagle2, sharegpt-eagle2; granularity=prompt) above entropy(mathinstruct-eagle2, "
        "sharegpt-eagle2; granularity=prompt) on gsm8k": HOLDS,
        "merged-tree(mathinstruct-eagle2, sharegpt-eagle2; budget=full) above confidence(mathinstruct-eagle2, "
        "sharegpt-eagle2; granularity=prompt) on gsm8k": HOLDS,
        "merged-tree(mathinstruct-eagle2, sharegpt-eagle2; budget=equal) above confidence(mathinstruct-eagle2, "
        "sharegpt-eagle2; granularity=prompt) on gsm8k": NOT_SEPARATED,
    }
    table = tables(measured, ["gsm8k"])[0]
    assert [r["group"] for r in table["rows"]] == ["single drafters", "single drafters", "averaged",
                                                   "confidence routed", "entropy routed", "merged trees",
                                                   "merged trees", "oracle"]
    assert table["rows"][-1]["cells"]["gsm8k"]["speedup"] is None  # the oracle is never timed


def test_published_rows_stand_beside_their_measured_rows_labelled() -> None:
    published = yaml.safe_load((Path(__file__).resolve().parents[1] / "leaderboard" / "published.yaml").read_text())
    hass, averaged = ProposerSpec(drafter="mathinstruct-hass"), ProposerSpec(drafter="averaged-hass")
    measured = cells({hass: {"gsm8k": 3.0}, averaged: {"gsm8k": 2.0},
                      combiner("confidence", granularity="step"): {"gsm8k": 3.0}})
    rows = tables(measured, ["gsm8k"], published, {"llama3-8b-instruct": "Llama-3-8B-Instruct"})[0]["rows"]
    labels = [r["label"] for r in rows]
    assert labels[0] == "mathinstruct-hass"
    assert labels[1] == "HASS MathInstruct: published (arXiv 2603.27027, Llama-3-8B-Instruct)"
    assert rows[1]["cells"]["gsm8k"] == {"tau_eagle": 5.02}
    assert labels[labels.index("averaged-hass") + 1].startswith("HASS averaged weights: published")
    routed = labels.index("confidence(mathinstruct-eagle2, sharegpt-eagle2; granularity=step)")
    assert labels[routed + 1].startswith("HASS confidence-routed: published")
    text = markdown({"matrix": "m", "tables": tables(measured, ["gsm8k"], published), "claims": []})
    assert "EAGLE 5.02 (published)" in text
    at_one = tables(measured, ["gsm8k"], published)[0]["rows"]
    assert not [r for r in tables([{**m, "temperature": 1.0} for m in measured], ["gsm8k"], published)[0]["rows"]
                if r["kind"] == "published"]  # the paper's numbers are of T=0
    assert len([r for r in at_one if r["kind"] == "published"]) == 5


def test_no_local_path_survives() -> None:
    assert no_paths("drafter /tmp/pytest-1/math-rand, db ~/x/results.sqlite") == "drafter math-rand, db results.sqlite"
    assert no_paths("tree 16/4/4; tau A / B; n/a") == "tree 16/4/4; tau A / B; n/a"


# -- the command, on a store written the way a matrix writes it ---------------------------------------------------

SPEC = {"name": "study-small", "description": "a small synthetic matrix", "targets": ["smollm2-135m-instruct"],
        "proposers": [{"drafter": "mathinstruct-eagle2"}, {"drafter": "sharegpt-eagle2"},
                      {"combiner": "confidence", "drafters": PAIR, "granularity": "step"},
                      {"combiner": "merged-tree", "drafters": PAIR, "budget": "full"}],
        "tasks": {"mt-bench": 6, "gsm8k": 6}, "temperatures": [0], "max_new_tokens": 64}
TAU = {"mathinstruct-eagle2": {"gsm8k": 3.0, "mt-bench": 2.0}, "sharegpt-eagle2": {"gsm8k": 2.2, "mt-bench": 2.8},
       "confidence": {"gsm8k": 3.0, "mt-bench": 2.8}, "merged-tree": {"gsm8k": 3.4, "mt-bench": 3.2}}


def write_store(tmp_path: Path, spec_fields: dict[str, Any] = SPEC) -> tuple[Path, Path]:
    """A spec file and a database holding its cells' runs, samples and cell records, as `matrix` stores them."""
    from taps_bench.catalog.registry import Registry

    path = tmp_path / "study-small.yaml"
    path.write_text(yaml.safe_dump(spec_fields, sort_keys=False))
    spec = check(load_spec(path), Registry.load())
    db = tmp_path / "secret-dir" / "r.db"
    db.parent.mkdir()
    rng = np.random.default_rng(11)
    prov = {"device": "cpu", "device_name": "Test CPU", "dtype": "float32", "threads": 1, "git_commit": "abc" * 10,
            "versions": {"taps-bench": "0.1", "torch": "2.0"}, "target_checkpoint": str(tmp_path / "weights")}
    with Store(as_url(str(db))) as store:
        for cell in plan(spec):
            entry = cell.entry
            settings = {"max_new_tokens": 64, "sampling": {"temperature": 0.0}, "task_card": cell.task}
            base_id = store.get_or_create_run("baseline", cell.target, cell.task, "autoregressive", 0.0, settings,
                                              prov)
            run_id = store.get_or_create_run("speculative", cell.target, cell.task, entry.describe(), 0.0,
                                             settings | {"proposer": entry.flat()}, prov)
            tau = TAU[entry.drafter or entry.combiner or ""][cell.task]
            for i in range(cell.limit or 0):
                for turn in range(2 if cell.task == "mt-bench" else 1):
                    t = tau + 0.3 * np.sin(i) + rng.normal(0, 0.02)
                    s = sample(i, t, turn=turn)
                    s["total_s"] = s["new_tokens"] / (500 * t)  # plain decoding: 500 tokens/s, so speedup ~ tau
                    store.add_sample(run_id, s)
                    store.add_sample(base_id, baseline(i, 1000, 2.0, turn=turn))  # one baseline, shared
            store.record_cell(cell.key(spec), spec.name, cell.identity(spec), "done", run_id=run_id,
                              baseline_run_id=base_id)
    return path, db


def test_report_prints_tables_and_claims_without_paths(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path, db = write_store(tmp_path)
    rc = main(["report", str(path), "--db", str(db)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "## smollm2-135m-instruct, T=0" in out and "| proposer | mt-bench | gsm8k |" in out
    assert "oracle(mathinstruct-eagle2, sharegpt-eagle2) (analysis only)" in out
    assert "HASS MathInstruct: published (arXiv 2603.27027, Llama-3-8B-Instruct)" in out
    assert "EAGLE " in out and "x [" in out and "n=6" in out
    assert "| specialisation | eagle2: math drafter above chat drafter on gsm8k | 6 |" in out
    assert "chat drafter above math drafter on mt-bench" in out
    assert "| averaging | each parent, and confidence routing, above the weight average (not measured" in out
    assert "merged trees (budget equal) above confidence routing (not measured" in out
    assert "machine: Test CPU (cpu)" in out and "commit: abcabcabcabc" in out
    assert str(tmp_path) not in out and "sqlite" not in out and "secret-dir" not in out and "/tmp" not in out
    out_file = tmp_path / "report.html"
    assert main(["report", str(path), "--db", str(db), "--format", "html", "--out", str(out_file)]) == 0
    page = out_file.read_text()
    assert page.startswith("<!doctype html>") and "<table" in page and "holds" in page
    assert str(tmp_path) not in page and "sqlite" not in page


def test_the_leaderboard_publishes_the_report_as_a_page(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """`leaderboard build --report MATRIX`: the report is a page of the site, linked from every page's header, with
    no local path; a matrix without cells fails the build before anything is written."""
    path, db = write_store(tmp_path)
    site = tmp_path / "site"
    assert main(["leaderboard", "build", "--db", str(db), "--out", str(site), "--report", str(path)]) == 0
    (page_file,) = (site / "studies").glob("study-small*.html")
    page = page_file.read_text()
    assert "<table" in page and "specialisation" in page and "holds" in page
    assert f'href="studies/{page_file.name}">Study: study-small</a>' in (site / "index.html").read_text()
    assert f'href="../studies/{page_file.name}"' in next((site / "drafters").glob("*.html")).read_text()
    for html_file in site.rglob("*.html"):
        text = html_file.read_text()
        assert str(tmp_path) not in text and "secret-dir" not in text and "sqlite" not in text, html_file
    capsys.readouterr()
    empty = tmp_path / "empty.yaml"
    empty.write_text(yaml.safe_dump({**SPEC, "name": "nothing-stored", "tasks": {"svamp": 2}}))
    rc = main(["leaderboard", "build", "--db", str(db), "--out", str(tmp_path / "site2"), "--report", str(empty)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "nothing-stored has no finished cells" in err
    assert not (tmp_path / "site2").exists()


def test_report_bad_input_is_one_line_exit_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path, db = write_store(tmp_path)
    rc = main(["report", "cpu-combiner", "--db", str(db)])
    err = capsys.readouterr().err
    assert rc == 2 and "did you mean cpu-combiners" in err and err.count("\n") == 1
    empty = tmp_path / "empty.db"
    Store(as_url(str(empty))).close()
    assert main(["report", str(path), "--db", str(empty)]) == 2
    err = capsys.readouterr().err
    assert "holds no runs" in err and err.count("\n") == 1
    assert main(["report", "cpu-combiners", "--db", str(db)]) == 2  # runs, but none of this matrix
    err = capsys.readouterr().err
    assert "cpu-combiners has no finished cells" in err and err.count("\n") == 1
    assert main(["report", str(path), "--db", str(db), "--format", "pdf"]) == 2


# -- a real tiny matrix, decoded and reported ---------------------------------------------------------------------


@pytest.mark.smollm
def test_report_of_a_real_tiny_matrix(capsys: pytest.CaptureFixture[str], tmp_path: Path, tiny_smol: Path,
                                      data_dir: Path, one_thread: None) -> None:
    from test_matrix import drafters

    a, b = (str(p) for p in drafters(tmp_path, tiny_smol))
    pair = [a, b]
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({
        "name": "tiny-report", "targets": ["tiny-smol"],
        "proposers": [{"drafter": a}, {"drafter": b}, {"combiner": "average", "drafters": pair},
                      {"combiner": "confidence", "drafters": pair, "granularity": "prompt"},
                      {"combiner": "entropy", "drafters": pair, "granularity": "prompt"},
                      {"combiner": "merged-tree", "drafters": pair, "budget": "full"},
                      {"combiner": "merged-tree", "drafters": pair, "budget": "equal"}],
        "tasks": {"mt-bench": 2, "gsm8k": 3}, "temperatures": [0], "max_new_tokens": 6}, sort_keys=False))
    db = tmp_path / "r.db"
    rc = main(["--include", str(tiny_smol), "matrix", str(path), "--db", str(db), "--no-progress",
               "--data-dir", str(data_dir)])
    assert rc == 0, capsys.readouterr().err[-2000:]
    capsys.readouterr()
    assert main(["--include", str(tiny_smol), "report", str(path), "--db", str(db)]) == 0
    out = capsys.readouterr().out
    assert "## tiny-smol, T=0" in out and "7 of 7 cells" not in out and "14 of 14 cells" in out
    for row in ("| math-rand |", "| chat-rand |", "| average(math-rand, chat-rand; alpha=0.5) |",
                "| confidence(math-rand, chat-rand; granularity=prompt) |",
                "| entropy(math-rand, chat-rand; granularity=prompt) |",
                "| merged-tree(math-rand, chat-rand; budget=full) |",
                "| merged-tree(math-rand, chat-rand; budget=equal) |",
                "| oracle(math-rand, chat-rand) (analysis only) |"):
        assert row in out
    claim_lines = [line for line in out.splitlines() if line.startswith(("| specialisation", "| averaging",
                                                                         "| routing", "| merged trees"))]
    assert {line.split(" | ")[0] for line in claim_lines} == {"| specialisation", "| averaging", "| routing",
                                                             "| merged trees"}
    assert not [line for line in claim_lines if "not measured" in line]  # every claim's rows are in the matrix
    assert "machine: " in out and "threads: 1" in out and "- settings: tree 8/2/3, max 6 new tokens\n" in out
    assert str(tmp_path) not in out and "sqlite" not in out and "r.db" not in out
