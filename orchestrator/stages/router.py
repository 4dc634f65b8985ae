"""What the router update's stages share: their folder, hyperparameters, data sets, actors.

Contract: everything of a model's update lives under router_update/<model>/ (`router_root`);
the updated checkpoint is a model of its own, `<model>-router` (`updated_model`). The
preference and training steps run on `RouterWorker` actors (orchestrator/actors.py), one per
model, started by `RouterSpawner`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray

from orchestrator.config import (
    DatasetConfig,
    ModelConfig,
    RouterUpdateConfig,
    RunConfig,
    load_option,
)
from orchestrator.plan import TaskT, Unit
from orchestrator.stage import Stage

if TYPE_CHECKING:
    from workers.router.update import UpdateConfig

SELECT_KEYS = ("margin", "fragile", "confident", "max_anchor_tokens", "holdout_share", "seed")
TRAIN_KEYS = ("beta", "anchor_weight", "steps", "lr", "seed")


@dataclass(frozen=True)
class Variant:
    """One trained router: the real update (`name` "updated", no control) or a control
    ("random", "shuffled") trained with its own `seed`, named "<control>-seed<seed>"."""

    name: str = "updated"
    control: str = ""
    seed: int | None = None


UPDATED = Variant()


def trained_variants(ru: RouterUpdateConfig) -> list[Variant]:
    """The real update, then each control at each of `seeds` (empty: [seed])."""
    seeds = ru.seeds or [ru.seed]
    return [UPDATED] + [Variant(f"{c}-seed{s}", c, s) for c in ru.controls for s in seeds]


def update_config(ru: RouterUpdateConfig, variant: Variant = UPDATED) -> UpdateConfig:
    """The update's hyperparameters as the worker takes them (a control's seed its own)."""
    from workers.router.update import UpdateConfig  # loads torch: the router stage only

    values = {k: getattr(ru, k) for k in (*SELECT_KEYS, *TRAIN_KEYS)}
    if variant.seed is not None:
        values["seed"] = variant.seed
    return UpdateConfig(**values)


def router_root(run_dir: Path, model: ModelConfig) -> Path:
    return run_dir / "router_update" / model.name


def variant_root(run_dir: Path, model: ModelConfig, variant: Variant = UPDATED) -> Path:
    """Where a variant's training log and checkpoint live: the model's folder for the real
    update, controls/<name>/ below it for a control."""
    root = router_root(run_dir, model)
    return root if variant == UPDATED else root / "controls" / variant.name


def updated_model(run_dir: Path, model: ModelConfig, variant: Variant = UPDATED) -> ModelConfig:
    """A trained checkpoint as a model of its own (name <model>-router, or
    <model>-router-<variant> for a control; loaded from disk)."""
    ckpt = variant_root(run_dir, model, variant) / "checkpoint"
    name = f"{model.name}-router" + ("" if variant == UPDATED else f"-{variant.name}")
    return dataclasses.replace(model, name=name, path=str(ckpt))


def datasets(names: list[str], limit: int | None = None) -> list[DatasetConfig]:
    """The named datasets as conf/dataset/ defines them, cut to `limit` problems if given."""
    out = [load_option("dataset", n) for n in names]
    if limit is not None:
        out = [dataclasses.replace(d, limit=min(d.limit or limit, limit)) for d in out]
    return out


class RouterSpawner:
    """Starts the router actor of one model: it loads the model once, on one GPU if used."""

    def __init__(self, model: ModelConfig, cfg: RunConfig, worker: type):
        self.model, self.cluster = model, cfg.cluster
        self.actor_cls = ray.remote(worker)
        self.device = "cuda" if self.cluster.use_gpus else "cpu"
        self.gpus = model.gpus if self.cluster.use_gpus else 0

    def __call__(self) -> Any:
        options = {"num_cpus": self.cluster.cpus_per_actor, "num_gpus": self.gpus}
        return self.actor_cls.options(max_restarts=0, **options).remote(
            self.model,
            self.device,
            torch_threads=self.cluster.torch_threads,
            compression=self.cluster.compression,
        )

    def need(self) -> dict[str, float]:
        return {"CPU": self.cluster.cpus_per_actor, "GPU": self.gpus}

    def describe(self) -> str:
        return f"the router actor of model {self.model.name}, needing {self.need()},"


class RouterStage(Stage):
    """A step on the model's router actor: one actor, one unit at a time."""

    def actors(self) -> int | None:
        return 1

    def spawner(self, model: ModelConfig) -> RouterSpawner:
        return RouterSpawner(model, self.cfg, self.worker)


def relocate(unit: Unit[TaskT], path: Path, key: str) -> Unit[TaskT]:
    """`unit` written elsewhere under another key: same task and hash (a main-stage unit
    moved under router_update/)."""
    return dataclasses.replace(unit, path=path, key=key)
