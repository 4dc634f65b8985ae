"""The router update's hyperparameters: every one declared here once, with its default and help.

Contract: `UpdateConfig(...)` is what workers.router.update's `select_tokens` and
`train_router` take. The driver's `router_update.<key>` settings are this class's fields (its
RouterUpdateConfig derives from it and adds only the run's own keys: which models, data sets
and layer), so a new hyperparameter is added here and nowhere else. The driver checks the
values before Ray (orchestrator.config). Importing this module does not import torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field


def _setting(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class UpdateConfig:
    """Preference tokens: Fragile (pbar < fragile) with max_j u(R_j) - u(S) > margin, winner
    R*, loser S. Anchor tokens: Confident (pbar >= confident), at most max_anchor_tokens (a
    seeded sample). Loss: -log sigmoid(beta * DPO margin) + anchor_weight * KL(original || new)
    on the anchors. Not frozen: it is also part of the Hydra schema of conf/router_update/. The
    field order is the order of the settings table in an updated checkpoint's README.md."""

    margin: float = _setting(0.05, "a preference token's best alternative beats S by more")
    fragile: float = _setting(0.5, "preference tokens have pbar < fragile")
    confident: float = _setting(0.9, "anchor tokens have pbar >= confident")
    beta: float = _setting(1.0, "DPO temperature of the preference loss")
    # Confident tokens' top-k sets often sit on near-ties (on the bundled model the median gap
    # between the k-th and (k+1)-th logit is 0.1), so the anchor needs weight to hold them.
    anchor_weight: float = _setting(10.0, "weight of the anchor tokens' KL term")
    steps: int = _setting(200, "full-batch Adam steps on the router parameters")
    # Adam moves every weight by about lr per step whatever its gradient: keep lr x steps well
    # below the router weights' scale (bundled model: |w| ~ 0.04).
    lr: float = _setting(3e-4, "Adam learning rate")
    max_anchor_tokens: int = _setting(4096, "most anchor tokens (a seeded sample)")
    holdout_share: float = _setting(
        0.25, "problems (by hash) kept out of the preference data: the held-out check's tokens"
    )
    seed: int = _setting(0, "seed of the anchor sample and the held-out problems")
