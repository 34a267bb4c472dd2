"""The submission card (`taps-bench submit CARD`): what a contributor says about a drafter they send in.

Not a registry card (CARD_TYPES): a submission is never resolved by name; it travels with the result bundle."""

from __future__ import annotations

import re
import unicodedata
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from taps_bench.catalog.cards import ModelSource


class SubmissionCard(BaseModel):
    """A contributor's drafter submission (`taps-bench submit CARD`): what the drafter is, where its checkpoint is,
    and who may be credited for it.

    Kept apart from CARD_TYPES on purpose: a submission is not something the registry resolves by name, it is the
    unit a contributor sends in a pull request together with the result bundle `submit` writes. `checkpoint` reuses
    ModelSource (the shape DrafterForTarget.source has), restricted to the two sources a drafter can come from.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    method: Literal["eagle2", "hass", "eagle3", "other"]
    target: str = Field(min_length=1)  # a registered target name; checked against the registry by `submit`
    checkpoint: ModelSource  # {path: DIR} (relative to the card's directory) or {hub: OWNER/REPO, revision: REV}
    training_data: str = Field(min_length=1)  # corpus and size, e.g. "MathInstruct, 70k conversations"
    license: str = Field(min_length=1)
    authors: list[str] = Field(min_length=1)
    links: list[str] = Field(default_factory=list)
    description: str | None = None

    @field_validator("*", mode="before")
    @classmethod
    def _visible(cls, value: Any, info: ValidationInfo) -> Any:
        # Zero-width and bidirectional controls make a name or a credit read differently from what it is (a name
        # that looks like another's, text shown reversed on the leaderboard).
        if (char := invisible_char(value)) is not None:
            raise ValueError(f"contains U+{ord(char):04X} ({unicodedata.name(char, 'a format character')}), an "
                             "invisible or bidirectional control character; remove it")
        return value

    @field_validator("checkpoint", mode="before")
    @classmethod
    def _drafter_source(cls, source: Any) -> Any:
        # Before ModelSource's own check, whose message would offer `wheel`, which no drafter comes from.
        if isinstance(source, dict):
            if source.get("wheel") or source.get("file"):
                raise ValueError("wheel and file sources are for targets, not drafters")
            given = [k for k in ("path", "hub") if source.get(k)]
            if len(given) != 1:
                raise ValueError(f"needs exactly one of path or hub (got {' and '.join(given) or 'neither'})")
            if source.get("revision") and not source.get("hub"):
                raise ValueError("revision only applies to a hub checkpoint")
        return source

    @field_validator("authors")
    @classmethod
    def _named(cls, authors: list[str]) -> list[str]:
        if any(not a.strip() for a in authors):
            raise ValueError("every author needs a name")
        return authors

    @field_validator("links")
    @classmethod
    def _urls(cls, links: list[str]) -> list[str]:
        bad = [u for u in links if not re.match(r"^https?://\S+$", u)]
        if bad:
            raise ValueError(f"not an http(s) URL: {bad[0]!r}")
        return links


def invisible_char(value: Any) -> str | None:
    """The first format character (Unicode category Cf: zero-width, bidi controls) in a value read from YAML."""
    if isinstance(value, str):
        return next((c for c in value if unicodedata.category(c) == "Cf"), None)
    items = [*value.keys(), *value.values()] if isinstance(value, dict) else \
        value if isinstance(value, (list, tuple)) else []
    return next((c for item in items if (c := invisible_char(item)) is not None), None)
