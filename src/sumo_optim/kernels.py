"""Grouped ``addmm_``: one launch for a stack of same-shape matrix products.

A low-rank step does two thin products per weight matrix, the projection with momentum
``M ← μ M + Qᵀ G`` (inner dimension m or n) and the back-projection with decay
``W ← (1 − ηλ) W − η Q O`` (inner dimension r). Both are ``out ← β out + α A B``.
:func:`grouped_addmm_` runs a whole stack of them in one Triton launch, reading each
operand's address from a table, so the matrices stay separate tensors.

When the kernel is used is set by measurement (H100, LLaMA-1B at r = 128, NOTES.md): only for
TF32 products (``torch.backends.cuda.matmul.allow_tf32``, compute capability ≥ 8.0) with an
inner dimension of at least ``MIN_INNER``: the projections, 3.1 ms against cuBLAS's 4.6 ms.
In strict float32 (Triton's ``ieee`` or ``tf32x3``) and for the r-deep back-projection,
cuBLAS was faster, so those stay a loop of ``torch.Tensor.addmm_``, as does everything
without CUDA or Triton.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["grouped_addmm_", "triton_available"]

try:  # Triton is optional: CUDA builds of PyTorch ship it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

# SUMO_OPTIM_TRITON=0 turns the kernel off (the loop of addmm_ is used everywhere).
ENABLED = os.environ.get("SUMO_OPTIM_TRITON", "1") != "0"
MIN_INNER = 512
# Under Triton's interpreter (TRITON_INTERPRET=1) the kernel also runs on CPU tensors: how CI tests it.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
BLOCK_M, BLOCK_N, BLOCK_K = 128, 128, 32


def triton_available() -> bool:
    """Whether Triton is importable and not turned off by ``SUMO_OPTIM_TRITON=0``."""
    return triton is not None and ENABLED


if triton is not None:

    @triton.jit
    def _grouped_addmm_kernel(
        out_table,
        left_table,
        right_table,
        rows,
        cols,
        inner,
        out_stride_row,
        out_stride_col,
        left_stride_row,
        left_stride_inner,
        right_stride_inner,
        right_stride_col,
        beta,
        alpha,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        """One output tile of ``out_g ← β out_g + α left_g right_g``; program axis 2 is g."""
        g = tl.program_id(2)
        out = tl.load(out_table + g).to(tl.pointer_type(tl.float32))
        left = tl.load(left_table + g).to(tl.pointer_type(tl.float32))
        right = tl.load(right_table + g).to(tl.pointer_type(tl.float32))
        row = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        col = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        step = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for start in range(0, inner, BLOCK_K):
            k = start + step
            a = tl.load(
                left + row[:, None] * left_stride_row + k[None, :] * left_stride_inner,
                mask=(row[:, None] < rows) & (k[None, :] < inner),
                other=0.0,
            )
            b = tl.load(
                right + k[:, None] * right_stride_inner + col[None, :] * right_stride_col,
                mask=(k[:, None] < inner) & (col[None, :] < cols),
                other=0.0,
            )
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        mask = (row[:, None] < rows) & (col[None, :] < cols)
        target = out + row[:, None] * out_stride_row + col[None, :] * out_stride_col
        if beta == 0:  # as addmm: out's old values are not read, so NaN garbage there is ignored
            tl.store(target, alpha * acc, mask=mask)
        else:
            tl.store(target, beta * tl.load(target, mask=mask) + alpha * acc, mask=mask)


# Host tables copied during a CUDA graph capture: every replay of the graph copies them again.
_CAPTURED_TABLES: dict[tuple[int, ...], Tensor] = {}


def _address_table(tensors: Sequence[Tensor], device: torch.device) -> Tensor:
    """The tensors' data addresses on ``device``, copied without synchronizing the host."""
    addresses = tuple(t.data_ptr() for t in tensors)
    table = torch.tensor(addresses, dtype=torch.int64)
    if device.type != "cuda":
        return table
    if torch.cuda.is_current_stream_capturing():  # keep the source alive and unchanged for replays
        return _CAPTURED_TABLES.setdefault(addresses, table.pin_memory()).to(device, non_blocking=True)
    return table.pin_memory().to(device, non_blocking=True)


def _same_layout(tensors: Sequence[Tensor]) -> bool:
    first = tensors[0]
    return all(t.shape == first.shape and t.stride() == first.stride() for t in tensors)


def _uses_kernel(outs: Sequence[Tensor], lefts: Sequence[Tensor], rights: Sequence[Tensor]) -> bool:
    tensors = [*outs, *lefts, *rights]
    device = outs[0].device
    return (
        triton_available()
        and torch.backends.cuda.matmul.allow_tf32
        and lefts[0].shape[1] >= MIN_INNER
        and ((device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)) or INTERPRETED)
        and all(t.dtype == torch.float32 and t.device == device for t in tensors)
        and _same_layout(outs)
        and _same_layout(lefts)
        and _same_layout(rights)
    )


def launch_grouped_addmm(
    outs: Sequence[Tensor],
    lefts: Sequence[Tensor],
    rights: Sequence[Tensor],
    beta: float,
    alpha: float,
    config: dict | None = None,
) -> None:
    """Runs the Triton kernel (also under ``TRITON_INTERPRET=1`` on CPU tensors, for tests)."""
    rows, inner = lefts[0].shape
    cols = rights[0].shape[1]
    device = outs[0].device
    precision = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3"  # see the module docstring
    config = {
        "BLOCK_M": BLOCK_M,
        "BLOCK_N": BLOCK_N,
        "BLOCK_K": BLOCK_K,
        "num_warps": 8,
        "num_stages": 3,
        "PRECISION": precision,
        **(config or {}),
    }
    grid = (triton.cdiv(rows, config["BLOCK_M"]), triton.cdiv(cols, config["BLOCK_N"]), len(outs))
    _grouped_addmm_kernel[grid](
        _address_table(outs, device),
        _address_table(lefts, device),
        _address_table(rights, device),
        rows,
        cols,
        inner,
        *outs[0].stride(),
        *lefts[0].stride(),
        *rights[0].stride(),
        float(beta),
        float(alpha),
        **config,
    )


def grouped_addmm_(
    outs: Sequence[Tensor], lefts: Sequence[Tensor], rights: Sequence[Tensor], beta: float = 1.0, alpha: float = 1.0
) -> None:
    """``outs[g] ← β outs[g] + α lefts[g] @ rights[g]`` in place, for every g.

    Operands may be views with any strides (``Q.mT`` needs no copy). Where the module
    docstring says the kernel pays (CUDA, float32 under TF32, long inner dimension, each list
    sharing one shape and stride) the stack is one launch; otherwise each product is one
    ``addmm_``. As with ``addmm_``, ``β = 0`` ignores ``out``'s values.
    """
    if not (len(outs) == len(lefts) == len(rights)):
        raise ValueError(f"got {len(outs)} outputs, {len(lefts)} left and {len(rights)} right factors")
    if not outs:
        return
    for out, left, right in zip(outs, lefts, rights):
        if (
            left.ndim != 2
            or right.ndim != 2
            or out.shape != (left.shape[0], right.shape[1])
            or (left.shape[1] != right.shape[0])
        ):
            raise ValueError(
                f"shapes do not fit out ← β out + α A B: out {tuple(out.shape)}, "
                f"A {tuple(left.shape)}, B {tuple(right.shape)}"
            )
    if _uses_kernel(outs, lefts, rights):
        launch_grouped_addmm(outs, lefts, rights, beta, alpha)
        return
    for out, left, right in zip(outs, lefts, rights):
        if beta == 0 and alpha == 1:  # a plain product
            torch.mm(left, right, out=out)
        else:
            out.addmm_(left, right, beta=beta, alpha=alpha)
