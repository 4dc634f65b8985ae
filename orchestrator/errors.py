"""The driver's errors: what stops a run, as one line for the user.

Contract: `ConfigError` (a bad config value: orchestrator.config's checks), `PipelineError`
and its subclasses end a run with exit code 2 and their message as the one `error:` line
(orchestrator/__main__.py); `last_line` shortens an exception raised far away (a Ray actor's
traceback) to that line. Imports nothing of the project, so every module of the driver can
use it.
"""

from __future__ import annotations


class PipelineError(RuntimeError):
    """The run cannot go on (e.g. nothing verified to score); the message says why."""


class ConfigError(ValueError):
    """A config value is invalid; the message is one line naming the key and what is valid."""


class ActorStartError(PipelineError):
    """An actor could not be created or placed (its __init__ raised, or it did not start in
    time); every unit of its pool would fail, so the run stops. The message is the cause."""


def last_line(err: BaseException | str) -> str:
    """The last non-empty line of an error message (tracebacks end with the cause)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__
