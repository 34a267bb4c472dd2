"""bench/gpu_check.py on a tiny model on the CPU: the script a lent GPU runs must work before it gets there.

float32 runs every section (tables print, the checks report no mismatch); bfloat16 runs the two checks (on CPU
its products run in the fp32 kernel over upcast weights, see `forward.Linear`)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import gpu_check

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
TINY = ["--tiny", "--device", "cpu", "--prompts", "2", "--max-new-tokens", "12", "--repeats", "1"]


def assert_no_mismatch(out: dict) -> None:
    assert [r["mismatches"] for r in out["invariance"]] == [0] * len(gpu_check.INVARIANCE_CASES)
    assert sum(r["nodes"] for r in out["invariance"]) == sum(n for _, n, _ in gpu_check.INVARIANCE_CASES)
    assert [r["mismatches"] for r in out["lossless"]] == [0, 0]
    # The scripted trees hold the true continuation: drafts are accepted, so the check covers accepted paths.
    assert out["lossless"][1]["tau"] > 1.5


def test_gpu_check_runs_on_cpu_float32(capsys):
    out = gpu_check.main([*TINY, "--dtype", "float32"])
    assert_no_mismatch(out)
    printed = capsys.readouterr().out
    assert printed.startswith("# random tiny Llama target")
    for title in ("a. Batch invariance", "b. Lossless", "c. Verify cost", "d. Autoregressive engine",
                  "e. Engine overhead"):
        assert f"## {title}" in printed
    assert [r["tokens"] for r in out["verify_cost"]] == list(gpu_check.SIZES)
    assert out["ar"][-1]["prompt"] == "all" and out["ar"][-1]["ratio"] > 0
    assert any("engine / bound" in r["what"] for r in out["bandwidth"])
    assert [r["same"] for r in out["overhead"]] == ["2/2", "2/2"]


def test_gpu_check_invariance_and_lossless_bfloat16():
    assert_no_mismatch(gpu_check.main([*TINY, "--dtype", "bfloat16", "--sections", "ab"]))
