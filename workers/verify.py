"""Answer verification: does a completion's final answer equal the gold answer?

Contract: `verify(kind, text, gold, *, timeout_s=5.0) -> Verdict(verified, extracted, reason)`
and its batch form `verify_many(kind, [(text, gold), ...], timeout_s=...)`. Whatever the text
(garbage, no answer, an answer sympy chokes on), the result is a Verdict, never an exception;
only an unknown `kind` (a config error) or a verifier process that cannot start raises.

Kinds:
- "exact": the demo task. `workers.demo_task.extract_answer` reads the answer; string equality.
- "math": the content of the LAST `\\boxed{...}` (nested braces handled) is the answer; it is
  compared with math-verify as `verify(parse(gold), parse(answer))`, gold first as math-verify
  documents. A completion without a box has no answer: the prompt asks for one.
- "choice": multiple choice (GPQA). The letter A-D in the last `\\boxed{...}`, else the last
  "answer is X" / "Answer: X"; compared with the gold letter.

Reasons: "match", "mismatch", "no_answer", "parse_error" (the answer is not a math expression /
not a letter), "timeout", "error: ..." (the checker failed on this input).

Why a subprocess: math-verify's own timeouts use SIGALRM, which only works on the main thread
of the main interpreter (Ray actors and thread pools are neither), and a hung sympy call cannot
be interrupted inside the caller. So math checks run in one small reusable child process per
caller process (started on first use, ~1 s: importing sympy), with math-verify's timeouts
turned off; the caller waits on a pipe with its own deadline and kills and replaces the child
when an answer takes too long. A check costs the pipe round trip (~0.1 ms) plus math-verify's
own time (a few ms); a timeout costs one child restart.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import select
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

KINDS = ("exact", "math", "choice")
_CHOICES = "ABCD"
# Time allowed for the checker process to import math-verify/sympy and answer a warm-up check.
_STARTUP_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Verdict:
    verified: bool
    extracted: str | None
    reason: str


def verify(kind: str, text: str, gold: str, *, timeout_s: float = 5.0) -> Verdict:
    """Check one completion `text` against `gold`; see the module docstring for kinds."""
    return verify_many(kind, [(text, gold)], timeout_s=timeout_s)[0]


def verify_many(
    kind: str, items: Sequence[tuple[str, str]], *, timeout_s: float = 5.0
) -> list[Verdict]:
    """Check many (text, gold) pairs; one Verdict per pair, in order.

    `timeout_s` bounds each math check separately (a slow one fails alone).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown verifier kind {kind!r}; valid kinds: {', '.join(KINDS)}")
    if kind == "exact":
        return [_verify_exact(text, gold) for text, gold in items]
    if kind == "choice":
        return [_verify_choice(text, gold) for text, gold in items]
    return [_verify_math(text, gold, timeout_s) for text, gold in items]


# ---------------------------------------------------------------------------------------------
# Extraction


_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")


def extract_boxed(text: str) -> str | None:
    """The content of the last complete `\\boxed{...}` (or `\\fbox{...}`) in `text`, stripped.

    Braces nest (`\\boxed{\\frac{1}{2}}` -> `\\frac{1}{2}`); a box left open (a completion cut
    off mid-answer) does not count. None when there is no complete box.
    """
    found = None
    for match in _BOXED.finditer(text or ""):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            char = text[i]
            if char == "{":
                depth += 1
            elif char == "}":
                depth -= 1
                if depth == 0:
                    found = text[start:i].strip()
                    break
    return found


_LATEX_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mathbf|textrm)\s*\{([^{}]*)\}")
_LETTER = re.compile(r"^[\(\[]?\s*([A-Da-d])\s*(?:[\)\]\.:]|\s|$)")
_ANSWER_IS = re.compile(
    r"(?i:answer)(?:\s+(?i:is))?\s*[:：]?\s*\**\s*[\(\[]?\s*([A-D])(?![A-Za-z0-9])"
)


def extract_choice(text: str) -> tuple[str | None, str | None]:
    """(letter, raw): the final multiple-choice letter, and the text it was read from."""
    boxed = extract_boxed(text)
    if boxed is not None:
        cleaned = boxed
        while (unwrapped := _LATEX_WRAPPER.sub(r"\1", cleaned)) != cleaned:
            cleaned = unwrapped
        match = _LETTER.match(cleaned.strip().strip("$").strip())
        if match:
            return match.group(1).upper(), boxed
    matches = _ANSWER_IS.findall(text or "")
    if matches:
        return matches[-1], matches[-1]
    return None, boxed


# ---------------------------------------------------------------------------------------------
# Kinds


def _verify_exact(text: str, gold: str) -> Verdict:
    from workers.demo_task import extract_answer

    try:
        extracted = extract_answer(text or "")
    except Exception as exc:  # a checker bug on odd input must not stop a whole shard
        return Verdict(False, None, f"error: {type(exc).__name__}")
    if extracted is None:
        return Verdict(False, None, "no_answer")
    ok = extracted.strip() == str(gold).strip()
    return Verdict(ok, extracted, "match" if ok else "mismatch")


def _verify_choice(text: str, gold: str) -> Verdict:
    letter, raw = extract_choice(text)
    if letter is None:
        return Verdict(False, raw, "parse_error" if raw else "no_answer")
    ok = letter == str(gold).strip().upper()
    return Verdict(ok, letter, "match" if ok else "mismatch")


def _verify_math(text: str, gold: str, timeout_s: float) -> Verdict:
    answer = extract_boxed(text)
    if not answer:
        return Verdict(False, answer, "no_answer")
    verified, reason = _CHECKER.check(str(gold), answer, timeout_s)
    return Verdict(verified, answer, reason)


# ---------------------------------------------------------------------------------------------
# The math checker process


def _check_math(gold: str, answer: str) -> tuple[bool, str]:
    """Runs in the checker process: math-verify with its SIGALRM timeouts off."""
    from math_verify import parse
    from math_verify import verify as math_verify

    gold_parsed = parse("\\boxed{" + gold + "}", parsing_timeout=None)
    answer_parsed = parse("\\boxed{" + answer + "}", parsing_timeout=None)
    if not answer_parsed:
        return False, "parse_error"
    if gold_parsed and math_verify(gold_parsed, answer_parsed, timeout_seconds=None):
        return True, "match"
    # math-verify falls back to the raw string when sympy cannot read the answer.
    if all(isinstance(item, str) for item in answer_parsed):
        return False, "parse_error"
    return False, "mismatch"


def _serve() -> None:
    """Checker process main loop: one JSON request per stdin line, one JSON reply per line."""
    import logging

    # math-verify warns once that its timeouts are off: the parent enforces them.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    out = sys.stdout.buffer
    sys.stdout = sys.stderr  # stray prints from libraries must not corrupt the protocol
    _check_math("\\frac{1}{2}", "0.5")  # warm the LaTeX parser before the first deadline
    out.write(b'{"ready": true}\n')
    out.flush()
    for line in sys.stdin.buffer:
        request = json.loads(line)
        try:
            verified, reason = _check_math(request["gold"], request["answer"])
        except Exception as exc:
            verified, reason = False, f"error: {type(exc).__name__}"
        out.write(json.dumps({"verified": verified, "reason": reason}).encode() + b"\n")
        out.flush()


class _MathChecker:
    """One lazily started checker process per caller process, shared by its threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._owner = os.getpid()
        self._buffer = b""

    def check(self, gold: str, answer: str, timeout_s: float) -> tuple[bool, str]:
        with self._lock:
            self._ensure_started()
            request = json.dumps({"gold": gold, "answer": answer}).encode() + b"\n"
            try:
                self._proc.stdin.write(request)
                self._proc.stdin.flush()
                reply = self._read_line(timeout_s)
            except (BrokenPipeError, EOFError, OSError):
                self._stop()
                return False, "error: checker process died"
            if reply is None:  # deadline passed: the child may be stuck in sympy forever
                self._stop()
                return False, "timeout"
            message = json.loads(reply)
            return bool(message["verified"]), str(message["reason"])

    def _ensure_started(self) -> None:
        if self._owner != os.getpid():  # forked: the child belongs to the parent process
            self._proc, self._owner, self._buffer = None, os.getpid(), b""
        if self._proc is not None and self._proc.poll() is None:
            return
        root = str(Path(__file__).resolve().parents[1])
        code = (
            f"import sys; sys.path.insert(0, {root!r}); from workers.verify import _serve; _serve()"
        )
        self._buffer = b""
        self._proc = subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0
        )
        try:
            ready = self._read_line(_STARTUP_TIMEOUT_S)
        except EOFError:
            ready = None
        if ready is None or not json.loads(ready).get("ready"):
            self._stop()
            raise RuntimeError(
                "the math verifier process did not start (is math-verify installed?)"
            )

    def _read_line(self, timeout_s: float) -> bytes | None:
        """One reply line, or None if none arrived within `timeout_s`; EOFError if the child died."""
        deadline = time.monotonic() + timeout_s
        fd = self._proc.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            readable, _, _ = select.select([fd], [], [], remaining)
            if not readable:
                return None
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise EOFError("checker process closed its output")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line

    def _stop(self) -> None:
        proc, self._proc, self._buffer = self._proc, None, b""
        if proc is None or self._owner != os.getpid():
            return
        proc.kill()
        proc.wait()
        for stream in (proc.stdin, proc.stdout):
            try:
                stream.close()
            except OSError:
                pass

    def close(self) -> None:
        with self._lock:
            self._stop()


_CHECKER = _MathChecker()
atexit.register(_CHECKER.close)
