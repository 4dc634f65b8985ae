"""Answer verification: does a completion's final answer equal the gold answer?

Contract: `verify(kind, text, gold, *, timeout_s=5.0) -> Verdict(verified, extracted, reason)`
and its batch form `verify_many(kind, [(text, gold), ...], timeout_s=...)`. Whatever the text
(garbage, no answer, an answer sympy chokes on, a looping 200k-character completion), the
result is a Verdict within `timeout_s` of the call for each pair, never an exception; only an
unknown `kind` (a config error) or a verifier process that cannot start raises.

Kinds:
- "exact": the demo task. `workers.generation.demo_task.extract_answer` reads the answer; string equality.
- "math": the content of the LAST `\\boxed{...}` (nested braces handled) is the answer; it is
  compared with math-verify as `verify(parse(gold), parse(answer))`, gold first as math-verify
  documents. A completion without a box has no answer: the prompt asks for one.
- "choice": multiple choice (GPQA). The letter A-D in the last `\\boxed{...}`, else the last
  "answer is X" / "Answer: X"; compared with the gold letter.

Reasons: "match", "mismatch", "no_answer", "parse_error" (the answer is not a math expression /
not a letter), "timeout", "error: ..." (the checker failed on this input).

One deadline for all of it: extraction and comparison of every kind run in one small reusable
child process per caller process, and the caller waits on a pipe with the deadline, killing and
replacing the child when a check takes too long. So a pathological completion costs at most
`timeout_s` wherever verification runs (a generator actor, a thread, the driver). Why a process
and not a thread: math-verify's own timeouts use SIGALRM, which only works on the main thread
of the main interpreter (Ray actors and thread pools are neither), and neither a hung sympy
call nor a slow regex can be interrupted inside the caller. The extractors are linear in the
text anyway (one scan over the braces; regexes without nested quantifiers), so the deadline is
a guard, not the common path. The child starts on first use (~0.3 s) and imports
math-verify/sympy (~1 s) before its first math check, with math-verify's timeouts turned off;
a check costs the pipe round trip (~0.1 ms) plus its own time (a few ms for math); a timeout
costs one child restart.
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

KINDS = ("exact", "math", "choice")
_CHOICES = "ABCD"
# Time allowed for the checker process to start, and to import math-verify/sympy and answer a
# warm-up check before its first math check: not counted against any check's deadline.
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

    `timeout_s` bounds each check separately, extraction included (a slow one fails alone,
    as "timeout", with the extracted answer when extraction had finished).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown verifier kind {kind!r}; valid kinds: {', '.join(KINDS)}")
    return [_CHECKER.check(kind, str(text or ""), str(gold), timeout_s) for text, gold in items]


# ---------------------------------------------------------------------------------------------
# Extraction: linear in the length of the text


# A box opener, or any other brace: the only tokens the brace scan looks at.
_BRACES = re.compile(r"\\(?:boxed|fbox)\s*\{|[{}]")


def extract_boxed(text: str) -> str | None:
    """The content of the last complete `\\boxed{...}` (or `\\fbox{...}`) in `text`, stripped.

    Braces nest (`\\boxed{\\frac{1}{2}}` -> `\\frac{1}{2}`); a box left open (a completion cut
    off mid-answer) does not count. "Last" is by where the box opens: in
    `\\boxed{a \\boxed{b}}` it is `b`. None when there is no complete box.

    One left-to-right pass over the braces with a stack of the open ones (each remembers where
    its content starts if it opens a box): a `}` closes the innermost open brace, which is the
    brace a depth count started at that box would close; a `}` with nothing open is ignored.
    """
    text = text or ""
    open_at: list[int] = []  # content start of each open brace; -1 for a plain brace
    best_start, found = -1, None
    for match in _BRACES.finditer(text):
        if match.group() == "}":
            if open_at:
                start = open_at.pop()
                if start > best_start:
                    best_start, found = start, text[start : match.start()]
        else:
            open_at.append(match.end() if match.group() != "{" else -1)
    return None if found is None else found.strip()


_LATEX_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mathbf|textrm)\s*\{([^{}]*)\}")
_MAX_WRAPPERS = 8  # nesting levels of \text{...} unwrapped: each level is one pass over the box
_LETTER = re.compile(r"^[\(\[]?\s*([A-Da-d])\s*(?:[\)\]\.:]|\s|$)")
# "answer", optionally "is", then optional ":", "**" and "(" with any spaces between, then the
# letter. Each optional piece starts with its own character, so a failed match backtracks
# linearly (a chain of `\s*`s around optional pieces backtracks as the product of the spaces).
_ANSWER_IS = re.compile(
    r"(?i:answer)(?:\s+(?i:is))?\s*(?:[:：]\s*)?(?:\*+\s*)?(?:[\(\[]\s*)?([A-D])(?![A-Za-z0-9])"
)


def extract_choice(text: str) -> tuple[str | None, str | None]:
    """(letter, raw): the final multiple-choice letter, and the text it was read from."""
    boxed = extract_boxed(text)
    if boxed is not None:
        cleaned = boxed
        for _ in range(_MAX_WRAPPERS):
            unwrapped = _LATEX_WRAPPER.sub(r"\1", cleaned)
            if unwrapped == cleaned:
                break
            cleaned = unwrapped
        match = _LETTER.match(cleaned.strip().strip("$").strip())
        if match:
            return match.group(1).upper(), boxed
    matches = _ANSWER_IS.findall(text or "")
    if matches:
        return matches[-1], matches[-1]
    return None, boxed


# ---------------------------------------------------------------------------------------------
# Kinds: run in the checker process. `found(extracted)` reports the answer as soon as it is
# read, so a comparison that runs out of time still says what was extracted.


def _check(kind: str, text: str, gold: str, found: Callable[[str | None], None]) -> Verdict:
    if kind == "exact":
        return _verify_exact(text, gold, found)
    if kind == "choice":
        return _verify_choice(text, gold, found)
    return _verify_math(text, gold, found)


def _verify_exact(text: str, gold: str, found: Callable[[str | None], None]) -> Verdict:
    from workers.generation.demo_task import extract_answer

    try:
        extracted = extract_answer(text)
    except Exception as exc:  # a checker bug on odd input must not stop a whole shard
        return Verdict(False, None, f"error: {type(exc).__name__}")
    found(extracted)
    if extracted is None:
        return Verdict(False, None, "no_answer")
    ok = extracted.strip() == gold.strip()
    return Verdict(ok, extracted, "match" if ok else "mismatch")


def _verify_choice(text: str, gold: str, found: Callable[[str | None], None]) -> Verdict:
    letter, raw = extract_choice(text)
    found(letter or raw)
    if letter is None:
        return Verdict(False, raw, "parse_error" if raw else "no_answer")
    ok = letter == gold.strip().upper()
    return Verdict(ok, letter, "match" if ok else "mismatch")


def _verify_math(text: str, gold: str, found: Callable[[str | None], None]) -> Verdict:
    answer = extract_boxed(text)
    found(answer)
    if not answer:
        return Verdict(False, answer, "no_answer")
    try:
        verified, reason = _check_math(gold, answer)
    except Exception as exc:
        verified, reason = False, f"error: {type(exc).__name__}"
    return Verdict(verified, answer, reason)


def _check_math(gold: str, answer: str) -> tuple[bool, str]:
    """math-verify with its SIGALRM timeouts off (the caller's deadline bounds it)."""
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


# ---------------------------------------------------------------------------------------------
# The checker process


def _serve() -> None:
    """Checker process main loop: one JSON request per stdin line. A check gets two reply
    lines, {"extracted": ...} once the answer is read, then the verdict; {"warm": true} (import
    math-verify and check once) gets {"ready": true}."""
    import logging

    # math-verify warns once that its timeouts are off: the parent enforces them.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    out = sys.stdout.buffer
    sys.stdout = sys.stderr  # stray prints from libraries must not corrupt the protocol

    def reply(message: dict) -> None:
        out.write(json.dumps(message).encode() + b"\n")
        out.flush()

    reply({"ready": True})
    for line in sys.stdin.buffer:
        request = json.loads(line)
        if request.get("warm"):
            _check_math("\\frac{1}{2}", "0.5")  # warm the LaTeX parser before a deadline
            reply({"ready": True})
            continue
        try:
            verdict = _check(
                request["kind"],
                request["text"],
                request["gold"],
                lambda extracted: reply({"extracted": extracted}),
            )
        except Exception as exc:
            verdict = Verdict(False, None, f"error: {type(exc).__name__}")
        reply({"verdict": [verdict.verified, verdict.extracted, verdict.reason]})


class _Checker:
    """One lazily started checker process per caller process, shared by its threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._owner = os.getpid()
        self._buffer = b""
        self._math_ready = False

    def check(self, kind: str, text: str, gold: str, timeout_s: float) -> Verdict:
        with self._lock:
            self._ensure_started(warm_math=kind == "math")
            deadline = time.monotonic() + timeout_s
            request = json.dumps({"kind": kind, "text": text, "gold": gold}).encode() + b"\n"
            extracted = None
            try:
                if not self._write(request, deadline):
                    self._stop()
                    return Verdict(False, None, "timeout")
                while True:
                    reply = self._read_line(deadline)
                    if reply is None:  # deadline passed: the child may be stuck forever
                        self._stop()
                        return Verdict(False, extracted, "timeout")
                    message = json.loads(reply)
                    if "verdict" in message:
                        verified, extracted, reason = message["verdict"]
                        return Verdict(bool(verified), extracted, str(reason))
                    extracted = message.get("extracted")
            except (BrokenPipeError, EOFError, OSError, ValueError):
                self._stop()
                return Verdict(False, extracted, "error: checker process died")

    def _ensure_started(self, *, warm_math: bool) -> None:
        if self._owner != os.getpid():  # forked: the child belongs to the parent process
            self._proc, self._owner, self._buffer = None, os.getpid(), b""
        if self._proc is None or self._proc.poll() is not None:
            self._start()
        if warm_math and not self._math_ready:
            self._handshake(b'{"warm": true}\n')
            self._math_ready = True

    def _start(self) -> None:
        root = str(Path(__file__).resolve().parents[2])
        code = (
            f"import sys; sys.path.insert(0, {root!r}); from workers.generation.verify import _serve; _serve()"
        )
        self._buffer, self._math_ready = b"", False
        self._proc = subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0
        )
        os.set_blocking(self._proc.stdin.fileno(), False)  # writes wait in select, with a deadline
        self._handshake(None)

    def _handshake(self, request: bytes | None) -> None:
        """Send `request` (if any) and wait for {"ready": true}, within the startup time."""
        deadline = time.monotonic() + _STARTUP_TIMEOUT_S
        try:
            sent = request is None or self._write(request, deadline)
            ready = self._read_line(deadline) if sent else None
        except (EOFError, OSError):
            ready = None
        if ready is None or not json.loads(ready).get("ready"):
            self._stop()
            raise RuntimeError("the verifier process did not start (is math-verify installed?)")

    def _write(self, data: bytes, deadline: float) -> bool:
        """Write all of `data` to the child before `deadline`; False if the time ran out."""
        fd, view = self._proc.stdin.fileno(), memoryview(data)
        while view:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            _, writable, _ = select.select([], [fd], [], remaining)
            if writable:
                try:
                    view = view[os.write(fd, view) :]
                except BlockingIOError:
                    continue
        return True

    def _read_line(self, deadline: float) -> bytes | None:
        """One reply line, or None if none arrived by `deadline`; EOFError if the child died."""
        fd = self._proc.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            readable, _, _ = select.select([fd], [], [], remaining)
            if not readable:
                return None
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                raise EOFError("checker process closed its output")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line

    def _stop(self) -> None:
        proc, self._proc, self._buffer, self._math_ready = self._proc, None, b"", False
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


_CHECKER = _Checker()
atexit.register(_CHECKER.close)
