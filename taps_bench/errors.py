"""User-facing errors: one clear line, exit code 2, no traceback unless --debug."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

# Names are echoed back in messages; one pasted by mistake (a 5000-character --drafter) must not become the message.
SHOWN_NAME = 200


class UserError(Exception):
    """Bad input from the user (a name, a file, a flag). The CLI prints `str(self)` and exits 2."""


class Interrupted(KeyboardInterrupt):
    """An interrupt whose command knows what it leaves behind: the CLI prints `str(self)` instead of the generic
    "every finished sample is stored, re-run to resume" (true of `run`, not of `submit`)."""


def shorten(text: str, limit: int = SHOWN_NAME) -> str:
    """`text` as a message may show it: cut to `limit` characters, saying how long it really was."""
    text = str(text)
    return text if len(text) <= limit else f"{text[: limit - 20]}...({len(text)} characters)"


def unknown_name(kind: str, name: str, known: Iterable[str]) -> UserError:
    known = sorted(known)
    # A name far longer than any known one is close to none of them (and difflib would compare it at length).
    longest = max((len(k) for k in known), default=0)
    close = [] if len(name) > 2 * longest + 10 else difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    # Also suggest names that merely contain what was typed ("hass" -> "mathinstruct-hass").
    close += [k for k in known if name and name.lower() in k.lower() and k not in close][: max(0, 3 - len(close))]
    hint = f"did you mean {', '.join(close)}?" if close else f"known: {', '.join(known) or '(none)'}"
    see = "" if kind == "kind" else f" (see `taps-bench list {'corpora' if kind == 'corpus' else kind + 's'}`)"
    return UserError(f"unknown {kind} '{shorten(name)}': {hint}{see}")
