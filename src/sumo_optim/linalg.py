"""Linear algebra shared by every optimizer of the library.

Orthogonalization maps a matrix ``M = U Σ Vᵀ`` (thin SVD) to its polar factor ``U Vᵀ``:
exactly (:func:`orthogonalize`, SUMO's Algorithm 1, line 5) or approximately by Muon's
quintic Newton–Schulz iteration (:func:`orthogonalize_newton_schulz`), kept for comparison.

Basis choice returns an orthonormal ``Q`` whose columns span a rank-``r`` subspace:
the top singular vectors of a matrix (exact SVD, checked subspace iteration or a randomized
range finder) or a uniformly random point of the Stiefel manifold (GoLore).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from . import cusolver
from .kernels import grouped_addmm_

__all__ = [
    "CHUNK_BYTES",
    "NEWTON_SCHULZ_COEFFICIENTS",
    "CholeskyQR",
    "TopSingularVectors",
    "cholesky_qr2",
    "cholesky_qr2_many",
    "iterative_top_singular_vectors",
    "orthogonalize",
    "orthogonalize_cholesky",
    "orthogonalize_cholesky_many",
    "orthogonalize_cholesky_unchecked",
    "orthogonalize_newton_schulz",
    "polar_schedule",
    "random_orthonormal",
    "randomized_top_singular_vectors",
    "replace_untrusted_",
    "top_singular_vectors",
]

# Muon's quintic coefficients (Keller Jordan, 2024; the values torch.optim.Muon uses).
NEWTON_SCHULZ_COEFFICIENTS = (3.4445, -4.7750, 2.0315)

# Float64 bytes of the r×n matrices that the Cholesky route works on at once (see
# :func:`orthogonalize_cholesky_unchecked`): a stack of a LLaMA-7B's 96 moments of 128×11008
# would otherwise hold 1.1 GB per float64 copy.
CHUNK_BYTES = 2**28
# Values of a bf16/fp16 matrix converted to float32 at a time (16 MiB of float32 work): by the
# randomized range finder (:func:`randomized_top_singular_vectors`) and by layer-wise
# accumulation's projections and back-projections (:class:`~sumo_optim.base.SubspaceOptimizer`).
CONVERT_VALUES = 2**22


def convert_blocks(length: int, values_per_index: int) -> list[slice]:
    """Slices of ``range(length)`` in order, each at least one index wide and, where
    ``values_per_index`` allows, covering at most :data:`CONVERT_VALUES` values: the blocks of
    rows (or columns) of a bf16/fp16 matrix that are converted to float32 one at a time."""
    width = max(1, CONVERT_VALUES // values_per_index)
    return [slice(start, start + width) for start in range(0, length, width)]


def orthogonalize(matrix: Tensor, rtol: float | None = None) -> Tensor:
    """Exact polar factor ``U Vᵀ`` of ``matrix = U Σ Vᵀ``, computed by a float64 thin SVD.

    Singular values at or below ``rtol · σ_max`` count as zero, so a rank-deficient matrix
    maps to ``U_k V_kᵀ`` over its ``k`` non-zero singular values and a zero matrix maps to
    zero, never NaN. The default ``rtol`` is the larger of the input's rounding level
    (``4 eps(dtype)``) and the float64 SVD's own error (``eps64 · max(m, n)``): condition
    numbers up to 2e6 in float32 are orthogonalized in full, while the rounding noise of an
    exactly rank-deficient matrix (measured at 0.1–0.5 eps32, up to 16 eps64) is dropped.
    Works on batches (``..., m, n``); returns the input's dtype.
    """
    if matrix.ndim < 2:
        raise ValueError(f"orthogonalize needs a matrix, got shape {tuple(matrix.shape)}")
    if rtol is None:
        rtol = max(4 * torch.finfo(matrix.dtype).eps, torch.finfo(torch.float64).eps * max(matrix.shape[-2:]))
    u, s, vh = torch.linalg.svd(matrix.to(torch.float64), full_matrices=False)
    keep = (s > rtol * s.amax(dim=-1, keepdim=True)).to(torch.float64)
    return ((u * keep.unsqueeze(-2)) @ vh).to(matrix.dtype)


def _largest_eigenvalue(spd: Tensor, iterations: int = 12) -> Tensor:
    """Largest eigenvalue of symmetric positive semi-definite matrices by power iteration."""
    vector = torch.ones(*spd.shape[:-1], 1, dtype=spd.dtype, device=spd.device)
    for _ in range(iterations):
        vector = spd @ vector
        vector = vector / vector.norm(dim=-2, keepdim=True).clamp_min(torch.finfo(spd.dtype).tiny)
    return (vector.mT @ spd @ vector)[..., 0, 0]


def _odd_quintic_range(coefficients: tuple[float, float, float], low: float, high: float) -> tuple[float, float]:
    """Smallest and largest value of ``p(x) = a x + b x³ + c x⁵`` on ``[low, high]``: at the ends or
    where ``p'(x) = a + 3b x² + 5c x⁴`` vanishes (a quadratic in ``x²``)."""
    a, b, c = coefficients
    candidates = [low, high]
    roots = [-a / (3 * b)] if c == 0 and b != 0 else []
    if c != 0 and 9 * b * b - 20 * a * c >= 0:
        root = math.sqrt(9 * b * b - 20 * a * c)
        roots = [(-3 * b - root) / (10 * c), (-3 * b + root) / (10 * c)]
    candidates += [math.sqrt(y) for y in roots if low**2 < y < high**2]
    values = [a * x + b * x**3 + c * x**5 for x in candidates]
    return min(values), max(values)


def _minimax_odd_quintic(low: float, high: float, iterations: int = 100) -> tuple[float, float, float]:
    """The odd quintic ``p`` minimizing ``max |1 − p(x)|`` over ``[low, high]`` (0 < low < high), by
    Remez exchange: ``p − 1`` equioscillates at ``low``, its two interior extrema and ``high``."""
    points = [low, low + (high - low) / 4, low + 3 * (high - low) / 4, high]
    coefficients = (0.0, 0.0, 0.0)
    for _ in range(iterations):
        # p(t_i) + (−1)^i E = 1 at the four alternation points.
        system = torch.tensor([[t, t**3, t**5, (-1.0) ** i] for i, t in enumerate(points)], dtype=torch.float64)
        a, b, c, _ = torch.linalg.solve(system, torch.ones(4, dtype=torch.float64)).tolist()
        coefficients = (a, b, c)
        root = math.sqrt(max(9 * b * b - 20 * a * c, 0.0))
        inner = sorted(math.sqrt(max((-3 * b + sign * root) / (10 * c), 0.0)) for sign in (-1, 1))
        moved = max(abs(new - old) for new, old in zip(inner, points[1:3]))
        points = [low, *inner, high]
        if moved <= 1e-15 * high:
            break
    return coefficients


@functools.cache
def polar_schedule(smallest_singular_value: float, tolerance: float = 1e-15) -> tuple[tuple[float, float, float], ...]:
    """Coefficients ``(a, b, c)`` of the odd quintics ``X ← a X + b (X Xᵀ) X + c (X Xᵀ)² X`` that,
    applied in turn, take every singular value in ``[ℓ, 1]`` to within ``tolerance`` of 1.

    Polar Express (Amsel et al. 2025, Algorithm 1): each step is the minimax polynomial for the
    interval the previous steps map ``[ℓ, 1]`` into (:func:`_minimax_odd_quintic`); the next
    interval is that polynomial's exact range over the current one (:func:`_odd_quintic_range`),
    so the bound holds whatever the Remez iteration's accuracy. Within 1e-2 of 1 the fixed
    ``p(x) = (15x − 10x³ + 3x⁵)/8`` (``p(1) = 1``, ``p'(1) = p''(1) = 0``) converges cubically.
    For ℓ = 4.2e-8 (float32 moments, r = 128): 15 steps (45 products), where Muon's quintic
    (14 steps) and the cubic Newton–Schulz (6) used before 2026-12-04 took 20 (54 products).
    """
    if not 0 < smallest_singular_value < 1:
        raise ValueError(f"the smallest singular value must lie in (0, 1), got {smallest_singular_value}")
    low, high = smallest_singular_value, 1.0
    schedule = []
    while max(1 - low, high - 1) > tolerance:
        near_one = max(1 - low, high - 1) <= 1e-2
        coefficients = (15 / 8, -10 / 8, 3 / 8) if near_one else _minimax_odd_quintic(low, high)
        low, high = _odd_quintic_range(coefficients, low, high)
        if low <= 0 or len(schedule) == 100:
            raise RuntimeError(f"the polar schedule from {smallest_singular_value} does not converge")
        schedule.append(coefficients)
    return tuple(schedule)


def _polar_of_square(factor: Tensor, smallest_singular_value: float) -> Tensor:
    """Polar factor of square float64 matrices by polynomial iteration, run to convergence.

    After scaling by the Frobenius norm the singular values lie in ``[ℓ, 1]``; the odd quintics of
    :func:`polar_schedule` take each to 1 within 1e-15 (Polar Express). Only matrix products.
    """
    x = factor / factor.norm(dim=(-2, -1), keepdim=True)
    # Each step as fused products (baddbmm: β·input + α·A B), three launches per step. (A bound
    # above 1/2, from a large rtol on few rows, gets [1/2, 1]'s schedule, which covers it.)
    for a, b, c in polar_schedule(min(smallest_singular_value, 0.5)):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x


def orthogonalize_cholesky(matrix: Tensor, rtol: float | None = None) -> Tensor:
    """The same ``U Vᵀ`` as :func:`orthogonalize`, from batched Cholesky factorizations and products.

    For ``M`` (r×n, r ≤ n; tall inputs are transposed), in float64:

    1. CholeskyQR2 (Fukaya et al. 2014): ``M Mᵀ = L₁L₁ᵀ``, ``Y₁ = L₁⁻¹ M``, ``Y₁Y₁ᵀ = L₂L₂ᵀ``,
       ``Y = L₂⁻¹ Y₁``: ``M = R Y`` with ``R = L₁L₂`` (r×r) and orthonormal rows in ``Y``,
       to float64 accuracy for condition numbers up to ~1e7. ``L₁⁻¹`` is formed explicitly
       (r×r) and applied by one batched product instead of a triangular solve over r×n:
       the residual ``L₁ L₁⁻¹ − I`` of a triangular inverse is ~κ eps64 (Higham, §14.1),
       and the second pass restores orthogonality;
    2. ``U Vᵀ(M) = polar(R) · Y = T M`` with ``T = polar(R) L₂⁻¹ L₁⁻¹`` (r×r), the r×r polar
       factor by the Polar Express iteration (:func:`polar_schedule`). ``T M`` in float64 has
       error ~κ eps64 relative, as ``Y₁`` has.

    The r×r work batches well on GPUs where batched SVD does not (cuSOLVER loops over the
    batch). Matrices the fast path cannot vouch for (Cholesky failure, a condition number beyond
    ``1/rtol``, non-finite values, any residual ``‖polar(R) polar(R)ᵀ − I‖`` above 1e-6) are
    recomputed by :func:`orthogonalize`, so the result always follows its rank convention.
    """
    return orthogonalize_cholesky_many([matrix], rtol)[0]


def orthogonalize_cholesky_many(matrices: list[Tensor], rtol: float | None = None) -> list[Tensor]:
    """:func:`orthogonalize_cholesky` of several stacks (``..., a, b`` each) at once.

    Stacks may differ in shape; the r×r polar iterations of stacks with the same short
    side run as one batch, and one host synchronization decides the fallbacks of all.
    """
    results, trusted = orthogonalize_cholesky_unchecked(matrices, rtol)
    if trusted and not bool(torch.cat([flags.flatten() for flags in trusted]).all()):  # the one synchronization
        for matrix, result, flags in zip(matrices, results, trusted):
            replace_untrusted_(result, matrix, flags, rtol)
    return results


def replace_untrusted_(result: Tensor, matrix: Tensor, trusted: Tensor, rtol: float | None = None) -> None:
    """Writes :func:`orthogonalize` of ``matrix`` into ``result`` wherever ``trusted`` (its batch
    shape) is False: the fallback of :func:`orthogonalize_cholesky_unchecked`."""
    if matrix.ndim == 2:
        result, matrix, trusted = result.unsqueeze(0), matrix.unsqueeze(0), trusted.reshape(1)
    untrusted = (~trusted).nonzero(as_tuple=True)
    if untrusted[0].numel():
        result[untrusted] = orthogonalize(matrix[untrusted], rtol=rtol).to(result.dtype)


def orthogonalize_cholesky_unchecked(
    matrices: list[Tensor], rtol: float | None = None
) -> tuple[list[Tensor], list[Tensor]]:
    """:func:`orthogonalize_cholesky_many` without its host synchronization.

    Returns the results, zero wherever the fast path cannot vouch for them, and per stack the
    flags (its batch shape) saying where it can; :func:`replace_untrusted_` completes the rest.
    A caller can so queue more work on the results before it looks at the flags.

    The r×n work runs on chunks of at most :data:`CHUNK_BYTES` of float64 data, the r×r polar
    iteration on all chunks at once, so the float64 working memory is bounded by the chunk size
    (about three chunks) rather than by the model.
    """
    prepared = []
    for matrix in matrices:
        if matrix.ndim < 2:
            raise ValueError(f"orthogonalize needs a matrix, got shape {tuple(matrix.shape)}")
        transposed = matrix.shape[-2] > matrix.shape[-1]
        wide = (matrix.mT if transposed else matrix).reshape(-1, *sorted(matrix.shape[-2:]))
        rows, cols = wide.shape[-2:]
        tolerance = rtol
        if tolerance is None:
            tolerance = max(4 * torch.finfo(matrix.dtype).eps, torch.finfo(torch.float64).eps * max(rows, cols))
        size = max(1, CHUNK_BYTES // (8 * rows * cols))
        chunks = [_cholesky_factors(chunk) for chunk in wide.split(size)]
        prepared.append((matrix, transposed, wide, size, tolerance, chunks))
    # One polar iteration per (short side, tolerance): its step count depends on the tolerance.
    polars: dict[tuple[int, float], list[tuple[int, int]]] = {}
    for i, (_, _, wide, _, tolerance, chunks) in enumerate(prepared):
        polars.setdefault((wide.shape[-2], tolerance), []).extend((i, c) for c in range(len(chunks)))
    for (rows, tolerance), members in polars.items():
        factors = torch.cat([prepared[i][-1][c]["factor"] for i, c in members])
        polar_all = _polar_of_square(factors, tolerance / math.sqrt(rows))
        identity = torch.eye(rows, dtype=torch.float64, device=factors.device)
        # Rank test: H = polar(R)ᵀ R is symmetric positive definite with M's singular values as
        # eigenvalues; H − rtol·σ_max·I has a Cholesky factor iff every σ_i > rtol·σ_max.
        spd = polar_all.mT @ factors
        spd = (spd + spd.mT) / 2
        _, info3 = torch.linalg.cholesky_ex(spd - tolerance * _largest_eigenvalue(spd)[..., None, None] * identity)
        trusted = (info3 == 0) & ((polar_all @ polar_all.mT - identity).abs().amax(dim=(-2, -1)) < 1e-6)
        counts = [prepared[i][-1][c]["factor"].shape[0] for i, c in members]
        for (i, c), polar, polar_trusted in zip(members, polar_all.split(counts), trusted.split(counts)):
            parts = prepared[i][-1][c]
            # U Vᵀ(M) = polar(R) L₂⁻¹ L₁⁻¹ M: an r×r matrix T, applied to M once per chunk below.
            parts["transform"] = polar @ parts["inverse"]
            parts["trusted"] = parts["trusted"] & polar_trusted & torch.isfinite(parts["transform"]).all(dim=(-2, -1))
    outputs, flags = [], []
    for matrix, transposed, wide, size, _, chunks in prepared:
        result = torch.empty_like(matrix, memory_format=torch.contiguous_format)
        # A tall result as Mᵀ Tᵀ, row-major in the input's shape: a transposed view there sends
        # later products to slower cuBLAS kernels (benchmarks/NOTES.md).
        for out, chunk, parts in zip(result.view(-1, *result.shape[-2:]).split(size), wide.split(size), chunks):
            chunk = chunk.to(torch.float64)
            out.copy_(chunk.mT @ parts["transform"].mT if transposed else parts["transform"] @ chunk)
        trusted = torch.cat([parts["trusted"] for parts in chunks])
        result.masked_fill_(~trusted.reshape(*matrix.shape[:-2], 1, 1), 0.0)
        outputs.append(result)
        flags.append(trusted.reshape(matrix.shape[:-2]))
    return outputs, flags


def _first_axis(x: Tensor | None) -> Tensor | None:
    return x[None] if x is not None else None


def _cholesky_factors(batch: Tensor) -> dict[str, Tensor]:
    """:func:`cholesky_qr2` of wide matrices (b×r×n, through their transposes) without ``Q`` and
    without fallback: ``M = F Y`` with ``F = Rᵀ`` (r×r), ``F⁻¹``, and the trust flags."""
    qr = cholesky_qr2(batch.mT, fallback=False, compute_q=False)
    return {"factor": qr.r.mT, "inverse": qr.r_inverse.mT, "trusted": qr.trusted}


class CholeskyQR(NamedTuple):
    """``M = Q R`` from :func:`cholesky_qr2`, all float64: ``Q`` (…×m×k; ``None`` unless asked
    for), ``R`` (upper triangular, positive diagonal), ``R⁻¹``, and ``trusted`` (batch shape)."""

    q: Tensor | None
    r: Tensor
    r_inverse: Tensor
    trusted: Tensor


def cholesky_qr2(matrix: Tensor, fallback: bool = True, compute_q: bool = True) -> CholeskyQR:
    """Thin ``M = Q R`` of tall matrices (…×m×k, m ≥ k, batched) by CholeskyQR2 in float64.

    Two passes of ``G = YᵀY = LLᵀ``, ``Y ← Y L⁻ᵀ`` (Fukaya et al. 2014), starting from ``Y = M``:
    ``R = (L₁L₂)ᵀ``. Each ``L⁻¹`` is formed explicitly (k×k) and applied by one product instead
    of a triangular solve over m×k (meant to be faster on GPUs: not yet measured, see
    ``benchmarks/fastpath_ab.py qr``; its residual ~κ eps64 is what the second pass removes).
    Exact to float64 rounding for κ(M) up to ~1e7.

    ``trusted`` is False where the result cannot be vouched for: a failed Cholesky, a first
    factor with ``min diag(L₁) ≤ 1e-7 max diag(L₁)`` (κ beyond ~1e7), a second Gram more than
    0.1 from ``I`` in some entry (the first pass did not nearly orthonormalize), or non-finite
    values. With ``fallback=True`` (one host synchronization) those matrices are recomputed by
    float64 Householder QR, signs chosen so ``R``'s diagonal is ≥ 0, and marked trusted; with
    ``fallback=False`` nothing waits for the device and the caller completes them.
    ``compute_q=False`` skips the product that forms ``Q`` (callers that need only ``R``).
    """
    (result,) = cholesky_qr2_many([matrix], compute_q)
    if fallback and not bool(result.trusted.all()):  # the one synchronization
        result = _householder_where_untrusted(matrix, result)
    return result


def cholesky_qr2_many(matrices: Sequence[Tensor], compute_q: bool = True) -> list[CholeskyQR]:
    """:func:`cholesky_qr2` with ``fallback=False`` of several tall matrices or stacks of
    different shapes: the k×k Cholesky factors and inverses of all those with the same k go in
    one batched call per pass (MoFaSGD's two QRs of a stack of matrices)."""
    for matrix in matrices:
        if matrix.shape[-2] < matrix.shape[-1]:
            raise ValueError(f"cholesky_qr2 needs tall matrices (m >= k), got shape {tuple(matrix.shape)}")
    ys = [matrix.to(torch.float64) for matrix in matrices]
    lower1, inverse1, info1 = _cholesky_with_inverses([y.mT @ y for y in ys])
    ys = [y @ inverse.mT for y, inverse in zip(ys, inverse1)]  # Y₁ = M L₁⁻ᵀ
    grams2 = [y.mT @ y for y in ys]
    lower2, inverse2, info2 = _cholesky_with_inverses(grams2)
    results = []
    for y, gram2, *factors in zip(ys, grams2, lower1, inverse1, info1, lower2, inverse2, info2):
        first, first_inverse, first_info, second, second_inverse, second_info = factors
        diagonal = first.diagonal(dim1=-2, dim2=-1)
        identity = torch.eye(gram2.shape[-1], dtype=torch.float64, device=gram2.device)
        trusted = (
            (first_info == 0)
            & (second_info == 0)
            & (diagonal.amin(-1) > 1e-7 * diagonal.amax(-1))
            & ((gram2 - identity).abs().amax(dim=(-2, -1)) < 0.1)  # False for NaN; Inf in Y₁ shows here too
        )
        q = y @ second_inverse.mT if compute_q else None
        results.append(CholeskyQR(q, (first @ second).mT, (second_inverse @ first_inverse).mT, trusted))
    return results


def _cholesky_with_inverses(grams: list[Tensor]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """``L``, ``L⁻¹`` and ``cholesky_ex``'s info of each (batched) k×k ``G = LLᵀ``; one
    ``cholesky_ex`` and one triangular solve for all of the same k and device."""
    lower, inverse, info = [None] * len(grams), [None] * len(grams), [None] * len(grams)
    groups: dict[tuple, list[int]] = {}
    for i, gram in enumerate(grams):
        groups.setdefault((gram.shape[-1], gram.device), []).append(i)
    for (size, device), members in groups.items():
        flat = [grams[i].reshape(-1, size, size) for i in members]
        stacked = flat[0] if len(flat) == 1 else torch.cat(flat)
        factor, flags = torch.linalg.cholesky_ex(stacked)
        identity = torch.eye(size, dtype=factor.dtype, device=device)
        factor_inverse = torch.linalg.solve_triangular(factor, identity, upper=False)
        counts = [len(x) for x in flat]
        for i, *parts in zip(members, *(t.split(counts) for t in (factor, factor_inverse, flags))):
            shape = grams[i].shape
            lower[i], inverse[i], info[i] = parts[0].view(shape), parts[1].view(shape), parts[2].view(shape[:-2])
    return lower, inverse, info


def _householder_where_untrusted(matrix: Tensor, result: CholeskyQR) -> CholeskyQR:
    """``result`` with its untrusted matrices replaced by float64 Householder QR (R's diagonal ≥ 0)."""
    if matrix.ndim == 2:  # as a batch of one
        batched = _householder_where_untrusted(matrix[None], CholeskyQR(*(_first_axis(x) for x in result)))
        return CholeskyQR(*(x[0] if x is not None else None for x in batched))
    untrusted = (~result.trusted).nonzero(as_tuple=True)
    q, r = torch.linalg.qr(matrix[untrusted].to(torch.float64))
    signs = torch.where(r.diagonal(dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(torch.float64)
    q, r = q * signs.unsqueeze(-2), r * signs.unsqueeze(-1)
    identity = torch.eye(r.shape[-1], dtype=torch.float64, device=r.device)
    replaced = list(result[:3])
    for out, value in zip(replaced, (q, r, torch.linalg.solve_triangular(r, identity, upper=True))):
        if out is not None:
            out[untrusted] = value
    return CholeskyQR(*replaced, torch.ones_like(result.trusted))


def orthogonalize_newton_schulz(
    matrix: Tensor,
    steps: int = 5,
    coefficients: tuple[float, float, float] = NEWTON_SCHULZ_COEFFICIENTS,
    eps: float = 1e-7,
    compute_dtype: torch.dtype = torch.bfloat16,
) -> Tensor:
    """Approximate ``U Vᵀ`` by Muon's quintic Newton–Schulz iteration.

    ``X ← a X + (b A + c A²) X`` with ``A = X Xᵀ``, after scaling ``X`` to unit Frobenius
    norm. With Muon's coefficients the singular values land in roughly [0.7, 1.2], not at 1:
    the iteration trades exactness for speed. Kept to measure that trade (SUMO's claim).
    """
    a, b, c = coefficients
    x = matrix.to(compute_dtype)
    transposed = x.shape[-2] > x.shape[-1]
    if transposed:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    if transposed:
        x = x.mT
    return x.to(matrix.dtype)


def top_singular_vectors(
    matrix: Tensor,
    rank: int,
    side: str = "left",
    method: str = "svd",
    power_iterations: int = 2,
    oversample: int = 8,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Orthonormal basis of the top-``rank`` singular subspace of ``matrix`` (m×n).

    ``side="left"`` returns ``U[:, :r]`` (m×r), ``side="right"`` returns ``V[:, :r]`` (n×r).
    ``method="svd"`` takes a truncated SVD (float32, or float64 for a float64 input);
    ``method="iterative"`` the same vectors by :func:`iterative_top_singular_vectors` (signs by
    its convention, ``power_iterations`` ignored);
    ``method="randomized"`` the randomized range finder of Halko, Martinsson & Tropp
    (2011, Alg. 4.4: ``Y = (A Aᵀ)^q A Ω``, re-orthonormalized after each product), then
    Rayleigh–Ritz on the small projected matrix, which costs O(mn(r+p)) instead of O(mn·min(m, n)).
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    a = matrix if matrix.dtype == torch.float64 else matrix.float()
    rank = min(rank, *a.shape)
    if method == "svd":  # U[:, :r] or Vh[:r]ᵀ of one SVD of the matrix itself, as galore-torch takes them
        u, _, vh = torch.linalg.svd(a, full_matrices=False)
        return (u[:, :rank] if side == "left" else vh[:rank].mT).contiguous()
    if method == "iterative":
        return iterative_top_singular_vectors([a], rank, side, generators=[generator]).bases[0]
    if method != "randomized":
        raise ValueError(f"method must be 'svd', 'iterative' or 'randomized', got {method!r}")
    return randomized_top_singular_vectors([a], rank, side, power_iterations, oversample, [generator])[0]


def randomized_top_singular_vectors(
    matrices: Sequence[Tensor],
    rank: int,
    side: str = "left",
    power_iterations: int = 2,
    oversample: int = 8,
    generators: Sequence[torch.Generator | None] | None = None,
) -> list[Tensor]:
    """:func:`top_singular_vectors` by the randomized method for a stack of same-shape matrices.

    Halko, Martinsson & Tropp (2011, Alg. 4.4): ``Y = (A Aᵀ)^q A Ω`` with a Gaussian ``Ω``
    (n×k, ``k = r + oversample``, drawn from ``generators[i]`` for matrix i), re-orthonormalized
    after each product; then Rayleigh–Ritz: the top-r eigenvectors of ``B Bᵀ`` (``B = Qᵀ A``,
    k×k, float64) rotate the sketch. The products of all matrices run as grouped products and
    the orthonormalizations and eigendecompositions as batches, so a stack costs a few dozen
    launches instead of a few hundred. bf16/fp16 matrices are not copied to float32 whole: each
    product converts them a block at a time (:func:`_products_in_blocks`), with the same float32
    ``Ω`` and the same result as for their float32 copies up to summation order.
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    low = matrices[0].dtype in (torch.bfloat16, torch.float16)  # kept as they are: float32 a block at a time
    a = [x if x.dtype == torch.float64 or low else x.float() for x in matrices]
    if side == "right":
        a = [x.mT for x in a]
    m, n = a[0].shape
    rank = min(rank, m, n)
    sketch_size = min(rank + oversample, m, n)
    device, dtype = a[0].device, torch.float32 if low else a[0].dtype
    generators = generators or [None] * len(a)
    omega = torch.stack([torch.randn(n, sketch_size, device=device, dtype=dtype, generator=g) for g in generators])
    products = _products_in_blocks if low else _stacked_products
    q = _per_batch(_orthonormal_columns, products(a, omega))
    for _ in range(power_iterations):
        z = _per_batch(_orthonormal_columns, products([x.mT for x in a], q))
        q = _per_batch(_orthonormal_columns, products(a, z))
    small = products(list(q.mT.unbind()), a).to(torch.float64)
    eigenvectors = _per_batch(lambda x: cusolver.eigh(x)[1], small @ small.mT)
    bases = q @ eigenvectors[..., -rank:].flip(-1).to(q.dtype)
    if len(a) == 1:
        return [bases[0]]
    return [basis.clone() for basis in bases.unbind()]  # independent tensors for the optimizer state


class TopSingularVectors(NamedTuple):
    """Result of :func:`iterative_top_singular_vectors`: one basis per matrix, which matrices
    fell back to the full SVD (a CPU bool tensor), and the subspace iterations run."""

    bases: list[Tensor]
    fell_back: Tensor
    iterations: int


def iterative_top_singular_vectors(
    matrices: Sequence[Tensor],
    rank: int,
    side: str = "left",
    oversample: int | None = None,
    min_iterations: int = 4,
    max_iterations: int = 30,
    check_every: int = 2,
    residual_tolerance: float | None = None,
    angle_tolerance: float = 0.1,
    generators: Sequence[torch.Generator | None] | None = None,
) -> TopSingularVectors:
    """The exact top-``rank`` singular vectors (``U[:, :r]`` or ``V[:, :r]``, as :func:`top_singular_vectors`
    with ``method="svd"``) of a stack of same-shape matrices, mostly without an SVD of them.

    Subspace iteration with Rayleigh–Ritz (Halko, Martinsson & Tropp 2011, Alg. 4.4 run to
    convergence; Stewart's SRRIT). With ``k = r + oversample`` columns (default ``oversample = r``:
    the error at ``σ_r`` shrinks by ``(σ_{k+1}/σ_r)²`` per iteration, fast on decaying spectra)
    and ``Q`` (m×k) orthonormal, one iteration maps ``Q`` to an orthonormal basis of ``A Aᵀ Q``
    by two grouped products with the large matrix. Most iterations orthonormalize after each
    product (``Z = orth(AᵀQ)``, ``Q ← orth(A Z)``, CholeskyQR2, so neither product squares the
    conditioning). At iteration ``min_iterations`` and every ``check_every`` after, Rayleigh–Ritz
    replaces them: ``Bᵀ = AᵀQ``; the float64 ``eigh`` of ``B Bᵀ`` (k×k) gives Ritz values ``θ`` and
    vectors ``W``; ``U = Q W``, ``V = Bᵀ W Θ⁻¹`` (so ``Aᵀ U = V Θ`` exactly); ``A V`` gives the
    residuals ``ρᵢ = ‖A vᵢ − θᵢ uᵢ‖``, and ``Q ← orth(A V Θ⁻¹)``, the same span. The ``eigh``
    (one batched cuSOLVER call, :func:`~sumo_optim.cusolver.eigh`) was the costly part on a GPU
    when ``torch.linalg.eigh`` looped over the batch (~2 ms per 256×256 on an H200, against ~0.1 ms
    for the products of a 2048×2048 matrix), hence checks every few iterations.

    A matrix is done when, at a check, its top ``r`` Ritz triplets pass:

    1. ``ρᵢ ≤ residual_tolerance · ‖A‖_F`` for i ≤ r (default ``16 eps``: each triplet is then an
       exact singular triplet of a matrix that close to ``A``, an SVD's backward error; float32
       ``torch.linalg.svd``'s own residuals measure ~8 eps ``‖A‖₂``, and the float32 rounding of
       ``A V`` grows with ``‖A‖_F``, which flat spectra make several times ``‖A‖₂``);
    2. ``‖(ρ₁ … ρ_r)‖ ≤ angle_tolerance · δ`` with ``δ = θ_r − θ_{r+1} − ρ_{r+1}``. Ritz values
       interlace (``θ_r ≤ σ_r``) and an exact singular value lies within ``ρ_{r+1}`` of ``θ_{r+1}``,
       which bounds ``σ_{r+1} ≤ θ_{r+1} + ρ_{r+1}`` as long as the sketch has not missed a singular
       value above ``θ_{r+1}`` (probability ~0 for a Gaussian start with oversampling). Wedin's
       theorem then bounds the sine of the angle between ``span(U_r)`` and the exact top-r
       singular subspace by ``‖R_r‖/δ ≤ angle_tolerance``: the subspace is the top-r one, and
       its vectors are as accurate as the residuals allow (``ρᵢ / gap_i`` each, as for an SVD).

    Matrices not done after ``max_iterations`` (a near tie at ``σ_r`` — where the choice is made
    by rounding, so only the SVD itself reproduces the SVD's choice — numerical rank below r,
    or a spectrum too flat to converge) fall back to ``torch.linalg.svd``. Products run in full
    float32 even where TF32 is allowed (the residual test needs float32 rounding); one host
    synchronization per check (besides CholeskyQR2's). Signs follow one convention
    for both paths (an SVD's are arbitrary): each vector's entry of largest magnitude is positive.
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    if min(min_iterations, max_iterations) < 0 or check_every < 1:
        raise ValueError(
            f"need iteration counts >= 0 and check_every >= 1, got {min_iterations}, {max_iterations}, {check_every}"
        )
    a = [x if x.dtype == torch.float64 else x.float() for x in matrices]
    if side == "right":
        a = [x.mT for x in a]
    m, n = a[0].shape
    rank = min(rank, m, n)
    sketch_size = min(rank + (rank if oversample is None else oversample), m, n)
    device, dtype = a[0].device, a[0].dtype
    tolerance = 16 * torch.finfo(dtype).eps if residual_tolerance is None else residual_tolerance
    norms = torch.stack(torch._foreach_norm(a)).double()  # ‖A‖_F of each matrix
    generators = generators or [None] * len(a)
    bases: list[Tensor | None] = [None] * len(a)
    active = list(range(len(a)))
    iteration = 0
    with _float32_products():
        omega = torch.stack([torch.randn(n, sketch_size, device=device, dtype=dtype, generator=g) for g in generators])
        y = _stacked_products(a, omega)
        next_check = min_iterations
        while True:
            q = _per_batch(_orthonormal_columns, y)
            b_t = _stacked_products([a[i].mT for i in active], q)  # Bᵀ = AᵀQ (n×k)
            if iteration < min(next_check, max_iterations):  # no check: orthonormalize, go on
                y = _stacked_products([a[i] for i in active], _per_batch(_orthonormal_columns, b_t))
                iteration += 1
                continue
            next_check = iteration + check_every
            gram = b_t.mT.double() @ b_t.double()  # B Bᵀ, k×k
            squares, w = cusolver.eigh(gram)
            theta = squares.flip(-1).clamp_min(0).sqrt()  # descending
            w = w.flip(-1)
            floor = (theta[..., :1] * torch.finfo(dtype).eps).clamp_min(torch.finfo(dtype).tiny)
            inverse = 1 / theta.clamp_min(floor)  # Θ⁻¹, finite in ``dtype`` (columns at σ ≈ 0 are noise)
            v = b_t @ (w * inverse.unsqueeze(-2)).to(dtype)
            a_v = _stacked_products([a[i] for i in active], v)
            u = q @ w.to(dtype)
            residuals = (a_v - u * theta.to(dtype).unsqueeze(-2)).norm(dim=-2).double()
            scale = tolerance * norms[active]
            certified = _ritz_certified(theta, residuals, rank, scale, angle_tolerance)
            # Numerical rank below r, or σ_r and σ_{r+1} tied to within the residual tolerance:
            # criterion 2 cannot be met, the SVD decides.
            hopeless = _tied_at_rank(theta, rank, scale)
            certified_list, stop_list = certified.tolist(), (certified | hopeless).tolist()  # the synchronization
            for j, i in enumerate(active):
                if certified_list[j]:
                    bases[i] = u[j, :, :rank]
            keep = [j for j, stop in enumerate(stop_list) if not stop]
            if not keep or iteration >= max_iterations:
                break
            active = [active[j] for j in keep]
            a_v, inverse = a_v[keep], inverse[keep]
            y = a_v * inverse.unsqueeze(-2).to(dtype)
            iteration += 1
    fell_back = torch.zeros(len(a), dtype=torch.bool)
    for i in range(len(a)):
        if bases[i] is None:
            fell_back[i] = True
            bases[i] = top_singular_vectors(a[i].mT if side == "right" else a[i], rank, side)  # as galore-torch
    return TopSingularVectors([_largest_entry_positive(x) for x in bases], fell_back, iteration)


def _ritz_certified(theta: Tensor, residuals: Tensor, rank: int, tolerance: Tensor, angle_tolerance: float) -> Tensor:
    """Criteria 1 and 2 of :func:`iterative_top_singular_vectors`, per matrix (float64 inputs;
    ``tolerance``: the residual bound ``residual_tolerance · ‖A‖_F`` of each)."""
    top = residuals[..., :rank]
    if theta.shape[-1] > rank:
        gap = theta[..., rank - 1] - theta[..., rank] - residuals[..., rank]
    else:  # k = r = min(m, n): no (r+1)-th singular value
        gap = theta[..., rank - 1]
    return (top.amax(-1) <= tolerance) & (top.norm(dim=-1) <= angle_tolerance * gap) & (gap > 0)


def _tied_at_rank(theta: Tensor, rank: int, tolerance: Tensor) -> Tensor:
    """Whether ``θ_r`` is within ``tolerance`` (the residual bound) of zero or of ``θ_{r+1}``."""
    following = theta[..., rank] if theta.shape[-1] > rank else torch.zeros_like(theta[..., 0])
    return theta[..., rank - 1] - following <= tolerance


def _largest_entry_positive(basis: Tensor) -> Tensor:
    """``basis`` with each column's sign chosen so that its entry of largest magnitude is positive."""
    largest = basis.gather(-2, basis.abs().argmax(dim=-2, keepdim=True))
    return (basis * torch.where(largest < 0, -1.0, 1.0).to(basis.dtype)).contiguous()


class _float32_products:  # noqa: N801 - used as a context manager, like torch.no_grad
    """Turns TF32 off for CUDA float32 products inside the block, restoring the setting after."""

    def __enter__(self) -> None:
        self.saved = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False

    def __exit__(self, *exc: object) -> None:
        torch.backends.cuda.matmul.allow_tf32 = self.saved


def _orthonormal_columns(matrix: Tensor) -> Tensor:
    """``Q`` of :func:`cholesky_qr2`, in the input's dtype."""
    return cholesky_qr2(matrix).q.to(matrix.dtype)


def _per_batch(function, stack: Tensor) -> Tensor:
    """``function`` of a stack; a stack of one goes through the unbatched routines."""
    return function(stack[0])[None] if stack.shape[0] == 1 else function(stack)


def _products_in_blocks(lefts: Sequence[Tensor], rights: Tensor | Sequence[Tensor]) -> Tensor:
    """:func:`_stacked_products` in float32 where one factor of each product is bf16/fp16 (an
    m×n matrix, as it is or transposed): converted a block of :data:`CONVERT_VALUES` values at a
    time along the dimension that the product keeps, or for ``A Ω`` along the summed one."""
    rights = list(rights.unbind()) if isinstance(rights, Tensor) else list(rights)
    out = torch.zeros(len(lefts), lefts[0].shape[0], rights[0].shape[1], device=lefts[0].device, dtype=torch.float32)
    for result, left, right in zip(out.unbind(), lefts, rights):
        if left.dtype in (torch.bfloat16, torch.float16):  # A X: blocks of A's columns, summed
            for block in convert_blocks(left.shape[1], left.shape[0]):
                result.addmm_(left[:, block].float(), right[block])
        else:  # Qᵀ A: blocks of A's columns give blocks of the result's
            for block in convert_blocks(right.shape[1], right.shape[0]):
                torch.mm(left, right[:, block].float(), out=result[:, block])
    return out


def _stacked_products(lefts: Sequence[Tensor], rights: Tensor | Sequence[Tensor]) -> Tensor:
    """``stack(lefts[i] @ rights[i])`` through :func:`~sumo_optim.kernels.grouped_addmm_`."""
    rights = list(rights.unbind()) if isinstance(rights, Tensor) else list(rights)
    out = torch.empty(len(lefts), lefts[0].shape[0], rights[0].shape[1], device=lefts[0].device, dtype=lefts[0].dtype)
    grouped_addmm_(list(out.unbind()), lefts, rights, beta=0.0)
    return out


def random_orthonormal(
    rows: int,
    rank: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    generator: torch.Generator | None = None,
) -> Tensor:
    """A ``rows × rank`` matrix drawn uniformly from the Stiefel manifold St(rows, rank).

    QR of a standard Gaussian matrix, with the signs of R's diagonal moved into Q so the
    distribution is exactly Haar (Mezzadri, 2007); used by GoLore.
    """
    gaussian = torch.randn(rows, rank, device=device, dtype=dtype, generator=generator)
    q, r = torch.linalg.qr(gaussian)
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1
    return q * signs
