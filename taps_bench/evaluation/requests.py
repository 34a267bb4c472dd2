"""lm-eval's requests as the taps-bench engine needs them: model_args values, generation settings, stop strings."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from taps_bench.decoding.sampling import Sampling
from taps_bench.errors import UserError

MAX_TOKEN_KEYS = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")


def flag(value: Any, name: str) -> bool:
    """model_args come as Python values or as text from lm-eval's `k=v,...` strings ("True", "false", "1")."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off", ""):
            return False
        raise UserError(f"model_args {name}={value!r}: expected true or false")
    return bool(value)


def opt_int(value: Any, name: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise UserError(f"model_args {name}={value!r}: expected an integer") from None


def split_names(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """Drafter names: a list, or text separated by '+' (lm-eval splits model_args on commas) or commas."""
    if value is None:
        return ()
    parts = re.split(r"[+,]", value) if isinstance(value, str) else [str(v) for v in value]
    return tuple(p.strip() for p in parts if p.strip())


class StopStrings:
    """`stop_when` for the engine: True once the generated text contains one of lm-eval's `until` strings.

    Only the tail of the output is decoded (every token decodes to at least one character, so the last
    len(longest stop) + 2 tokens hold any stop string that the newest token completed); special tokens are kept, as
    lm-eval's own stopping criteria keep them. A miss would only cost decoding time: the returned text is always cut
    at the first stop string of the full decode, exactly as lm-eval's HF model does.
    """

    def __init__(self, tokenizer: Any, stops: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.window = max((len(s) for s in self.stops), default=0) + 2

    def __call__(self, ids: list[int]) -> bool:
        if not self.stops:
            return False
        tail = self.tokenizer.decode(ids[-self.window:], skip_special_tokens=False)
        return any(s in tail for s in self.stops)


def cut_at_stops(text: str, stops: Sequence[str]) -> str:
    """lm-eval's post-processing: the text before the first occurrence of any stop string."""
    for s in stops:
        if s:
            text = text.split(s)[0]
    return text


@dataclass
class GenerationRequest:
    """One `generate_until` request's settings, normalised the way lm-eval's HF model reads them."""

    sampling: Sampling
    until: list[str]
    max_gen_toks: int
    ignored: dict[str, Any] = field(default_factory=dict)


def generation_request(gen_kwargs: dict[str, Any], default_max: int, seed: int) -> GenerationRequest:
    """Greedy unless do_sample is true with a positive temperature (do_sample unset: sample when temperature > 0)."""
    kw = dict(gen_kwargs or {})
    until = kw.pop("until", None)
    until = [until] if isinstance(until, str) else list(until or [])
    given = [kw.pop(k) for k in MAX_TOKEN_KEYS if k in kw]
    given = [g for g in given if g is not None]
    max_gen = int(given[0]) if given else default_max
    temperature = float(kw.pop("temperature", 0.0) or 0.0)
    do_sample = kw.pop("do_sample", None)
    if do_sample is None:
        do_sample = temperature > 0
    if not do_sample:
        temperature = 0.0
    top_p = float(kw.pop("top_p", 1.0) or 1.0)
    top_k = int(kw.pop("top_k", 0) or 0)
    sampling = (Sampling(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed) if temperature > 0
                else Sampling(seed=seed))
    return GenerationRequest(sampling=sampling, until=until, max_gen_toks=max_gen, ignored=kw)


