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
`compare_override_error(argv)` refuses, before Hydra starts, what would break the sweep: a
sampler, run id or sweep of the user's own beside it.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from analysis.metrics import AnalysisConfig
from orchestrator.config import CONF_DIR
from orchestrator.plan import RESULT_KEYS, without_unhashed
from workers.io import config_hash
from workers.runfiles import read_run_config

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

        analysis = OmegaConf.to_object(config.analysis)
        assert isinstance(analysis, AnalysisConfig)
        cfg = dataclasses.replace(analysis, binning=config.compare.binning)
        try:
            if len(self.run_dirs) < self.jobs:
                raise ValueError(f"{self.jobs - len(self.run_dirs)} runs made no run folder")
            out = self.run_dirs[0].parent / comparison_name(self.run_dirs)
            path = write_comparison(compare_samplers(self.run_dirs, cfg), out)
        except (FileNotFoundError, ValueError) as err:
            print(f"error: samplers not compared: {err}", file=sys.stderr)
            sys.exit(2)
        runs = ", ".join(d.name for d in self.run_dirs)
        print(f"samplers compared ({runs}): {path}", file=sys.stderr)
