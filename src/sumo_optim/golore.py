"""GoLore: GaLore with random subspaces late in training (He et al., ICML 2025, arXiv 2410.11289).

GaLore's SVD basis follows the gradient; once the true gradient is small, it follows the
noise and the method can stall (the paper's counter-example). GoLore draws the basis
uniformly from the Stiefel manifold instead, independently of the gradient, which converges
with ordinary batch sizes. "GoLore@x%" runs GaLore for the first (100 − x)% of
``total_steps`` and GoLore for the last x%. Every τ = ``update_proj_gap`` steps:

    P ~ U(St(m, r))  (random phase)   or   P = top-r singular vectors of G  (GaLore phase)

and the inner rule runs on R = project(G): Adam (as in GaLore) or momentum SGD
(``m ← μ m + R``, ``W ← W − η α project_back(m)``, the setting of the paper's analysis).
Following the authors' code, the first moment is carried into a new basis
(``m ← P_newᵀ P_old m``) and Adam's second moment is kept.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import _is_number
from .galore import GaLoreAdamW
from .stacks import Matrix

__all__ = ["GoLore"]

INNER_RULES = ("adamw", "sgd")


class GoLore(GaLoreAdamW):
    """GoLore@x%: GaLore's SVD subspaces, then random Stiefel subspaces for the last x%.

    Args:
        total_steps: planned number of optimizer steps (the schedule's length).
        random_fraction: x, the fraction of ``total_steps`` (at the end) that uses random
            subspaces; 1.0 is pure GoLore, 0.0 pure GaLore. The paper's GoLore@20% is 0.2.
        inner: "adamw" (GaLore's Adam) or "sgd" (momentum SGD with ``momentum``).
        momentum: μ of the SGD inner rule.
        rank, update_proj_gap (τ), scale (α), proj_type, lr, betas, eps, weight_decay,
        transport_moments (default True here), seed (the random bases' seed), nonfinite,
        layerwise, layerwise_accumulation_steps, bf16_stochastic_rounding, adamw_state_bits: as in
        :class:`~sumo_optim.GaLoreAdamW`.
    """

    def __init__(
        self,
        params: Any,
        total_steps: int,
        lr: float = 1e-3,
        random_fraction: float = 0.2,
        inner: str = "adamw",
        momentum: float = 0.0,
        rank: int | None = None,
        update_proj_gap: int = 200,
        scale: float = 1.0,
        transport_moments: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            params,
            lr=lr,
            rank=rank,
            update_proj_gap=update_proj_gap,
            scale=scale,
            transport_moments=transport_moments,
            total_steps=total_steps,
            random_fraction=random_fraction,
            inner=inner,
            momentum=momentum,
            **kwargs,
        )

    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
        self._check_positive_int(group, "total_steps")
        if not _is_number(group["random_fraction"]) or not 0 <= group["random_fraction"] <= 1:
            raise ValueError(f"random_fraction must be in [0, 1], got {group['random_fraction']!r}")
        if group["inner"] not in INNER_RULES:
            raise ValueError(f"inner must be one of {INNER_RULES}, got {group['inner']!r}")
        if not _is_number(group["momentum"]) or not 0 <= group["momentum"] < 1:
            raise ValueError(f"momentum must be in [0, 1), got {group['momentum']!r}")

    def _basis_method(self, state: dict[str, Any], group: dict[str, Any]) -> str:
        switch = (1 - group["random_fraction"]) * group["total_steps"]
        return "random" if state["step"] > switch else group["refresh"]

    graph_hyperparameters = ("adamw_betas", "adamw_eps", "inner", "momentum")

    def _reduced_directions(self, members: list[Matrix], reduced: list[Tensor]) -> list[Tensor]:
        """Adam as in GaLore, or momentum SGD: ``m ← μ m + R`` is the direction."""
        group = members[0].group
        if group["inner"] == "adamw":
            return super()._reduced_directions(members, reduced)
        momenta = [x.state["exp_avg"] for x in members]
        torch._foreach_mul_(momenta, group["momentum"])
        torch._foreach_add_(momenta, reduced)
        return momenta

    def _back_projection_scalars(self, members: list[Matrix]) -> tuple[float, float]:
        """SGD: ``W ← (1 − ηλ) W − η α project_back(m)``; Adam as in GaLore."""
        group = members[0].group
        if group["inner"] == "adamw":
            return super()._back_projection_scalars(members)
        return 1.0 - group["lr"] * group["weight_decay"], -group["lr"] * group["scale"]
