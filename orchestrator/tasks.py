"""What a unit asks its worker to do: one frozen dataclass per kind of unit.

Contract: each stage (orchestrator/stages/) plans one task per unit (`plan.Unit.task`) and
declares the worker method that takes it as is; Ray pickles it to the actor. A task is neither
hashed nor written anywhere: a unit's path and config hash come from its config slice and
inputs, so a task can change shape without redoing finished units. Fields are checked at
construction, so a malformed task fails in the driver with the field's name, not later as a
traceback from inside an actor.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from workers.generation import SamplingParams

if TYPE_CHECKING:
    from workers.generation.cor_eval import EvalSettings
    from workers.generation.reroute import ReroutePlan
    from workers.router.update import UpdateConfig


@dataclass(frozen=True)
class GenerationTask:
    """Sample, verify and write the trajectories of problems `rows` = [start, stop)."""

    problems_path: Path
    rows: tuple[int, int]
    model_name: str
    sampling: SamplingParams
    verifier: str
    instruction: str
    template: str | None
    use_chat_template: bool

    def __post_init__(self) -> None:
        expect(self, problems_path=Path, model_name=str, sampling=SamplingParams, verifier=str)
        expect(self, instruction=str, template=(str, type(None)), use_chat_template=bool)
        start, stop = expect_rows(self)
        if not 0 <= start < stop:
            raise ValueError(f"GenerationTask.rows must satisfy 0 <= start < stop, got {self.rows}")


@dataclass(frozen=True)
class CeiTask:
    """Counterfactual Expert Impact of the trajectory shard `in_path` at decoder layer `layer`,
    k-1 routes gated by `gating` (workers.scoring.cei)."""

    in_path: Path
    layer: int
    gating: str

    def __post_init__(self) -> None:
        expect(self, in_path=Path, layer=int, gating=str)


@dataclass(frozen=True)
class CorEvalTask:
    """Score the questions `rows` = [start, stop) of `problems_path` with the model routed by
    `plan` (workers.generation.reroute.ReroutePlan), labelled `condition`
    (workers.generation.cor_eval)."""

    problems_path: Path
    rows: tuple[int, int]
    kind: str  # the questions' layout: its loader, truthful_qa or trivia_qa
    condition: str
    plan: ReroutePlan
    settings: EvalSettings

    def __post_init__(self) -> None:
        expect(self, problems_path=Path, kind=str, condition=str)
        start, stop = expect_rows(self)
        if not 0 <= start < stop:
            raise ValueError(f"CorEvalTask.rows must satisfy 0 <= start < stop, got {self.rows}")


@dataclass(frozen=True)
class ScoringTask:
    """Score the trajectory shard `in_path` at decoder layer `layer` (with `draws`, a
    complete scores file of the same tokens: its alternative routes, not fresh draws)."""

    in_path: Path
    layer: int
    draws: Path | None = None

    def __post_init__(self) -> None:
        expect(self, in_path=Path, layer=int)


@dataclass(frozen=True)
class PreferenceTask:
    """Select the preference and anchor tokens of `scores` (the shards they scored are
    `shards`) and record the router input at each, at layer `layer`."""

    scores: tuple[Path, ...]
    shards: tuple[Path, ...]
    layer: int
    update: UpdateConfig

    def __post_init__(self) -> None:
        expect(self, scores=tuple, shards=tuple, layer=int)
        expect_update(self)
        for name in ("scores", "shards"):
            if not all(isinstance(p, Path) for p in getattr(self, name)):
                raise TypeError(f"PreferenceTask.{name} must be a tuple of Path")


@dataclass(frozen=True)
class TrainTask:
    """Train the router of layer `layer` on `preferences`; write the updated model to
    `checkpoint`, its README naming `source` as the model it started from. A `control`
    ("random", "shuffled"; "" = the real update) first replaces the preference tokens' targets
    (workers.router.update.control_targets, seeded by update.seed; "random" draws from the
    training `scores`)."""

    preferences: Path
    checkpoint: Path
    layer: int
    update: UpdateConfig
    source: str
    control: str = ""
    scores: tuple[Path, ...] = ()

    def __post_init__(self) -> None:
        expect(self, preferences=Path, checkpoint=Path, layer=int, source=str, control=str)
        expect_update(self)


def expect(task: object, **kinds: type | tuple[type, ...]) -> None:
    """Raise TypeError naming the first field of `task` that is not of its kind (bool is not
    taken for int: a flag where a layer belongs is a bug)."""
    for name, kind in kinds.items():
        value = getattr(task, name)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise TypeError(
                f"{type(task).__name__}.{name} must be {names}, got {type(value).__name__}"
                f" {value!r}"
            )


def expect_rows(task: GenerationTask) -> tuple[int, int]:
    rows = task.rows
    if not (
        isinstance(rows, tuple)
        and len(rows) == 2
        and all(isinstance(r, int) and not isinstance(r, bool) for r in rows)
    ):
        raise TypeError(f"GenerationTask.rows must be a (start, stop) tuple of int, got {rows!r}")
    return rows


def expect_update(task: PreferenceTask | TrainTask) -> None:
    # Imported here: workers.router.update loads torch, which only the router stage needs.
    from workers.router.update import UpdateConfig

    expect(task, update=UpdateConfig)
