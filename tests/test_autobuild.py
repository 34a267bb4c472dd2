"""`run` builds a registered-but-unbuilt drafter on the way (announced, with progress), and `--no-build` refuses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import DATA

from taps_bench.cli import main

CARDS = {
    "recipes/tiny-math-eagle2.yaml": """
name: tiny-math-eagle2
description: A very small recipe for tests.
target: smollm2-135m-instruct
corpus: "mathinstruct:6"
method: eagle2
max_len: 96
epochs: 1
batch_tokens: 512
""",
    "drafters/tiny-math-eagle2.yaml": """
name: tiny-math-eagle2
description: Built by the tiny recipe.
method: eagle2
corpus: mathinstruct
targets:
  smollm2-135m-instruct: {recipe: tiny-math-eagle2}
""",
}


@pytest.fixture
def include(tmp_path: Path) -> Path:
    for rel, text in CARDS.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return tmp_path


@pytest.mark.smollm
@pytest.mark.slow
def test_run_builds_a_missing_drafter_then_reuses_it(include: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                     monkeypatch: pytest.MonkeyPatch, isolated_home: Path) -> None:
    monkeypatch.setenv("TAPS_BENCH_DATA", str(DATA))
    args = ["--include", str(include), "run", "--drafter", "tiny-math-eagle2", "--task", "gsm8k", "--limit", "1",
            "--max-new-tokens", "8", "--total-tokens", "4", "--depth", "1", "--top-k", "2", "--json",
            "--db", str(tmp_path / "r.sqlite"), "--no-progress"]
    assert main([*args, "--no-build"]) == 2
    assert "has not been built yet (--no-build)" in capsys.readouterr().err

    assert main(args) == 0
    out, err = capsys.readouterr()
    assert "is not built yet: building it now with the recipe 'tiny-math-eagle2'" in err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["lossless_rate"] == 1.0 and result["drafter"] == "tiny-math-eagle2"
    built = isolated_home / "drafters" / "smollm2-135m-instruct" / "tiny-math-eagle2"
    assert (built / "card.yaml").is_file() and (built / "model.safetensors").is_file()
    assert result["proposer_settings"]["drafter_checkpoint"] == f"built:{built}"

    assert main(args) == 0  # second time: found in the model store, nothing is built
    assert "building it now" not in capsys.readouterr().err

    # --no-baseline decodes only the speculative arm: tau without speedup or lossless check on a fresh database
    fresh = [a if a != str(tmp_path / "r.sqlite") else str(tmp_path / "fresh.sqlite") for a in args]
    assert main([*fresh, "--no-baseline"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["tau"] >= 1.0 and result["speedup"] is None and result["lossless_rate"] is None
    # ... and uses a baseline once one is stored
    assert main(args) == 0 and main([*args, "--no-baseline"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["speedup"] is not None and result["lossless_rate"] == 1.0


def test_two_processes_needing_one_recipe_drafter_build_it_once(include: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture) -> None:
    """Two matrix workers reaching an unbuilt recipe drafter at once: one builds, the other waits and loads it."""
    import threading
    import time
    from types import SimpleNamespace

    from taps_bench import build
    from taps_bench.registry import Registry

    monkeypatch.setenv("TAPS_BENCH_HOME", str(tmp_path / "home"))
    recipe = Registry.load(include=[include]).recipe("tiny-math-eagle2")
    target = SimpleNamespace(name="smollm2-135m-instruct")
    builds: list[str] = []

    def slow_build(reg, target, name, *_args):  # stands in for extraction + training (the lock is what is tested)
        builds.append(name)
        time.sleep(0.5)
        out = build.store_dir(target.name, name)
        out.mkdir(parents=True)
        (out / "model.safetensors").write_bytes(b"weights")
        (out / "card.yaml").write_text("name: tiny-math-eagle2\n")
        return out

    monkeypatch.setattr(build, "_build", slow_build)
    results: list[Path] = []
    workers = [threading.Thread(target=lambda: results.append(build.build_recipe(None, recipe, target, DATA)))
               for _ in range(2)]
    for w in workers:
        w.start()
        time.sleep(0.1)
    for w in workers:
        w.join()
    assert builds == ["tiny-math-eagle2"]
    assert results == [build.store_dir(target.name, "tiny-math-eagle2")] * 2
    assert "another process is building drafter 'tiny-math-eagle2'" in capsys.readouterr().err
