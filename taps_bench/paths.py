"""Where taps-bench keeps things on disk."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs


def home() -> Path:
    """`$TAPS_BENCH_HOME`, else the user's cache directory: model cache, downloaded wheels, default database."""
    return Path(os.environ.get("TAPS_BENCH_HOME") or platformdirs.user_cache_dir("taps-bench"))


def write_atomic(path: Path, text: str) -> None:
    """Write PATH.part, then rename it over PATH: a killed process never leaves a half-written file that looks
    complete (and a reader never sees one)."""
    part = path.with_name(path.name + ".part")
    part.write_text(text, encoding="utf-8")
    part.replace(path)
