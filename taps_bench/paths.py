"""Where taps-bench keeps things on disk."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import platformdirs
from filelock import FileLock, Timeout

from taps_bench.errors import UserError

# The installed package (`taps_bench/`): in a wheel the built-in cards sit inside it (`cards/<dir>`), in a source
# or editable install beside it (`<repo>/<dir>`).
PACKAGE_DIR = Path(__file__).resolve().parent


def shipped_dir(name: str) -> Path:
    """A directory of shipped files (`tasks`, `matrices`, `leaderboard`...): `taps_bench/cards/<name>` in a wheel,
    `<repo>/<name>` in a source or editable install."""
    packaged = PACKAGE_DIR / "cards" / name
    return packaged if packaged.is_dir() else PACKAGE_DIR.parent / name


def home() -> Path:
    """`$TAPS_BENCH_HOME`, else the user's cache directory: model cache, downloaded wheels, default database."""
    return Path(os.environ.get("TAPS_BENCH_HOME") or platformdirs.user_cache_dir("taps-bench"))


def write_atomic(path: Path, text: str) -> None:
    """Write PATH.part, then rename it over PATH: a killed process never leaves a half-written file that looks
    complete (and a reader never sees one)."""
    part = path.with_name(path.name + ".part")
    try:
        part.write_text(text, encoding="utf-8")
        part.replace(path)
    except OSError as exc:  # a missing or read-only directory, a full disk: the user's to fix, so one line
        with suppress(OSError):
            part.unlink(missing_ok=True)
        raise UserError(f"cannot write {path}: {exc.strerror or exc}; pass a path in an existing, writable "
                        "directory") from None


@contextmanager
def exclusive(path: Path, what: str) -> Iterator[None]:
    """Hold PATH.lock while making what lives at PATH, so that two processes needing the same thing (two matrix
    workers on a fresh machine, say) do not make it side by side; the second says so, waits, then finds it made."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path) + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"[taps-bench] another process is {what}; waiting for it", file=sys.stderr)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()
