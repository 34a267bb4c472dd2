"""Where taps-bench keeps things on disk."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs


def home() -> Path:
    """`$TAPS_BENCH_HOME`, else the user's cache directory: model cache, downloaded wheels, default database."""
    return Path(os.environ.get("TAPS_BENCH_HOME") or platformdirs.user_cache_dir("taps-bench"))
