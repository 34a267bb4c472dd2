"""Which card a leaderboard row shows, read only from what is stored (never from a path a stored value names).

A row measured here shows the card its run recorded at measure time (provenance `drafter_card`, see
`measure.resolve`), else the registry's card of an official drafter name. A submitted row shows only its own
submission's card (from the submissions table): a bundle must not borrow an official card's credibility. Every card
is checked before it is shown, since stored data may come from anybody's bundle; one that does not pass is shown as
"card unavailable" instead of stopping the build.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from taps_bench.catalog.registry import Registry
from taps_bench.results.schema import canonical_json
from taps_bench.site.rows import Row

MAX_CARD_CHARS = 20_000  # a card's whole JSON text; larger is not a card, it is a payload
MAX_DEPTH = 8
Short = Annotated[str, Field(max_length=300)]


class ShownCard(BaseModel):
    """The fields the drafter page lays out, with the types it relies on; other fields only appear in the YAML."""

    model_config = ConfigDict(extra="allow", strict=True)

    name: Short | None = None
    description: Annotated[str, Field(max_length=4000)] | None = None
    method: Short | None = None
    license: Short | None = None
    authors: list[Short] = Field(default_factory=list, max_length=50)
    links: list[Annotated[str, Field(max_length=1000)]] = Field(default_factory=list, max_length=30)


def check_card(card: Any) -> tuple[dict[str, Any] | None, str]:
    """(the card, "") when it can be shown, else (None, why not)."""
    if not isinstance(card, dict):
        return None, f"not a mapping but {type(card).__name__}"
    if why := _not_plain(card, 0):
        return None, why
    if len(canonical_json(card)) > MAX_CARD_CHARS:
        return None, f"over {MAX_CARD_CHARS} characters"
    try:
        ShownCard.model_validate(card)
    except ValidationError as exc:
        first = exc.errors()[0]
        return None, f"{'.'.join(map(str, first['loc'])) or 'card'}: {first['msg']}"
    return card, ""


def _not_plain(value: Any, depth: int) -> str:
    """Why a value is not plain JSON data (strings, finite numbers, booleans, null, lists, string-keyed maps)."""
    if depth > MAX_DEPTH:
        return "nested too deeply"
    if isinstance(value, float) and not math.isfinite(value):
        return "holds a non-finite number"
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            return "has a non-string key"
        return next((w for v in value.values() if (w := _not_plain(v, depth + 1))), "")
    if isinstance(value, list):
        return next((w for v in value if (w := _not_plain(v, depth + 1))), "")
    return "" if value is None or isinstance(value, (str, int, float, bool)) else f"holds a {type(value).__name__}"


def stored_card(reg: Registry | None, row: Row) -> tuple[Any, str]:
    """(the raw card a row would show, where it comes from); (None, "") when it has none."""
    if not row.provenance:  # oracles and published numbers have no proposer of their own
        return None, ""
    if row.submission is not None:
        return row.submission.get("card"), f"submission {row.submission.get('id')}"
    for prov in row.provenance:
        if "drafter_card" in prov:
            return prov["drafter_card"], "the run's provenance"
    if reg is not None and row.kind == "drafter" and row.name in reg.cards["drafter"]:
        return reg.cards["drafter"][row.name].model_dump(exclude={"origin"}, mode="json"), "the registry"
    return None, ""


def drafter_card(reg: Registry | None, row: Row) -> tuple[dict[str, Any] | None, str]:
    """(the card to show, "") or (None, why it is unavailable); (None, "") for a row with no card at all."""
    raw, where = stored_card(reg, row)
    if raw is None and not where:
        return None, ""
    card, why = check_card(raw)
    return card, f"the card from {where} is malformed ({why})" if card is None else ""
