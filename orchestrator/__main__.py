"""`python -m orchestrator [group=option ...] [key=value ...]`: problems -> scores -> report.

Reads as its steps: compose the typed config, validate it, plan (or print the plan and stop:
`dry_run=true`), take the run's lease (orchestrator/lock.py; with `runs_dir=s3://...` the run's
local mirror is then brought to the bucket's state, workers/store.py), load the problems, start
Ray, run the stages, build the report, run the router update and the CoR evaluation (if set;
after the report, so their failure does not cost the report), log to W&B, stop the local Ray
(also on SIGTERM), exit 0 when every unit is complete. Running the same
command again resumes the run: complete units are skipped. Exit codes: 0 complete, 1 some units
failed (the resume command is printed, secrets masked), 2 bad config or input, or another
driver holds the run (one line on stderr, nothing marked complete).
"""

from __future__ import annotations

import os
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from orchestrator.actors import DEFAULT_WORKERS, Workers
from orchestrator.compare import SWEPT, compare_override_error, share_trajectories
from orchestrator.config import (
    CONF_DIR,
    ConfigError,
    config_tree,
    override_key_error,
    register_configs,
    scrub_secrets,
    to_run_config,
    validate,
)
from orchestrator.errors import PipelineError
from orchestrator.estimate import check_memory
from orchestrator.lock import LeaseWriteError, RunLock, RunLockedError, StoreLock, pid_alive
from orchestrator.plan import derive_run_id, describe_plan, write_plan
from orchestrator.problems import prepare_problems
from orchestrator.provenance import check_resume, run_record
from orchestrator.summary import record_fixed
from orchestrator.wandb_run import SECRET_KEY
from workers.atomic import atomic_write, read_nofollow, remove
from workers.store import StoreError, is_store_uri, mirror_of

register_configs()


@hydra.main(config_path="../conf", config_name="config", version_base=None)
def main(dcfg: DictConfig) -> str | None:
    """Exits with the run's code unless 0; returns the run folder (None for a dry run), which
    a multirun's JobReturn carries to a callback (orchestrator/compare.py)."""
    code, run_dir = run_job(dcfg, overrides=hydra_overrides())
    if code:
        sys.exit(code)
    return str(run_dir) if run_dir else None


def run(
    dcfg: DictConfig, *, overrides: list[str] | None = None, workers: Workers = DEFAULT_WORKERS
) -> int:
    """One run from a composed config; returns the exit code (tests call this directly, and
    may pass `workers`: the actor classes, orchestrator.actors.Workers, e.g. failing ones)."""
    return run_job(dcfg, overrides=overrides, workers=workers)[0]


def run_job(
    dcfg: DictConfig, *, overrides: list[str] | None = None, workers: Workers = DEFAULT_WORKERS
) -> tuple[int, Path | None]:
    """`run`'s exit code and the run folder (None when no run was made: a dry run, a bad
    config, another driver holding the run)."""
    started = time.monotonic()
    try:
        # 1. Typed config, validated before anything starts.
        cfg = to_run_config(dcfg, overrides or [])
        validate(cfg)
        resolved = config_tree(cfg)
        run_id = derive_run_id(cfg, resolved)
        resolved["run_id"] = run_id
        resolved["provenance"] = run_record(cfg)
        on_store = is_store_uri(cfg.runs_dir)  # a local mirror of the run (workers/store.py)
        run_dir = (mirror_of(cfg.runs_dir) if on_store else Path(cfg.runs_dir).resolve()) / run_id
        # 2. The plan, its memory and GPU-hours; a dry run stops here (no model, no Ray).
        if cfg.dry_run:
            print(describe_plan(cfg, run_id, run_dir))
            if cfg.router_update.enabled:
                from orchestrator.router_stage import describe_router_plan

                print(describe_router_plan(cfg))
            if cfg.cor.enabled:
                from orchestrator.cor_stage import describe_cor_plan

                print(describe_cor_plan(cfg))
        check_memory(cfg)
        if cfg.dry_run:
            return 0, None
        check_cluster_address(cfg.cluster.address)
        # 3. One driver per run: the run folder's lease, held until this driver exits.
        lock = StoreLock(run_dir) if on_store else RunLock(run_dir)
        lock.acquire()
    except (
        ConfigError,
        PipelineError,
        FileNotFoundError,
        RunLockedError,
        LeaseWriteError,
        StoreError,
    ) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2, None
    try:
        if not on_store:
            return run_locked(cfg, run_dir, run_id, resolved, overrides, started, workers), run_dir
        return run_synced(cfg, run_dir, run_id, resolved, overrides, started, workers), run_dir
    finally:
        lock.release()


def run_synced(cfg: Any, run_dir: Path, *args: Any) -> int:
    """`run_locked` on object storage: the mirror is first brought to the store's state (a
    unit whose object is corrupt or missing is redone), the run's small files are uploaded at
    the end, whatever the outcome (data files are committed as they are written)."""
    from workers.store import pull_run, push_run_files

    try:
        for line in pull_run(run_dir, checksum=cfg.verify_checksums):
            print(f"warning: {line}", file=sys.stderr)
    except StoreError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        return run_locked(cfg, run_dir, *args)
    finally:
        try:
            push_run_files(run_dir)
        except StoreError as err:
            print(f"warning: run files not uploaded: {err}", file=sys.stderr)


def run_locked(
    cfg: Any,
    run_dir: Path,
    run_id: str,
    resolved: dict[str, Any],
    overrides: list[str] | None,
    started: float,
    workers: Workers = DEFAULT_WORKERS,
) -> int:
    """Steps 4-9 of `run`, under the run's lease."""
    from orchestrator.pipeline import run_stages  # Ray: not for a dry run

    try:
        # 4. A resumed run made by other code says so (or refuses: another scorer).
        changed = check_resume(run_dir, resolved["provenance"], cfg.allow_scorer_change)
        if changed:
            print(f"warning: {changed}", file=sys.stderr)
        # 5. Problems on the driver: a missing data file fails here, before Ray starts.
        # plan.json says "scoring not planned" until the stages replan it: a report made
        # meanwhile never trusts the plan of an earlier config.
        problems = prepare_run(cfg, run_dir, resolved)
    except (ConfigError, PipelineError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    resume = resume_command(overrides, run_id)
    # 6. Ray: a local instance started here (the leftovers of one a killed driver of this
    # run started are cleared first), or an existing cluster.
    started_ray = init_ray(cfg.cluster, run_dir, verbose=cfg.verbose)
    previous_sigterm = interrupt_on_sigterm()  # after ray.init, which installs its own
    code = 1
    try:
        session = open_wandb(cfg, run_id, run_dir, resolved)
    except BaseException:
        if started_ray:
            stop_local_ray(run_dir)
        restore_sigterm(previous_sigterm)
        raise
    try:
        # 7. The stages, then 8. the report.
        summary = run_stages(
            cfg,
            run_dir,
            problems,
            run_id=run_id,
            sink=session.log_progress,
            job_sink=session.log_job,
            workers=workers,
        )
        # The main report first: a router update that fails must not cost it.
        summary.report_path = build_report(run_dir, session, cfg.analysis)
        run_experiments(cfg, run_dir, summary, run_id, session)
        code = 0 if summary.ok else 1
        print_summary(summary, resume, time.monotonic() - started)
    except (ConfigError, PipelineError) as err:
        print(f"error: {err}", file=sys.stderr)
        code = 2
    except OSError as err:  # a report or router write refused (a folder replaced by a link)
        print(f"error: {err}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print(f"interrupted; resume with:\n  {resume}", file=sys.stderr)
        code = 130
    finally:
        # 9. failures.jsonl says which earlier failures are complete now; close W&B and the
        # Ray this driver started.
        try:
            record_fixed(run_dir)
        except OSError as err:  # e.g. a full disk: the failures stay listed as open
            print(f"warning: failures.jsonl not updated: {err}", file=sys.stderr)
        session.finish(exit_code=code)
        if started_ray:
            stop_local_ray(run_dir)
        restore_sigterm(previous_sigterm)
    return code


def prepare_run(cfg: Any, run_dir: Path, resolved: dict[str, Any]) -> dict[str, Any]:
    """Step 5 of `run`, on the driver: the problems, config.yaml, plan.json (scoring not
    planned yet) and, under compare=samplers, the generated files a sibling run holds."""
    problems = prepare_problems(cfg, run_dir)
    save_config(run_dir, resolved)
    write_plan(run_dir, None)
    share_trajectories(cfg, run_dir)
    return problems


def restore_sigterm(previous: Any) -> None:
    import signal

    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


def check_command_line(argv: list[str]) -> str | None:
    """Hydra's own errors for these overrides (unknown key or option, bad type) as one line,
    or None. Hydra would print them over several lines and exit 1; the run's contract is one
    `error:` line and exit 2. A secret-looking value is refused before Hydra sees it: Hydra
    writes the command line to disk (a multirun's multirun.yaml). An unknown key names the
    valid ones, also beside Hydra's flags (--help, -m, --cfg, ...), which are left to Hydra."""
    overrides = [arg for arg in argv if not arg.startswith("-")]
    for arg in overrides:
        if secret_override(arg):
            key = arg.split("=", 1)[0].lstrip("+~")
            return (
                f"{key} is a secret: give it through the environment, not the command line,"
                " which Hydra writes to disk (W&B reads WANDB_API_KEY, the Hugging Face hub"
                " HF_TOKEN)"
            )
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    for arg in overrides:
        try:
            [override] = parser.parse_overrides([arg])
        except (HydraException, ValueError):
            continue  # Hydra's own message, below (or, beside a flag, Hydra's own exit)
        problem = override_key_error(override.key_or_group)
        if problem:
            return problem
    if len(overrides) < len(argv):
        return None
    from hydra import compose, initialize_config_dir
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            compose("config", overrides=argv)
    except (HydraException, OmegaConfBaseException) as err:
        message = " ".join(str(err).split()).split(" Config search path:")[0]
        # Hydra's hint to add the key with `+` is wrong here: the schema has no such key.
        message = re.sub(
            r"Could not override '([^']*)'\. To append to your config use \S+",
            r"unknown key \1",
            message,
        )
        cause = err.__cause__
        if cause is not None and str(cause).strip():
            message += f" ({str(cause).strip().splitlines()[0]})"
        return message
    return None


def hydra_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task)


def save_config(run_dir: Path, resolved: dict[str, Any]) -> None:
    """The resolved config, secrets scrubbed, as runs/<id>/config.yaml (replaced each run)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    config = OmegaConf.to_yaml(OmegaConf.create(scrub_secrets(resolved)))
    atomic_write(run_dir / "config.yaml", config, root=run_dir)


def resume_command(overrides: list[str] | None, run_id: str) -> str:
    """The command that resumes this run: the same overrides, with the run id pinned and the
    values of secret-looking keys masked (give them again, or through the environment)."""
    kept = [o for o in overrides or [] if not o.startswith(("run_id=", "dry_run="))]
    masked = [f"{o.split('=', 1)[0]}=***" if secret_override(o) else o for o in kept]
    if any(o.startswith("compare=") and o != "compare=none" for o in kept):
        # A comparison resumes whole: its own command, each run deriving its id again.
        masked = [o for o in masked if not o.startswith(f"{SWEPT}=")]
        return shlex.join(["python", "-m", "orchestrator", *masked])
    return shlex.join(["python", "-m", "orchestrator", *masked, f"run_id={run_id}"])


def secret_override(override: str) -> str | None:
    """The value of a `key=value` override whose key looks secret (api_key, token, ...)."""
    key, sep, value = override.partition("=")
    key = key.lstrip("+~").rsplit(".", 1)[-1]
    return value if sep and value and SECRET_KEY.search(key) else None


class MaskedStream:
    """A text stream that writes `secrets` as ***: whatever prints an override (Hydra's echo
    of a bad one, a traceback, a warning) cannot show a secret given on the command line."""

    def __init__(self, stream: Any, secrets: list[str]):
        self._stream = stream
        self._secrets = sorted(set(secrets), key=len, reverse=True)

    def write(self, text: str) -> int:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return self._stream.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def mask_secret_arguments(argv: list[str]) -> None:
    """Route stdout and stderr through MaskedStream for the secret values in `argv`."""
    secrets = [v for v in map(secret_override, argv) if v]
    if secrets:
        sys.stdout = MaskedStream(sys.stdout, secrets)
        sys.stderr = MaskedStream(sys.stderr, secrets)


CONNECT_TIMEOUT_S = 15.0  # an unreachable cluster.address fails after this, not never
LOCAL_RAY_RECORD = ".local_ray.json"  # the node of the local Ray this run's driver started


def check_cluster_address(address: str | None) -> None:
    """Raise ConfigError unless `cluster.address` answers within CONNECT_TIMEOUT_S: Ray itself
    would wait for an unreachable head without end. None (a local Ray) is not checked."""
    import socket

    if address is None:
        return
    if address == "auto":  # Ray's own lookup: RAY_ADDRESS, then the cluster `ray start` left
        from ray._private.services import canonicalize_bootstrap_address

        try:
            address = canonicalize_bootstrap_address("auto")
        except (ConnectionError, ValueError) as err:
            raise ConfigError(f"cluster.address=auto: {err}".splitlines()[0]) from None
        if address is None:
            raise ConfigError("cluster.address=auto: no running Ray cluster found on this node")
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"cluster.address={address}: give host:port, ray://host:port or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as err:
        reason = "no answer" if isinstance(err, TimeoutError) else err.strerror or str(err)
        raise ConfigError(
            f"cluster.address={address}: cannot connect within {CONNECT_TIMEOUT_S:.0f} s"
            f" ({reason}); is the head running and the port open?"
        ) from None


def init_ray(cluster: Any, run_dir: Path, *, verbose: bool = False) -> bool:
    """Start a local Ray (returns True) or join `cluster.address`; reuse one already up.

    Quiet unless `verbose`: Ray's driver logger is set to ERROR while Ray starts (its
    start-up lines are INFO, its token-authentication notice a WARNING), then to WARNING, so
    Ray's warnings about the run still show, as does every line an actor prints (our
    progress, worker tracebacks)."""
    import logging

    import ray

    if ray.is_initialized():
        return False
    quiet = {} if verbose else {"logging_level": logging.ERROR}
    if cluster.address:
        ray.init(address=cluster.address, **quiet)
    else:
        clear_local_ray(run_dir)
        # address="local": always a new instance of our own, even on a node where `ray start`
        # ran (a bare ray.init() would join that cluster and refuse num_cpus).
        ray.init(
            address="local",
            num_cpus=cluster.num_cpus or os.cpu_count(),
            num_gpus=cluster.num_gpus,
            include_dashboard=False,
            **quiet,
        )
        record_local_ray(run_dir)
    if not verbose:
        logging.getLogger("ray").setLevel(logging.WARNING)
    return True


def interrupt_on_sigterm() -> Any:
    """Make SIGTERM (a scheduler's stop, `kill`) end the driver as Ctrl-C does, so its
    `finally` stops the local Ray instead of leaving Ray's processes behind. Returns the
    previous handler (None off the main thread, where signals cannot be handled)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, interrupt)


def record_local_ray(run_dir: Path) -> None:
    """The session folder of the local Ray just started, in runs/<id>/.local_ray.json: every
    process of that Ray keeps files open in it (its logs), so a later driver can find what a
    SIGKILLed one left behind (Ray's dashboard and runtime-env agents outlive their raylet)."""
    import json
    import socket

    import ray

    node = ray._private.worker._global_node  # Ray has no public call for the session folder
    record = {"host": socket.gethostname(), "session_dir": node.get_session_dir_path()}
    atomic_write(run_dir / LOCAL_RAY_RECORD, json.dumps(record), root=run_dir)


def stop_local_ray(run_dir: Path) -> None:
    """Shut down the local Ray this driver started, then kill whatever of it outlived that."""
    import ray

    ray.shutdown()
    clear_local_ray(run_dir)


def local_ray_processes(session_dir: str) -> list[int]:
    """This user's processes with a file open in `session_dir` (a Ray session's folder,
    unique per node start: session_<date>_<time>_<pid>). Not this process."""
    inside = session_dir.rstrip("/") + "/"
    found = []
    for fds in Path("/proc").glob("[0-9]*/fd"):
        pid = int(fds.parent.name)
        if pid == os.getpid():
            continue
        try:
            if any(os.readlink(fd).startswith(inside) for fd in fds.iterdir()):
                found.append(pid)
        except OSError:  # gone, or another user's
            pass
    return found


# A Ray session folder as Ray names it when a driver starts a new local cluster:
# session_<date>_<time>_<microseconds>_<pid of that driver>.
RAY_SESSION = re.compile(r"session_\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_\d{6}_(\d+)")


def recorded_session(run_dir: Path) -> str | None:
    """The session folder in runs/<id>/.local_ray.json when it is one this driver may clear:
    the record a regular file (not a link), written on this host, naming an absolute, normal
    path to a folder Ray named (RAY_SESSION) whose starting driver is this process or gone.
    A forged or stale record never makes a driver kill another driver's Ray or anything else."""
    import json
    import socket

    try:
        record = json.loads(read_nofollow(run_dir / LOCAL_RAY_RECORD) or b"null")
        session_dir = record["session_dir"]
        host = record.get("host")
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    if host != socket.gethostname() or not isinstance(session_dir, str):
        return None
    name = RAY_SESSION.fullmatch(os.path.basename(session_dir))
    if not name or not os.path.isabs(session_dir) or os.path.normpath(session_dir) != session_dir:
        return None
    pid = int(name[1])
    if pid != os.getpid() and pid_alive(pid):
        return None  # the driver that started that Ray is alive: not a leftover
    return session_dir


def clear_local_ray(run_dir: Path) -> int:
    """Kill what is left of the local Ray recorded in the run folder (a driver that was
    SIGKILLed never stopped it); the caller holds the run's lease, so that driver is gone.
    Returns how many processes were killed."""
    import signal

    session_dir = recorded_session(run_dir)
    if session_dir is None:
        return 0
    killed = 0
    for pid in local_ray_processes(session_dir):
        try:
            os.kill(pid, signal.SIGKILL)
            killed += 1
        except OSError:
            pass
    remove(run_dir / LOCAL_RAY_RECORD, root=run_dir)
    return killed


def open_wandb(cfg: Any, run_id: str, run_dir: Path, resolved: dict[str, Any]) -> Any:
    from orchestrator.wandb_run import WandbSession

    return WandbSession(cfg.wandb, run_id=run_id, run_dir=run_dir, config=scrub_secrets(resolved))


def run_experiments(cfg: Any, run_dir: Path, summary: Any, run_id: str, session: Any) -> None:
    """The router update, then the CoR evaluation, each when set; report.md points at their
    results (a link to router_update.md, the CoR section appended)."""
    if run_router_update(cfg, run_dir, summary, run_id, session) is not None:
        from orchestrator.router_report import link_from_report

        summary.report_path = link_from_report(summary.report_path, run_dir)
    if run_cor(cfg, run_dir, summary, run_id, session) is not None:
        summary.report_path = summary.report_path or run_dir / "report.md"


def run_router_update(cfg: Any, run_dir: Path, summary: Any, run_id: str, session: Any) -> Any:
    """The router update of the final MoE layer and its evaluation, when router_update is set."""
    if not cfg.router_update.enabled:
        return None
    from orchestrator.router_stage import run_router_update as run_update

    return run_update(
        cfg, run_dir, summary, run_id=run_id, sink=session.log_progress, session=session
    )


def run_cor(cfg: Any, run_dir: Path, summary: Any, run_id: str, session: Any) -> Any:
    """The CoR evaluation of the reroute plans, when cor is set."""
    if not cfg.cor.enabled:
        return None
    from orchestrator.cor_stage import run_cor as run_evaluation

    return run_evaluation(
        cfg, run_dir, summary, run_id=run_id, sink=session.log_progress, session=session
    )


def build_report(run_dir: Path, session: Any, analysis: Any) -> Path | None:
    """Tables, figures and report.md from the complete score shards; logged to W&B."""
    from analysis.report import build_report as build

    if not any((run_dir / "scores").rglob("*.done.json")):
        return None
    try:
        report = build(run_dir, config=analysis)
    except (FileNotFoundError, ValueError) as err:  # e.g. no file of the current plan yet
        print(f"warning: no report: {err}", file=sys.stderr)
        return None
    session.log_results(report)
    if session.active:
        session.log_tokens(inspector_tables(run_dir, analysis))
    return report.path


def inspector_tables(run_dir: Path, analysis: Any) -> dict[str, Any]:
    """The token inspector's W&B tables; a tokenizer that cannot load costs a warning only."""
    from analysis.inspect import wandb_tables

    try:
        return wandb_tables(run_dir, analysis)
    except Exception as err:  # a hub tokenizer offline, an unreadable file: W&B only loses it
        print(f"warning: token tables for W&B skipped: {err}", file=sys.stderr)
        return {}


def print_summary(summary: Any, resume: str, seconds: float) -> None:
    stages = "; ".join(
        f"{name} {m[f'{name}/computed']} computed, {m[f'{name}/skipped']} skipped,"
        f" {m[f'{name}/failed']} failed"
        for name, m in summary.stages.items()
    )
    print(f"run {summary.run_id}: {stages}; {seconds:,.1f} s", file=sys.stderr)
    for warning in summary.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if summary.report_path:
        print(f"report: {summary.report_path}", file=sys.stderr)
    if summary.failures:
        print(
            f"{len(summary.failures)} units failed (see {summary.run_dir / 'failures.jsonl'});"
            f" resume with:\n  {resume}",
            file=sys.stderr,
        )


if __name__ == "__main__":
    mask_secret_arguments(sys.argv[1:])
    problem = compare_override_error(sys.argv[1:]) or check_command_line(sys.argv[1:])
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    main()
