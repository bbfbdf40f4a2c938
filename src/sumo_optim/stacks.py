"""A step over stacks: the matrices of one step grouped by shape, each product one launch.

A low-rank optimizer's step does two thin products per weight matrix: the projection of the
gradient into its subspace and the back-projection of the step. :func:`project_` and
:func:`project_back_` run them for a whole stack of equal-shape matrices through
:func:`~sumo_optim.kernels.grouped_addmm_` (one launch where that measured faster, else one
``addmm_`` each), with the scalars of the rule folded into the product:

    project_:       out ← β out + Qᵀ G      (left)   or   β out + G Q    (right)
    project_back_:  W   ← β W   + α Q D     (left)   or   β W + α D Qᵀ   (right)

(:func:`project_back_` also takes β and α in device memory, for a CUDA graph.)

``side="full"`` (the subspace is the whole space, ``Q = I``) uses the gradient and the
direction as they are. :func:`project_checked` projects every stack into one buffer and says
which projections are finite: on a step without a refresh, that check stands for the full
gradient's (see :meth:`~sumo_optim.base.SubspaceOptimizer.step`).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import torch
from torch import Tensor

from .cublas import addmm_many_
from .kernels import grouped_addmm_

__all__ = [
    "Matrix",
    "finite_matrices",
    "project_",
    "project_back_",
    "project_checked",
    "project_stacks",
    "projection_key",
    "stacks",
]


class Matrix:
    """One matrix of a step: 2-D working copies of weights and gradient, its state, group and
    side; ``projected`` holds ``project(G)`` once computed, ``update`` the rule's result;
    ``basis_ready`` says that this step's refresh was already made (layer-wise, from the first
    micro-batch). ``deferred``, when a list, receives :func:`project_back_`'s work as
    ``(basis, side, D, β, α)`` instead of it being done on ``weights`` (the optimizer then applies
    it to the parameter a block of rows at a time). ``source``, when set, is the gradient as
    stored (bf16/fp16) and ``grad`` a float32 stand-in of its shape without data: a refresh that
    converts the gradient a block at a time reads it there."""

    __slots__ = (
        "basis_ready",
        "deferred",
        "grad",
        "group",
        "projected",
        "side",
        "source",
        "state",
        "update",
        "weights",
    )

    def __init__(self, weights: Tensor, grad: Tensor, state: dict[str, Any], group: dict[str, Any], side: str) -> None:
        self.weights, self.grad, self.state, self.group, self.side = weights, grad, state, group, side
        self.projected: Tensor | None = None
        self.update: Tensor | None = None
        self.basis_ready = False
        self.deferred: list[tuple[Tensor | None, str, Tensor, float, float]] | None = None
        self.source: Tensor | None = None


def stacks(items: list[Matrix], key: Callable[[Matrix], Hashable]) -> list[list[Matrix]]:
    """Items grouped by ``key``, in order of first appearance."""
    grouped: dict[Hashable, list[Matrix]] = {}
    for item in items:
        grouped.setdefault(key(item), []).append(item)
    return list(grouped.values())


def projection_key(item: Matrix) -> tuple:
    """Matrices whose gradients are projected together: same group, side and gradient layout."""
    return id(item.group), item.side, item.grad.shape, item.grad.stride()


def project_(outs: list[Tensor], members: list[Matrix], beta: float) -> None:
    """``outs[i] ← β outs[i] + project(G_i)`` for a stack sharing one side (``β = 0`` ignores
    the old values, NaN included)."""
    side, grads = members[0].side, [x.grad for x in members]
    if side == "left":
        grouped_addmm_(outs, [x.state["basis"].mT for x in members], grads, beta)
    elif side == "right":
        grouped_addmm_(outs, grads, [x.state["basis"] for x in members], beta)
    elif beta == 0:
        torch._foreach_copy_(outs, grads)
    else:
        torch._foreach_mul_(outs, beta)
        torch._foreach_add_(outs, grads)


def project_stacks(matrices: list[Matrix]) -> tuple[list[Tensor], list[tuple[list[int], Tensor]]]:
    """``R_i = project(G_i)`` for every matrix, each a view of its stack's one buffer, and per
    stack (positions in ``matrices``, that buffer). Only kernels: a CUDA graph can capture it."""
    projected: list[Tensor | None] = [None] * len(matrices)
    buffers = []
    position = {id(x): i for i, x in enumerate(matrices)}
    for members in stacks(matrices, projection_key):
        first = members[0]
        m, n = first.grad.shape
        rank = first.state["basis"].shape[1] if first.side != "full" else None
        shape = {"left": (rank, n), "right": (m, rank), "full": (m, n)}[first.side]
        buffer = first.grad.new_empty((len(members), *shape))
        outs = list(buffer.unbind())
        project_(outs, members, 0.0)
        positions = [position[id(x)] for x in members]
        for i, out in zip(positions, outs):
            projected[i] = out
        buffers.append((positions, buffer))
    return projected, buffers


def finite_matrices(stack: Tensor) -> Tensor:
    """Whether each matrix of a stack is finite (max |x| is NaN or Inf iff some entry is)."""
    return torch.linalg.vector_norm(stack, float("inf"), dim=(-2, -1)).isfinite()


def project_checked(matrices: list[Matrix]) -> tuple[list[Tensor], list[tuple[list[int], Tensor]]]:
    """:func:`project_stacks`, and per stack (positions in ``matrices``, whether each ``R_i`` is
    finite). Only kernels: a CUDA graph can capture it.

    Products propagate NaN and Inf (``0·Inf`` is NaN), so ``R_i`` is finite only if ``G_i`` is,
    unless the product overflows, which makes the step as unusable as a non-finite gradient."""
    projected, buffers = project_stacks(matrices)
    return projected, [(positions, finite_matrices(buffer)) for positions, buffer in buffers]


def project_back_(members: list[Matrix], directions: list[Tensor], beta: float | Tensor, alpha: float | Tensor) -> None:
    """``W_i ← β W_i + α project_back(D_i)`` in place, for a stack sharing one side (recorded
    in ``deferred`` instead, for matrices that have it). ``β`` and ``α`` are numbers, or 0-dim
    tensors in the weights' dtype and device, read when the products run
    (:func:`~sumo_optim.cublas.addmm_many_`): a CUDA graph that captures those stays valid when
    they change."""
    if members[0].deferred is not None:
        for x, direction in zip(members, directions):
            x.deferred.append((x.state.get("basis"), x.side, direction, beta, alpha))
        return
    on_device = isinstance(beta, Tensor)
    product = addmm_many_ if on_device else grouped_addmm_
    side, weights = members[0].side, [x.weights for x in members]
    if side == "left":
        product(weights, [x.state["basis"] for x in members], directions, beta, alpha)
    elif side == "right":
        product(weights, directions, [x.state["basis"].mT for x in members], beta, alpha)
    else:
        torch._foreach_mul_(weights, beta)
        if on_device:
            torch._foreach_add_(weights, torch._foreach_mul(directions, alpha))
        else:
            torch._foreach_add_(weights, directions, alpha=alpha)
