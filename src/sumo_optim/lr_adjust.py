"""Learning-rate conventions for orthogonalized updates (SUMO, MoFaSGD; ``torch.optim.Muon``'s ``adjust_lr_fn``).

An orthogonalized step ``O = U Vᵀ`` has all singular values 1, so its size is fixed by its
shape and rank, not by the gradient: ``‖O‖_F = √k`` for a rank-k step on an ``m × n`` matrix, an
RMS of ``√(k / (m n))``. A convention multiplies the learning rate by a factor of the matrix's
shape so that steps of different shapes get a chosen size. For a full-rank step (``k = min(m, n)``)
and a low-rank one (SUMO's ``Q O``, MoFaSGD's ``U Vᵀ``: ``k = r``) the update RMS per unit of
learning rate is:

=====================  ==================  ======================  ===========================
convention             factor              RMS, full rank          RMS, rank r
=====================  ==================  ======================  ===========================
``"none"``             1                   1 / √max(m, n)          √(r / (m n))
``"original"``         √max(1, m/n)        1 / √n                  √max(1, m/n) · √(r / (m n))
``"match_rms_adamw"``  0.2 · √max(m, n)    0.2                     0.2 · √(r / min(m, n))
``"paper"``            √max(m, n)          1                       √(r / min(m, n))
=====================  ==================  ======================  ===========================

* ``"original"``: Keller Jordan's Muon, ``torch.optim.Muon``'s default (``m`` rows, ``n`` columns).
* ``"match_rms_adamw"``: Liu et al. 2025 (Moonlight, arXiv 2502.16982): the update RMS of AdamW
  (≈ 0.2), so AdamW's learning rate and weight decay carry over; ``torch.optim.Muon``'s option.
* ``"paper"``: SUMO's text ("scaled by √max(m, n), following [39]"), with the constant 1 since
  the paper prints none. With it, a full-rank step has RMS 1.

A low-rank step at rank ``r`` is ``√(r / min(m, n))`` times the full-rank one under every
convention: at LLaMA-60M (``r = 128``, ``min(m, n) = 512``) half its RMS.
"""

from __future__ import annotations

import math

__all__ = ["LR_ADJUSTMENTS", "lr_adjustment", "update_rms"]

LR_ADJUSTMENTS = ("none", "original", "match_rms_adamw", "paper")


def lr_adjustment(shape: tuple[int, ...], convention: str) -> float:
    """The factor on the learning rate of an orthogonalized step of a matrix of ``shape`` (rows,
    columns; more dimensions count as columns, as the optimizers view conv weights)."""
    m, n = shape[0], math.prod(shape[1:])
    if convention == "none":
        return 1.0
    if convention == "original":
        return math.sqrt(max(1.0, m / n))
    if convention == "match_rms_adamw":
        return 0.2 * math.sqrt(max(m, n))
    if convention == "paper":
        return math.sqrt(max(m, n))
    raise ValueError(f"adjust_lr_fn must be one of {LR_ADJUSTMENTS}, got {convention!r}")


def update_rms(shape: tuple[int, int], rank: int, convention: str) -> float:
    """RMS of ``lr_adjustment(shape) · O`` for an orthogonalized ``O`` of rank ``rank`` (the table above)."""
    m, n = shape
    return lr_adjustment(shape, convention) * math.sqrt(rank / (m * n))
