"""Bundles as claims: `import` refuses any bundle whose counters do not hold together or whose owner, target, tasks
or drafter name this registry does not vouch for, leaving the database byte-identical; `verify` re-decodes an
imported bundle's greedy prompts and re-measures tau, and stores its verdict with the submission.

Every hostile bundle starts from a real `taps-bench submit` output of the tiny target in test_submit.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from test_submit import CARD, fails, include, submitted  # noqa: F401  (fixtures)

from taps_bench.cli import main
from taps_bench.results import submissions
from taps_bench.results.schema import output_hash
from taps_bench.results.store import Store

pytestmark = pytest.mark.usefixtures("one_thread")
COUNTERS = ("new_tokens", "steps", "turn", "prompt_tokens", "accept_lengths", "drafted_by_depth",
            "accepted_by_depth", "tree_sizes")


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from conftest import DATA

    monkeypatch.setenv("TAPS_BENCH_DB", f"sqlite:///{tmp_path / 'default.sqlite'}")
    monkeypatch.setenv("TAPS_BENCH_DATA", str(DATA))


def honest(submitted: dict[str, Any]) -> dict[str, Any]:  # noqa: F811
    assert submitted["rc"] == 0, submitted["err"]
    return json.loads(submitted["bundle"].read_text())


def write(tmp_path: Path, bundle: dict[str, Any], name: str = "edited.bundle.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(bundle))
    return path


def imported(capsys: pytest.CaptureFixture[str], include: Path, bundle: Path, db: Path) -> None:  # noqa: F811
    assert main(["--include", str(include), "import", str(bundle), "--db", str(db)]) == 0, capsys.readouterr().err
    capsys.readouterr()


def sample_of(bundle: dict[str, Any], kind: str, task: str = "gsm8k") -> dict[str, Any]:
    return next(r for r in bundle["runs"] if r["kind"] == kind and r["task"] == task)["samples"][0]


# -- import: counters --------------------------------------------------------------------------------------------


def one_digit_edits(sample: dict[str, Any]) -> list[tuple[str, int | None, int]]:
    """(field, index or None, new value): every integer counter of the sample with its last digit changed."""
    def bump(v: int) -> int:
        return v - v % 10 + (v % 10 + 1) % 10

    out = []
    for name in COUNTERS:
        value = sample[name]
        if isinstance(value, list):
            out += [(name, i, bump(v)) for i, v in enumerate(value)]
        else:
            out.append((name, None, bump(value)))
    return out


def test_one_digit_of_any_counter_changed_is_refused(capsys, tmp_path, submitted, include):  # noqa: F811
    bundle = honest(submitted)
    db = tmp_path / "board.sqlite"
    Store(f"sqlite:///{db}").close()  # empty: no refusal here can come from a name already taken
    data = db.read_bytes()
    edits = 0
    for kind, task in (("baseline", "gsm8k"), ("speculative", "gsm8k"), ("speculative", "svamp")):
        for name, index, value in one_digit_edits(sample_of(bundle, kind, task)):
            edited = json.loads(json.dumps(bundle))
            target = sample_of(edited, kind, task)
            if index is None:
                target[name] = value
            else:
                target[name][index] = value
            line = fails(capsys, "--include", include, "import", write(tmp_path, edited), "--db", db)
            assert "nothing was imported" in line, (kind, name, index, line)
            assert db.read_bytes() == data
            edits += 1
    assert edits >= 30


@pytest.mark.parametrize(("edit", "says"), [
    (lambda b: sample_of(b, "speculative").update(new_tokens=99), "new_tokens is 99 but output_ids holds"),
    (lambda b: sample_of(b, "speculative").update(steps=1, accept_lengths=[], tree_sizes=[]),
     "cannot come from accept lengths"),
    (lambda b: sample_of(b, "speculative").update(lossless=None), "lossless is None but the outputs are equal"),
    (lambda b: next(r for r in b["runs"] if r["kind"] == "speculative").update(temperature=0.7),
     "settings.sampling.temperature must equal"),
    (lambda b: sample_of(b, "speculative").update(total_s=1e-9, prefill_s=0.0, draft_s=0.0, verify_s=0.0),
     "is not possible"),
    (lambda b: sample_of(b, "speculative").update(total_s=-1.0), "total_s must be a finite, non-negative"),
    (lambda b: sample_of(b, "speculative").update(correct=True), "are not what the number scorer gives"),
    (lambda b: b["summary"][0].update(tau=100.0), "summary: tau 100.0"),
    (lambda b: b["runs"].pop(0), "has no autoregressive baseline"),
    (lambda b: next(r for r in b["runs"] if r["kind"] == "speculative").update(proposer="mathinstruct-hass"),
     "not the submission's name"),
    (lambda b: b["submission"].update(name="mathinstruct-hass")
     or [r.update(proposer="mathinstruct-hass") for r in b["runs"] if r["kind"] == "speculative"]
     or [r["provenance"].update(drafter_card=b["submission"]) for r in b["runs"] if r["kind"] == "speculative"],
     "belongs to an official drafter"),
    (lambda b: [r.update(target="llama3-8b-instruct") for r in b["runs"]] and b["submission"].update(
        target="llama3-8b-instruct"), "does not know the checkpoint of target llama3-8b-instruct"),
    (lambda b: [r["settings"].update(target_checkpoint_sha256="0" * 64) for r in b["runs"]],
     "not the one the registry knows"),
    (lambda b: next(r for r in b["runs"] if r["kind"] == "speculative")["provenance"].update(
        drafter_card={**b["submission"], "license": "MIT"}), "drafter_card is not the submission card"),
    (lambda b: next(r for r in b["runs"] if r["kind"] == "speculative")["settings"].update(
        drafter_checkpoint="path:/etc"), "drafter_checkpoint must be path:drafter"),
    (lambda b: sample_of(b, "speculative")["extra"].update(nodes={"x/accepted": {"n": 1}}), "extra.nodes"),
])
def test_inconsistent_claims_are_refused(capsys, tmp_path, submitted, include, edit, says):  # noqa: F811
    bundle = honest(submitted)
    edit(bundle)
    db = tmp_path / "board.sqlite"
    Store(f"sqlite:///{db}").close()
    data = db.read_bytes()
    line = fails(capsys, "--include", include, "import", write(tmp_path, bundle), "--db", db)
    assert says in line, line
    assert db.read_bytes() == data


@pytest.mark.parametrize(("text", "says"), [
    ('{"format": NaN}', "NaN is not a JSON number"),
    ('{"format": "a", "format": "b"}', "duplicate key"),
    ("[" * 100000 + "]" * 100000, "nested more than"),
    ("[" * 40 + "]" * 40, "nested more than 32 levels"),
])
def test_non_json_and_hostile_json_is_refused(capsys, tmp_path, include, text, says):  # noqa: F811
    path = tmp_path / "x.bundle.json"
    path.write_text(text)
    assert says in fails(capsys, "--include", include, "import", path, "--db", tmp_path / "db.sqlite")
    assert not (tmp_path / "db.sqlite").exists()


def test_runs_belong_to_their_submission(capsys, tmp_path, submitted, include):  # noqa: F811
    """A second bundle can neither take the name of an imported submission nor add samples to its runs, and a
    submitted speculative run is paired with its own bundle's baseline only."""
    db = tmp_path / "board.sqlite"
    imported(capsys, include, submitted["bundle"], db)
    again = honest(submitted)
    again["created_at"] = "2026-12-01T00:00:00+00:00"  # same runs, other bytes: another bundle
    line = fails(capsys, "--include", include, "import", write(tmp_path, again), "--db", db)
    assert "the drafter name tiny-hass is already held by submission" in line

    with Store(f"sqlite:///{db}") as store:
        (sub,) = submissions.submissions(store)
        runs = store.runs()
        assert {r["submission_id"] for r in runs} == {sub["id"]} and sub["verification"] is None
        spec = next(r for r in runs if r["kind"] == "speculative")
        # A baseline measured here with the same settings does not pair with the submitted run.
        local = store.get_or_create_run("baseline", spec["target"], spec["task"], "autoregressive", 0.0,
                                        {k: v for k, v in spec["settings"].items() if k in (
                                            "target_checkpoint_sha256", "target_card", "task_card", "data_sha256",
                                            "device", "dtype", "max_new_tokens", "sampling")}, {})
        assert store.baseline_for(spec)["id"] != local
        assert store.baseline_for(spec)["submission_id"] == sub["id"]


# -- verify ------------------------------------------------------------------------------------------------------


def checkpoint_of(submitted: dict[str, Any]) -> Path:  # noqa: F811
    return submitted["card"].parent / "drafter"


def run_verify(capsys, include: Path, bundle: Path, db: Path, *extra: Any) -> tuple[int, str]:  # noqa: F811
    rc = main(["--include", str(include), "verify", str(bundle), "--db", str(db), "--no-progress",
               *map(str, extra)])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return rc, out


def verification(db: Path) -> dict[str, Any]:
    with Store(f"sqlite:///{db}") as store:
        (sub,) = submissions.submissions(store)
        return sub["verification"]


def test_verify_passes_an_honest_bundle(capsys, tmp_path, submitted, include):  # noqa: F811
    db = tmp_path / "board.sqlite"
    imported(capsys, include, submitted["bundle"], db)
    rc, out = run_verify(capsys, include, submitted["bundle"], db, "--checkpoint", checkpoint_of(submitted))
    assert rc == 0, out
    assert "verification PASSED: 4 prompts re-run, 10 claimed samples compared, 0 differ" in out
    check = verification(db)
    assert check["passed"] and check["prompts_rerun"] == 4 and len(check["tau"]) == 4
    assert all(t["ok"] and t["measured"] == t["claimed"] for t in check["tau"])

    rc, out = run_verify(capsys, include, submitted["bundle"], db, "--sample", 2, "--seed", 3)
    assert rc == 0 and "2 prompts re-run" in out and "tau not re-measured" in out  # no --checkpoint, a path card
    assert submissions.verified_label({"verification": verification(db)}) == "verified (2 prompts re-run)"


def test_verify_fails_edited_outputs(capsys, tmp_path, submitted, include):  # noqa: F811
    """Both arms' outputs edited alike (so every import check holds): only re-decoding can tell."""
    bundle = honest(submitted)
    for kind in ("baseline", "speculative"):
        s = sample_of(bundle, kind, "svamp")
        s["output_ids"][-1] = (s["output_ids"][-1] + 1) % 200
        s["output_hash"] = output_hash(s["output_ids"])
    path = write(tmp_path, bundle)
    db = tmp_path / "board.sqlite"
    imported(capsys, include, path, db)
    rc, out = run_verify(capsys, include, path, db, "--tau-prompts", 0)
    assert rc == 1
    assert "svamp example" in out and "output_ids" in out and "verification FAILED" in out
    assert verification(db)["passed"] is False and verification(db)["n_mismatches"] == 2
    assert submissions.verified_label({"verification": verification(db)}) == "verification failed"


def inflate(sample: dict[str, Any]) -> None:
    """Claim two accepted tokens per verify step (the deepest path a 4-node tree of depth 1 can hold), keeping every
    counter consistent with the others and with the outputs."""
    accepts: list[int] = []
    while 1 + sum(a + 1 for a in accepts) < sample["new_tokens"]:
        accepts.append(2)
    steps = len(accepts)
    sample.update(steps=1 + steps, accept_lengths=accepts, tree_sizes=[4] * steps,
                  drafted_by_depth=[2 * steps, steps] if steps else [],
                  accepted_by_depth=[steps, steps] if steps else [])


def test_verify_fails_tau_inflated_consistently(capsys, tmp_path, submitted, include):  # noqa: F811
    bundle = honest(submitted)
    for run in bundle["runs"]:
        if run["kind"] == "speculative":
            for s in run["samples"]:
                inflate(s)
    from taps_bench.results.metrics import summarize

    for row in bundle["summary"]:
        run = next(r for r in bundle["runs"] if r["kind"] == "speculative" and r["task"] == row["task"])
        row["tau"] = summarize(run["samples"])["tau"]
        assert row["tau"] >= 2.0  # the honest random drafter's tau is 1.0 to 1.33
    path = write(tmp_path, bundle)
    db = tmp_path / "board.sqlite"
    imported(capsys, include, path, db)  # every import check holds
    rc, out = run_verify(capsys, include, path, db, "--checkpoint", checkpoint_of(submitted))
    assert rc == 1 and "verification FAILED" in out and "0 differ" in out  # the outputs are the target's own
    assert [t["ok"] for t in verification(db)["tau"]] == [False] * 4


def test_verify_needs_an_imported_bundle_and_a_matching_checkpoint(capsys, tmp_path, submitted, include):  # noqa: F811
    db = tmp_path / "board.sqlite"
    Store(f"sqlite:///{db}").close()
    assert "is not imported into" in fails(capsys, "--include", include, "verify", submitted["bundle"], "--db", db)
    imported(capsys, include, submitted["bundle"], db)
    other = tmp_path / "other-drafter"
    shutil.copytree(checkpoint_of(submitted), other)
    weights = other / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 1
    weights.write_bytes(bytes(raw))
    line = fails(capsys, "--include", include, "verify", submitted["bundle"], "--db", db, "--checkpoint", other,
                 "--no-progress")
    assert "not the ones the bundle measured" in line
