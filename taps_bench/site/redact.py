"""No local path on a published page: stored settings, provenance and cards name checkpoint directories, model
stores and data files on the machine that measured them ("path:/home/me/runs/x"). Before a page shows such data,
every absolute path in it (POSIX, home-relative, Windows; file:// and other host-less URLs, such as a SQLite
database's) becomes "…/" and its last component, which is what identifies a drafter; URLs with a host (https://…)
stay as they are."""

from __future__ import annotations

import re
from typing import Any

_STOP = r"[^\s'\"<>`|]"  # a path runs until whitespace, a quote or markup
_PATHS = re.compile(
    rf"file://{_STOP}*"  # a file URL, whole
    rf"|(?<=:)///{_STOP}+"  # the path of a URL with no host (sqlite:////home/me/r.db)
    rf"|(?<![A-Za-z0-9])[A-Za-z]:\\{_STOP}*"  # C:\Users\...
    # /abs/path or ~/path where a value or a word starts (not a/b, not </b>, not the // of a URL)
    rf"|(?<![^\s=:'\"(\[{{,;])~?/(?![/\s]){_STOP}+"
)


def _shorten(match: re.Match[str]) -> str:
    parts = [p for p in re.split(r"[/\\]", match.group(0)) if p and p not in ("file:", "~")]
    return "…/" + parts[-1] if parts else "…"


def redact_text(text: str) -> str:
    return _PATHS.sub(_shorten, text)


def redact(value: Any) -> Any:
    """The value with every absolute local path in its strings (keys too) shortened; other values as they are."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {redact(k) if isinstance(k, str) else k: redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    return value
