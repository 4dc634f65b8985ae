"""Generation: sample, verify and write the trajectories of one problem shard per unit.

Contract: `GenerationStage.plan` gives one unit per `generation.problems_per_shard` problems of
a (model, dataset), written to trajectories/<model>/<dataset>/generated/<k>.arrow; its hash
covers the model's identity, dtype, backend, sampling, prompt settings, the problems file by
content and the rows. A `GeneratorWorker` (orchestrator/actors.py) runs a `GenerationTask`
with `generate`, started by a `GeneratorSpawner` with the model's resources.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import ray

from orchestrator import actors
from orchestrator.config import (
    DatasetConfig,
    GenerationConfig,
    ModelConfig,
    RunConfig,
    actor_cap,
)
from orchestrator.errors import ActorStartError
from orchestrator.executor import cluster_resources
from orchestrator.plan import Unit, generated_dir, model_identity, problems_path
from orchestrator.stage import Stage, absolute_path
from orchestrator.tasks import GenerationTask
from workers.generation import SamplingParams
from workers.io import config_hash


def generation_units(
    run_dir: Path,
    model: ModelConfig,
    dataset: DatasetConfig,
    generation: GenerationConfig,
    *,
    num_problems: int,
    problems_sha256: str,
) -> list[Unit[GenerationTask]]:
    """One unit per `problems_per_shard` problems; all samples of a problem stay in one shard."""
    sampling = sampling_params(model, generation)
    prompt = {
        "template": model.template,
        "use_chat_template": model.use_chat_template,
        "instruction": dataset.instruction,
        "verifier": dataset.verifier,
    }
    common = {
        "model": model_identity(model),
        "dtype": model.dtype,
        "backend": model.generation_backend or generation.backend,
        "sampling": dataclasses.asdict(sampling),  # what the worker samples with, field by field
        "prompt": prompt,
        "problems": problems_sha256,
    }
    if generation.record_routes:  # at its default (off) the hash is as before
        common["record_routes"] = True
    base = generated_dir(run_dir, model, dataset)
    units = []
    size = generation.problems_per_shard
    for k in range(math.ceil(num_problems / size)):
        rows = (k * size, min((k + 1) * size, num_problems))
        units.append(
            Unit(
                stage="generation",
                key=f"{model.name}/{dataset.name}/{k:05d}",
                path=base / f"{k:05d}.arrow",
                root=run_dir,
                config_hash=config_hash({**common, "rows": list(rows)}),
                task=GenerationTask(
                    problems_path=problems_path(run_dir, dataset),
                    rows=rows,
                    model_name=model.name,
                    sampling=sampling,
                    **prompt,
                ),
            )
        )
    return units


def sampling_params(model: ModelConfig, generation: GenerationConfig) -> SamplingParams:
    """The sampling of this model's completions (its per-model settings, the run's n and seed)."""
    return SamplingParams(
        n=generation.samples_per_problem,
        temperature=model.temperature,
        top_p=model.top_p,
        top_k=model.sample_top_k,
        min_p=model.min_p,
        max_tokens=model.max_tokens,
        seed=generation.seed,
    )


class GeneratorSpawner:
    """Starts generator actors for one model with their resources.

    `cluster.use_gpus`: HF takes one GPU; vLLM takes `model.tensor_parallel_size` GPUs, as a
    placement group when > 1 (one per actor, removed by `release` when its actor goes and by
    `close`). Otherwise no GPU is asked for: HF runs on CPU, and so does vLLM's CPU build, with
    a fixed KV-cache size (`model.engine.cpu_kv_cache_gib`). `worker` is the class made remote.
    """

    def __init__(self, model: ModelConfig, cfg: RunConfig, worker: type = actors.GeneratorWorker):
        self.model, self.cluster = absolute_path(model), cfg.cluster
        self.actor_cls = ray.remote(worker)
        self.backend = model.generation_backend or cfg.generation.backend
        self.groups: dict[Any, Any] = {}  # actor -> its placement group
        gpus = self.cluster.use_gpus
        self.resources: dict[str, Any] = {"num_cpus": self.cluster.cpus_per_actor, "num_gpus": 0}
        routes = {"route_layers": list(model.moe_layers)} if cfg.generation.record_routes else {}
        if self.backend == "hf":
            self.options: dict[str, Any] = {
                "dtype": model.dtype,
                "batch_size": cfg.generation.batch_size,
                "device": "cuda" if gpus else "cpu",
                **routes,
            }
            self.resources["num_gpus"] = 1 if gpus else 0
            return
        engine, tp = model.engine, model.tensor_parallel_size if gpus else 1
        self.options = {
            "dtype": model.dtype,
            "tensor_parallel_size": tp,
            "seed": cfg.generation.seed,
            "max_model_len": engine.max_model_len,
            "enforce_eager": engine.enforce_eager,
            "max_num_seqs": engine.max_num_seqs,
            **routes,
        }
        if gpus:
            self.options["gpu_memory_utilization"] = engine.gpu_memory_utilization
            self.resources["num_gpus"] = tp
        else:
            self.options["kv_cache_memory_bytes"] = int(engine.cpu_kv_cache_gib * 2**30)
        if tp > 1:
            # vLLM starts one Ray worker per GPU itself: reserve the GPUs as a placement
            # group its workers inherit (vLLM's distributed_executor_backend="ray").
            self.options["distributed_executor_backend"] = "ray"

    def describe(self) -> str:
        need: dict[str, Any] = dict(self.need())
        if self.options.get("distributed_executor_backend") == "ray":
            need = {"bundles": f"{self.model.tensor_parallel_size} x {self.bundle()}"}
        return f"the {self.backend} generator actor of model {self.model.name}, needing {need},"

    def bundle(self) -> dict[str, float]:
        return {"GPU": 1, "CPU": self.cluster.cpus_per_actor}

    def need(self) -> dict[str, float]:
        """What one actor takes from the cluster (its placement group's bundles together)."""
        if self.options.get("distributed_executor_backend") == "ray":
            tp = self.model.tensor_parallel_size
            return {k: v * tp for k, v in self.bundle().items()}
        return {"CPU": self.resources["num_cpus"], "GPU": self.resources["num_gpus"]}

    def __call__(self) -> Any:
        resources, group = dict(self.resources), None
        if self.options.get("distributed_executor_backend") == "ray":
            group, strategy = self.placement()
            resources = {"num_cpus": 0, "num_gpus": 0, "scheduling_strategy": strategy}
        actor = self.actor_cls.options(max_restarts=0, **resources).remote(
            self.model,
            self.backend,
            self.options,
            torch_threads=self.cluster.torch_threads,
            provenance=actors.driver_provenance(),
            compression=self.cluster.compression,
        )
        if group is not None:
            self.groups[actor] = group
        return actor

    def placement(self) -> tuple[Any, Any]:
        from ray.exceptions import GetTimeoutError
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        bundles = [self.bundle()] * self.model.tensor_parallel_size
        group = placement_group(bundles, strategy="STRICT_PACK")
        try:
            ray.get(group.ready(), timeout=self.cluster.actor_start_timeout_s)
        except GetTimeoutError:
            remove_placement_group(group)
            raise ActorStartError(
                f"{self.describe()} could not be placed within"
                f" {self.cluster.actor_start_timeout_s:g} s (cluster.actor_start_timeout_s):"
                f" no node has {len(bundles)} x {self.bundle()} free;"
                f" the cluster has {cluster_resources()}"
            ) from None
        return group, PlacementGroupSchedulingStrategy(
            placement_group=group, placement_group_capture_child_tasks=True
        )

    def release(self, actor: Any) -> None:
        """Free the placement group of an actor that is gone (dead, hung or done)."""
        from ray.util.placement_group import remove_placement_group

        group = self.groups.pop(actor, None)
        if group is not None:
            remove_placement_group(group)

    def close(self) -> None:
        for actor in list(self.groups):
            self.release(actor)


class GenerationStage(Stage):
    name = "generation"
    task = GenerationTask
    method = "generate"

    def actors(self) -> int | None:
        return actor_cap(self.cfg.cluster.generators)

    def spawner(self, model: ModelConfig) -> GeneratorSpawner:
        return GeneratorSpawner(model, self.cfg, self.worker)

    plan = staticmethod(generation_units)
