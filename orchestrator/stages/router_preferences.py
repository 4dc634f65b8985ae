"""Router preferences: the selected tokens of the training scores and the router input at each.

Contract: one unit per model, router_update/<model>/preferences.arrow
(workers.router.update: the preference and anchor tokens, one standard pass per trajectory);
its hash covers the model's identity, the layer, the selection settings and the scores by
content. A `RouterWorker` runs its `PreferenceTask` with `preferences`.
"""

from __future__ import annotations

from pathlib import Path

from orchestrator.config import ModelConfig, RouterUpdateConfig
from orchestrator.plan import Unit, model_identity
from orchestrator.stages.router import SELECT_KEYS, RouterStage, router_root, update_config
from orchestrator.tasks import PreferenceTask
from workers.io import config_hash, read_sidecar


def preference_unit(
    run_dir: Path,
    model: ModelConfig,
    layer: int,
    ru: RouterUpdateConfig,
    scores: list[Path],
    shards: list[Path],
) -> Unit[PreferenceTask]:
    """The model's one preference unit, from its training `scores` (complete) and `shards`."""
    return Unit(
        stage="router_preferences",
        key=f"{model.name}/preferences",
        path=router_root(run_dir, model) / "preferences.arrow",
        root=run_dir,
        config_hash=config_hash(
            {
                "model": model_identity(model),
                "layer": layer,
                "select": {k: getattr(ru, k) for k in SELECT_KEYS},
                "scores": [read_sidecar(p)["sha256"] for p in scores],
            }
        ),
        task=PreferenceTask(
            scores=tuple(scores), shards=tuple(shards), layer=layer, update=update_config(ru)
        ),
    )


class PreferenceStage(RouterStage):
    name = "router_preferences"
    task = PreferenceTask
    method = "preferences"
    plan = staticmethod(preference_unit)
