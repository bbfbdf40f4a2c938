"""Grouped ``addmm_``: one launch for a stack of same-shape matrix products.

A low-rank step does two thin products per weight matrix, the projection with momentum
``M ← μ M + Qᵀ G`` (inner dimension m or n) and the back-projection with decay
``W ← (1 − ηλ) W − η Q O`` (inner dimension r). Both are ``out ← β out + α A B``.
:func:`grouped_addmm_` runs a whole stack of them in one Triton launch, reading each
operand's address from a table, so the matrices stay separate tensors.

When a kernel is used is set by measurement (LLaMA-1B at r = 128, NOTES.md), only for TF32
products (``torch.backends.cuda.matmul.allow_tf32``):

* inner dimension of at least ``MIN_INNER`` (the projections), compute capability ≥ 8.0:
  ``_grouped_addmm_kernel``, 3.1 ms against cuBLAS's 4.6 ms (H100);
* shorter inner dimensions (the r-deep back-projection), compute capability ≥ 9.0, operands
  whose rows TMA can address (unit column stride, row strides of a multiple of 16 bytes):
  ``_back_projection_kernel``, tiles moved by TMA descriptors, 3.23–3.29 ms against cuBLAS's
  3.70 for the 144 such products of LLaMA-1B (H200, ``benchmarks/backprojection_ab.py``).

In strict float32 (Triton's ``ieee`` or ``tf32x3``) cuBLAS was faster, so those stay a loop of
``torch.Tensor.addmm_``, as does everything else, and everything without CUDA or Triton.
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
try:  # where Triton looks for the scratch memory of descriptors made on the device (a ContextVar)
    from triton.runtime._allocation import _allocator as _triton_allocator
except ImportError:  # pragma: no cover - older Triton, or none
    _triton_allocator = None
# TMA descriptors made inside a kernel (Triton ≥ 3.4 or so): the back-projection kernel needs them.
HAS_TENSOR_DESCRIPTORS = _triton_allocator is not None and hasattr(tl, "make_tensor_descriptor")

# SUMO_OPTIM_TRITON=0 turns the kernel off (the loop of addmm_ is used everywhere).
ENABLED = os.environ.get("SUMO_OPTIM_TRITON", "1") != "0"
MIN_INNER = 512
# Under Triton's interpreter (TRITON_INTERPRET=1) the kernel also runs on CPU tensors: how CI tests it.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
BLOCK_M, BLOCK_N, BLOCK_K = 128, 128, 32
# The back-projection kernel's tiles: the best of 48 configurations (H200, backprojection_ab.py).
BACK_PROJECTION_CONFIG = {"BLOCK_M": 256, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 1}


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

    @triton.jit
    def _back_projection_kernel(
        out_table,
        left_table,
        right_table,
        rows,
        cols,
        inner,
        out_stride_row,
        left_stride_row,
        right_stride,
        beta,
        alpha,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        RIGHT_TRANSPOSED: tl.constexpr,
    ):
        """One output tile of ``out_g ← β out_g + α left_g right_g`` (out and left row-major; right
        row-major, or the transpose of a row-major matrix), tiles moved by TMA descriptors (their
        loads zero-fill past the edges, their stores clip); program axis 2 is g."""
        g = tl.program_id(2)
        out = tl.load(out_table + g).to(tl.pointer_type(tl.float32))
        left = tl.load(left_table + g).to(tl.pointer_type(tl.float32))
        right = tl.load(right_table + g).to(tl.pointer_type(tl.float32))
        row = tl.program_id(0) * BLOCK_M
        col = tl.program_id(1) * BLOCK_N
        left_tiles = tl.make_tensor_descriptor(left, [rows, inner], [left_stride_row, 1], [BLOCK_M, BLOCK_K])
        if RIGHT_TRANSPOSED:  # right = Pᵀ, P (cols × inner) row-major
            right_tiles = tl.make_tensor_descriptor(right, [cols, inner], [right_stride, 1], [BLOCK_N, BLOCK_K])
        else:
            right_tiles = tl.make_tensor_descriptor(right, [inner, cols], [right_stride, 1], [BLOCK_K, BLOCK_N])
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, inner, BLOCK_K):
            if RIGHT_TRANSPOSED:
                b = right_tiles.load([col, k]).T
            else:
                b = right_tiles.load([k, col])
            acc = tl.dot(left_tiles.load([row, k]), b, acc, input_precision="tf32")
        out_tiles = tl.make_tensor_descriptor(out, [rows, cols], [out_stride_row, 1], [BLOCK_M, BLOCK_N])
        if beta == 0:  # as addmm: out's old values are not read
            out_tiles.store([row, col], alpha * acc)
        else:
            out_tiles.store([row, col], beta * out_tiles.load([row, col]) + alpha * acc)


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


def _tma_addressable(tensor: Tensor, column_stride_one: bool = True) -> bool:
    """Whether TMA can move tiles of a float32 matrix: 16-byte aligned start and row stride, unit
    column stride (or, with ``column_stride_one=False``, unit row stride: the transpose of one)."""
    row_stride, col_stride = tensor.stride() if column_stride_one else tensor.stride()[::-1]
    return col_stride == 1 and row_stride % 4 == 0 and tensor.data_ptr() % 16 == 0


def _uses_back_projection_kernel(outs: Sequence[Tensor], lefts: Sequence[Tensor], rights: Sequence[Tensor]) -> bool:
    tensors = [*outs, *lefts, *rights]
    device = outs[0].device
    return (
        triton_available()
        and HAS_TENSOR_DESCRIPTORS
        and torch.backends.cuda.matmul.allow_tf32
        and lefts[0].shape[1] < MIN_INNER
        and ((device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0)) or INTERPRETED)
        and all(t.dtype == torch.float32 and t.device == device for t in tensors)
        and _same_layout(outs)
        and _same_layout(lefts)
        and _same_layout(rights)
        and all(_tma_addressable(t) for t in (*outs, *lefts))
        and (all(_tma_addressable(t) for t in rights) or all(_tma_addressable(t, False) for t in rights))
    )


def launch_back_projection(
    outs: Sequence[Tensor],
    lefts: Sequence[Tensor],
    rights: Sequence[Tensor],
    beta: float,
    alpha: float,
    config: dict | None = None,
) -> None:
    """Runs ``_back_projection_kernel`` (also under ``TRITON_INTERPRET=1`` on CPU tensors, for tests)."""
    rows, inner = lefts[0].shape
    cols = rights[0].shape[1]
    device = outs[0].device
    config = {**BACK_PROJECTION_CONFIG, **(config or {})}
    transposed = rights[0].stride(1) != 1
    grid = (triton.cdiv(rows, config["BLOCK_M"]), triton.cdiv(cols, config["BLOCK_N"]), len(outs))

    def scratch(size: int, alignment: int, stream: int | None) -> Tensor:  # the descriptors' global memory
        return torch.empty(size, dtype=torch.int8, device=device)

    token = _triton_allocator.set(scratch)  # only for this launch: a user's allocator stays as it was
    try:
        _back_projection_kernel[grid](
            _address_table(outs, device),
            _address_table(lefts, device),
            _address_table(rights, device),
            rows,
            cols,
            inner,
            outs[0].stride(0),
            lefts[0].stride(0),
            rights[0].stride(1 if transposed else 0),
            float(beta),
            float(alpha),
            RIGHT_TRANSPOSED=transposed,
            **config,
        )
    finally:
        _triton_allocator.reset(token)


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
    docstring says a kernel pays (CUDA, float32 under TF32, each list sharing one shape and
    stride, and the conditions of either kernel) the stack is one launch; otherwise each
    product is one ``addmm_``. As with ``addmm_``, ``β = 0`` ignores ``out``'s values.
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
    if _uses_back_projection_kernel(outs, lefts, rights):
        launch_back_projection(outs, lefts, rights, beta, alpha)
        return
    for out, left, right in zip(outs, lefts, rights):
        if beta == 0 and alpha == 1:  # a plain product
            torch.mm(left, right, out=out)
        else:
            out.addmm_(left, right, beta=beta, alpha=alpha)
