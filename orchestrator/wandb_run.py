"""Weights & Biases for one run: a driver run for live progress, one run per scoring job.

Contract: `WandbSession(cfg, run_id=..., run_dir=..., config=...)` opens the driver run
(group=<run_id>, job_type="driver", name="<run_id>-driver") under `<run_dir>/wandb/`;
`log_progress(metrics)` logs to it at most once every `progress_interval_s` (the latest
metrics win; the last ones are flushed by `finish`); `log_job(model, layer, dataset, metrics)`
logs a scoring job (job_type="score", name "<run_id>/<model>/L<layer>/<dataset>") as soon as
its last unit is written; `log_results(report)` adds to each job's run its per-bin summary
metrics ("fragile/gain_pp", "confident/win_rate", "ambiguous/alignment", ...), its rows of
the aggregate table and the figures, and logs the full tables and figures on the driver;
`log_tokens(tables)` adds the token inspector's tables (text and routes of the most fragile
trajectories) to the driver run; `log_step(name=, key=, job_type=, ...)` logs one step of a
stage (the router update's) in its own run; `finish(exit_code)` closes it. Every run's W&B id is
derived by `wandb_id` from the run id and (model, layer, dataset) for a job, `key` for a step
(e.g. (model, "router", "train")), and opened with resume="allow", so a
restarted driver continues the same runs instead of opening new ones. Offline, where wandb does
not resume, the newest earlier log of the id is copied into the new run and the earlier
folders are deleted by `finish` (orchestrator/wandb_offline.py). Job runs carry the
scoring slice and the run's provenance (git commit, versions) as config. Needs wandb >=
0.19.10 (reinit="create_new").

W&B is never a reason for a run to fail: a missing package, a bad mode, entity or key, no
network, a timeout, an exception inside wandb, each becomes one `logging.warning` line and
W&B is switched off for the rest of the session. Config is logged with the values of secret-
looking keys replaced (api_key, token, secret, password; recursively); environment variables
are never logged. Online mode reads WANDB_API_KEY itself (wandb does); it is never printed.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.wandb_offline import carry_over, remove_runs, run_logs

log = logging.getLogger(__name__)

MODES = ("offline", "online", "disabled")
# A key is secret when its last word is one of these: `api_key`, `auth_token`, `password`, but
# not `max_tokens` or `tokens` (sampling settings, which must stay visible in W&B).
SECRET_KEY = re.compile(r"(^|[_-])(api[_-]?key|key|secret|password|token|auth)$", re.IGNORECASE)
BINS = ("confident", "ambiguous", "fragile", "all")
SUMMARY_METRICS = (  # by_bin column -> summary key suffix
    ("tokens", "tokens"),
    ("mean_u_std", "mean_u_std"),
    ("mean_max_alt", "mean_max_alt"),
    ("gain_pp", "gain_pp"),
    ("win_rate", "win_rate"),
    ("win_rate_strict", "win_rate_strict"),
    ("gain_pp_lo", "gain_pp_lo"),
    ("gain_pp_hi", "gain_pp_hi"),
    ("mean_rank", "mean_rank"),
    ("alignment", "alignment"),
    ("no_variance", "no_variance"),
)


@dataclass
class WandbConfig:
    """W&B for a run. Not frozen: it is also the Hydra schema of conf/wandb/ (overridable)."""

    mode: str = "offline"  # offline (sync later with `wandb sync`), online, disabled
    project: str = "moe-routing"  # W&B project the runs go to
    entity: str | None = None  # None: the key's default entity
    tags: tuple[str, ...] = ()  # W&B tags of every run
    init_timeout_s: float = 60.0  # an unreachable server costs at most this, once, per session
    progress_interval_s: float = 5.0  # log_progress writes at most this often

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"wandb.mode must be one of {', '.join(MODES)}, got {self.mode!r}")


def scrub_secrets(obj: Any) -> Any:
    """A copy of a plain config tree with the values of secret-looking keys replaced by ***."""
    if isinstance(obj, dict):
        return {
            k: "***" if SECRET_KEY.search(str(k)) and v is not None else scrub_secrets(v)
            for k, v in obj.items()
        }
    if isinstance(obj, (list, tuple)):
        return [scrub_secrets(v) for v in obj]
    return obj


def wandb_id(*parts: Any) -> str:
    """A W&B run id from its parts: readable, within W&B's 64 characters, free of the
    characters W&B refuses in ids (/ \\ # ? % :), and unique by a hash of the parts."""
    text = "-".join(str(p) for p in parts)
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "-", text)[:48].strip("-")
    return f"{readable}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def _warn(what: str, err: BaseException) -> None:
    # One line: wandb's own exceptions can be multi-line and may quote the settings.
    message = " ".join(str(err).split())[:300]
    log.warning("W&B %s failed, continuing without W&B: %s: %s", what, type(err).__name__, message)


def _clean(value: Any) -> Any:
    """A summary value W&B accepts: NaN / None become None, numpy scalars plain numbers."""
    if value is None:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    return value.item() if hasattr(value, "item") else value


class WandbSession:
    """The W&B side of one run (driver process only)."""

    def __init__(
        self, cfg: WandbConfig, *, run_id: str, run_dir: str | Path, config: dict[str, Any]
    ):
        self.cfg, self.run_id, self.run_dir = cfg, run_id, Path(run_dir)
        self.config = scrub_secrets(dict(config or {}))
        self._wandb: Any = None  # the module, once imported
        self._broken = (
            False  # an init failed: the next would fail the same way, after the same wait
        )
        self._run: Any = None
        self._last_progress = -math.inf
        self._pending: dict[str, Any] | None = None
        self._step = 0
        self._log_warned = False  # a wandb log file failed to write (reported once)
        self._superseded: list[Path] = []  # offline logs carried into this session's runs
        self._mine: set[Path] = set()  # the offline run folders this session wrote
        mode = getattr(cfg, "mode", None)
        if mode == "disabled":
            return
        if mode not in MODES:
            _warn("setup", ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}"))
            return
        try:
            import wandb
        except Exception as err:  # ImportError, or a broken install
            _warn("import", err)
            return
        self._wandb = wandb
        # wandb's own log files (debug.log, ...) fail on a full disk: Python's logging would
        # print a "--- Logging error ---" traceback per record, from wandb's threads too.
        # Off while this session lives; the first such failure is one warning (_log_failed).
        self._raise_exceptions, logging.raiseExceptions = logging.raiseExceptions, False
        self._run = self._init(
            name=f"{run_id}-driver",
            job_type="driver",
            config=self.config,
            run_key=wandb_id(run_id, "driver"),
        )

    @property
    def active(self) -> bool:
        return self._run is not None

    def _init(self, *, name: str, job_type: str, config: dict[str, Any], run_key: str) -> Any:
        """One wandb run, or None (and W&B off) on any failure. Offline, it starts with what
        the newest earlier log of `run_key` holds (wandb_offline.carry_over)."""
        if self._wandb is None or self._broken:
            return None
        wandb = self._wandb
        try:
            earlier = (
                run_logs(self.run_dir / "wandb", run_key) if self.cfg.mode == "offline" else []
            )
            self.run_dir.mkdir(parents=True, exist_ok=True)
            settings = wandb.Settings(
                silent=True,
                console="off",  # the driver's stdout/stderr are not uploaded
                init_timeout=float(self.cfg.init_timeout_s),
                x_disable_stats=True,  # no system-metrics sampler thread
                x_disable_meta=True,  # no host, program, args, git or env capture
                x_disable_machine_info=True,
                disable_git=True,
                disable_code=True,
                save_code=False,
                x_save_requirements=False,
            )
            run = wandb.init(
                project=self.cfg.project,
                entity=self.cfg.entity,
                group=self.run_id,
                job_type=job_type,
                name=name,
                id=run_key,
                resume="allow",  # a restarted driver continues the run with this id
                config=config,
                tags=list(self.cfg.tags) or None,
                mode=self.cfg.mode,
                dir=str(self.run_dir),  # W&B adds "wandb/": runs/<id>/wandb/<mode>-run-*
                reinit="create_new",  # several runs live in this one process
                settings=settings,
            )
        except Exception as err:  # wandb.errors.*, OSError, TimeoutError, ValueError, ...
            _warn(f"init of {name}", err)
            self._broken = True
            return None
        for handler in logging.getLogger("wandb").handlers:
            handler.handleError = self._log_failed  # type: ignore[method-assign]
        if self.cfg.mode == "offline":
            self._mine.add(Path(run.dir).parent)  # run.dir: the run folder's files/
        if earlier:  # offline, and an earlier session (or this one) logged this id already
            own = earlier[-1].parent in self._mine  # e.g. a job's run: log_job, then log_results
            try:
                carry_over(wandb, run, earlier[-1], wait_s=self.cfg.init_timeout_s if own else None)
                self._superseded += earlier
            except Exception as err:  # a damaged log: it stays, beside the new one
                message = " ".join(str(err).split())[:300]
                log.warning(
                    "W&B: could not carry %s over into the new run of %s, keeping both: %s: %s",
                    earlier[-1].parent.name, name, type(err).__name__, message,
                )  # fmt: skip
        return run

    def _log_failed(self, record: logging.LogRecord) -> None:
        """A wandb log file could not be written (a full disk): one warning, no traceback."""
        if not self._log_warned:
            self._log_warned = True
            err = sys.exc_info()[1] or OSError("unknown error")
            _warn("writing its files", err)
            self._broken = True  # no more runs: the next would fail the same way

    def log_progress(self, metrics: dict[str, Any]) -> None:
        """Log live progress on the driver run, at most once per progress_interval_s."""
        if self._run is None:
            return
        self._pending = dict(metrics)
        now = time.monotonic()
        if now - self._last_progress < float(self.cfg.progress_interval_s):
            return
        self._last_progress = now
        self._flush_progress()

    def _flush_progress(self) -> None:
        if self._run is None or not self._pending:
            return
        pending, self._pending = self._pending, None
        try:
            self._run.log({k: _clean(v) for k, v in pending.items()})
        except Exception as err:
            if not self._log_warned:
                _warn("log_progress", err)

    def log_results(self, report: Any) -> None:
        """One score run per (model, layer, dataset) of the report, and everything on the driver."""
        if self._run is None:
            return
        try:
            by_bin = report.tables["by_bin"]
            figures = dict(report.figures)
            jobs = (
                by_bin.filter(by_bin["dataset"] != "all")
                .select("model", "layer", "dataset")
                .unique(maintain_order=True)
                .rows()
            )
        except Exception as err:
            _warn("log_results (reading the report)", err)
            return
        for model, layer, dataset in jobs:
            rows = by_bin.filter(
                (by_bin["model"] == model)
                & (by_bin["layer"] == layer)
                & (by_bin["dataset"] == dataset)
            )
            self._log_job(model, layer, dataset, rows, figures)
            if self._broken:
                return
        try:
            wandb = self._wandb
            payload: dict[str, Any] = {
                f"tables/{name}": _table(wandb, frame) for name, frame in report.tables.items()
            }
            payload.update({f"figures/{name}": wandb.Image(str(p)) for name, p in figures.items()})
            self._run.log(payload)
            from analysis.tables import pooled_rows  # every dataset of a (model, layer)

            overall = pooled_rows(by_bin)
            for row in overall.iter_rows(named=True):
                prefix = f"{row['model']}/L{row['layer']}/{row['bin']}"
                self._run.summary.update(
                    {f"{prefix}/{key}": _clean(row[col]) for col, key in SUMMARY_METRICS}
                )
            self._run.summary["report"] = str(report.path)
        except Exception as err:
            _warn("log_results on the driver run", err)

    def log_tokens(self, tables: dict[str, Any]) -> None:
        """Token inspector tables (analysis.inspect.wandb_tables) on the driver run, as
        `inspect/<model>/L<layer>`: each token's text, pbar, u(S) and its best routes."""
        if self._run is None or not tables:
            return
        try:
            wandb = self._wandb
            self._run.log({f"inspect/{k}": _table(wandb, frame) for k, frame in tables.items()})
        except Exception as err:
            _warn("log_tokens", err)

    def _open_job(self, model: str, layer: int, dataset: str) -> tuple[Any, str]:
        config = {
            "run_id": self.run_id,
            "model": model,
            "layer": int(layer),
            "dataset": dataset,
            "scoring": self.config.get("scoring", {}),
            "provenance": self.config.get("provenance", {}),
        }
        name = f"{self.run_id}/{model}/L{layer}/{dataset}"
        key = wandb_id(self.run_id, model, int(layer), dataset)
        return self._init(name=name, job_type="score", config=config, run_key=key), name

    def log_job(self, model: str, layer: int, dataset: str, metrics: dict[str, Any]) -> None:
        """A scoring job whose units are all written: its counts, in its own run, now."""
        if self._run is None:
            return
        run, name = self._open_job(model, layer, dataset)
        if run is None:
            return
        try:
            run.summary.update({f"job/{k}": _clean(v) for k, v in metrics.items()})
        except Exception as err:
            _warn(f"logging {name}", err)
        finally:
            try:
                run.finish()
            except Exception as err:
                _warn(f"finish of {name}", err)

    def _log_job(self, model: str, layer: int, dataset: str, rows: Any, figures: dict) -> None:
        run, name = self._open_job(model, layer, dataset)
        if run is None:
            return
        try:
            summary = {}
            for row in rows.iter_rows(named=True):
                for col, key in SUMMARY_METRICS:
                    summary[f"{row['bin']}/{key}"] = _clean(row[col])
            run.summary.update(summary)
            payload = {"by_bin": _table(self._wandb, rows)}
            payload.update({f"figures/{k}": self._wandb.Image(str(p)) for k, p in figures.items()})
            run.log(payload)
        except Exception as err:
            _warn(f"logging {name}", err)
        finally:
            try:
                run.finish()
            except Exception as err:
                _warn(f"finish of {name}", err)

    def log_step(
        self,
        *,
        name: str,
        key: tuple[Any, ...],
        job_type: str,
        config: dict[str, Any],
        summary: dict[str, Any],
        tables: dict[str, Any] | None = None,
        figures: dict[str, Any] | None = None,
    ) -> None:
        """One run for one step of a stage (e.g. job_type="router_train"), grouped with the
        run: summary values, Polars frames as tables, image files as figures. Its W&B id is
        `wandb_id(run id, *key)`, e.g. key=(model, "router", "train")."""
        if self._run is None:
            return
        run = self._init(
            name=name,
            job_type=job_type,
            config=scrub_secrets(config),
            run_key=wandb_id(self.run_id, *key),
        )
        if run is None:
            return
        try:
            run.summary.update({k: _clean(v) for k, v in summary.items()})
            payload = {k: _table(self._wandb, f) for k, f in (tables or {}).items()}
            payload.update({k: self._wandb.Image(str(p)) for k, p in (figures or {}).items()})
            if payload:
                run.log(payload)
        except Exception as err:
            _warn(f"logging {name}", err)
        finally:
            try:
                run.finish()
            except Exception as err:
                _warn(f"finish of {name}", err)

    def finish(self, exit_code: int = 0) -> None:
        """Flush the last progress, close the driver run and wait until W&B has written (offline)
        or sent (online) everything, so the files under runs/<id>/wandb/ are complete on return.
        Safe to call twice."""
        if self._run is None:
            self._restore_logging()
            return
        self._flush_progress()
        run, self._run = self._run, None
        try:
            run.finish(exit_code=int(exit_code))
            # run.finish() can return before wandb-core has flushed the run's .wandb file;
            # teardown waits for it (and ends W&B's service process; a later init restarts it).
            self._wandb.teardown(exit_code=int(exit_code))
            if not self._log_warned:  # this session's logs are complete: the older ones go
                remove_runs(self._superseded)
        except Exception as err:
            if not self._log_warned:  # a full disk was already reported, once
                _warn("finish", err)
        self._restore_logging()

    def _restore_logging(self) -> None:
        if hasattr(self, "_raise_exceptions"):
            logging.raiseExceptions = self._raise_exceptions


def _table(wandb: Any, frame: Any) -> Any:
    """A wandb.Table from a Polars frame (plain Python values, NaN as None)."""
    rows = [[_clean(v) for v in row] for row in frame.rows()]
    return wandb.Table(columns=list(frame.columns), data=rows)
