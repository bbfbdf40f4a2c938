"""Block-wise 8-bit quantization of optimizer states (Dettmers et al. 2022, arXiv 2110.02861).

A tensor is flattened and cut into blocks of ``block_size`` values (the last one shorter);
each block keeps one float32 scale, its absolute maximum ``a``, and each value one 8-bit code:

    signed:    code = round(127 · x / a)  ∈ [−127, 127]  (int8),   x̂ = a · code / 127
    unsigned:  code = round(255 · x / a)  ∈ [0, 255]     (uint8),  x̂ = a · code / 255

so ``|x̂ − x| ≤ a / 254`` (signed) or ``a / 510`` (unsigned): half a quantization step of its
block. A block's largest value is exact, and an all-zero block stays zero. One outlier only
coarsens the 255 other values of its own block.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["BLOCK_SIZE", "dequantize_blockwise", "quantize_blockwise"]

BLOCK_SIZE = 256


def _levels(signed: bool) -> int:
    return 127 if signed else 255


def _blocks(flat: Tensor, block_size: int) -> Tensor:
    """``flat`` as rows of ``block_size`` values, zero-padded at the end."""
    padding = -flat.numel() % block_size
    if padding:
        flat = torch.cat([flat, flat.new_zeros(padding)])
    return flat.view(-1, block_size)


def quantize_blockwise(
    x: Tensor, signed: bool = True, block_size: int = BLOCK_SIZE, check: bool = True
) -> tuple[Tensor, Tensor]:
    """8-bit codes (``x``'s shape; int8 if ``signed``, else uint8) and per-block absmax (float32,
    ``ceil(numel / block_size)`` values) of ``x``, linearly quantized as the module describes.

    With ``check`` (the default), non-finite values, and negative ones when not ``signed``, raise
    ``ValueError`` (one host synchronization); the optimizers quantize moments of checked
    gradients and pass ``check=False``.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size!r}")
    if check:
        if not bool(torch.isfinite(x).all()):
            raise ValueError("quantize_blockwise: the tensor has NaN or Inf values")
        if not signed and x.numel() and bool((x < 0).any()):
            raise ValueError("quantize_blockwise: negative values need signed=True")
    blocks = _blocks(x.detach().reshape(-1).to(torch.float32), block_size)
    absmax = blocks.abs().amax(dim=1)
    scale = torch.where(absmax > 0, _levels(signed) / absmax, torch.zeros_like(absmax))
    codes = (blocks * scale[:, None]).round_().clamp_(-_levels(signed) if signed else 0, _levels(signed))
    codes = codes.to(torch.int8 if signed else torch.uint8).view(-1)[: x.numel()].view(x.shape)
    return codes, absmax


def dequantize_blockwise(codes: Tensor, absmax: Tensor, block_size: int = BLOCK_SIZE) -> Tensor:
    """The float32 tensor that :func:`quantize_blockwise` coded (``codes``' shape)."""
    if codes.dtype not in (torch.int8, torch.uint8):
        raise ValueError(f"codes must be int8 or uint8, got {codes.dtype}")
    if absmax.shape != (math.ceil(codes.numel() / block_size),):
        raise ValueError(f"absmax has shape {tuple(absmax.shape)}, expected ({math.ceil(codes.numel() / block_size)},)")
    blocks = _blocks(codes.reshape(-1).to(torch.float32), block_size)
    values = blocks * (absmax / _levels(codes.dtype == torch.int8))[:, None]
    return values.view(-1)[: codes.numel()].view(codes.shape)
