"""The subspace engine shared by SUMO, GaLore, GoLore and MoFaSGD.

A low-rank optimizer keeps, for a weight matrix ``W ∈ R^{m×n}``, an orthonormal basis ``Q``
of a rank-``r`` subspace on one side of the matrix and runs its inner rule on the reduced
gradient. Three independent pieces, combined per algorithm:

* **side** (:func:`choose_side`): which dimension is projected;
* **basis policy** (:func:`compute_basis`): how ``Q`` is chosen when it is refreshed
  (top singular vectors by exact or randomized SVD, or a random Stiefel point), and
  **when** (:func:`is_refresh_step`, every ``K`` steps from the first);
* **moment transport** (:func:`transport`): carrying a moment from the old basis into the new.

For ``side="left"`` (``Q`` is m×r) the reduced gradient is ``Qᵀ G`` (r×n) and a reduced step
``S`` maps back as ``Q S``; for ``side="right"`` (``Q`` is n×r) they are ``G Q`` (m×r) and
``S Qᵀ``. ``side="full"`` means ``r ≥ min(m, n)``: the subspace is the whole space (``Q = I``,
never stored).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .linalg import (
    iterative_top_singular_vectors,
    random_orthonormal,
    randomized_top_singular_vectors,
    top_singular_vectors,
)

__all__ = [
    "BASIS_METHODS",
    "PROJECTION_TYPES",
    "SIDES",
    "choose_side",
    "compute_bases",
    "compute_basis",
    "is_refresh_step",
    "project",
    "project_back",
    "refresh_generator",
    "transport",
]

SIDES = ("left", "right", "full")
# "short": project the shorter side, left on ties (SUMO, Alg. 1: m ≤ n → left).
# "std" / "reverse_std" / "left" / "right": galore-torch's proj_type conventions
# ("std" projects the shorter side too, but right on ties).
PROJECTION_TYPES = ("short", "std", "reverse_std", "left", "right")
BASIS_METHODS = ("svd", "iterative", "randomized", "random")
# Matrices per batched randomized refresh: at LLaMA-7B's 11008×4096 the float64 Rayleigh–Ritz
# input of 32 matrices is 0.4 GB.
REFRESH_CHUNK = 32


def choose_side(shape: torch.Size | tuple[int, int], rank: int, proj_type: str = "short") -> str:
    """Which side of an m×n matrix a rank-``rank`` basis lives on: "left", "right" or "full"."""
    m, n = shape
    if proj_type not in PROJECTION_TYPES:
        raise ValueError(f"proj_type must be one of {PROJECTION_TYPES}, got {proj_type!r}")
    if rank >= min(m, n):
        return "full"
    if proj_type == "short":
        return "left" if m <= n else "right"
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    return proj_type


def compute_basis(
    grad: Tensor,
    rank: int,
    side: str,
    method: str = "svd",
    generator: torch.Generator | None = None,
    power_iterations: int = 2,
) -> Tensor:
    """A new orthonormal basis for the ``side`` of ``grad`` (m×n), in float32 or float64.

    ``"svd"``: top-``rank`` singular vectors by exact SVD; ``"iterative"``: the same vectors
    (to float32 accuracy, one sign convention) by subspace iteration checked to convergence,
    with the SVD as fallback; ``"randomized"``: an approximation by a randomized range finder
    with ``power_iterations``; ``"random"``: uniform on the Stiefel
    manifold, independent of ``grad`` (GoLore).
    """
    if side not in ("left", "right"):
        raise ValueError(f"compute_basis needs side 'left' or 'right', got {side!r}")
    if method == "random":
        rows = grad.shape[0] if side == "left" else grad.shape[1]
        dtype = torch.promote_types(grad.dtype, torch.float32)
        return random_orthonormal(rows, rank, device=grad.device, dtype=dtype, generator=generator)
    if method not in BASIS_METHODS:
        raise ValueError(f"basis method must be one of {BASIS_METHODS}, got {method!r}")
    return top_singular_vectors(
        grad, rank, side=side, method=method, power_iterations=power_iterations, generator=generator
    )


def compute_bases(
    grads: list[Tensor],
    rank: int,
    side: str,
    method: str = "svd",
    generators: list[torch.Generator | None] | None = None,
    power_iterations: int = 2,
) -> list[Tensor]:
    """:func:`compute_basis` for a stack of same-shape gradients (``generators[i]`` for ``grads[i]``).

    The randomized and iterative methods run batched
    (:func:`~sumo_optim.linalg.randomized_top_singular_vectors`,
    :func:`~sumo_optim.linalg.iterative_top_singular_vectors`), in chunks of ``REFRESH_CHUNK``
    matrices to bound their working memory; the others loop.
    """
    generators = generators if generators is not None else [None] * len(grads)
    if method not in ("randomized", "iterative") or side not in ("left", "right"):
        return [compute_basis(g, rank, side, method, gen, power_iterations) for g, gen in zip(grads, generators)]
    bases = []
    for start in range(0, len(grads), REFRESH_CHUNK):
        chunk = slice(start, start + REFRESH_CHUNK)
        if method == "iterative":
            bases += iterative_top_singular_vectors(grads[chunk], rank, side, generators=generators[chunk]).bases
        else:
            bases += randomized_top_singular_vectors(
                grads[chunk], rank, side, power_iterations, generators=generators[chunk]
            )
    return bases


def project(matrix: Tensor, basis: Tensor | None, side: str) -> Tensor:
    """Reduced matrix: ``Qᵀ G`` (left), ``G Q`` (right) or ``G`` itself (full)."""
    if side == "left":
        return basis.mT @ matrix
    if side == "right":
        return matrix @ basis
    return matrix


def project_back(reduced: Tensor, basis: Tensor | None, side: str) -> Tensor:
    """Full-size matrix from a reduced one: ``Q S`` (left), ``S Qᵀ`` (right) or ``S`` (full)."""
    if side == "left":
        return basis @ reduced
    if side == "right":
        return reduced @ basis.mT
    return reduced


def transport(moment: Tensor, old_basis: Tensor, new_basis: Tensor, side: str) -> Tensor:
    """Moment expressed in the new basis: ``(Q_newᵀ Q_old) M`` (left), ``M (Q_oldᵀ Q_new)`` (right).

    SUMO's Algorithm 1, refresh step: the part of the moment inside both subspaces is kept,
    the part leaving the new subspace is dropped.
    """
    if side == "left":
        return (new_basis.mT @ old_basis) @ moment
    if side == "right":
        return moment @ (old_basis.mT @ new_basis)
    return moment


def is_refresh_step(step: int, refresh_every: int) -> bool:
    """True at steps 1, K+1, 2K+1, … (1-based): the basis is chosen on the first step."""
    return (step - 1) % refresh_every == 0


def refresh_generator(seed: int, step: int, device: torch.device, stream: int = 0) -> torch.Generator:
    """A generator determined by (matrix seed, step, stream) alone.

    Randomness drawn for a refresh then depends on nothing but values stored in the
    optimizer state: a resumed run redraws exactly the same bases, and data-parallel ranks
    with the same seed agree without communicating. ``stream`` separates independent uses of
    randomness at one step (0: the basis refresh; 1: stochastic rounding of the weights).
    """
    mixed = (seed * 6364136223846793005 + step * 1442695040888963407 + stream * 2862933555777941757 + 1) % (2**63 - 1)
    return torch.Generator(device=device).manual_seed(mixed)
