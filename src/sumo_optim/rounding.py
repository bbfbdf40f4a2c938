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


def stochastic_round_to_bf16(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """``x`` (float32) rounded stochastically to bfloat16, drawing from ``generator``.

    The rule: ``bits(x) + U`` with ``U`` uniform on ``{0, …, 2¹⁶ − 1}``, truncated to its upper
    16 bits. Values already representable in bfloat16 are returned exactly; ±Inf and NaN are
    kept (values within one bfloat16 ulp of bfloat16's largest finite number may round to Inf,
    as the unbiased rule requires).
    """
    if x.dtype != torch.float32:
        raise ValueError(f"stochastic_round_to_bf16 takes a float32 tensor, got {x.dtype}")
    noise = torch.randint(0, _LOW_BITS, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    bits = (x.view(torch.int32) + noise).bitwise_and_(_HIGH_MASK)
    rounded = bits.view(torch.float32).to(torch.bfloat16)  # exact: the low 16 bits are zero
    return torch.where(x.isnan(), x.to(torch.bfloat16), rounded)
