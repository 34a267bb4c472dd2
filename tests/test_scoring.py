"""Answer extraction and checking: the number scorer (GSM8K, SVAMP) and math-verify (MATH-500)."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from taps_bench.data.scoring import extract_answer, is_correct

DATA = Path(os.environ.get("TAPS_BENCH_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


# -- number ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("She makes 9 * 2 = $18 every day.\nThe answer is 18", "18"),
        ("The answer is $1,600.", "1600"),
        ("Total: 16 - 3 - 4 = 9 eggs, 9 * 2 = 18", "18"),  # no marker: the last number; "-3" is not negative
        ("So the answer is 42. Check: 42 - 2 = 40", "42"),  # the marked number beats the last one
        ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "72"),
        ("#### Step 1\nAdd them: 3 + 4 = 7", "7"),  # a Markdown heading is not the GSM8K marker
        ("Thus the total is $\\boxed{1,234}$ dollars (5 bags).", "1234"),
        ("**Answer:** -10 degrees", "-10"),
        ("The answer is 18.50", "18.50"),
        ("I cannot tell.", None),
    ],
)
def test_extract_number(text: str, expected: str | None) -> None:
    assert extract_answer("number", text) == expected


@pytest.mark.parametrize(
    ("text", "gold", "correct"),
    [
        ("3 + 15 = 18.\nThe answer is 18", "18", True),
        ("The answer is 1,600", "1,600", True),  # GSM8K golds keep their commas
        ("The answer is 1600.", "1,600", True),
        ("The answer is 27", "27.0", True),  # SVAMP gold written as a float
        ("The answer is 27.00", "27", True),
        ("\\boxed{-3}", "-3", True),
        ("The answer is 17", "18", False),
        ("The answer is 1,601", "1,600", False),
        ("So the answer is 18. Actually wait 19", "19", False),  # the marked answer counts
        ("no number at all", "5", False),
    ],
)
def test_number_correct(text: str, gold: str, correct: bool) -> None:
    assert is_correct("number", text, gold) is correct


def test_gsm8k_reference_solutions_score_correct() -> None:
    rows = [json.loads(line) for line in (DATA / "gsm8k" / "test.jsonl").read_text(encoding="utf-8").splitlines()]
    golds = [r["answer"].split("#### ")[-1] for r in rows]
    assert all(is_correct("number", r["answer"], g) for r, g in zip(rows, golds, strict=True))
    assert not is_correct("number", rows[0]["answer"], golds[1])


# -- math ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "gold", "correct"),
    [
        ("So $x = \\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}", True),
        ("The answer is \\boxed{0.5}", "\\frac{1}{2}", True),
        ("\\boxed{\\dfrac12}", "\\frac{1}{2}", True),
        ("Hence $\\boxed{(3,\\frac{\\pi}{2})}$.", "\\left( 3, \\frac{\\pi}{2} \\right)", True),
        ("\\boxed{90}", "90^\\circ", True),
        ("\\boxed{3\\sqrt{13}}", "3\\sqrt{13}", True),
        ("\\boxed{0.6}", "\\frac{1}{2}", False),
        ("\\boxed{(3,\\pi)}", "\\left( 3, \\frac{\\pi}{2} \\right)", False),
        ("\\boxed{\\sqrt{13}}", "3\\sqrt{13}", False),
        ("I do not know.", "\\frac{1}{2}", False),
    ],
)
def test_math_correct(text: str, gold: str, correct: bool) -> None:
    assert is_correct("math", text, gold) is correct


def test_math_extract() -> None:
    assert extract_answer("math", "so the answer is $\\boxed{3\\sqrt{13}}$.") == "3\\sqrt{13}"
    assert extract_answer("math", "nothing to see") is None


def test_math500_reference_solutions_score_correct() -> None:
    rows = [json.loads(line) for line in (DATA / "math500" / "test.jsonl").read_text(encoding="utf-8").splitlines()]
    wrong = [r["unique_id"] for r in rows if not is_correct("math", r["solution"], r["answer"])]
    assert wrong == []


def test_math_in_a_worker_thread() -> None:
    # math-verify's timeouts use SIGALRM, which raises outside the main thread; scoring must still work there.
    results: list[object] = []

    def work() -> None:
        try:
            results.append((is_correct("math", "\\boxed{0.5}", "\\frac{1}{2}"),
                            is_correct("math", "\\boxed{2}", "3"), extract_answer("math", "\\boxed{7}")))
        except Exception as exc:  # pragma: no cover - reported below
            results.append(exc)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(timeout=60)
    assert results == [(True, False, "7")]


# -- none and misuse -------------------------------------------------------------------------------------------


def test_none_scorer_and_missing_gold() -> None:
    assert is_correct("none", "anything", "5") is None
    assert extract_answer("none", "The answer is 5") is None
    assert is_correct("number", "The answer is 5", None) is None
    assert is_correct("math", "\\boxed{5}", None) is None


def test_unknown_scorer() -> None:
    with pytest.raises(ValueError, match="unknown scorer"):
        is_correct("exact", "5", "5")
