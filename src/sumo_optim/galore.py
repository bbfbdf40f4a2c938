"""GaLore: Adam inside a gradient SVD subspace (Zhao et al., ICML 2024, arXiv 2403.03507).

Drop-in for galore-torch 1.0's ``GaLoreAdamW``: a param group with a ``rank`` key (and
``update_proj_gap`` T, ``scale`` α, ``proj_type``) trains its matrices in a rank-r subspace;
every other parameter gets the same Adam rule in full space. For a matrix, with ``P`` the
basis chosen every T steps from the first (``side`` by ``proj_type``):

    R = project(G)                       (Pᵀ G or G P)
    m ← β₁ m + (1 − β₁) R;   v ← β₂ v + (1 − β₂) R²
    W ← W − η √(1 − β₂ᵗ)/(1 − β₁ᵗ) · α · project_back(m / (√v + ε));   W ← W − η λ W

The Adam moments are not carried over when P changes (the published algorithm and
galore-torch); ``transport_moments=True`` maps the first moment into the new basis
(``m ← P_newᵀ P_old m``) and keeps the second.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .base import SubspaceOptimizer, _is_number
from .subspace import BASIS_METHODS, choose_side, compute_basis, is_refresh_step, project, project_back, transport

__all__ = ["GaLoreAdamW", "galore_adam_update", "validate_galore_options"]


def galore_adam_update(
    weights: Tensor, direction_of: Any, moments: tuple[Tensor, Tensor], grad: Tensor, step: int, group: dict[str, Any]
) -> None:
    """galore-torch's AdamW step (bias correction folded into the step size, ε outside it,
    weight decay after the update); ``direction_of`` maps m/(√v+ε) to the weights' shape."""
    exp_avg, exp_avg_sq = moments
    beta1, beta2 = group["adamw_betas"]
    exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    denom = exp_avg_sq.sqrt().add_(group["adamw_eps"])
    step_size = group["lr"]
    if group["correct_bias"]:
        step_size = step_size * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)
    weights.add_(direction_of(exp_avg / denom), alpha=-step_size)
    if group["weight_decay"] > 0.0:
        weights.add_(weights, alpha=-group["lr"] * group["weight_decay"])


def validate_galore_options(group: dict[str, Any]) -> None:
    """Checks a group's ``rank`` (``None``: full space), ``update_proj_gap``, ``scale``,
    ``proj_type`` and ``refresh``, with one clear ``ValueError`` each."""
    if group["rank"] is not None:
        SubspaceOptimizer._check_positive_int(group, "rank")
    SubspaceOptimizer._check_positive_int(group, "update_proj_gap")
    if not _is_number(group["scale"]) or group["scale"] < 0:
        raise ValueError(f"scale must be a finite number >= 0, got {group['scale']!r}")
    if group["proj_type"] not in ("std", "reverse_std", "left", "right"):
        raise ValueError(
            f"proj_type must be 'std', 'reverse_std', 'left' or 'right', got {group['proj_type']!r}"
            + (" (galore-torch's two-sided 'full' is not supported)" if group["proj_type"] == "full" else "")
        )
    if group["refresh"] not in BASIS_METHODS:
        raise ValueError(f"refresh must be one of {BASIS_METHODS}, got {group['refresh']!r}")


class GaLoreAdamW(SubspaceOptimizer):
    """GaLore with Adam, argument-compatible with ``galore_torch.GaLoreAdamW``.

    Args:
        params: parameters or groups; a group with ``rank`` (and optionally ``update_proj_gap``,
            ``scale``, ``proj_type``, ``refresh``) trains its matrices in a subspace. Groups from
            :func:`sumo_optim.param_groups` work too (``subspace=False`` means plain Adam).
        lr, betas, eps, weight_decay, correct_bias: Adam's, with galore-torch's defaults.
        rank: r for groups that name none (``None``: such groups get plain Adam, as in galore-torch).
        update_proj_gap: T, the refresh period. scale: α. proj_type: "std" (project the
            shorter side), "reverse_std", "left" or "right".
        refresh: "svd" (exact, galore-torch) or "randomized" (range finder, milliseconds on GPU).
        transport_moments: carry the first moment into a new basis instead of keeping it as is.
        nonfinite, seed, layerwise: as in :class:`~sumo_optim.SUMO`.
    """

    basis_method_key = "refresh"

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
        rank: int | None = None,
        update_proj_gap: int = 200,
        scale: float = 1.0,
        proj_type: str = "std",
        refresh: str = "svd",
        transport_moments: bool = False,
        nonfinite: str = "raise",
        seed: int = 0,
        layerwise: bool = False,
        **extra: Any,
    ) -> None:
        defaults = dict(
            lr=lr,
            adamw_betas=betas,
            adamw_eps=eps,
            weight_decay=weight_decay,
            correct_bias=correct_bias,
            rank=rank,
            update_proj_gap=update_proj_gap,
            scale=scale,
            proj_type=proj_type,
            refresh=refresh,
            transport_moments=transport_moments,
            nonfinite=nonfinite,
            seed=seed,
            **extra,
        )
        super().__init__(params, defaults, layerwise=layerwise)

    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
        validate_galore_options(group)

    def _uses_matrix_rule(self, param: Tensor, group: dict[str, Any]) -> bool:
        return group["subspace"] and group["rank"] is not None and param.ndim >= 2

    def _side(self, shape: tuple[int, int], group: dict[str, Any]) -> str:
        # Never "full": Adam is not rotation invariant, so a full-size basis is not Q = I.
        return choose_side(shape, 0, group["proj_type"])

    def _expected_state_shapes(
        self, shape: tuple[int, int], group: dict[str, Any], state: dict[str, Any]
    ) -> dict[str, tuple[int, ...]]:
        m, n = shape
        side, rank = self._side(shape, group), min(group["rank"], m, n)
        reduced = (rank, n) if side == "left" else (m, rank)
        return {"basis": (m if side == "left" else n, rank), "exp_avg": reduced, "exp_avg_sq": reduced}

    def _basis_method(self, state: dict[str, Any], group: dict[str, Any]) -> str:
        return group["refresh"]

    def _matrix_step(self, weights: Tensor, grad: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        side, basis = self._side(grad.shape, group), state.get("basis")
        if basis is None or is_refresh_step(state["step"], group["update_proj_gap"]):
            method = self._basis_method(state, group)
            generator = self._generator(state, grad.device) if method != "svd" else None
            new_basis = compute_basis(grad, group["rank"], side, method=method, generator=generator)
            if basis is not None and group["transport_moments"] and "exp_avg" in state:
                state["exp_avg"] = transport(state["exp_avg"], basis, new_basis, side)
            state["basis"] = basis = new_basis
        reduced = project(grad, basis, side)
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(reduced)
            state["exp_avg_sq"] = torch.zeros_like(reduced)
        self._inner_step(weights, reduced, state, group, lambda r: project_back(r, basis, side) * group["scale"])

    def _inner_step(
        self, weights: Tensor, reduced: Tensor, state: dict[str, Any], group: dict[str, Any], direction_of: Any
    ) -> None:
        galore_adam_update(
            weights, direction_of, (state["exp_avg"], state["exp_avg_sq"]), reduced, state["step"], group
        )

    def _vector_step(self, weights: Tensor, grad: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(grad)
            state["exp_avg_sq"] = torch.zeros_like(grad)
        galore_adam_update(weights, lambda d: d, (state["exp_avg"], state["exp_avg_sq"]), grad, state["step"], group)
