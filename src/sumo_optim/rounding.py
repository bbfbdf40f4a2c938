"""Stochastic rounding of float32 values to bfloat16.

A bfloat16 number is the upper 16 bits of a float32 one. Adding a uniform random integer in
``[0, 2¹⁶)`` to the float32 bit pattern and then clearing the lower 16 bits rounds the
magnitude up to the next bfloat16 with probability equal to the distance from the lower one
(in units of that gap), and down otherwise: the result is one of the two bfloat16 neighbours
of ``x`` and ``E[round(x)] = x``. Tiny updates (below half a bfloat16 ulp, which round-to-nearest
always loses) then still move a bfloat16 weight in expectation.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["stochastic_round_to_bf16"]

_LOW_BITS = 1 << 16
_HIGH_MASK = -_LOW_BITS  # 0xFFFF0000 as an int32
CHUNK = 1 << 22  # values rounded per random draw: 16 MiB of int32 work, whatever the tensor's size


def stochastic_round_to_bf16(x: Tensor, generator: torch.Generator | None = None, out: Tensor | None = None) -> Tensor:
    """``x`` (float32) rounded stochastically to bfloat16, drawing from ``generator``; written
    into ``out`` (a contiguous bfloat16 tensor of ``x``'s shape) when given, else a new tensor.

    The rule: ``bits(x) + U`` with ``U`` uniform on ``{0, …, 2¹⁶ − 1}``, truncated to its upper
    16 bits. Values already representable in bfloat16 are returned exactly; ±Inf and NaN are
    kept (values within one bfloat16 ulp of bfloat16's largest finite number may round to Inf,
    as the unbiased rule requires). Works on :data:`CHUNK` values at a time, so the transient
    memory beyond ``out`` is bounded (for LLaMA-7B's 45M-value MLP matrices: 32 MiB, not 0.6 GiB).
    """
    if x.dtype != torch.float32:
        raise ValueError(f"stochastic_round_to_bf16 takes a float32 tensor, got {x.dtype}")
    if out is None:
        out = torch.empty(x.shape, dtype=torch.bfloat16, device=x.device)
    elif out.dtype != torch.bfloat16 or out.shape != x.shape or not out.is_contiguous():
        raise ValueError(
            f"out must be a contiguous bfloat16 tensor of shape {tuple(x.shape)}, got {out.dtype} {tuple(out.shape)}"
        )
    flat, flat_out = x.reshape(-1), out.view(-1)
    for start in range(0, flat.numel(), CHUNK):
        part = flat[start : start + CHUNK]
        noise = torch.randint(0, _LOW_BITS, part.shape, dtype=torch.int32, device=x.device, generator=generator)
        rounded = noise.add_(part.view(torch.int32)).bitwise_and_(_HIGH_MASK).view(torch.float32)
        flat_out[start : start + CHUNK].copy_(torch.where(part.isnan(), part, rounded))  # exact: low bits zero
    return out
