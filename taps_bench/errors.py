"""User-facing errors: one clear line, exit code 2, no traceback unless --debug."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """Bad input from the user (a name, a file, a flag). The CLI prints `str(self)` and exits 2."""


def unknown_name(kind: str, name: str, known: Iterable[str]) -> UserError:
    known = sorted(known)
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    # Also suggest names that merely contain what was typed ("hass" -> "mathinstruct-hass").
    close += [k for k in known if name and name.lower() in k.lower() and k not in close][: max(0, 3 - len(close))]
    hint = f"did you mean {', '.join(close)}?" if close else f"known: {', '.join(known) or '(none)'}"
    see = "" if kind == "kind" else f" (see `taps-bench list {'corpora' if kind == 'corpus' else kind + 's'}`)"
    return UserError(f"unknown {kind} '{name}': {hint}{see}")
