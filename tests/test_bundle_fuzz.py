"""1,000 seeded random mutations of an honest bundle (fields deleted, retyped, scaled, NaN, huge, nested, samples
duplicated): each is either refused by `taps-bench import` with exit 2, one line and the database byte-identical,
or imported with every stored sample equal to the bundle's (nothing coerced) and every claim holding on what was
stored, so that every number derived from it is what recomputation from the raw counters gives. No traceback."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import pytest
from test_submit import include, submitted  # noqa: F401  (fixtures)

from taps_bench.cli import main
from taps_bench.results import submissions
from taps_bench.results.bundle import check_pairs
from taps_bench.results.claims import check_run
from taps_bench.results.metrics import summarize
from taps_bench.results.schema import STORE_OWNED
from taps_bench.results.store import Store

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]
MUTATIONS = 1000
OTHER_VALUES: list[Any] = ["x", "", 0, 1, -1, 2.5, True, False, None, [], {}, [1, 2], {"a": 1}, "0" * 64]


def paths(node: Any, here: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every position in a JSON value (dict keys and list indices)."""
    out = [here]
    if isinstance(node, dict):
        for k, v in node.items():
            out += paths(v, (*here, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += paths(v, (*here, i))
    return out


def mutate(bundle: dict[str, Any], rng: random.Random) -> tuple[str, str]:
    """Apply one random mutation in place; returns (what was done, JSON text to import)."""
    where = rng.choice(paths(bundle)[1:])
    parent = bundle
    for key in where[:-1]:
        parent = parent[key]
    key, value = where[-1], parent[where[-1]]
    op = rng.choice(["delete", "retype", "scale", "nan", "huge", "nested", "duplicate"])
    if op == "delete":
        del parent[key]
    elif op == "retype":
        parent[key] = rng.choice(OTHER_VALUES)
    elif op == "scale" and isinstance(value, (int, float)) and not isinstance(value, bool):
        parent[key] = value * rng.choice([0, -1, 2, 10, 0.5, 1e9, 1e-9])
    elif op == "nan":
        parent[key] = rng.choice([float("nan"), float("inf"), -float("inf")])
    elif op == "huge":
        parent[key] = rng.choice([10**30, -(10**30), "a" * 100_000, list(range(10_000)), 1e308])
    elif op == "nested":
        deep: Any = value
        for _ in range(rng.choice([5, 40, 400])):
            deep = [deep]
        parent[key] = deep
    elif op == "duplicate" and isinstance(parent, list):
        parent.append(json.loads(json.dumps(value)))
    else:
        parent[key] = rng.choice(OTHER_VALUES)
    return f"{op} at {'/'.join(map(str, where))[:80]}", json.dumps(bundle)


def stored_matches(db: Path, bundle: dict[str, Any]) -> None:
    """What an accepted mutation stored is the bundle's raw counters exactly, and every claim holds on it."""
    with Store(f"sqlite:///{db}", readonly=True) as store:
        assert len(submissions.submissions(store)) == 1
        runs = store.runs()
        assert len(runs) == len(bundle["runs"])
        records = []
        for claimed in bundle["runs"]:
            run = next(r for r in runs if (r["kind"], r["task"], r["proposer"], r["temperature"]) == (
                claimed["kind"], claimed["task"], claimed["proposer"], claimed["temperature"]))
            samples = store.samples(run["id"])
            assert [{k: s[k] for k in c} for s, c in zip(samples, claimed["samples"], strict=True)] \
                == claimed["samples"]
            assert summarize(samples)["tau"] == summarize(claimed["samples"])["tau"]
            record = {**claimed, "samples": [{k: v for k, v in s.items() if k not in STORE_OWNED} for s in samples]}
            check_run(record)
            records.append(record)
        check_pairs(records)


@pytest.fixture
def registry_once(monkeypatch: pytest.MonkeyPatch, include: Path) -> None:  # noqa: F811
    """Every `main` call below reads the same cards: parse them once (the checks under test come after)."""
    from taps_bench.catalog.registry import Registry

    loaded = Registry.load(include=[include])
    monkeypatch.setattr(Registry, "load", classmethod(lambda cls, include=None: loaded))


@pytest.mark.usefixtures("registry_once")
def test_random_mutations_are_refused_cleanly_or_imported_exactly(capsys, tmp_path, submitted, include):  # noqa: F811
    assert submitted["rc"] == 0, submitted["err"]
    honest = json.loads(submitted["bundle"].read_text())
    pristine = tmp_path / "pristine.sqlite"
    Store(f"sqlite:///{pristine}").close()
    db, path = tmp_path / "board.sqlite", tmp_path / "mutant.bundle.json"
    rng = random.Random(20261201)
    outcomes = {0: 0, 2: 0}
    for i in range(MUTATIONS):
        shutil.copyfile(pristine, db)
        bundle = json.loads(json.dumps(honest))
        what, text = mutate(bundle, rng)
        path.write_text(text)
        rc = main(["--include", str(include), "import", str(path), "--db", str(db)])
        out, err = capsys.readouterr()
        assert "Traceback" not in out + err, (i, what, err)
        assert rc in outcomes, (i, what, rc, err)
        outcomes[rc] += 1
        if rc == 2:
            lines = err.splitlines()
            assert len(lines) == 1 and lines[0].startswith("taps-bench: error: bundle "), (i, what, err)
            assert db.read_bytes() == pristine.read_bytes(), (i, what)
        else:
            stored_matches(db, json.loads(text))
        for leftover in (db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
            leftover.unlink(missing_ok=True)
    # Both outcomes occur: the mutations reach fields that carry claims and fields that carry none (provenance).
    assert outcomes[2] > MUTATIONS / 2 and outcomes[0] > 10, outcomes
