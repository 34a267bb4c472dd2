"""SQLite as the default results store: a file that must be writable, opened in WAL mode."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sqlalchemy.engine import URL

from taps_bench.errors import UserError


def cannot_write(path: Path, reason: str) -> UserError:
    return UserError(f"cannot write the database {path}: {reason}; pass --db with a writable path or URL")


def sqlite_file(url: URL) -> Path | None:
    """The file behind a SQLite URL, or None for in-memory and URI-mode (`file:...`) databases."""
    if url.get_backend_name() != "sqlite":
        return None
    db = url.database
    if not db or db == ":memory:" or db.startswith("file:") or str(url.query.get("uri", "")).lower() == "true":
        return None
    return Path(db).expanduser()


def prepare_sqlite_path(path: Path) -> None:
    """Check that `path` can be written, then create its parent directory. Nothing is created if a check fails."""
    if path.exists():
        if path.is_dir():
            raise cannot_write(path, "it is a directory")
        if not os.access(path, os.R_OK | os.W_OK):
            raise cannot_write(path, "permission denied")
        # SQLite (WAL mode) creates <db>-wal and <db>-shm next to the file.
        if not os.access(path.parent, os.W_OK | os.X_OK):
            raise cannot_write(path, f"its directory {path.parent} is not writable")
        return
    ancestor = path.parent
    # Path(".").parent == Path("."), and "/" exists, so this terminates.
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise cannot_write(path, f"{ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise cannot_write(path, f"{ancestor} is not writable")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise cannot_write(path, exc.strerror or str(exc)) from exc


def sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        # First, so that the pragmas below (switching to WAL takes a lock) wait for a concurrent opener too.
        cursor.execute("PRAGMA busy_timeout=30000")
        # WAL: a reader (`taps-bench show`, the leaderboard) does not block the run that is writing, and vice versa.
        cursor.execute("PRAGMA journal_mode=WAL")
        # SQLite ignores foreign keys unless asked, per connection.
        cursor.execute("PRAGMA foreign_keys=ON")
    finally:
        cursor.close()




def sqlite_on_connect_readonly(dbapi_connection: Any, _record: Any) -> None:
    # A read-only connection may neither switch journal modes nor need to: it reads whatever mode the file is in.
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA busy_timeout=30000")
    finally:
        cursor.close()


def readonly_mode(path: Path) -> str:
    """URI parameters to read `path` without writing anything. `mode=ro` still creates the -wal/-shm files of a WAL
    database, which fails where the directory is read-only; there, with no -wal left (so no writer can be mid-way:
    nobody can write beside the file), `immutable=1` reads the file as it is."""
    wal = path.with_name(path.name + "-wal")
    # The mode bits too: root passes os.access everywhere, but a directory nobody may write is read-only to all.
    locked = not os.access(path.parent, os.W_OK | os.X_OK) or not path.parent.stat().st_mode & 0o222
    if locked and not wal.exists():
        return "mode=ro&immutable=1"
    return "mode=ro"
