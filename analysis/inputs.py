"""Which score files belong to a run: the ones its current plan wrote, intact.

Contract: `select_score_files(run_dir) -> ScoreInputs`. The driver writes `runs/<id>/plan.json`
(orchestrator/plan.py, `write_plan`; read by workers.runfiles.read_plan) before each run's
stages, with `"scores": null`, and again once the scoring units are known, listing each unit's file (relative to the run dir)
and the settings hash its sidecar must carry, plus the (model, dataset) cells left unscored.
A score file is used only when

- the plan lists it, and its sidecar's `config_hash` equals the planned one (not "stale":
  left by another seed, layer set or shard size), and
- it verifies against its sidecar (workers.io.verify: a well-formed sidecar naming this file,
  its row count, its sha256), else it is "corrupt", named with what is wrong. The report reads
  every byte of its input anyway, so the check costs one more sequential read of files the
  page cache then holds.

Planned units without such a file are "missing". A run dir without plan.json (made by hand,
or by a version that did not write one) uses every score file with a sidecar that verifies,
and says so. `"scores": null` means the driver has not planned scoring yet (it stopped before
the trajectories were complete): nothing can be said to belong to the run, which is an error.
`select_generated_files(run_dir)` selects the generated trajectory files the report
summarises the same way (there is no plan for them: every one that verifies; the others are
named as corrupt). Plain file reads: no Ray, no model, no Polars.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from workers.io import CorruptFile, IncompleteFileError, StaleFile, done_path, verify
from workers.runfiles import PLAN_FILE, read_plan

SCORES_GLOB = "scores/*/layer=*/*/*.arrow"  # runs/<id>/scores/<model>/layer=<L>/<dataset>/
GENERATED_GLOB = "trajectories/*/*/generated/*.arrow"


@dataclass
class ScoreInputs:
    files: list[Path]  # the score files to read, sorted
    planned: int | None  # units in plan.json; None without one
    missing: list[str] = field(default_factory=list)  # planned, no complete file
    stale: list[str] = field(default_factory=list)  # a sidecar of other settings, or unplanned
    corrupt: list[str] = field(default_factory=list)  # "<unit or file> (<what is wrong>)"
    unscored: list[str] = field(default_factory=list)  # cells the driver could not score
    # generated trajectory files left out of the generation summary: "<file> (<what is wrong>)"
    corrupt_trajectories: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.planned is not None and not self.partial

    @property
    def partial(self) -> bool:
        """Some input of the run is left out: the results cover only part of it."""
        return bool(
            self.missing or self.stale or self.corrupt or self.unscored or self.corrupt_trajectories
        )

    def problems(self, limit: int = 10) -> list[str]:
        """One line per kind of problem, naming up to `limit` units each."""
        out = []
        if self.planned is None:
            out.append(f"no {PLAN_FILE}: every score file with a verified sidecar was used")
        for what, items in (
            ("missing", self.missing),
            ("stale (other settings or not in the plan)", self.stale),
            ("corrupt or tampered (not as their sidecar says)", self.corrupt),
            ("not scored", self.unscored),
            ("trajectory files corrupt or tampered", self.corrupt_trajectories),
        ):
            if items:
                shown = ", ".join(items[:limit]) + (
                    f" and {len(items) - limit} more" if len(items) > limit else ""
                )
                out.append(f"{len(items)} {what}: {shown}")
        return out


def select_score_files(run_dir: str | Path, under: str | None = None) -> ScoreInputs:
    """The score files of `run_dir` that belong to its current plan, and what is wrong with
    the rest (see the module docstring); with `under` (e.g. "scores/tiny/layer=3/"), only
    those whose path relative to the run starts with it. Raises ValueError for an unreadable
    or unfinished plan."""
    run_dir = Path(run_dir)
    plan = read_plan(run_dir)
    present = {p.relative_to(run_dir).as_posix(): p for p in sorted(run_dir.glob(SCORES_GLOB))}
    if under is not None:
        present = {rel: p for rel, p in present.items() if rel.startswith(under)}
    if plan is None:
        inputs = ScoreInputs(files=[], planned=None)
        for rel, path in present.items():
            _check(path, rel, None, inputs)
        return inputs
    if plan["scores"] is None:
        raise ValueError(
            f"{run_dir.name}: the driver has not planned its scoring yet (it stopped before the "
            "trajectories were complete); rerun it to finish the run"
        )
    planned = {u["path"]: u for u in plan["scores"]}
    if under is not None:
        planned = {rel: u for rel, u in planned.items() if rel.startswith(under)}
    inputs = ScoreInputs(files=[], planned=len(planned), unscored=list(plan["unscored"]))
    for rel, unit in planned.items():
        if rel not in present:
            inputs.missing.append(unit["unit"])
        else:
            _check(present[rel], unit["unit"], unit["config_hash"], inputs)
    inputs.stale += [  # ours, or made to look so: named, never read
        rel for rel, path in present.items() if rel not in planned and done_path(path).exists()
    ]
    return inputs


def _check(path: Path, name: str, want: str | None, inputs: ScoreInputs) -> None:
    try:
        verify(path, want)
    except StaleFile:
        inputs.stale.append(name)
    except CorruptFile as err:
        inputs.corrupt.append(f"{name} ({err.reason})")
    except IncompleteFileError:
        inputs.missing.append(name)
    else:
        inputs.files.append(path)


def select_generated_files(
    run_dir: str | Path, pattern: str = GENERATED_GLOB
) -> tuple[list[Path], list[str]]:
    """(generated trajectory files matching `pattern` that verify, sorted; one
    "<file> (<what is wrong>)" per file whose sidecar exists but does not verify). Files
    without a sidecar are in progress or foreign: neither read nor named."""
    run_dir = Path(run_dir)
    files, corrupt = [], []
    for path in sorted(run_dir.glob(pattern)):
        try:
            verify(path)
        except CorruptFile as err:
            corrupt.append(f"{path.relative_to(run_dir).as_posix()} ({err.reason})")
        except IncompleteFileError:
            continue
        else:
            files.append(path)
    return files, corrupt
