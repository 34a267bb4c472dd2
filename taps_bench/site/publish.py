"""Putting a built site in place without ever destroying what is not ours, or leaving half a site behind.

A build renders into a fresh temporary directory beside the destination (`tempfile.mkdtemp` in the same parent, so
the final rename stays on one filesystem) and leaves a marker file, `.taps-bench-site`, listing every file it wrote.
The destination is replaced only when it is absent, empty, or carries that marker; then only the files its marker
lists go away, and any other file (a user's own notes inside the site) is moved into the new site. A directory of
something else is refused before anything is rendered. A failure while rendering removes the temporary directory
and leaves the previous site byte for byte as it was.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath

from taps_bench.errors import UserError

MARKER = ".taps-bench-site"
_HEAD = ("# Written by `taps-bench leaderboard build`: the files below are replaced by the next build into this "
         "directory; any other file here is left alone.")


class SiteFiles:
    """The files a build writes, each recorded (relative, POSIX) for the marker."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.written: list[str] = []

    def write(self, rel: str, text: str) -> None:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        self.written.append(rel)


def previous_site(out: Path) -> list[str] | None:
    """The files an earlier build listed in `out`'s marker; None where `out` is absent or empty. Refuses (one line)
    a file, or a non-empty directory without the marker: it is somebody's data, not a leaderboard."""
    if not out.exists() and not out.is_symlink():
        return None
    if not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a directory for the site")
    if not any(out.iterdir()):
        return None
    marker = out / MARKER
    if not marker.is_file():
        raise UserError(f"--out {out} is a non-empty directory that is not a leaderboard built by taps-bench (it has "
                        f"no {MARKER} file); nothing was changed: pass a new or empty directory, or an earlier site")
    return [rel for line in marker.read_text(encoding="utf-8", errors="replace").splitlines()
            if (rel := _listed(line)) is not None]


def _listed(line: str) -> str | None:
    # The marker is a file in a directory anybody may have edited: only plain paths inside the site count.
    path = PurePosixPath(line.strip())
    if not line.strip() or line.startswith("#") or path.is_absolute() or ".." in path.parts or "\\" in line:
        return None
    return str(path)


def publish(out: Path, render: Callable[[SiteFiles], None]) -> None:
    """Render a site with `render` (which writes through the given `SiteFiles`) and put it at `out`."""
    previous = previous_site(out)  # before rendering: a refused directory is never touched
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".building", dir=out.parent))
    try:
        files = SiteFiles(tmp)
        render(files)
        (tmp / MARKER).write_text("\n".join([_HEAD, *files.written]) + "\n", encoding="utf-8")
        if previous is None:
            os.replace(tmp, out)  # onto an absent or empty directory: one rename
            return
        theirs = [rel for rel in _files(out) if rel not in set(previous) and rel != MARKER]
        if clash := sorted(set(theirs) & set(files.written)):
            raise UserError(f"--out {out}: {clash[0]} is not a file of the previous site but the new site needs "
                            "that name; move it away and build again")
        _swap(tmp, out, previous, theirs)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a rename; after a failure, nothing stays behind


def _swap(tmp: Path, out: Path, previous: list[str], theirs: list[str]) -> None:
    """Replace the old site by the new one (two renames), carry the user's files over, then delete the old site's
    own files. If anything fails after the first rename, nothing is deleted: what is left stays in `.OUT.*.old`."""
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    os.replace(out, old / "site")
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old / "site", out)
        old.rmdir()
        raise
    for rel in theirs:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        os.replace(old / "site" / rel, out / rel)
    for rel in {*previous, MARKER}:
        path = old / "site" / rel
        if (path.is_file() or path.is_symlink()) and not _through_link(old / "site", rel):
            path.unlink()
    _remove_empty(old)


def _files(root: Path, prefix: str = "") -> Iterator[str]:
    """Every file (and link, followed never) under root, relative and POSIX."""
    for entry in os.scandir(root):
        rel = f"{prefix}{entry.name}"
        if entry.is_dir(follow_symlinks=False):
            yield from _files(Path(entry.path), rel + "/")
        else:
            yield rel


def _through_link(root: Path, rel: str) -> bool:
    # A listed path whose directory is a link points outside the site: never delete through it.
    parts = PurePosixPath(rel).parts[:-1]
    return any((root.joinpath(*parts[: i + 1])).is_symlink() for i in range(len(parts)))


def _remove_empty(directory: Path) -> None:
    """Remove the directories left empty, deepest first; a directory still holding anything stays."""
    for dirpath, _, _ in sorted(os.walk(directory), key=lambda w: -len(w[0])):
        with contextlib.suppress(OSError):  # not empty: something is still there, and stays
            os.rmdir(dirpath)
