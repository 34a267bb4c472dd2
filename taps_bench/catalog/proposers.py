"""What names a proposer: one drafter, or a combiner over several drafters with that combiner's typed options.

`ProposerSpec` is the one declaration of proposer options: `run`, `sweep-alpha` and `lm-eval` build it from their
flags, a matrix spec lists them, lm-eval's `taps` model builds one from its model_args. A combiner's own options are
a pydantic model per combiner (`CombinerOptions` subclasses, discriminated on `combiner`, as vllm-project/speculators
types its configs); the registry turns the registered combiners' models into one discriminated union and validates
a spec's options there, once, whoever asked.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator, model_validator


class CombinerOptions(BaseModel):
    """The options every combiner takes; a combiner's own options model subclasses this and fixes `combiner` to its
    name with a Literal (the discriminator)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    combiner: str
    drafters: tuple[str, ...]

    @field_validator("drafters")
    @classmethod
    def _distinct(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        if len(names) < 2:
            raise ValueError(f"a combiner needs at least two drafters (got {len(names)})")
        if len(set(names)) != len(names):
            raise ValueError(f"a combiner's drafters must be distinct (got {', '.join(names)})")
        return names

    def settings(self) -> dict[str, Any]:
        """The options that identify a run of this combiner in the store (beside its drafters' checkpoints)."""
        return self.model_dump(mode="json", exclude={"combiner", "drafters"})


# Cell identities of matrices stored before combiners had their own options models were hashes of a flat spec that
# always carried these three fields; `ProposerSpec.identity` keeps them so that those cells are still found.
LEGACY_OPTION_DEFAULTS: dict[str, Any] = {"alpha": 0.5, "granularity": "step", "budget": "full"}
_OWN_FIELDS = ("drafter", "combiner", "drafters", "options")


# Longest name or path component a file system takes (NAME_MAX, PATH_MAX on Linux): a drafter name is looked up as a
# directory first, and a longer one would make that look-up fail with an OSError instead of an answer.
NAME_MAX, PATH_MAX = 255, 4096


def _usable_name(name: str) -> str:
    if len(name) > PATH_MAX or any(len(part) > NAME_MAX for part in name.split("/")):
        raise ValueError(f"name too long ({len(name)} characters, starting {name[:30]!r}); a drafter or combiner "
                         "is a registered name (see `taps-bench list drafters`) or a checkpoint directory")
    return name


class ProposerSpec(BaseModel):
    """One drafter (`drafter`), or a combiner (`combiner` + `drafters` + its options).

    Written flat (`{combiner: confidence, drafters: [a, b], granularity: prompt}`, as in matrix specs); every field
    that is not one of the spec's own goes to `options`, which `Registry.combiner_options` validates against the
    combiner's model. `options` is a sorted tuple of pairs so that a spec can key a dict (a matrix builds each
    proposer once)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    drafter: str | None = None
    combiner: str | None = None
    drafters: tuple[str, ...] = ()
    options: tuple[tuple[str, Any], ...] = ()

    @model_validator(mode="before")
    @classmethod
    def _flat(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        given = dict(data.get("options") or {})
        given |= {k: v for k, v in data.items() if k not in _OWN_FIELDS}
        out = {k: v for k, v in data.items() if k in _OWN_FIELDS}
        out["options"] = tuple(sorted(given.items()))
        return out

    @field_validator("drafter", "combiner")
    @classmethod
    def _name(cls, name: str | None) -> str | None:
        return None if name is None else _usable_name(name)

    @field_validator("drafters")
    @classmethod
    def _names(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(_usable_name(n) for n in names)

    @model_validator(mode="after")
    def _one_kind(self) -> ProposerSpec:
        if bool(self.drafter) == bool(self.combiner):
            raise ValueError("give either a drafter, or a combiner with its drafters")
        if self.drafter and (self.drafters or self.options):
            extra = [k for k, _ in self.options] + (["drafters"] if self.drafters else [])
            raise ValueError(f"a single drafter takes no combiner options (got {', '.join(extra)})")
        return self

    def names(self) -> tuple[str, ...]:
        """The drafters this proposer reads, in order."""
        return (self.drafter,) if self.drafter else self.drafters

    def flat(self) -> dict[str, Any]:
        """The spec as written: drafter, or combiner + drafters + options."""
        if self.drafter:
            return {"drafter": self.drafter}
        return {"combiner": self.combiner, "drafters": list(self.drafters), **dict(self.options)}

    def identity(self) -> dict[str, Any]:
        """What identifies the spec in a matrix cell's key (stable across releases: see LEGACY_OPTION_DEFAULTS)."""
        return {"drafter": self.drafter, "combiner": self.combiner, "drafters": list(self.drafters),
                **LEGACY_OPTION_DEFAULTS, **dict(self.options)}

    def describe(self) -> str:
        """A short label: the drafter's name, or `combiner(a,b;option=value)`."""
        if self.drafter:
            return self.drafter
        extra = "".join(f";{k}={v:g}" if isinstance(v, float) else f";{k}={v}" for k, v in self.options)
        return f"{self.combiner}({','.join(self.drafters)}{extra})"
