"""Answer verification: extraction, math equivalence, timeouts, threads, never an exception."""

import random
import re
import threading
import time

import pytest

from workers.generation.verify import Verdict, extract_boxed, extract_choice, verify, verify_many

# sympy expands this polynomial when comparing it with a number: many seconds, not milliseconds.
SLOW_ANSWER = "\\boxed{(x+1)^{2000}-(x-1)^{2000}}"


def test_extract_boxed_handles_nesting_and_takes_the_last_box():
    assert extract_boxed("so \\boxed{\\frac{1}{2}}.") == "\\frac{1}{2}"
    assert (
        extract_boxed("\\boxed{1} then \\boxed{ \\sqrt{\\frac{a}{b}} }") == "\\sqrt{\\frac{a}{b}}"
    )
    assert extract_boxed("\\boxed{3} and an open \\boxed{\\frac{1}{") == "3"  # cut off: ignored
    assert extract_boxed("\\fbox{7}") == "7"
    assert extract_boxed("no box here") is None
    assert extract_boxed("") is None


@pytest.mark.parametrize(
    ("text", "gold"),
    [
        ("The answer is \\boxed{\\frac{1}{2}}.", "0.5"),
        ("\\boxed{0.5}", "\\frac12"),
        ("\\boxed{2/4}", "\\frac{1}{2}"),
        ("\\boxed{\\dfrac{2}{4}}", "0.5"),
        ("\\boxed{204}", "204"),
        ("\\boxed{024}", "24"),
        ("\\boxed{(3, \\pi/2)}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("\\boxed{\\sqrt{200}}", "10\\sqrt{2}"),
        ("first \\boxed{7}, on reflection \\boxed{8}", "8"),
    ],
)
def test_math_equivalent_forms_match(text, gold):
    verdict = verify("math", text, gold)
    assert verdict == Verdict(True, extract_boxed(text), "match")


@pytest.mark.parametrize(
    ("text", "gold", "reason"),
    [
        ("\\boxed{205}", "204", "mismatch"),
        ("first \\boxed{8}, on reflection \\boxed{7}", "8", "mismatch"),  # the last box counts
        ("I think it is 204.", "204", "no_answer"),
        ("", "204", "no_answer"),
        ("\\boxed{}", "204", "no_answer"),
        ("\\boxed{!!@#}", "3", "parse_error"),
        ("\x00\xff garbage \\boxed{\\frac{", "3", "no_answer"),
    ],
)
def test_math_failures_are_verdicts(text, gold, reason):
    verdict = verify("math", text, gold)
    assert verdict.verified is False
    assert verdict.reason == reason


def test_math_timeout_is_a_verdict_and_the_checker_recovers():
    start = time.monotonic()
    verdict = verify("math", SLOW_ANSWER, "5", timeout_s=0.5)
    assert verdict == Verdict(False, SLOW_ANSWER[7:-1], "timeout")
    assert time.monotonic() - start < 5  # the caller waited for its deadline, not for sympy
    # The stuck checker was replaced: the next call works.
    assert verify("math", "\\boxed{3}", "3").verified


def test_verify_many_keeps_order_and_isolates_a_timeout():
    items = [("\\boxed{1}", "1"), (SLOW_ANSWER, "5"), ("\\boxed{2}", "3"), ("\\boxed{4}", "4")]
    verdicts = verify_many("math", items, timeout_s=0.5)
    assert [v.reason for v in verdicts] == ["match", "timeout", "mismatch", "match"]


def test_math_from_a_non_main_thread():
    results = []
    thread = threading.Thread(target=lambda: results.append(verify("math", "\\boxed{2/4}", "0.5")))
    thread.start()
    thread.join(timeout=60)
    assert results == [Verdict(True, "2/4", "match")]


def test_math_checks_are_cheap_once_started():
    verify("math", "\\boxed{1}", "1")  # start the checker process
    items = [(f"\\boxed{{{i}}}", str(i)) for i in range(50)]
    start = time.monotonic()
    assert all(v.verified for v in verify_many("math", items))
    assert (time.monotonic() - start) / len(items) < 0.1  # measured ~2 ms per check


@pytest.mark.parametrize(
    ("text", "letter"),
    [
        ("... so \\boxed{B}", "B"),
        ("\\boxed{\\text{(C)}}", "C"),
        ("\\boxed{D) the last option}", "D"),
        ("\\boxed{a}", "A"),
        ("Therefore, the answer is (C).", "C"),
        ("Answer: B", "B"),
        ("The answer is A. On reflection, the answer is D", "D"),
        ("\\boxed{A} ... wait, \\boxed{C}", "C"),
    ],
)
def test_choice_extraction(text, letter):
    assert extract_choice(text)[0] == letter
    assert verify("choice", text, letter) == Verdict(True, letter, "match")
    other = "A" if letter != "A" else "B"
    assert verify("choice", text, other).reason == "mismatch"


def test_choice_failures():
    assert (
        verify("choice", "I am not sure, maybe a good answer is a guess", "A").reason == "no_answer"
    )
    assert verify("choice", "\\boxed{42}", "A") == Verdict(False, "42", "parse_error")


def test_exact_uses_the_demo_extractor():
    assert verify("exact", "try 2 : 6 + 7 = 13 no ; answer 6", "6") == Verdict(True, "6", "match")
    assert verify("exact", "try 2 : 6 + 7 = 13 no ; answer 5", "6").reason == "mismatch"
    assert verify("exact", "try 2 : 6 + 7", "6") == Verdict(False, None, "no_answer")


def test_unknown_kind_is_a_config_error():
    with pytest.raises(ValueError, match="valid kinds: exact, math, choice"):
        verify("regex", "x", "y")


# ---------------------------------------------------------------------------------------------
# Linear extraction, one deadline


def reference_boxed(text: str) -> str | None:
    """The plain definition, quadratic: from each box opener, count braces to its close."""
    found = None
    for match in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth = 1
        for i in range(match.end(), len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                found = text[match.end() : i].strip()
                break
    return found


PIECES = ["\\boxed{", "{", "}", "x", "\\fbox{", " ", "\\boxed {", "\\boxed", "\\fbox"]


def test_extract_boxed_agrees_with_the_reference_on_random_strings():
    rng = random.Random(0)
    for _ in range(5000):
        text = "".join(rng.choices(PIECES, k=rng.randint(0, 40)))
        assert extract_boxed(text) == reference_boxed(text), text


# 200k characters of what a looping reasoning model writes, or worse.
N = 200_000
ADVERSARIAL = {
    "unclosed boxes": "\\boxed{" * (N // 7),
    "50k boxes": "\\boxed{" * 50_000,
    "deep nesting": "\\boxed{" + "{" * (N // 2) + "7",
    "open brace run, then an answer": "{" * N + "\\boxed{42}",
    "nested closed boxes": "\\boxed{" * (N // 8) + "}" * (N // 8),
    "spaces after answer": "answer" + " " * N + "is",
    "spaces after a box command": "\\boxed" + " " * N,
    "deep text wrappers": "\\boxed{" + "\\text{" * (N // 6) + "A" + "}" * (N // 6 + 1),
}
BOXED_ANSWERS = {"open brace run, then an answer": "42"}


@pytest.mark.parametrize("name", list(ADVERSARIAL))
def test_extraction_is_linear_on_adversarial_completions(name):
    text = ADVERSARIAL[name]
    start = time.monotonic()
    extract_boxed(text)
    extract_choice(text)
    # The quadratic scan took 21 s on 35k characters of unclosed boxes; this is ~0.1 s.
    assert time.monotonic() - start < 3


HUGE_SUM = "\\boxed{" + "+".join(["1"] * 60_000) + "}"  # 120k characters sympy must read


@pytest.mark.parametrize("kind", ["math", "choice", "exact"])
@pytest.mark.parametrize(
    ("name", "text", "gold", "answer"),
    [
        *((name, text, "42", BOXED_ANSWERS.get(name)) for name, text in ADVERSARIAL.items()),
        ("right answer after 200k", "\\boxed{" * (N // 7) + "\\boxed{42}", "42", "42"),
        ("huge expression", HUGE_SUM, "60000", HUGE_SUM[7:-1]),
    ],
)
def test_verification_of_adversarial_completions_ends_within_its_deadline(
    kind, name, text, gold, answer
):
    verify("math", "\\boxed{1}", "1")  # a started, warm checker: the deadline is the check's
    deadline = 2.0
    start = time.monotonic()
    verdict = verify(kind, text, gold, timeout_s=deadline)
    elapsed = time.monotonic() - start
    assert elapsed < deadline + 1.0, (kind, name, elapsed, verdict.reason)
    if verdict.reason != "timeout":
        if kind == "math" and answer is not None:  # the right answer, or a clean timeout
            assert verdict == Verdict(True, answer, "match")
        else:
            assert not verdict.verified
            assert verdict.reason in ("no_answer", "parse_error", "mismatch"), verdict
    # Whatever happened, the next check works.
    assert verify("math", "\\boxed{3}", "3").verified


def test_a_check_out_of_time_is_a_timeout_verdict():
    verify("exact", "answer 1", "1")
    start = time.monotonic()
    assert verify("exact", "answer 1", "1", timeout_s=0.0) == Verdict(False, None, "timeout")
    assert time.monotonic() - start < 1
    assert verify("exact", "answer 1", "1").verified
