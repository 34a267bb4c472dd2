"""Row labels (`of: row` in the schema): each row's drafter family and draft vocabulary, from its stored settings and
card (for registered drafters, the registry's card), never from a path a stored value names."""

from __future__ import annotations

import math
from typing import Any

from taps_bench.catalog.registry import Registry
from taps_bench.site.cards import drafter_card
from taps_bench.site.rows import Row, finite_number
from taps_bench.site.schema import RowLabel

# The drafter families a stored value may name (a run's `drafter_family`, a card's `method`), as shown, in the order
# they were published: a family column sorts by it. "other" is the word a submission card may use.
FAMILIES = {"eagle1": "EAGLE-1", "eagle2": "EAGLE-2", "hass": "HASS", "eagle3": "EAGLE-3", "other": "other",
            "pld": "PLD (model-free)"}
UNKNOWN_MEMBER = "?"  # a combiner's member whose family nothing stored says
MAX_VOCAB = 2**31  # a larger stored "vocabulary size" is no vocabulary (bundles come from anybody)


def row_labels(row: Row, reg: Registry | None = None) -> dict[str, RowLabel | None]:
    """The schema's row labels (site.schema.ROW_LABELS) of `row`, read from stored data only: its settings, its
    provenance, the card it shows (site.cards, which never reads a path a stored value names), and for the members
    of a combiner measured here the registry's cards of their names. None: nothing stored says."""
    return {"family": _family_label(_families(row, reg)), "draft_vocab": _draft_vocab(row)}


def _family_id(value: Any) -> str | None:
    # Only the known ids: stored text is never echoed into a label.
    return value if isinstance(value, str) and value in FAMILIES else None


def _families(row: Row, reg: Registry | None) -> list[str | None]:
    """The family of each drafter of the row (None where unknown); empty when the row names no drafter."""
    if row.kind == "published":
        return [_family_id(f) for f in row.published_family]
    if row.kind == "oracle":  # picks among drafters per question after the fact: no family of its own
        return []
    if row.kind == "combiner":
        members = row.settings.get("drafters")
        # A submitted row must not borrow the registry's word for a name it uses (site.cards says why).
        lookup = reg if row.submission is None else None
        return [_member_family(m, lookup) for m in members] if isinstance(members, list) else []
    # What the run measured first (an EAGLE-3 checkpoint records it), else the method of the card the row shows:
    # the EAGLE-1/2/HASS checkpoint format is one, so only a card tells those apart.
    own = _family_id(row.settings.get("drafter_family"))
    if own is None:
        card, _ = drafter_card(reg, row)
        own = _family_id(card.get("method")) if card else None
    return [own]


def _member_family(member: Any, reg: Registry | None) -> str | None:
    if not isinstance(member, dict):
        return None
    own = _family_id(member.get("drafter_family"))
    name = member.get("name")
    if own is None and reg is not None and isinstance(name, str) and name in reg.cards["drafter"]:
        own = _family_id(getattr(reg.cards["drafter"][name], "method", None))
    return own


def _family_label(families: list[str | None]) -> RowLabel | None:
    """"EAGLE-3", or a combiner's members joined ("EAGLE-2 + HASS"); sorted by the members' families in order of
    publication, member by member (one digit each)."""
    if not any(families):
        return None
    order = list(FAMILIES)
    text = " + ".join(FAMILIES[f] if f else UNKNOWN_MEMBER for f in families)
    sort = sum((order.index(f) + 1 if f else 9) * 10.0 ** -i for i, f in enumerate(families))
    return RowLabel(text, sort)


def _vocab_size(value: Any) -> int | None:
    number = finite_number(value)
    return int(number) if number is not None and number.is_integer() and 1 <= number < MAX_VOCAB else None


def _draft_vocab(row: Row) -> RowLabel | None:
    """The vocabulary the row's drafters score: "N" for a reduced one, "full (N)" for the target's whole vocabulary
    (N: the target's size when the run's provenance records it), sorted by size."""
    if row.kind in ("oracle", "published"):
        return None
    full = next((_vocab_size(p.get("target_vocab_size")) for p in row.provenance
                 if isinstance(p, dict) and p.get("target_vocab_size") is not None), None)
    settings = row.settings
    if row.kind == "drafter" and isinstance(settings.get("model_free"), dict):
        # A model-free drafter (PLD) copies tokens from its context: it scores no vocabulary at all.
        return RowLabel("none (copies)", 0)
    reduced = settings.get("draft_vocab")
    if row.kind == "drafter" and ("draft_vocab_size" in settings or reduced is not None):
        # An EAGLE-3 drafter's own draft vocabulary (its d2t map), or an EAGLE-2/HASS run's reduced one (FR-Spec).
        raw = settings["draft_vocab_size"] if "draft_vocab_size" in settings else \
            reduced.get("size") if isinstance(reduced, dict) else None
        size = _vocab_size(raw)
        if size is None:
            return None  # a stored size that is no size
        if size != full:
            return RowLabel(str(size), size)
    # Neither: the full vocabulary (runs stored before reduced vocabularies too); combiners always draft over it
    # (measure.resolve.build_proposer).
    return RowLabel(f"full ({full})" if full else "full", full if full else math.inf)
