"""SUMO: Subspace-Aware Moment-Orthogonalization (Refael et al., NeurIPS 2025, arXiv 2505.24749).

Algorithm 1, for a weight ``W ∈ R^{m×n}`` with gradient ``G`` (written for the left side,
``m ≤ n``; for ``m > n`` every product is mirrored onto the right side):

1. every ``K`` steps from the first, ``Q ← top-r left singular vectors of G``  (Block 1)
   and the moment is carried over, ``M ← (Q_newᵀ Q_old) M``                   (Block 1.1)
2. ``Ĝ = Qᵀ G``;  ``M ← μ M + Ĝ``                                              (Block 2)
3. ``O = U Vᵀ`` where ``M = U Σ Vᵀ`` is the exact thin SVD                      (Block 2)
4. optional norm-growth limiter: if ``‖O‖ / ‖O_prev‖ > γ``, ``O ← O γ ‖O_prev‖ / ‖O‖`` (Block 3)
5. ``W ← W − η (α Q O + β (G − Q Ĝ)) − η λ W``                                  (Block 4)

The optimizer state of a matrix is ``Q`` (m×r) and ``M`` (r×n): ``(m + n) r`` numbers
against AdamW's ``2mn``. Parameters that are not matrices get AdamW (see
:class:`~sumo_optim.base.SubspaceOptimizer`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import SubspaceOptimizer, _is_number
from .linalg import orthogonalize, orthogonalize_cholesky, orthogonalize_newton_schulz
from .subspace import choose_side, compute_basis, is_refresh_step, project, project_back, transport

__all__ = ["SUMO", "limit_norm_growth"]

REFRESH_METHODS = ("svd", "randomized")
ORTHOGONALIZATIONS = ("exact", "svd", "cholesky", "newton_schulz")


def limit_norm_growth(update: Tensor, previous_norm: Tensor, growth_limit: float) -> tuple[Tensor, Tensor]:
    """Fira's norm-growth limiter (Chen et al. 2024, arXiv 2410.01623), SUMO's Block 3.

    If ``‖O_t‖_F > γ ‖O_{t−1}‖_F`` the update is rescaled to norm ``γ ‖O_{t−1}‖_F``. No limit on
    the first step (``previous_norm == 0``). Returns the update and its norm, without a
    host-device synchronization.
    """
    norm = torch.linalg.vector_norm(update)
    too_large = (previous_norm > 0) & (norm > growth_limit * previous_norm)
    factor = torch.where(too_large, growth_limit * previous_norm / norm, torch.ones_like(norm))
    return update * factor, norm * factor


class SUMO(SubspaceOptimizer):
    """SUMO: momentum in a low-rank gradient subspace, orthogonalized exactly by SVD.

    Args:
        params: parameters or param groups. In a group, matrices (2-D, or more dimensions
            viewed as ``(shape[0], -1)``) follow SUMO; everything else, and every parameter
            of a group with ``subspace=False``, follows AdamW. See
            :func:`sumo_optim.param_groups`.
        lr: step size η (also AdamW's learning rate for the non-matrix parameters of the group).
        rank: subspace rank r; ``rank ≥ min(m, n)`` uses the whole space (exact-SVD Muon).
        update_freq: subspace refresh period K, in steps (the first step refreshes).
        momentum: moment decay μ in ``M ← μ M + Ĝ``.
        scale: α, the scale of the orthogonalized step ``Q O`` (the paper's
            "projection back scale").
        weight_decay: decoupled weight decay λ (``W ← W − η λ W``), for AdamW params too.
        limiter: γ of the norm-growth limiter (the paper uses 1.1); ``None`` disables it.
        refresh: how Q is chosen: ``"randomized"`` (default, as in Algorithm 1: a randomized
            range finder with ``power_iterations`` and Rayleigh–Ritz, milliseconds per matrix
            on a GPU) or ``"svd"`` (the exact truncated SVD; 260 ms per 2048×5461 matrix on
            an H100, so a LLaMA-1B refresh takes ~40 s).
        complement_scale: β, weight of the gradient's orthogonal complement ``(I − QQᵀ) G``
            in the update. Algorithm 1's Block 4 uses 1; the default 0 takes the step in the
            subspace only (the project's spec, and GaLore-class methods).
        orthogonalization: ``"exact"`` (default: ``U Vᵀ`` to float64 accuracy, by one SVD per
            matrix on CPU and by the batched Cholesky-QR2 + Newton–Schulz route of
            :func:`~sumo_optim.linalg.orthogonalize_cholesky` on GPUs; both give the same
            result), ``"svd"`` or ``"cholesky"`` to force one route, or ``"newton_schulz"``
            (Muon's 5-step approximation, the paper's ablation).
        adamw_betas, adamw_eps: AdamW's (β1, β2) and ε for the non-matrix parameters.
        nonfinite: ``"raise"`` (default) raises on a NaN/Inf gradient before any weight
            changes; ``"skip"`` skips that parameter's step and counts it in
            ``state["skipped_steps"]``.
        seed: seeds the randomized refresh; each matrix's draws depend only on
            (seed, its index, step), so resumed and data-parallel runs draw the same.
        layerwise: update each parameter in a post-accumulate-grad hook and free its gradient
            at once (see :class:`~sumo_optim.base.SubspaceOptimizer`).

    States (``self.state[p]``): ``basis`` Q, ``moment`` M, ``step``, ``seed``, and
    ``previous_norm`` with the limiter; float32 for bf16/fp16 parameters.
    """

    def __init__(
        self,
        params: Any,
        lr: float = 0.02,
        rank: int = 128,
        update_freq: int = 200,
        momentum: float = 0.95,
        scale: float = 1.0,
        weight_decay: float = 0.0,
        limiter: float | None = None,
        refresh: str = "randomized",
        power_iterations: int = 2,
        complement_scale: float = 0.0,
        orthogonalization: str = "exact",
        adamw_betas: tuple[float, float] = (0.9, 0.999),
        adamw_eps: float = 1e-8,
        nonfinite: str = "raise",
        seed: int = 0,
        layerwise: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr,
            rank=rank,
            update_freq=update_freq,
            momentum=momentum,
            scale=scale,
            weight_decay=weight_decay,
            limiter=limiter,
            refresh=refresh,
            power_iterations=power_iterations,
            complement_scale=complement_scale,
            orthogonalization=orthogonalization,
            adamw_betas=adamw_betas,
            adamw_eps=adamw_eps,
            nonfinite=nonfinite,
            seed=seed,
        )
        super().__init__(params, defaults, layerwise=layerwise)

    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
        self._check_positive_int(group, "rank")
        self._check_positive_int(group, "update_freq")
        if not _is_number(group["momentum"]) or not 0 <= group["momentum"] < 1:
            raise ValueError(f"momentum must be in [0, 1), got {group['momentum']!r}")
        if not _is_number(group["scale"]) or group["scale"] < 0:
            raise ValueError(f"scale must be a finite number >= 0, got {group['scale']!r}")
        if not _is_number(group["complement_scale"]) or group["complement_scale"] < 0:
            raise ValueError(f"complement_scale must be a finite number >= 0, got {group['complement_scale']!r}")
        limiter = group["limiter"]
        if limiter is not None and (not _is_number(limiter) or limiter < 1):
            raise ValueError(f"limiter (γ) must be None or a number >= 1, got {limiter!r}")
        if group["refresh"] not in REFRESH_METHODS:
            raise ValueError(f"refresh must be one of {REFRESH_METHODS}, got {group['refresh']!r}")
        if group["orthogonalization"] not in ORTHOGONALIZATIONS:
            raise ValueError(
                f"orthogonalization must be one of {ORTHOGONALIZATIONS}, got {group['orthogonalization']!r}"
            )
        if not isinstance(group["power_iterations"], int) or group["power_iterations"] < 0:
            raise ValueError(f"power_iterations must be an int >= 0, got {group['power_iterations']!r}")

    def _expected_state_shapes(
        self, shape: tuple[int, int], group: dict[str, Any], state: dict[str, Any]
    ) -> dict[str, tuple[int, ...]]:
        m, n = shape
        rank = group["rank"]
        side = choose_side(shape, rank)
        if side == "left":
            return {"basis": (m, rank), "moment": (rank, n)}
        if side == "right":
            return {"basis": (n, rank), "moment": (m, rank)}
        return {"moment": (m, n)}

    def _matrix_step(self, weights: Tensor, grad: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        moment = self._update_moment(grad, state, group)
        self._apply_update(weights, grad, _orthogonalizer(group, moment.device)(moment), state, group)

    def _update_parameters(self, work: list[tuple[Tensor, dict[str, Any], int]]) -> None:
        """Blocks 1–2 per matrix, then Block 2's orthogonalization once per stack of equal-shape
        moments (one batched call instead of one SVD per matrix), then Blocks 3–4 per matrix."""
        pending = []
        for p, group, index in work:
            if not self._uses_matrix_rule(p, group):
                self._update_parameter(p, group, index)
                continue
            state = self._count_step(p, group, index)
            moment = self._update_moment(self._working_copy(p.grad).view(p.shape[0], -1), state, group)
            pending.append((p, state, group, moment))
        stacks: dict[tuple, list[int]] = {}
        for i, (_, _, group, moment) in enumerate(pending):
            method = _orthogonalizer(group, moment.device)
            stacks.setdefault((method, moment.shape, moment.dtype, moment.device), []).append(i)
        updates: list[Tensor | None] = [None] * len(pending)
        for (method, *_), members in stacks.items():
            orthogonalized = method(torch.stack([pending[i][-1] for i in members]))
            for i, update in zip(members, orthogonalized.unbind()):
                updates[i] = update
        for (p, state, group, _), update in zip(pending, updates):
            weights = self._working_copy(p)
            grad = self._working_copy(p.grad) if group["complement_scale"] else None
            self._apply_update(weights.view(p.shape[0], -1), grad, update, state, group)
            self._end_update(p, weights)

    def _update_moment(self, grad: Tensor, state: dict[str, Any], group: dict[str, Any]) -> Tensor:
        """Blocks 1, 1.1 and 2 up to the orthogonalization: refresh Q, transport M, M ← μ M + Qᵀ G."""
        rank, side = group["rank"], choose_side(grad.shape, group["rank"])
        if "moment" not in state:
            moment_shape = self._expected_state_shapes(grad.shape, group, state)["moment"]
            state["moment"] = torch.zeros(moment_shape, dtype=grad.dtype, device=grad.device)
            if group["limiter"] is not None:
                state["previous_norm"] = torch.zeros((), dtype=grad.dtype, device=grad.device)
        basis = state.get("basis")
        if side != "full" and is_refresh_step(state["step"], group["update_freq"]):  # Block 1
            randomized = group["refresh"] == "randomized"
            new_basis = compute_basis(
                grad,
                rank,
                side,
                method=group["refresh"],
                generator=self._generator(state, grad.device) if randomized else None,
                power_iterations=group["power_iterations"],
            )
            if basis is not None:  # Block 1.1
                state["moment"] = transport(state["moment"], basis, new_basis, side)
            state["basis"] = new_basis
        reduced_grad = project(grad, state.get("basis"), side)  # Ĝ = Qᵀ G
        return state["moment"].mul_(group["momentum"]).add_(reduced_grad)  # M ← μ M + Ĝ

    def _apply_update(
        self, weights: Tensor, grad: Tensor | None, update: Tensor, state: dict[str, Any], group: dict[str, Any]
    ) -> None:
        """Blocks 3 and 4: optional norm-growth limiter, then W ← W − η (α Q O + β (I − QQᵀ) G) − η λ W.

        The decay and the back-projection are one fused ``addmm_``; ``grad`` is needed only
        when ``complement_scale`` is non-zero.
        """
        side, basis = choose_side(weights.shape, group["rank"]), state.get("basis")
        if group["limiter"] is not None:
            update, state["previous_norm"] = limit_norm_growth(update, state["previous_norm"], group["limiter"])
        lr = group["lr"]
        decay, step = 1 - lr * group["weight_decay"], -lr * group["scale"]
        if side == "left":
            weights.addmm_(basis, update, beta=decay, alpha=step)
        elif side == "right":
            weights.addmm_(update, basis.mT, beta=decay, alpha=step)
        else:
            weights.mul_(decay).add_(update, alpha=step)
        if group["complement_scale"] and side != "full":
            complement = grad - project_back(project(grad, basis, side), basis, side)  # (I − Q Qᵀ) G
            weights.add_(complement, alpha=-lr * group["complement_scale"])


def _orthogonalizer(group: dict[str, Any], device: torch.device):
    """The orthogonalization a group asks for; ``"exact"`` takes the batched Cholesky path on GPUs."""
    method = group["orthogonalization"]
    if method == "exact":
        method = "svd" if device.type == "cpu" else "cholesky"
    return {"svd": orthogonalize, "cholesky": orthogonalize_cholesky, "newton_schulz": orthogonalize_newton_schulz}[
        method
    ]
