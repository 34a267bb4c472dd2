"""EAGLE-3 submissions: `submit` takes an EAGLE-3 drafter in the SafeAILab layout or the speculators format, the
bundle imports, and `verify` re-measures it; a card whose method is not the checkpoint's family is refused.

The tiny target, the card and the one-line failure check are test_submit's (its 2-layer target has hidden states
0 and 1 only, so these drafters name their taps instead of reading EAGLE-3's default layers 2, L//2, L-3).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from test_submit import FAST, fails, include, target_config, write_card  # noqa: F401  (fixtures)

from taps_bench.cli import main
from taps_bench.models.drafter import random_drafter, save_drafter
from taps_bench.models.eagle3 import Eagle3Drafter, load_state
from taps_bench.models.eagle3_format import save_safeailab, save_speculators
from taps_bench.results import submissions
from taps_bench.results.store import Store

pytestmark = pytest.mark.usefixtures("one_thread")
# HF hidden-state indices: the SafeAILab layout names layer outputs (index - 1), so it cannot name the embedding (0).
TAPS = {"safeailab": (1,), "speculators": (0, 1)}


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from conftest import DATA

    monkeypatch.setenv("TAPS_BENCH_DB", f"sqlite:///{tmp_path / 'default.sqlite'}")
    monkeypatch.setenv("TAPS_BENCH_DATA", str(DATA))


def eagle3_drafter(include: Path, taps: tuple[int, ...], seed: int = 1) -> Eagle3Drafter:  # noqa: F811
    """A random EAGLE-3 drafter for the tiny target over a draft vocabulary of 100 of its 258 tokens."""
    from test_eagle3_decoding import drafter_parts

    shape, state = drafter_parts(target_config(include), seed, 100)
    config = replace(shape, aux_layers=taps)
    g = torch.Generator().manual_seed(seed)
    state["fc.weight"] = 0.2 * torch.randn(config.hidden_size, config.num_aux * config.target_hidden_size, generator=g)
    drafter = Eagle3Drafter(config)
    load_state(drafter, state)
    return drafter.eval()


def write_eagle3(directory: Path, include: Path, fmt: str, taps: tuple[int, ...] | None = None) -> Path:  # noqa: F811
    drafter = eagle3_drafter(include, TAPS[fmt] if taps is None else taps)
    if fmt == "safeailab":
        save_safeailab(drafter, directory)
    else:
        save_speculators(drafter, directory, "tiny-bytes", ["LlamaForCausalLM"])
    return directory


def bundle_runs(path: Path) -> list[dict[str, Any]]:
    return json.loads(path.read_text())["runs"]


@pytest.mark.parametrize("fmt", list(TAPS))
def test_an_eagle3_submission_imports_and_verifies(capsys, tmp_path, include, fmt):  # noqa: F811
    write_eagle3(tmp_path / "drafter", include, fmt)
    card = write_card(tmp_path, name=f"tiny-eagle3-{fmt}", method="eagle3")
    rc = main(["--include", str(include), "submit", str(card), *FAST, "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert all(r["lossless"] is True for r in result["tasks"]) and len(result["tasks"]) == 4
    bundle = Path(result["bundle"])
    spec = [r for r in bundle_runs(bundle) if r["kind"] == "speculative"]
    assert len(spec) == 4 and all(r["settings"]["drafter_family"] == "eagle3" for r in spec)
    assert all(r["settings"]["draft_vocab_size"] == 100 and r["settings"]["drafter_checkpoint"] == "path:drafter"
               for r in spec)
    assert sum(sum(s["drafted_by_depth"]) for r in spec for s in r["samples"]) > 0  # the drafter did draft

    db = tmp_path / "board.sqlite"
    assert main(["--include", str(include), "import", str(bundle), "--db", str(db)]) == 0, capsys.readouterr().err
    capsys.readouterr()
    rc = main(["--include", str(include), "verify", str(bundle), "--db", str(db), "--no-progress",
               "--checkpoint", str(tmp_path / "drafter")])
    out, err = capsys.readouterr()
    assert rc == 0, out + err
    assert "verification PASSED" in out and "0 differ" in out
    with Store(f"sqlite:///{db}") as store:
        (sub,) = submissions.submissions(store)
    check = sub["verification"]
    assert check["passed"] and len(check["tau"]) == 4
    assert all(t["ok"] and t["measured"] == t["claimed"] for t in check["tau"])


@pytest.mark.parametrize(("method", "checkpoint", "says"), [
    ("eagle3", "eagle2", ["method: eagle3", "is an EAGLE-1/2/HASS drafter", "`method: hass`"]),
    ("hass", "safeailab", ["method: hass", "is an EAGLE-3 drafter (SafeAILab layout)", "write `method: eagle3`"]),
    ("eagle2", "speculators", ["method: eagle2", "is an EAGLE-3 drafter (speculators format)", "`method: eagle3`"]),
])
def test_method_and_checkpoint_family_must_agree(capsys, tmp_path, include, method, checkpoint, says):  # noqa: F811
    if checkpoint == "eagle2":
        save_drafter(random_drafter(target_config(include), 1), tmp_path / "drafter")
    else:
        write_eagle3(tmp_path / "drafter", include, checkpoint)
    card = write_card(tmp_path, method=method)
    line = fails(capsys, "--include", include, "submit", card, *FAST)
    for s in [f"submission card {card}", *says]:
        assert s in line, line
    assert not list(tmp_path.glob("*.bundle.json*"))


def test_an_eagle3_drafter_must_fit_the_target(capsys, tmp_path, include):  # noqa: F811
    write_eagle3(tmp_path / "drafter", include, "speculators", taps=(0, 1, 5))  # the target has layers 0..1
    line = fails(capsys, "--include", include, "submit", write_card(tmp_path, method="eagle3"), *FAST)
    assert "layer(s) [5]" in line
    assert not list(tmp_path.glob("*.bundle.json*"))


def test_verify_refuses_a_checkpoint_of_another_family(capsys, tmp_path, include):  # noqa: F811
    write_eagle3(tmp_path / "drafter", include, "speculators")
    card = write_card(tmp_path, name="tiny-eagle3-x", method="eagle3")
    assert main(["--include", str(include), "submit", str(card), *FAST]) == 0, capsys.readouterr().err
    bundle = tmp_path / "tiny-eagle3-x.bundle.json"
    db = tmp_path / "board.sqlite"
    assert main(["--include", str(include), "import", str(bundle), "--db", str(db)]) == 0
    capsys.readouterr()
    save_drafter(random_drafter(target_config(include), 1), tmp_path / "eagle2")
    line = fails(capsys, "--include", include, "verify", bundle, "--db", db, "--checkpoint", tmp_path / "eagle2",
                 "--no-progress")
    assert f"bundle {bundle}: method: eagle3" in line and "is an EAGLE-1/2/HASS drafter" in line
    with Store(f"sqlite:///{db}") as store:
        (sub,) = submissions.submissions(store)
    assert sub["verification"] is None  # nothing stored: the check failed before anything was re-decoded
