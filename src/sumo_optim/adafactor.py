"""GaLore with Adafactor (Zhao et al. 2024; Adafactor: Shazeer & Stern, ICML 2018, arXiv 1804.04235).

Drop-in for galore-torch 1.0's ``GaLoreAdafactor``: a param group with a ``rank`` key runs
Adafactor on the reduced gradient ``R = project(G)`` of each matrix (basis ``P`` chosen every
T steps from the first, as in :class:`~sumo_optim.GaLoreAdamW`); every other parameter gets
plain Adafactor. At step t, for the (reduced) gradient R of shape m×n:

    β̂₂ₜ = 1 − t^c                                   (c = decay_rate < 0; Alg. 4, line 5)
    factored (≥ 2-D):  r ← β̂₂ₜ r + (1 − β̂₂ₜ) mean_cols(R² + ε₁)
                       c ← β̂₂ₜ c + (1 − β̂₂ₜ) mean_rows(R² + ε₁)
                       V̂ = r cᵀ / mean(r)                 (Alg. 4, lines 6–8)
    otherwise:         V̂ ← β̂₂ₜ V̂ + (1 − β̂₂ₜ)(R² + ε₁)
    U = R / √V̂;   U ← U / max(1, RMS(U)/d)              (update clipping, §5)
    αₜ = max(ε₂, RMS(Wₜ₋₁)) · ρₜ  with ρₜ = min(10⁻², 1/√t)   (relative step, §8; ρₜ = min(10⁻⁶t, 1/√t)
         with warmup_init; ρₜ = lr without relative_step; no RMS factor without scale_parameter)
    m ← β₁ m + (1 − β₁) αₜ U   (only when beta1 is not None; else m = αₜ U)
    W ← W − αₜ λ W − α · project_back(m)

Like galore-torch, the factored second moment and ``m`` are kept as they are when P changes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .base import SubspaceOptimizer, _is_number
from .galore import validate_galore_options
from .subspace import choose_side, compute_basis, is_refresh_step, project, project_back

__all__ = ["GaLoreAdafactor", "adafactor_update"]


def root_mean_square(tensor: Tensor) -> Tensor:
    """RMS(x) = ‖x‖₂ / √numel, as a 0-d tensor (no host sync)."""
    return torch.linalg.vector_norm(tensor) / math.sqrt(tensor.numel())


def adafactor_step_size(group: dict[str, Any], step: int, weights: Tensor) -> Tensor | float:
    """αₜ: the relative step ρₜ (or ``lr``), times max(ε₂, RMS(W)) when ``scale_parameter``."""
    if group["relative_step"]:
        floor = 1e-6 * step if group["warmup_init"] else 1e-2
        step_size = min(floor, 1.0 / math.sqrt(step))
    else:
        step_size = group["lr"]
    if group["scale_parameter"]:
        return root_mean_square(weights).clamp(min=group["eps"][1]) * step_size
    return step_size


def inverse_sqrt_second_moment(grad: Tensor, state: dict[str, Any], beta2: float, eps: float) -> Tensor:
    """Updates the second-moment estimate with R² + ε₁ and returns 1/√V̂ (R's shape).

    Tensors of two or more dimensions keep only the row and column means over their last two
    dimensions (``exp_avg_sq_row``, ``exp_avg_sq_col``); V̂ is their rank-1 outer product
    normalized by the mean row. Vectors keep the full ``exp_avg_sq``.
    """
    squared = grad.square().add_(eps)
    if grad.ndim < 2:
        if "exp_avg_sq" not in state:
            state["exp_avg_sq"] = torch.zeros_like(grad)
        second_moment = state["exp_avg_sq"]
        second_moment.mul_(beta2).add_(squared, alpha=1.0 - beta2)
        return second_moment.rsqrt()
    if "exp_avg_sq_row" not in state:
        state["exp_avg_sq_row"] = grad.new_zeros(grad.shape[:-1])
        state["exp_avg_sq_col"] = grad.new_zeros(grad.shape[:-2] + grad.shape[-1:])
    row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
    row.mul_(beta2).add_(squared.mean(dim=-1), alpha=1.0 - beta2)
    col.mul_(beta2).add_(squared.mean(dim=-2), alpha=1.0 - beta2)
    row_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
    return row_factor * col.unsqueeze(-2).rsqrt()


def adafactor_update(
    weights: Tensor,
    grad: Tensor,
    state: dict[str, Any],
    group: dict[str, Any],
    direction_of: Callable[[Tensor], Tensor] = lambda update: update,
) -> None:
    """One Adafactor step in place; ``direction_of`` maps the (reduced) update to the weights'
    shape. ``state["step"]`` must already count this step."""
    step = state["step"]
    step_size = adafactor_step_size(group, step, weights)
    beta2 = 1.0 - math.pow(step, group["decay_rate"])
    update = inverse_sqrt_second_moment(grad, state, beta2, group["eps"][0]).mul_(grad)
    update.div_((root_mean_square(update) / group["clip_threshold"]).clamp_(min=1.0))
    update.mul_(step_size)
    if group["beta1"] is not None:
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(grad)
        update = state["exp_avg"].mul_(group["beta1"]).add_(update, alpha=1.0 - group["beta1"])
    update = direction_of(update)
    if group["weight_decay"] != 0.0:
        weights.mul_(1.0 - group["weight_decay"] * step_size)
    weights.sub_(update)


class GaLoreAdafactor(SubspaceOptimizer):
    """GaLore with Adafactor, argument-compatible with ``galore_torch.GaLoreAdafactor``.

    Args:
        params: parameters or groups; a group with ``rank`` (and optionally ``update_proj_gap``,
            ``scale``, ``proj_type``, ``refresh``) trains its matrices in a subspace. Everything
            else (and groups with ``subspace=False`` from :func:`sumo_optim.param_groups`) gets
            plain Adafactor, factored for tensors of two or more dimensions.
        lr: external step size ρ; must be ``None`` with ``relative_step`` and set without it.
        eps: (ε₁, ε₂): added to R², and the floor of RMS(W) in the step size.
        clip_threshold: d of the update clipping. decay_rate: c in β̂₂ₜ = 1 − tᶜ (c < 0).
        beta1: first-moment decay (``None``: no first moment). weight_decay: λ, scaled by αₜ.
        scale_parameter, relative_step, warmup_init: the step size αₜ (module docstring).
        rank: r for groups that name none (``None``: plain Adafactor, as in galore-torch).
        update_proj_gap: T. scale: α. proj_type: "std", "reverse_std", "left" or "right".
        refresh: "iterative" (default since 2026-12-04, as :class:`~sumo_optim.GaLoreAdamW`'s: the
            SVD's bases to float32 accuracy, signed by one convention; matrix by matrix here, a
            LLaMA-1B refresh 4.9 s against the SVD's 41.1 s, amortized step 111.6 against
            296.0 ms on an H200, ``benchmarks/results/step_time_1b_adafactor.md``), "svd" (exact,
            galore-torch bit for bit) or "randomized".
        nonfinite, seed, layerwise, bf16_stochastic_rounding: as in :class:`~sumo_optim.SUMO`.
        layerwise_accumulation_steps: as in :class:`~sumo_optim.SUMO`, except that every matrix
            keeps its full gradient until the N-th backward pass.
            (Nothing here follows AdamW, so there is no ``adamw_state_bits``.)
    """

    vector_step_is_elementwise = False  # factored second moments of 2-D parameters

    def __init__(
        self,
        params: Any,
        lr: float | None = None,
        eps: tuple[float, float] = (1e-30, 1e-3),
        clip_threshold: float = 1.0,
        decay_rate: float = -0.8,
        beta1: float | None = None,
        weight_decay: float = 0.0,
        scale_parameter: bool = True,
        relative_step: bool = True,
        warmup_init: bool = False,
        rank: int | None = None,
        update_proj_gap: int = 200,
        scale: float = 1.0,
        proj_type: str = "std",
        refresh: str = "iterative",
        nonfinite: str = "raise",
        seed: int = 0,
        layerwise: bool = False,
        bf16_stochastic_rounding: bool = False,
        layerwise_accumulation_steps: int = 1,
    ) -> None:
        defaults = dict(
            lr=lr,
            eps=eps,
            clip_threshold=clip_threshold,
            decay_rate=decay_rate,
            beta1=beta1,
            weight_decay=weight_decay,
            scale_parameter=scale_parameter,
            relative_step=relative_step,
            warmup_init=warmup_init,
            rank=rank,
            update_proj_gap=update_proj_gap,
            scale=scale,
            proj_type=proj_type,
            refresh=refresh,
            nonfinite=nonfinite,
            seed=seed,
            bf16_stochastic_rounding=bf16_stochastic_rounding,
        )
        super().__init__(
            params, defaults, layerwise=layerwise, layerwise_accumulation_steps=layerwise_accumulation_steps
        )

    def _validate_group(self, group: dict[str, Any]) -> None:
        for name in ("scale_parameter", "relative_step", "warmup_init"):
            if not isinstance(group[name], bool):
                raise ValueError(f"{name} must be True or False, got {group[name]!r}")
        if group["relative_step"]:
            if group["lr"] is not None:
                raise ValueError("lr must be None with relative_step=True (the step size is then 1/√t-based)")
        elif group["lr"] is None:
            raise ValueError("lr is required with relative_step=False")
        else:
            self._validate_lr(group["lr"])
        if group["warmup_init"] and not group["relative_step"]:
            raise ValueError("warmup_init=True requires relative_step=True")
        eps = group["eps"]
        if not isinstance(eps, (tuple, list)) or len(eps) != 2 or not all(_is_number(e) and e >= 0 for e in eps):
            raise ValueError(f"eps must be two finite numbers >= 0, got {eps!r}")
        if not _is_number(group["clip_threshold"]) or group["clip_threshold"] <= 0:
            raise ValueError(f"clip_threshold must be a finite number > 0, got {group['clip_threshold']!r}")
        if not _is_number(group["decay_rate"]) or group["decay_rate"] >= 0:
            raise ValueError(f"decay_rate must be a finite number < 0 (β̂₂ₜ = 1 − t^c), got {group['decay_rate']!r}")
        beta1 = group["beta1"]
        if beta1 is not None and (not _is_number(beta1) or not 0 <= beta1 < 1):
            raise ValueError(f"beta1 must be None or a number in [0, 1), got {beta1!r}")
        validate_galore_options(group)
        if group["adamw_state_bits"] != 32:
            raise ValueError("GaLoreAdafactor has no AdamW states: adamw_state_bits must stay 32")
        self._validate_common(group)

    def _uses_matrix_rule(self, param: Tensor, group: dict[str, Any]) -> bool:
        return group["subspace"] and group["rank"] is not None and param.ndim >= 2

    @staticmethod
    def _side(shape: tuple[int, int], group: dict[str, Any]) -> str:
        # Never "full": Adafactor's factored moment is not rotation invariant.
        return choose_side(shape, 0, group["proj_type"])

    def _expected_state_shapes(
        self, shape: tuple[int, int], group: dict[str, Any], state: dict[str, Any]
    ) -> dict[str, tuple[int, ...]]:
        m, n = shape
        side, rank = self._side(shape, group), min(group["rank"], m, n)
        reduced = (rank, n) if side == "left" else (m, rank)
        return {
            "basis": (m if side == "left" else n, rank),
            "exp_avg": reduced,
            "exp_avg_sq_row": reduced[:1],
            "exp_avg_sq_col": reduced[1:],
        }

    def _expected_vector_state_shapes(
        self, shape: tuple[int, ...], group: dict[str, Any]
    ) -> dict[str, tuple[int, ...]]:
        if len(shape) < 2:
            return {"exp_avg": shape, "exp_avg_sq": shape}
        return {"exp_avg": shape, "exp_avg_sq_row": shape[:-1], "exp_avg_sq_col": shape[:-2] + shape[-1:]}

    def _matrix_step(self, weights: Tensor, grad: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        side, basis = self._side(grad.shape, group), state.get("basis")
        if basis is None or is_refresh_step(state["step"], group["update_proj_gap"]):
            method = group["refresh"]
            generator = self._generator(state, grad.device) if method != "svd" else None
            state["basis"] = basis = compute_basis(grad, group["rank"], side, method=method, generator=generator)
        reduced = project(grad, basis, side)
        adafactor_update(weights, reduced, state, group, lambda r: project_back(r, basis, side) * group["scale"])

    def _vector_step(self, weights: Tensor, grad: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        adafactor_update(weights, grad, state, group)
