"""Router training: the updated router of one layer, written as a checkpoint.

Contract: one unit per model and variant (the real update, then each control at each seed:
orchestrator.stages.router.trained_variants), router_update/<model>/train_log.arrow plus the
checkpoint directory router_update/<model>/checkpoint/ (a control's under
router_update/<model>/controls/<variant>/), complete only while the checkpoint's files match
the fingerprint in the log's sidecar; its hash covers the model's identity, the layer, the
training settings and the preferences by content (a control's also its control and the
training scores). A `RouterWorker` runs its `TrainTask` with
`train`.
"""

from __future__ import annotations

from pathlib import Path

from orchestrator.config import ModelConfig, RouterUpdateConfig
from orchestrator.plan import Unit, local_fingerprint, model_identity
from orchestrator.stages.router import (
    TRAIN_KEYS,
    UPDATED,
    RouterStage,
    Variant,
    update_config,
    variant_root,
)
from orchestrator.tasks import TrainTask
from workers.io import config_hash, is_complete, read_sidecar


def train_unit(
    run_dir: Path,
    model: ModelConfig,
    layer: int,
    ru: RouterUpdateConfig,
    preferences: Path,
    variant: Variant = UPDATED,
    scores: tuple[Path, ...] = (),
) -> Unit[TrainTask]:
    """One variant's training unit, from the complete `preferences` file (a control's also
    from the training `scores`, whose draws its targets come from)."""
    root = variant_root(run_dir, model, variant)
    update = update_config(ru, variant)
    hashed = {
        "model": model_identity(model),
        "layer": layer,
        "train": {k: getattr(update, k) for k in TRAIN_KEYS},
        "preferences": read_sidecar(preferences)["sha256"],
    }
    if variant != UPDATED:
        hashed |= {
            "control": variant.control,
            "scores": [read_sidecar(p)["sha256"] for p in scores],
        }
    return Unit(
        stage="router_train",
        key=f"{model.name}/train" + ("" if variant == UPDATED else f"/{variant.name}"),
        path=root / "train_log.arrow",
        root=run_dir,
        config_hash=config_hash(hashed),
        task=TrainTask(
            preferences=preferences,
            checkpoint=root / "checkpoint",
            layer=layer,
            update=update,
            source=model.hf_id if model.hf_id != "bundled" else "workers/assets/tiny-moe",
            control=variant.control,
            scores=tuple(scores) if variant != UPDATED else (),
        ),
    )


def train_complete(unit: Unit[TrainTask], checksum: bool) -> bool:
    """The log is complete and the checkpoint's files still match the recorded fingerprint."""
    if not is_complete(unit.path, unit.config_hash, checksum=checksum):
        return False
    ckpt = unit.task.checkpoint
    if not (ckpt / "config.json").is_file():
        return False
    recorded = (read_sidecar(unit.path) or {}).get("checkpoint_fingerprint")
    return recorded == local_fingerprint(str(ckpt.resolve()))


class TrainStage(RouterStage):
    name = "router_train"
    task = TrainTask
    method = "train"
    plan = staticmethod(train_unit)

    def complete(self, unit: Unit, checksum: bool) -> bool:
        return train_complete(unit, checksum)
