"""`compare=samplers`: one config scored with every route sampler, then the runs compared.

Contract: conf/compare/samplers.yaml makes the command a Hydra multirun over `scoring.sampler`
(gumbel, uniform_pool, uniform_all). Each job is an ordinary run (its own run id, folder and
resume); `orchestrator.__main__.main` returns the job's run folder, which Hydra hands to
`SamplerComparison.on_job_end`. When every job has returned one, `on_multirun_end` compares
the runs with analysis.samplers (same tokens, per bin, with intervals) and writes
samplers.{md,parquet,csv} to `<runs_dir>/samplers-<model-or-sweep>-<hash8>/`, the hash being of
the config the runs share (the run id's settings without the sampler), so the same command
writes the same folder; its path goes to stderr. A dry run returns no folder: nothing is
compared. Runs that cannot be compared end the command with one `error:` line, exit 2.
The runs generate the same seeded trajectories: `share_trajectories` lets a run take them
from a sibling that has them instead of generating them again.
`compare_override_error(argv)` refuses, before Hydra starts, what would break the sweep: a
sampler, run id or sweep of the user's own beside it.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from analysis.metrics import AnalysisConfig
from orchestrator.config import CONF_DIR, RunConfig, config_tree
from orchestrator.plan import RESULT_KEYS, derive_run_id, without_unhashed
from workers.atomic import atomic_file
from workers.io import config_hash, done_path, is_complete
from workers.runfiles import read_run_config
from workers.scoring.routes import SAMPLERS

SWEPT = "scoring.sampler"  # the key compare=samplers sweeps (conf/compare/samplers.yaml)


def compare_override_error(argv: list[str]) -> str | None:
    """Why these command-line overrides cannot go with `compare=<option>`, or None (also
    when no comparison is asked for). Each job of the comparison sets the sampler itself and
    derives its own run id; a sweep of the user's own would multiply the jobs."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parsed = []
    for arg in (a for a in argv if not a.startswith("-")):
        try:
            parsed.extend(OverridesParser.create().parse_overrides([arg]))
        except (HydraException, ValueError):
            continue  # Hydra's own message says what is wrong with it
    options = {p.stem for p in (CONF_DIR / "compare").glob("*.yaml")} - {"none"}
    asked = [o for o in parsed if o.key_or_group == "compare"]
    if asked and asked[-1].is_sweep_override():
        return f"compare is one option per command, not a sweep: {asked[-1].input_line}"
    if not asked or asked[-1].value() not in options:
        return None  # no comparison, or an unknown option (Hydra's own message)
    name = f"compare={asked[-1].value()}"
    for o in parsed:
        if o.is_sweep_override():
            return (
                f"{name} runs its own sweep over {SWEPT}; drop the sweep"
                f" {o.input_line} (or run it without {name})"
            )
        if o.key_or_group == SWEPT:
            return f"{name} scores with every sampler; drop {o.input_line}"
        if o.key_or_group == "run_id":
            return f"{name} runs one run per sampler, each with its derived id; drop {o.input_line}"
    return None


def comparison_name(run_dirs: list[Path]) -> str:
    """samplers-<model-or-sweep>-<hash8>: the hash of the settings the runs share (their
    config.yaml's result keys, the sampler left out); ValueError if those differ."""
    shared = []
    for run_dir in run_dirs:
        config = read_run_config(run_dir) or {}
        tree = {k: config[k] for k in RESULT_KEYS if k in config}
        tree["scoring"] = {k: v for k, v in (tree.get("scoring") or {}).items() if k != "sampler"}
        shared.append(without_unhashed(tree))
    if any(tree != shared[0] for tree in shared):
        names = ", ".join(d.name for d in run_dirs)
        raise ValueError(f"runs {names} differ in more than {SWEPT}: not one comparison")
    prefix = run_dirs[0].name.rpartition("-")[0] or run_dirs[0].name
    return f"samplers-{prefix}-{config_hash(shared[0])[:8]}"


def share_trajectories(cfg: RunConfig, run_dir: Path) -> list[str]:
    """Under `compare=samplers`, the generated trajectory files that a sibling run (the same
    settings, another sampler) already holds, copied into `run_dir` where it has none, each
    after its sidecar verifies (sha256 included), data file first. A generation unit's hash
    covers no scoring setting, so a copy is a complete unit here and the stage skips it (a
    copy that does not verify against this run's plan is redone, like any file). Returns the
    run ids copied from; no ids or hashes change."""
    if cfg.compare.name != "samplers":
        return []
    taken = []
    for sampler in SAMPLERS:
        other = dataclasses.replace(cfg, scoring=dataclasses.replace(cfg.scoring, sampler=sampler))
        sibling = run_dir.parent / derive_run_id(other, config_tree(other))
        if sibling == run_dir or not sibling.is_dir():
            continue
        copied = 0
        for src in sorted(sibling.glob("trajectories/*/*/generated/*.arrow")):
            dst = run_dir / src.relative_to(sibling)
            if dst.exists() or dst.is_symlink() or not is_complete(src):
                continue
            try:
                for a, b in ((src, dst), (done_path(src), done_path(dst))):
                    with open(a, "rb") as fin, atomic_file(b, root=run_dir) as fout:
                        shutil.copyfileobj(fin, fout)
            except OSError as err:  # e.g. a folder replaced by a link: this run generates it
                print(f"warning: {dst} not copied from {sibling.name}: {err}", file=sys.stderr)
                continue
            copied += 1
        if copied:
            taken.append(sibling.name)
            print(f"[compare] {copied} generated files taken from {sibling.name}", file=sys.stderr)
    return taken


class SamplerComparison(Callback):
    """The Hydra callback of conf/compare/samplers.yaml (module docstring)."""

    def __init__(self) -> None:
        self.run_dirs: list[Path] = []
        self.jobs = 0

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.run_dirs, self.jobs = [], 0

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        self.jobs += 1
        if job_return.status == JobStatus.COMPLETED and job_return.return_value:
            self.run_dirs.append(Path(job_return.return_value))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not self.run_dirs:  # a dry run: no run folder, nothing to compare
            return
        from analysis.samplers import compare_samplers, write_comparison  # Polars, numba

        analysis: AnalysisConfig = OmegaConf.to_object(config.analysis)  # type: ignore[assignment]
        cfg = dataclasses.replace(analysis, binning=config.compare.binning)
        try:
            if len(self.run_dirs) < self.jobs:
                raise ValueError(f"{self.jobs - len(self.run_dirs)} runs made no run folder")
            out = self.run_dirs[0].parent / comparison_name(self.run_dirs)
            path = write_comparison(compare_samplers(self.run_dirs, cfg), out)
        except (OSError, ValueError) as err:  # OSError: e.g. its folder replaced by a link
            print(f"error: samplers not compared: {err}", file=sys.stderr)
            sys.exit(2)
        runs = ", ".join(d.name for d in self.run_dirs)
        print(f"samplers compared ({runs}): {path}", file=sys.stderr)
