"""Answer checking for the tasks that have gold answers.

`number` (GSM8K, SVAMP): the model's final number, compared numerically with the gold (27.0 == 27, "1,600" ==
1600). `math` (MATH-500): the maintained math-verify library decides equivalence (\\frac{1}{2} == 0.5, tuples,
intervals, ...); no LaTeX normalisation is written here. `none` (MT-Bench): nothing to score.
"""

from __future__ import annotations

import re
import threading
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from typing import Any

SCORERS = ("number", "math", "none")

# A number: optional sign, either properly comma-grouped digits ("1,234,567") or plain digits, then an optional
# decimal part. The sign counts only when it is not a binary minus ("16-3" is 16 and 3, not 16 and -3); the
# negative lookbehind on digits keeps a match from starting in the middle of a number.
_NUMBER = re.compile(
    r"(?P<sign>(?<![\w).])[-−])?(?<![\d.])(?P<num>(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?)"
)
# Explicit answer markers, in the forms our prompts ask for and models commonly use. The number that follows the
# last marker wins over the last number in the text, which is often a check or a restatement of a sub-result.
# "####" counts only when a number follows at once: models also write "#### Step 2" as a Markdown heading.
_MARKERS = re.compile(r"####(?=[ \t]*\$?[ \t]*[-−]?\d)|answer\s*(?:is|:)|\\boxed\s*\{", re.IGNORECASE)
# Math-verify's own timeout defaults; it implements them with SIGALRM, which only the main thread may use.
_TIMEOUT_S = 5


def _numbers(text: str) -> list[str]:
    return [("-" if m.group("sign") else "") + m.group("num").replace(",", "") for m in _NUMBER.finditer(text)]


def _boxed_content(text: str, start: int) -> str:
    """The text inside the braces of a \\boxed{ whose body starts at `start` (braces balanced)."""
    depth = 1
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start:i]
    return text[start:]


def _extract_number(text: str) -> str | None:
    for marker in reversed(list(_MARKERS.finditer(text))):
        if marker.group(0).startswith("\\"):
            span = _boxed_content(text, marker.end())
        else:
            # Only the rest of the marker's line: "The answer is below." must not pick up a number further on.
            span = text[marker.end():].split("\n", 1)[0]
        found = _numbers(span)
        if found:
            return found[0]
    found = _numbers(text)
    return found[-1] if found else None


def _as_decimal(text: str) -> Decimal | None:
    try:
        return Decimal(text.replace(",", "").replace("−", "-").strip())
    except InvalidOperation:
        return None


def _timeouts() -> int | None:
    # Outside the main thread signal.alarm raises, so run without math-verify's timeout there; a run that scores in
    # worker threads accepts that a pathological answer may take long to parse.
    return _TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def _parse_math(text: str) -> list[Any]:
    from math_verify import parse  # imported lazily: it pulls in sympy, which only the math scorer needs

    return list(parse(text, parsing_timeout=_timeouts()))  # type: ignore[arg-type]


@lru_cache(maxsize=4096)
def _parse_gold(gold: str) -> tuple[Any, ...]:
    # Gold answers are bare LaTeX ("\frac{14}{3}", "\left( 3, \frac{\pi}{2} \right)"); wrapping them in $...$
    # tells math-verify to read the whole string as one expression. Cached: the same gold is checked once per run.
    return tuple(_parse_math(f"${gold}$"))


def _check_scorer(scorer: str) -> None:
    if scorer not in SCORERS:
        raise ValueError(f"unknown scorer {scorer!r}; expected one of {', '.join(SCORERS)}")


def extract_answer(scorer: str, text: str) -> str | None:
    """The answer the scorer reads from a model output, as text (for display and the store); None if none found."""
    _check_scorer(scorer)
    if scorer == "number":
        return _extract_number(text)
    if scorer == "math":
        parsed = _parse_math(text)
        # math-verify returns [sympy object, matched string]; the string is what the model wrote as its answer.
        strings = [p for p in parsed if isinstance(p, str)]
        if strings:
            return strings[-1]
        return str(parsed[0]) if parsed else None
    return None


def is_correct(scorer: str, text: str, gold: str | None) -> bool | None:
    """Whether the output's answer equals the gold; None when the task has no scorer or the example no gold."""
    _check_scorer(scorer)
    if scorer == "none" or gold is None:
        return None
    if scorer == "number":
        answer = _extract_number(text)
        if answer is None:
            return False
        want, got = _as_decimal(gold), _as_decimal(answer)
        if want is None or got is None:
            return answer.strip() == gold.strip()
        return want == got
    from math_verify import verify

    gold_parsed = list(_parse_gold(gold))
    answer_parsed = _parse_math(text)
    if not gold_parsed or not answer_parsed:
        return False
    return bool(verify(gold_parsed, answer_parsed, timeout_seconds=_timeouts()))
