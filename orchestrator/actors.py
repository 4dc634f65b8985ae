"""The worker classes the stages run as Ray actors.

Contract: `GeneratorWorker`, `ScorerWorker` and `RouterWorker` are plain classes (usable without Ray) that load
one model once in `__init__` and then run many units, each unit = read an input file, write
one Arrow file with its completion sidecar (`workers.io.write_arrow`), return a small dict of
counts. The stages make them remote in one line (`ray.remote(cls)`) and run them on the
executor (orchestrator/executor.py); `Workers` names the classes a run uses, so a test can
pass subclasses that fail or die on purpose.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from orchestrator.config import ModelConfig, check_model_shape, model_path
from orchestrator.plan import local_fingerprint
from orchestrator.tasks import (
    CeiTask,
    CorEvalTask,
    GenerationTask,
    PreferenceTask,
    ScoringTask,
    TrainTask,
)
from workers.io import COMPRESSION, read_arrow, write_arrow
from workers.schemas import completion_tokens


def setup_process(torch_threads: int) -> None:
    """Torch threads per actor (so actors do not oversubscribe cores); no loading bars in logs."""
    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(torch_threads)
    hf_logging.disable_progress_bar()


def worker_provenance(path: str, driver: dict[str, Any] | None) -> dict[str, Any]:
    """What a worker's sidecars record: the driver's git commit (workers may have no .git),
    this node's library versions, the scoring code it runs and the model revision it loaded."""
    from workers.provenance import library_versions, model_revision, scoring_code_version

    return {
        **(driver or {}),
        "versions": library_versions(),
        "scoring_code": scoring_code_version(),
        "model_revision": model_revision(path),
    }


def local_model_dir(model: ModelConfig) -> str:
    """A directory with the model's files: model.path, the bundled model, or a snapshot of
    hf_id at model.revision in this node's Hugging Face cache (downloaded on first use; point
    HF_HOME at shared storage to download once per cluster). Its shape is checked here."""
    path = model_path(model)
    if not Path(path).is_dir():
        from huggingface_hub import snapshot_download

        path = snapshot_download(
            model.hf_id,
            revision=model.revision,
            ignore_patterns=["*.bin", "*.pt", "*.pth", "original/*", "metal/*"],
        )
    check_model_shape(model, json.loads((Path(path) / "config.json").read_text()))
    return path


class GeneratorWorker:
    """Samples, verifies and writes trajectory shards of one model (workers.generation.generate)."""

    def __init__(
        self,
        model: ModelConfig,
        backend: str,
        backend_options: dict[str, Any],
        *,
        torch_threads: int,
        provenance: dict[str, Any] | None = None,
        compression: str = COMPRESSION,
    ):
        setup_process(torch_threads)
        from workers.generation import make_backend

        self.compression = compression  # of the files it writes (cluster.compression)
        path = local_model_dir(model)
        self.backend = make_backend(backend, path, **backend_options)
        self.backend_name = backend  # recorded in each sidecar: the report says who generated
        self.provenance = worker_provenance(path, provenance)

    def pid(self) -> int:
        return os.getpid()

    def close(self) -> None:
        """Shut the backend's engine down (vLLM: its worker processes, its device memory)."""
        close = getattr(self.backend, "close", None)
        if close is not None:
            close()

    def generate(
        self, task: GenerationTask, out_path: str, config_hash: str, root: Path | None = None
    ) -> dict[str, Any]:
        from workers.generation.generate import generate_trajectories

        started = time.time()
        start, stop = task.rows
        problems = read_arrow(task.problems_path).slice(start, stop - start)
        table = generate_trajectories(
            self.backend,
            problems,
            task.sampling,
            model_name=task.model_name,
            verifier=task.verifier,
            tokenizer=self.backend.tokenizer,
            instruction=task.instruction,
            template=task.template,
            use_chat_template=task.use_chat_template,
        )
        counts = {"tokens": completion_tokens(table), "verified": _count_true(table["verified"])}
        write_arrow(
            table,
            out_path,
            config_hash=config_hash,
            started=started,
            extra={"provenance": self.provenance, "backend": self.backend_name, **counts},
            root=root,
            compression=self.compression,
        )
        return {"rows": table.num_rows, **counts}


def _count_true(column: pa.ChunkedArray) -> int:
    return int(pc.sum(pc.cast(column, pa.int64())).as_py() or 0)


class ScorerWorker:
    """Scores trajectory shards of one model at any of its MoE layers (workers.scoring.scorer)."""

    def __init__(
        self,
        model: ModelConfig,
        score_options: dict[str, Any],
        *,
        torch_threads: int,
        provenance: dict[str, Any] | None = None,
        compression: str = COMPRESSION,
    ):
        setup_process(torch_threads)
        from workers.scoring.scorer import ScoreConfig, Scorer

        self.compression = compression  # of the files it writes (cluster.compression)
        path = local_model_dir(model)
        self.scorer = Scorer(path, ScoreConfig(**score_options))
        self.provenance = worker_provenance(path, provenance)

    def pid(self) -> int:
        return os.getpid()

    def score(
        self, task: ScoringTask, out_path: str, config_hash: str, root: Path | None = None
    ) -> dict[str, Any]:
        from workers.scoring.scorer import score_file

        sidecar = score_file(
            self.scorer,
            task.in_path,
            task.layer,
            out_path,
            config_hash=config_hash,
            require_complete=True,  # the shard the driver planned, verified
            extra={"provenance": self.provenance},
            root=root,
            compression=self.compression,
            draws=task.draws,
        )
        return {"rows": sidecar["rows"], "tokens": sidecar["rows"]}

    def cei(
        self, task: CeiTask, out_path: str, config_hash: str, root: Path | None = None
    ) -> dict[str, Any]:
        from workers.scoring.cei import cei_file

        sidecar = cei_file(
            self.scorer,
            task.in_path,
            task.layer,
            out_path,
            gating=task.gating,
            config_hash=config_hash,
            extra={"provenance": self.provenance},
            root=root,
            compression=self.compression,
        )
        return {"rows": sidecar["rows"], "tokens": sidecar["rows"]}


class RouterWorker:
    """Loads one model once; builds preference data and trains its router (Ray actor body)."""

    def __init__(
        self, model: ModelConfig, device: str, *, torch_threads: int, compression: str = COMPRESSION
    ):
        setup_process(torch_threads)
        self.compression = compression  # of the files it writes (cluster.compression)
        from workers.adapters import adapter_for
        from workers.scoring.scorer import ScoreConfig, load_model

        self.path = local_model_dir(model)
        self.model = load_model(self.path, ScoreConfig(dtype=model.dtype, device=device))
        self.adapter = adapter_for(self.model)
        self.tokenizer = None  # loaded by the first CoR evaluation unit

    def preferences(
        self, task: PreferenceTask, out_path: str, unit_hash: str, root: Path | None = None
    ) -> dict[str, Any]:
        import pyarrow as pa

        from workers.router.update import add_router_inputs, select_tokens
        from workers.schemas import as_list_routes
        from workers.trajectories import read_trajectories

        started = time.time()
        scores = pa.concat_tables([as_list_routes(read_arrow(p)) for p in task.scores])
        trajectories = pa.concat_tables([read_trajectories(p) for p in task.shards])
        tokens = select_tokens(scores, task.update)
        table = add_router_inputs(self.model, self.adapter, tokens, trajectories, task.layer)
        kinds = table.column("kind").to_pylist()
        counts = {"prefer": kinds.count("prefer"), "anchor": kinds.count("anchor")}
        write_arrow(
            table,
            out_path,
            config_hash=unit_hash,
            started=started,
            extra=counts,
            root=root,
            compression=self.compression,
        )
        return {"rows": table.num_rows, "tokens": scores.num_rows, **counts}

    def cor_eval(
        self, task: CorEvalTask, out_path: str, unit_hash: str, root: Path | None = None
    ) -> dict[str, Any]:
        """One CoR evaluation unit: its questions scored with the model routed by the task's
        plan; the routed experts per token the plan ran go to the sidecar."""
        from transformers import AutoTokenizer

        from workers.generation.cor_eval import evaluate_questions
        from workers.generation.reroute import active_experts_per_token, rerouted

        started = time.time()
        if self.tokenizer is None:
            self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        start, stop = task.rows
        problems = read_arrow(task.problems_path).slice(start, stop - start)
        with rerouted(self.model, task.plan) as counter:
            table = evaluate_questions(
                self.model, self.tokenizer, problems, task.settings, task.condition, task.kind
            )
        active = active_experts_per_token(counter, self.adapter.moe_layers)
        write_arrow(
            table,
            out_path,
            config_hash=unit_hash,
            started=started,
            extra={"condition": task.condition, "active_experts_per_token": active},
            root=root,
            compression=self.compression,
        )
        return {"rows": table.num_rows, "tokens": sum(table.column("tokens").to_pylist())}

    def train(
        self, task: TrainTask, out_path: str, unit_hash: str, root: Path | None = None
    ) -> dict[str, Any]:
        from workers.router.update import (
            control_targets,
            describe_update,
            router_parameters,
            train_router,
            write_checkpoint,
        )

        started = time.time()
        cfg, layer = task.update, task.layer
        params = router_parameters(self.model, self.adapter, layer)
        weight_name = next(n for n in params if n.endswith(".weight"))
        bias_name = next((n for n in params if n.endswith(".bias")), None)
        prefs = read_arrow(task.preferences)
        if task.control:
            import pyarrow as pa

            scores = pa.concat_tables([read_arrow(p) for p in task.scores])
            prefs = control_targets(prefs, scores, task.control, cfg.seed)
        weight, bias, log, summary = train_router(
            params[weight_name], params[bias_name] if bias_name else None, prefs, self.adapter, cfg
        )
        tensors = {weight_name: weight, **({bias_name: bias} if bias_name else {})}
        recorded = {"control": task.control, **summary} if task.control else summary
        readme = describe_update(
            source=task.source, layer=layer, names=list(tensors), summary=recorded, cfg=cfg
        )
        write_checkpoint(self.path, task.checkpoint, tensors, readme, root=root)
        fingerprint = local_fingerprint(str(task.checkpoint.resolve()))
        extra = {"summary": recorded, "checkpoint_fingerprint": fingerprint}
        write_arrow(
            log,
            out_path,
            config_hash=unit_hash,
            started=started,
            extra=extra,
            root=root,
            compression=self.compression,
        )
        return {"rows": log.num_rows, "tokens": summary["prefer_tokens"], **summary}


def driver_provenance() -> dict[str, Any]:
    """The driver's part of a sidecar's provenance: the project's git commit."""
    from workers.provenance import git_commit

    return {"git_commit": git_commit()}


@dataclass(frozen=True)
class Workers:
    """The worker classes of a run's stages (subclasses in tests: a unit that fails, an actor
    that dies); the spawners make them remote."""

    generator: type[GeneratorWorker] = GeneratorWorker
    scorer: type[ScorerWorker] = ScorerWorker
    router: type[RouterWorker] = RouterWorker


DEFAULT_WORKERS = Workers()
