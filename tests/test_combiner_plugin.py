"""A combiner is one file: a class with a typed options model and `build`, added with `--include DIR` and run from
`run` and from a matrix without touching any other file of taps-bench."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from taps_bench.catalog.proposers import ProposerSpec
from taps_bench.catalog.registry import Registry
from taps_bench.cli import main
from taps_bench.errors import UserError
from taps_bench.results.store import Store, as_url

pytestmark = pytest.mark.usefixtures("one_thread")

# A combiner that always verifies drafter number `pick`'s tree (its option) and says so in its diagnostics.
PLUGIN = '''
from typing import Any, Literal

from pydantic import Field

from taps_bench.catalog.proposers import CombinerOptions
from taps_bench.decoding.eagle2 import EagleProposer


class PickOptions(CombinerOptions):
    combiner: Literal["pick"] = "pick"
    pick: int = Field(0, ge=0)


class Pick:
    """Always draft with one of the drafters (option pick: its index)."""

    combiner_name = "pick"
    Options = PickOptions

    @classmethod
    def build(cls, options, drafters, target_model, tree, head_dtype="target"):
        name, drafter = drafters[options.pick]
        proposer = EagleProposer(drafter, target_model, tree, name=f"pick{options.pick}({name})",
                                 head_dtype=head_dtype)
        diagnostics = proposer.diagnostics
        proposer.diagnostics = lambda: {**diagnostics(), "picked": name}
        return proposer
'''


@pytest.fixture
def plugin_dir(tmp_path: Path, tiny_smol: Path) -> Path:
    include = tmp_path / "include"
    (include / "combiners").mkdir(parents=True)
    (include / "combiners" / "pick.py").write_text(PLUGIN)
    (include / "targets").mkdir()
    (include / "targets" / "tiny-smol.yaml").write_text((tiny_smol / "targets" / "tiny-smol.yaml").read_text())
    return include


def tiny_drafters(root: Path, tiny_smol: Path) -> tuple[Path, Path]:
    from transformers import AutoConfig

    from taps_bench.models.drafter import random_drafter, save_drafter

    config = AutoConfig.from_pretrained(tiny_smol / "model")
    a, b = root / "drafter-a", root / "drafter-b"
    for seed, where in enumerate((a, b)):
        save_drafter(random_drafter(config, seed, std=0.5), where)
    return a, b


def test_the_plugin_is_registered_and_its_options_are_typed(plugin_dir: Path) -> None:
    reg = Registry.load(include=[plugin_dir])
    assert "pick" in reg.names("combiner") and {"average", "confidence", "entropy", "merged-tree"} <= set(
        reg.names("combiner"))
    assert dict(reg.describe("combiner"))["pick"].startswith("Always draft with one of the drafters")
    spec = reg.normalise(ProposerSpec(combiner="pick", drafters=("a", "b"), pick="1"))
    assert dict(spec.options) == {"pick": 1}  # validated by the plugin's own model: "1" became 1
    with pytest.raises(UserError, match="combiner pick: pick: Input should be greater than or equal to 0"):
        reg.normalise(ProposerSpec(combiner="pick", drafters=("a", "b"), pick=-1))
    with pytest.raises(UserError, match="combiner pick: granularity: not an option of this combiner"):
        reg.normalise(ProposerSpec(combiner="pick", drafters=("a", "b"), granularity="step"))
    with pytest.raises(UserError, match="did you mean pick"):
        reg.combiner("pik")


def test_a_broken_plugin_file_is_one_clear_line(tmp_path: Path) -> None:
    (tmp_path / "combiners").mkdir()
    (tmp_path / "combiners" / "bad.py").write_text("class Half:\n    combiner_name = 'half'\n")
    with pytest.raises(UserError, match=r"combiner .half. from .*bad.py cannot be used: its Options is not"):
        Registry.load(include=[tmp_path])


@pytest.mark.smollm
def test_the_plugin_runs_from_run_and_from_a_matrix(plugin_dir: Path, tiny_smol: Path, tmp_path: Path,
                                                     data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = tiny_drafters(tmp_path, tiny_smol)
    db = tmp_path / "r.sqlite"
    common = ["--task", "gsm8k", "--limit", "1", "--max-new-tokens", "5", "--target", "tiny-smol",
              "--data-dir", str(data_dir), "--db", str(db), "--no-progress", "--json"]
    rc = main(["--include", str(plugin_dir), "run", "--combiner", "pick", "--drafters", f"{a},{b}",
               "--option", "pick=1", *common])
    out = capsys.readouterr().out
    assert rc == 0, out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["drafter"] == "pick1(drafter-b)" and result["lossless_rate"] == 1.0
    assert result["proposer_settings"]["combiner"] == "pick" and result["proposer_settings"]["pick"] == 1
    store = Store(as_url(str(db)))
    run = next(r for r in store.runs() if r["kind"] == "speculative")
    assert store.samples(run["id"])[0]["extra"]["picked"] == "drafter-b"

    spec = tmp_path / "m.yaml"
    spec.write_text(yaml.safe_dump({"name": "plugin", "targets": ["tiny-smol"], "tasks": {"gsm8k": 1},
                                    "max_new_tokens": 5,
                                    "proposers": [{"combiner": "pick", "drafters": [str(a), str(b)], "pick": 0}]}))
    rc = main(["--include", str(plugin_dir), "matrix", str(spec), "--data-dir", str(data_dir), "--db", str(db),
               "--no-progress", "--json"])
    out = capsys.readouterr().out
    assert rc == 0, out
    cells = json.loads(out.strip().splitlines()[-1])["cells"]
    assert [c["status"] for c in cells] == ["done"] and cells[0]["result"]["drafter"] == "pick0(drafter-a)"
