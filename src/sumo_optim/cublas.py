"""``out ← β out + α A B`` by cuBLAS with β and α read from device memory.

``torch.Tensor.addmm_`` takes β and α as host numbers, so a CUDA graph that captures it bakes
them in: a step whose β = 1 − ηλ and α = −η f(m, n) change with the learning rate could not be
replayed, and a step that must leave the weights untouched when a gradient is not finite could
only decide so on the host. cuBLAS reads them from device memory in its device pointer mode
(``CUBLAS_POINTER_MODE_DEVICE``). `addmm_many_` calls ``cublasGemmEx`` that way through
``ctypes``, on the cuBLAS library PyTorch itself loaded (no build step), with a handle of its
own. On the CPU it is ``addmm_`` with the scalars read on the host.
"""

from __future__ import annotations

import ctypes
import functools
import threading
from collections.abc import Sequence

import torch
from torch import Tensor

from .cusolver import loaded_library_paths

__all__ = ["addmm_many_", "device_scalars_available"]

# cuBLAS / CUDA enum values (cublas_api.h, library_types.h).
_OP_N, _OP_T = 0, 1
_POINTER_MODE_DEVICE = 1
_GEMM_DEFAULT = -1
_DATA_TYPE = {torch.float32: 0, torch.float64: 1}  # CUDA_R_32F, CUDA_R_64F
_COMPUTE_32F, _COMPUTE_32F_FAST_TF32, _COMPUTE_64F = 68, 77, 70
# cuBLAS's recommended workspace on Hopper; set explicitly so that a CUDA graph capture allocates nothing.
WORKSPACE_BYTES = 32 * 2**20

_int = ctypes.c_int
_pointer = ctypes.c_void_p


@functools.cache
def _library() -> ctypes.CDLL | None:
    """PyTorch's cuBLAS with the calls used here typed, or None (no CUDA, a ROCm build)."""
    if not torch.cuda.is_available() or torch.version.cuda is None:
        return None
    torch.cuda.init()  # maps the CUDA libraries
    for name in [*loaded_library_paths("libcublas.so", exclude="Lt"), "libcublas.so"]:
        try:
            library = ctypes.CDLL(name)
            gemm = library.cublasGemmEx
        except (OSError, AttributeError):
            continue
        library.cublasCreate_v2.argtypes = [ctypes.POINTER(_pointer)]
        library.cublasSetStream_v2.argtypes = [_pointer, _pointer]
        library.cublasSetPointerMode_v2.argtypes = [_pointer, _int]
        library.cublasSetWorkspace_v2.argtypes = [_pointer, _pointer, ctypes.c_size_t]
        operand = [_pointer, _int, _int]  # pointer, data type, leading dimension
        gemm.argtypes = [_pointer, _int, _int, _int, _int, _int, _pointer, *operand, *operand, _pointer, *operand]
        gemm.argtypes += [_int, _int]  # compute type, algorithm
        return library
    return None


_handles = threading.local()


def _handle(library: ctypes.CDLL, device: torch.device) -> ctypes.c_void_p:
    """One cuBLAS handle per thread and device (cuBLAS's rule) in device pointer mode, with its
    own workspace, created once."""
    cache = _handles.__dict__.setdefault("by_device", {})
    if device.index not in cache:
        handle = _pointer()
        with torch.cuda.device(device):
            _check(library.cublasCreate_v2(ctypes.byref(handle)), "cublasCreate")
            _check(library.cublasSetPointerMode_v2(handle, _POINTER_MODE_DEVICE), "cublasSetPointerMode")
            workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
            _check(library.cublasSetWorkspace_v2(handle, workspace.data_ptr(), WORKSPACE_BYTES), "cublasSetWorkspace")
        cache[device.index] = (handle, workspace)  # (the workspace lives as long as the handle)
    return cache[device.index][0]


def _check(status: int, call: str) -> None:
    if status != 0:
        raise RuntimeError(f"{call} failed with cuBLAS status {status}")


def device_scalars_available(device: torch.device) -> bool:
    """Whether :func:`addmm_many_` on ``device`` reads its scalars without the host (CUDA with
    PyTorch's cuBLAS found); on the CPU it reads them on the host, which costs nothing there."""
    return device.type == "cpu" or (device.type == "cuda" and _library() is not None)


def _layout(matrix: Tensor, name: str) -> tuple[bool, int]:
    """(row-major?, leading dimension) of a 2-D operand with one unit stride."""
    rows, cols = matrix.shape
    if matrix.stride(1) == 1 and matrix.stride(0) >= max(1, cols):
        return True, matrix.stride(0)
    if matrix.stride(0) == 1 and matrix.stride(1) >= max(1, rows):
        return False, matrix.stride(1)
    raise ValueError(f"{name} needs a unit stride in one dimension, got strides {matrix.stride()}")


def addmm_many_(
    outs: Sequence[Tensor], lefts: Sequence[Tensor], rights: Sequence[Tensor], beta: Tensor, alpha: Tensor
) -> None:
    """``outs[i] ← β outs[i] + α lefts[i] @ rights[i]`` in place, for 2-D float32/float64 matrices
    of one dtype and device, each list's members of one shape and layout; ``beta`` and ``alpha``
    are one-element tensors of that dtype and device, read when the products run (a CUDA graph
    may capture the call and replay it with new values). TF32 as
    ``torch.backends.cuda.matmul.allow_tf32`` says. ``outs`` must be row-major."""
    if not outs:
        return
    out, left, right = outs[0], lefts[0], rights[0]
    if not len(outs) == len(lefts) == len(rights):
        raise ValueError(f"addmm_many_ needs lists of one length, got {len(outs)}, {len(lefts)}, {len(rights)}")
    for name, members in (("outs", outs), ("lefts", lefts), ("rights", rights)):
        first = members[0]
        if first.dim() != 2:
            raise ValueError(f"addmm_many_ multiplies 2-D matrices, got {name} of shape {tuple(first.shape)}")
        if any(x.shape != first.shape or x.stride() != first.stride() for x in members):
            raise ValueError(f"addmm_many_ needs {name} of one shape and layout")
    tensors = (out, left, right, beta, alpha)
    if any(t.dtype != out.dtype or t.device != out.device for t in tensors):
        raise ValueError("addmm_many_ needs outs, lefts, rights, beta and alpha of one dtype and device")
    rows, cols, inner = out.shape[0], out.shape[1], left.shape[1]
    if left.shape[0] != rows or right.shape != (inner, cols):
        raise ValueError(
            f"addmm_many_ shapes do not agree: {tuple(out.shape)} ← {tuple(left.shape)} @ {tuple(right.shape)}"
        )
    if beta.numel() != 1 or alpha.numel() != 1:
        raise ValueError("beta and alpha must be one-element tensors")
    if out.device.type == "cpu":
        beta_value, alpha_value = beta.item(), alpha.item()
        for out, left, right in zip(outs, lefts, rights):
            out.addmm_(left, right, beta=beta_value, alpha=alpha_value)
        return
    library = _library()
    if out.device.type != "cuda" or library is None or out.dtype not in _DATA_TYPE:
        raise RuntimeError(
            f"addmm_many_ needs float32/float64 CUDA tensors and cuBLAS, got {out.dtype} on {out.device}"
        )
    if out.numel() == 0:
        return
    out_row_major, out_ld = _layout(out, "outs")
    if not out_row_major:
        raise ValueError("addmm_many_ writes row-major outs only")
    # cuBLAS is column-major: a row-major out is outᵀ there, and outᵀ = rightᵀ leftᵀ.
    right_row_major, right_ld = _layout(right, "rights")
    left_row_major, left_ld = _layout(left, "lefts")
    data_type = _DATA_TYPE[out.dtype]
    if out.dtype == torch.float64:
        compute = _COMPUTE_64F
    else:
        compute = _COMPUTE_32F_FAST_TF32 if torch.backends.cuda.matmul.allow_tf32 else _COMPUTE_32F
    shape = (_OP_N if right_row_major else _OP_T, _OP_N if left_row_major else _OP_T, cols, rows, inner)
    gemm, alpha_pointer, beta_pointer = library.cublasGemmEx, alpha.data_ptr(), beta.data_ptr()
    with torch.cuda.device(out.device):  # (a cuBLAS handle works only under its own device)
        handle = _handle(library, out.device)
        _check(library.cublasSetStream_v2(handle, torch.cuda.current_stream().cuda_stream), "cublasSetStream")
        for out, left, right in zip(outs, lefts, rights):
            status = gemm(
                handle,
                *shape,
                alpha_pointer,
                right.data_ptr(),
                data_type,
                right_ld,
                left.data_ptr(),
                data_type,
                left_ld,
                beta_pointer,
                out.data_ptr(),
                data_type,
                out_ld,
                compute,
                _GEMM_DEFAULT,
            )
            if status != 0:
                _check(status, "cublasGemmEx")
