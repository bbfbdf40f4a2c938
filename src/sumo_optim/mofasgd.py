"""MoFaSGD: low-rank momentum factorization (Mahdavinia & Mahdavi, TMLR 2025, arXiv 2507.08091).

The momentum of a matrix is kept as a rank-r factorization ``M ≈ U diag(σ) Vᵀ`` and updated
every step without a full SVD ("UMF", Algorithm 1). With ``Ĝ = UUᵀG + GVVᵀ − UUᵀGVVᵀ`` the
projection of G onto the tangent space of the rank-r manifold at (U, V):

    [U, G V] = U' R_U,   [V, Gᵀ U] = V' R_V                      (two thin QRs)
    β M + Ĝ = U' · R_U [[β diag(σ) − UᵀGV, I], [I, 0]] R_Vᵀ · V'ᵀ  (a 2r×2r core S)
    U, σ, V ← U' U_S[:, :r],  σ_S[:r],  V' V_S[:, :r]             (SVD of the core, top r)

The step is spectrally normalized: ``W ← W − η α U Vᵀ − η λ W``. The first step sets
(U, σ, V) to the top-r SVD of the first gradient (``M₁ = β·0 + G₁`` truncated to rank r).

:func:`update_momentum_factors` computes these lines as written. The optimizer's step takes the
QRs on r columns instead of 2r (U and V made orthonormal in float64, then ``G V = U P + Q_Z R_Z``
by block Gram–Schmidt: half the float64 work; :func:`_stack_core`), for all matrices of a shape at
once, and waits for the device once; matrices whose QRs or core solve it cannot trust are redone
by that function.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import cusolver
from .base import SubspaceOptimizer, _as_matrix, _is_number
from .linalg import (
    _cholesky_with_inverses,
    _ritz_certified,
    _stacked_products,
    _tied_at_rank,
    cholesky_qr2,
    cholesky_qr2_many,
)
from .lr_adjust import LR_ADJUSTMENTS, lr_adjustment

__all__ = [
    "MoFaSGD",
    "core_top_triplets",
    "momentum_core",
    "top_singular_triplets",
    "top_singular_triplets_ex",
    "update_momentum_factors",
    "warm_top_singular_triplets",
]


def _thin_qr(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """``Q R`` of tall matrices (batched) by :func:`~sumo_optim.linalg.cholesky_qr2`, in the input's dtype."""
    q, r, _, _ = cholesky_qr2(matrix)
    return q.to(matrix.dtype), r.to(matrix.dtype)


def top_singular_triplets(matrix: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """``U_r, σ_r, V_r`` of the top ``rank`` singular values of square matrices ``K`` (batched):
    ``V_r`` from the float64 ``eigh`` of ``KᵀK`` (one batched cuSOLVER call on the GPU,
    :func:`~sumo_optim.cusolver.eigh`), then ``K V_r = U_r Σ_r`` by QR (``R`` is diagonal up to
    rounding; σ from it, not from the eigenvalues, whose square roots lose half the digits; any
    orthonormal completion of ``U_r`` where σ is zero)."""
    matrix64 = matrix.to(torch.float64)
    right = cusolver.eigh(matrix64.mT @ matrix64)[1][..., -rank:].flip(-1)  # descending
    return _triplets_from_right(matrix64, right, matrix.dtype, fallback=True)[:3]


def top_singular_triplets_ex(matrix: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`top_singular_triplets` without waiting for the device, and a flag per matrix: True
    where the result is that function's (``eigh`` converged, the QR trusted); the caller redoes the others."""
    matrix64 = matrix.to(torch.float64)
    _, vectors, info = cusolver.eigh_ex(matrix64.mT @ matrix64)
    *triplets, trusted = _triplets_from_right(matrix64, vectors[..., -rank:].flip(-1), matrix.dtype, fallback=False)
    return *triplets, trusted & (info == 0)


def _triplets_from_right(
    matrix64: Tensor, right: Tensor, dtype: torch.dtype, fallback: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``U_r, σ_r, V_r`` from ``K V_r = U_r Σ_r`` (QR, ``R``'s diagonal made ≥ 0) in ``dtype``,
    and the QR's trust flags (:func:`~sumo_optim.linalg.cholesky_qr2`)."""
    q, triangle, _, trusted = cholesky_qr2(matrix64 @ right, fallback=fallback)
    diagonal = triangle.diagonal(dim1=-2, dim2=-1)
    left = q * torch.where(diagonal < 0, -1.0, 1.0).unsqueeze(-2)
    return left.to(dtype), diagonal.abs().to(dtype), right.to(dtype), trusted


def warm_top_singular_triplets(
    matrix: Tensor, rank: int, iterations: int = 4, oversample: int = 16
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`top_singular_triplets` of square matrices ``K`` (batched) whose top-``rank`` right
    singular subspace lies near the first ``rank`` coordinates, as MoFaSGD's core's does (the old
    momentum's directions come first in its bases). Returns ``U_r, σ_r, V_r`` and a CPU bool per
    matrix: fell back to :func:`top_singular_triplets`.

    In float64: ``iterations`` steps of subspace iteration on ``KᵀK`` (CholeskyQR2 after each)
    from the first ``k = rank + oversample`` coordinate vectors, then Rayleigh–Ritz: the k×k
    ``eigh`` of ``(KX)ᵀ(KX)`` gives ``V``; ``σᵢ = ‖K vᵢ‖`` and ``uᵢ = K vᵢ / σᵢ`` (``K V = U Σ``
    exactly), residuals ``ρᵢ = ‖Kᵀ uᵢ − σᵢ vᵢ‖``. A matrix passes the check of
    :func:`~sumo_optim.linalg.iterative_top_singular_vectors` (``ρᵢ ≤ 16 eps ‖K‖_F`` with the eps
    of ``K``'s dtype, in which the triplets are returned: float32 for float32 factors; Wedin
    bound ≤ 0.1 from the r/r+1 gap); the others are recomputed by :func:`top_singular_triplets`.
    The ``eigh`` is k×k instead of 2r×2r.
    """
    matrix64 = matrix.to(torch.float64)
    size = matrix64.shape[-1]
    width = min(rank + oversample, size)
    x = torch.eye(size, width, dtype=torch.float64, device=matrix64.device).expand(*matrix64.shape[:-2], size, width)
    for _ in range(iterations):
        x = cholesky_qr2(matrix64.mT @ (matrix64 @ x)).q
    projected = matrix64 @ x
    w = cusolver.eigh(projected.mT @ projected)[1].flip(-1)  # descending
    right = x @ w
    images = projected @ w  # K V = U Σ
    sigma = images.norm(dim=-2)
    left = images / sigma.clamp_min(torch.finfo(torch.float64).tiny).unsqueeze(-2)
    residuals = (matrix64.mT @ left - right * sigma.unsqueeze(-2)).norm(dim=-2)
    tolerance = 16 * torch.finfo(matrix.dtype).eps * torch.linalg.matrix_norm(matrix64)  # the result's dtype
    certified = _ritz_certified(sigma, residuals, rank, tolerance, 0.1) & ~_tied_at_rank(sigma, rank, tolerance)
    fell_back = ~certified.cpu()
    left, sigma, right = (t[..., :rank].contiguous() for t in (left, sigma, right))
    if bool(fell_back.any()):
        flat = [t.reshape(-1, *t.shape[-2:]) for t in (left, right, matrix64)]
        flat_sigma = sigma.reshape(-1, rank)
        index = fell_back.reshape(-1).nonzero(as_tuple=True)[0].to(matrix64.device)
        exact = top_singular_triplets(flat[2][index], rank)
        flat[0][index], flat_sigma[index], flat[1][index] = exact
    return left.to(matrix.dtype), sigma.to(matrix.dtype), right.to(matrix.dtype), fell_back


def momentum_core(u: Tensor, sigma: Tensor, grad_v: Tensor, left_r: Tensor, right_r: Tensor, beta: float) -> Tensor:
    """The 2r×2r core ``S = R_U [[β diag(σ) − UᵀGV, I], [I, 0]] R_Vᵀ`` of the module docstring,
    with ``β U diag(σ) Vᵀ + Ĝ = U' S V'ᵀ`` (``R_U``, ``R_V``: the R factors of ``[U, G V]`` and
    ``[V, Gᵀ U]``), on one matrix or a stack of equal-shape matrices."""
    rank = u.shape[-1]
    identity = torch.eye(rank, dtype=u.dtype, device=u.device).expand(*u.shape[:-2], rank, rank)
    core = torch.cat(
        [
            torch.cat([beta * torch.diag_embed(sigma) - u.mT @ grad_v, identity], dim=-1),
            torch.cat([identity, torch.zeros_like(identity)], dim=-1),
        ],
        dim=-2,
    )
    return left_r @ core @ right_r.mT


def core_top_triplets(cores: Tensor, rank: int, core_solver: str = "eigh") -> tuple[Tensor, Tensor, Tensor]:
    """The top ``rank`` singular triplets of the cores by :func:`top_singular_triplets` ("eigh")
    or :func:`warm_top_singular_triplets` ("warm")."""
    if core_solver == "warm":
        return warm_top_singular_triplets(cores, rank)[:3]
    return top_singular_triplets(cores, rank)


def update_momentum_factors(
    u: Tensor, sigma: Tensor, v: Tensor, grad: Tensor, beta: float, core_solver: str = "eigh"
) -> tuple[Tensor, Tensor, Tensor]:
    """Rank-r factors of ``β U diag(σ) Vᵀ + Ĝ`` (Ĝ: G projected on the tangent space at U, V).

    Works on one matrix or on a stack of equal-shape matrices (leading batch dimension), with
    batched building blocks only (:func:`momentum_core`, :func:`core_top_triplets`): cuSOLVER's
    SVD loops over a stack of 2r×2r cores one matrix at a time.
    """
    grad_v = grad @ v
    left, left_r = _thin_qr(torch.cat([u, grad_v], dim=-1))
    right, right_r = _thin_qr(torch.cat([v, grad.mT @ u], dim=-1))
    core = momentum_core(u, sigma, grad_v, left_r, right_r, beta)
    core_u, core_sigma, core_v = core_top_triplets(core, u.shape[-1], core_solver)
    return left @ core_u, core_sigma, right @ core_v


_FACTORS = ("left", "singular_values", "right")  # M ≈ U diag(σ) Vᵀ in a matrix's state


def _nonzero_directions(u: Tensor, sigma: Tensor, v: Tensor) -> Tensor:
    """``U`` with the columns whose σ is zero (relative to the largest; a zero momentum gives a
    zero step) set to zero, on one matrix or a stack."""
    tolerance = max(4 * torch.finfo(sigma.dtype).eps, torch.finfo(torch.float64).eps * max(u.shape[-2], v.shape[-2]))
    return u * (sigma > tolerance * sigma.amax(-1, keepdim=True)).to(u.dtype).unsqueeze(-2)


def _core_top_triplets_ex(
    cores: Tensor, rank: int, core_solver: str, dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`core_top_triplets` with :func:`top_singular_triplets_ex`'s flags; ``dtype``: the
    factors' ("warm" certifies at its precision and completes its own fallbacks: all True)."""
    if core_solver == "warm":
        left, sigma, right, _ = warm_top_singular_triplets(cores.to(dtype), rank)
        return left, sigma, right, torch.ones(cores.shape[:-2], dtype=torch.bool, device=cores.device)
    return top_singular_triplets_ex(cores, rank)


@dataclass
class _Stack:
    """Equal-shape matrices whose factors MoFaSGD updates together (positions in the step's
    list): the bases ``[Û, Q_Z]``, ``[V̂, Q_W]`` and the float64 cores of their update, then their
    new factors; per matrix, whether all of it can be trusted."""

    members: list[int]
    core_solver: str
    bases: tuple[Tensor, Tensor, Tensor, Tensor]
    core: Tensor
    trusted: Tensor
    new: tuple[Tensor, Tensor, Tensor] = ()


def _stack_core(
    members: list[int], u: Tensor, sigma: Tensor, v: Tensor, grads: list[Tensor], beta: float, core_solver: str
) -> _Stack:
    """The bases and cores of a stack's update (factors stacked, gradients as a list) without
    waiting for the device, in float64 from ``G V`` and ``Gᵀ U`` (by
    :func:`~sumo_optim.linalg._stacked_products`: no stacked copy of the gradients).

    U and V are first made orthonormal to float64 rounding, ``U = Û L_Uᵀ`` (Cholesky of ``UᵀU``;
    their float32 rounding would otherwise add up over steps). Then the module docstring's QRs
    are taken on r columns: ``G V̂ = Û P + Q_Z R_Z`` (one block Gram–Schmidt pass, then
    CholeskyQR2 of ``Z``), likewise ``Gᵀ Û = V̂ P_V + Q_W R_W``, so that
    ``β M + Ĝ = [Û, Q_Z] [[β L_Uᵀ diag(σ) L_V + P_Vᵀ, R_Wᵀ], [R_Z, 0]] [V̂, Q_W]ᵀ`` (Ĝ's cross
    term ``ÛᵀGV̂`` read from ``G V̂``, as :func:`update_momentum_factors` reads it). Not trusted
    besides the Cholesky factorizations' own flags: a diagonal of ``R_Z`` or ``R_W`` below 1e-7
    of the largest column of ``G V̂`` or ``Gᵀ Û`` (cancellation; rank-deficient products)."""
    grad_v, grad_t_u = _stacked_products(grads, v), _stacked_products([g.mT for g in grads], u)
    u, v = u.to(torch.float64), v.to(torch.float64)
    (lower_u, lower_v), (inverse_u, inverse_v), infos = _cholesky_with_inverses([u.mT @ u, v.mT @ v])
    u, v = u @ inverse_u.mT, v @ inverse_v.mT  # Û, V̂
    grad_v, grad_t_u = grad_v.to(torch.float64) @ inverse_v.mT, grad_t_u.to(torch.float64) @ inverse_u.mT
    largest = [torch.linalg.vector_norm(x, dim=-2).amax(-1) for x in (grad_v, grad_t_u)]
    right_coefficients = v.mT @ grad_t_u
    rests = [grad_v - u @ (u.mT @ grad_v), grad_t_u - v @ right_coefficients]
    del grad_v, grad_t_u  # (the float64 products: not held through the QRs)
    left, right = cholesky_qr2_many(rests)
    trusted = left.trusted & right.trusted & (infos[0] == 0) & (infos[1] == 0)
    for qr, norm in zip((left, right), largest):
        trusted &= qr.r.diagonal(dim1=-2, dim2=-1).amin(-1) > 1e-7 * norm
    momentum = lower_u.mT * sigma.to(torch.float64).unsqueeze(-2) @ lower_v  # U diag(σ) Vᵀ = Û (L_Uᵀ diag(σ) L_V) V̂ᵀ
    top = beta * momentum + right_coefficients.mT
    core = torch.cat([torch.cat([top, right.r.mT], -1), torch.cat([left.r, torch.zeros_like(top)], -1)], -2)
    core = core.where(trusted[:, None, None], 0.0)  # (an untrusted QR's NaN would stop eigh on CPU)
    dtype = sigma.dtype
    return _Stack(members, core_solver, tuple(x.to(dtype) for x in (u, left.q, v, right.q)), core, trusted)


def _solve_cores(stacks: list[_Stack]) -> None:
    """Sets the stacks' new factors: the top r of all cores of one size and solver in one
    unchecked call (:func:`top_singular_triplets_ex`), its flags added to the stacks'."""
    solves: dict[tuple, list[_Stack]] = {}
    for stack in stacks:
        core = stack.core
        key = (core.shape[1:], stack.bases[0].dtype, core.device, stack.core_solver)
        solves.setdefault(key, []).append(stack)
    for (core_shape, dtype, _, core_solver), members in solves.items():
        rank = core_shape[-1] // 2
        cores = torch.cat([stack.core for stack in members])
        *triplets, solved = _core_top_triplets_ex(cores, rank, core_solver, dtype)
        counts = [len(stack.members) for stack in members]
        for stack, core_u, sigma, core_v, ok in zip(members, *(t.split(counts) for t in (*triplets, solved))):
            u, extension_u, v, extension_v = stack.bases
            core_u, core_v = core_u.to(u.dtype), core_v.to(v.dtype)
            new_u = torch.baddbmm(u @ core_u[:, :rank], extension_u, core_u[:, rank:])  # [Û, Q_Z] U_S
            new_v = torch.baddbmm(v @ core_v[:, :rank], extension_v, core_v[:, rank:])
            stack.new = (new_u, sigma.to(u.dtype), new_v)
            stack.trusted = stack.trusted & ok


class MoFaSGD(SubspaceOptimizer):
    """SGD with a low-rank factorized momentum and spectrally normalized steps.

    Args:
        params: parameters or groups (matrices get MoFaSGD; the rest AdamW, see
            :class:`~sumo_optim.base.SubspaceOptimizer`).
        lr: η. rank: r, capped at ``min(m, n) // 2`` so the 2r-wide QRs exist.
        beta: momentum decay β in ``M ← β M + Ĝ``.
        scale: α, the scale of ``U Vᵀ``.
        adjust_lr_fn: learning-rate convention ``f(m, n)`` of the step ``α f U Vᵀ``: ``"none"``
            (default), ``"original"``, ``"match_rms_adamw"`` or ``"paper"``
            (:mod:`sumo_optim.lr_adjust`).
        core_solver: the top r of the 2r×2r core: ``"eigh"`` (default; float64 ``eigh`` of ``KᵀK``,
            :func:`top_singular_triplets`) or ``"warm"`` (subspace iteration from the previous
            factors, checked, with that as fallback: :func:`warm_top_singular_triplets`; measured
            slower on an H200, 226 against 63 ms per step at LLaMA-1B before the step's one-synchronization
            form, see ``benchmarks/NOTES.md``).
        weight_decay: decoupled λ. adamw_betas, adamw_eps, nonfinite, seed, layerwise,
            bf16_stochastic_rounding, adamw_state_bits: as in SUMO.
        layerwise_accumulation_steps: as in SUMO, except that a matrix's step reads its whole
            gradient, so every matrix keeps its full gradient until the N-th backward pass.
    """

    def __init__(
        self,
        params: Any,
        lr: float = 0.02,
        rank: int = 128,
        beta: float = 0.95,
        scale: float = 1.0,
        adjust_lr_fn: str = "none",
        weight_decay: float = 0.0,
        adamw_betas: tuple[float, float] = (0.9, 0.999),
        adamw_eps: float = 1e-8,
        nonfinite: str = "raise",
        seed: int = 0,
        layerwise: bool = False,
        bf16_stochastic_rounding: bool = False,
        adamw_state_bits: int = 32,
        layerwise_accumulation_steps: int = 1,
        core_solver: str = "eigh",
    ) -> None:
        defaults = dict(
            lr=lr,
            rank=rank,
            beta=beta,
            core_solver=core_solver,
            scale=scale,
            adjust_lr_fn=adjust_lr_fn,
            weight_decay=weight_decay,
            adamw_betas=adamw_betas,
            adamw_eps=adamw_eps,
            nonfinite=nonfinite,
            seed=seed,
            bf16_stochastic_rounding=bf16_stochastic_rounding,
            adamw_state_bits=adamw_state_bits,
        )
        super().__init__(
            params, defaults, layerwise=layerwise, layerwise_accumulation_steps=layerwise_accumulation_steps
        )

    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
        self._check_positive_int(group, "rank")
        if not _is_number(group["beta"]) or not 0 <= group["beta"] < 1:
            raise ValueError(f"beta must be in [0, 1), got {group['beta']!r}")
        if not _is_number(group["scale"]) or group["scale"] < 0:
            raise ValueError(f"scale must be a finite number >= 0, got {group['scale']!r}")
        if group["core_solver"] not in ("eigh", "warm"):
            raise ValueError(f"core_solver must be 'eigh' or 'warm', got {group['core_solver']!r}")
        if group["adjust_lr_fn"] not in LR_ADJUSTMENTS:
            raise ValueError(f"adjust_lr_fn must be one of {LR_ADJUSTMENTS}, got {group['adjust_lr_fn']!r}")

    @staticmethod
    def _rank(shape: tuple[int, int], group: dict[str, Any]) -> int:
        return max(1, min(group["rank"], min(shape) // 2))

    def _expected_state_shapes(
        self, shape: tuple[int, int], group: dict[str, Any], state: dict[str, Any]
    ) -> dict[str, tuple[int, ...]]:
        rank = self._rank(shape, group)
        return {"left": (shape[0], rank), "singular_values": (rank,), "right": (shape[1], rank)}

    def _update_parameters(self, work: list[tuple[Tensor, dict[str, Any], int]]) -> None:
        """Per matrix, except the factor update, which waits for the device once per step: per
        stack of equal-shape matrices the r-column QRs of :func:`_stack_core` (both in one
        batched Cholesky call per pass), the top r of all stacks' 2r×2r cores in one ``eigh`` (as
        costly for 24 cores as for 168; ``benchmarks/NOTES.md``), unchecked; then one host read
        of all their flags, and the matrices flagged (an untrusted QR, an unconverged ``eigh``)
        redone by the checked :func:`update_momentum_factors`."""
        pending = []
        for p, group, index in work:
            state = self.state[p]
            if not self._uses_matrix_rule(p, group) or "left" not in state:
                self._update_parameter(p, group, index)  # vectors, and each matrix's first step
                continue
            self._count_step(p, group, index)
            pending.append((p, group, state, _as_matrix(self._working_copy(p.grad), p)))
        members_of: dict[tuple, list[int]] = {}
        for i, (_, group, state, grad) in enumerate(pending):
            key = (grad.shape, grad.dtype, grad.device, group["beta"], group["core_solver"], state["left"].shape)
            members_of.setdefault(key, []).append(i)
        stacks = []
        for (*_, beta, core_solver, _), members in members_of.items():
            u, sigma, v = (torch.stack([pending[i][2][name] for i in members]) for name in _FACTORS)
            stacks.append(_stack_core(members, u, sigma, v, [pending[i][3] for i in members], beta, core_solver))
        _solve_cores(stacks)
        trusted = iter(torch.cat([stack.trusted for stack in stacks]).tolist() if stacks else [])  # the one sync
        directions = {}
        for stack in stacks:
            stack_directions = _nonzero_directions(*stack.new)
            for j, i in enumerate(stack.members):
                _, group, state, grad = pending[i]
                if next(trusted):
                    factors = [factor[j] for factor in stack.new]
                    directions[i] = stack_directions[j]
                else:  # from the old factors, still in the state
                    old = [state[name] for name in _FACTORS]
                    factors = update_momentum_factors(*old, grad, group["beta"], stack.core_solver)
                    directions[i] = _nonzero_directions(*factors)
                state.update(zip(_FACTORS, factors))
        for j, (p, group, state, _) in enumerate(pending):
            weights = self._working_copy(p)
            self._apply_step(_as_matrix(weights, p), directions.pop(j), state["right"], group)
            self._end_update(p, weights, group)

    def _matrix_step(self, weights: Tensor, grad: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        rank = self._rank(grad.shape, group)
        if "left" not in state:
            u, sigma, vh = torch.linalg.svd(grad, full_matrices=False)
            state["left"], state["singular_values"], state["right"] = u[:, :rank], sigma[:rank], vh[:rank].mT
        else:
            state["left"], state["singular_values"], state["right"] = update_momentum_factors(
                state["left"], state["singular_values"], state["right"], grad, group["beta"], group["core_solver"]
            )
        directions = _nonzero_directions(state["left"], state["singular_values"], state["right"])
        self._apply_step(weights, directions, state["right"], group)

    @staticmethod
    def _apply_step(weights: Tensor, directions: Tensor, right: Tensor, group: dict[str, Any]) -> None:
        """``W ← (1 − ηλ) W − η α f(m, n) U Vᵀ`` in one ``addmm_`` (``directions``: U from
        :func:`_nonzero_directions`)."""
        alpha = -group["lr"] * group["scale"] * lr_adjustment(weights.shape, group["adjust_lr_fn"])
        weights.addmm_(directions, right.mT, beta=1 - group["lr"] * group["weight_decay"], alpha=alpha)
