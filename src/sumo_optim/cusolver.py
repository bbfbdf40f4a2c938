"""Batched symmetric eigendecomposition on the GPU by cuSOLVER's ``cusolverDnXsyevBatched``.

``torch.linalg.eigh`` hands a stack of matrices larger than 32×32 to cuSOLVER one matrix at a
time (``syevd``/``syevj`` in a loop; pytorch/pytorch#174674): 343 ms for 168 float64 256×256
matrices on an H200, most of MoFaSGD's step, and the cost of GaLore's iterative refresh.
cuSOLVER ≥ 11.7.1 (CUDA 12.6) has a batched solver for any size, ``cusolverDnXsyevBatched``:
17.8 ms for the same stack (``benchmarks/results/eigh_batched_1b.txt``). This module calls it
through ``ctypes`` on the cuSOLVER library that PyTorch itself loaded. Where that is not possible (CPU tensors, an older
cuSOLVER, a ROCm build, a dtype other than float32/float64) :func:`eigh` is ``torch.linalg.eigh``.
"""

from __future__ import annotations

import ctypes
import functools
import threading

import torch
from torch import Tensor

__all__ = ["batched_eigh_available", "eigh", "eigh_ex"]

# cuSOLVER / CUDA enum values (cusolver_common.h, cublas_api.h, library_types.h).
_EIG_MODE_VECTOR = 1
_FILL_MODE_UPPER = 1
_CUDA_DATA_TYPE = {torch.float32: 0, torch.float64: 1}  # CUDA_R_32F, CUDA_R_64F

_size_t = ctypes.c_size_t
_int64 = ctypes.c_int64
_int = ctypes.c_int
_pointer = ctypes.c_void_p


def loaded_library_paths(name: str, exclude: str = "Mg") -> list[str]:
    """Paths of the libraries mapped into this process whose file names contain ``name`` and not
    ``exclude`` (PyTorch's CUDA build loads cuSOLVER and cuBLAS)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if name in line}
    except OSError:
        return []
    return sorted(path for path in paths if exclude not in path.rsplit("/", 1)[-1])


@functools.cache
def _library() -> ctypes.CDLL | None:
    """PyTorch's cuSOLVER with the two batched-eigh symbols typed, or None where it lacks them."""
    if not torch.cuda.is_available() or torch.version.cuda is None:
        return None
    torch.cuda.init()  # maps the CUDA libraries
    for name in [*loaded_library_paths("libcusolver.so"), "libcusolver.so.12", "libcusolver.so.11", "libcusolver.so"]:
        try:
            library = ctypes.CDLL(name)
            size_function, function = library.cusolverDnXsyevBatched_bufferSize, library.cusolverDnXsyevBatched
        except (OSError, AttributeError):
            continue
        common = [_pointer, _pointer, _int, _int, _int64, _int, _pointer, _int64, _int, _pointer, _int]
        size_function.argtypes = [*common, ctypes.POINTER(_size_t), ctypes.POINTER(_size_t), _int64]
        function.argtypes = [*common, _pointer, _size_t, _pointer, _size_t, _pointer, _int64]
        library.cusolverDnCreate.argtypes = [ctypes.POINTER(_pointer)]
        library.cusolverDnSetStream.argtypes = [_pointer, _pointer]
        library.cusolverDnCreateParams.argtypes = [ctypes.POINTER(_pointer)]
        return library
    return None


_handles = threading.local()


def _handle_and_params(library: ctypes.CDLL, device: torch.device) -> tuple[ctypes.c_void_p, ctypes.c_void_p]:
    """One cuSOLVER handle and parameter object per thread and device (cuSOLVER's rule), created once."""
    cache = _handles.__dict__.setdefault("by_device", {})
    if device.index not in cache:
        handle, params = _pointer(), _pointer()
        with torch.cuda.device(device):
            _check(library.cusolverDnCreate(ctypes.byref(handle)), "cusolverDnCreate")
            _check(library.cusolverDnCreateParams(ctypes.byref(params)), "cusolverDnCreateParams")
        cache[device.index] = (handle, params)
    return cache[device.index]


def _check(status: int, call: str) -> None:
    if status != 0:
        raise RuntimeError(f"{call} failed with cuSOLVER status {status}")


def batched_eigh_available(matrices: Tensor) -> bool:
    """Whether :func:`eigh` of ``matrices`` (a CUDA stack of float32/float64 matrices) runs batched."""
    return (
        matrices.is_cuda
        and matrices.dtype in _CUDA_DATA_TYPE
        and matrices.dim() >= 2
        and matrices.shape[-1] == matrices.shape[-2]
        and matrices.numel() > 0
        and _library() is not None
    )


def _solve_in_place(library: ctypes.CDLL, vectors: Tensor, values: Tensor, info: Tensor) -> None:
    """One ``cusolverDnXsyevBatched`` call on the current stream: eigenvectors over ``vectors``
    (b×n×n, contiguous), eigenvalues into ``values`` (b×n), cuSOLVER's flags into ``info`` (b)."""
    batch, size = vectors.shape[0], vectors.shape[-1]
    handle, params = _handle_and_params(library, vectors.device)
    data_type = _CUDA_DATA_TYPE[vectors.dtype]
    stream = torch.cuda.current_stream(vectors.device).cuda_stream
    _check(library.cusolverDnSetStream(handle, stream), "cusolverDnSetStream")
    arguments = [handle, params, _EIG_MODE_VECTOR, _FILL_MODE_UPPER, size, data_type]
    arguments += [vectors.data_ptr(), size, data_type, values.data_ptr(), data_type]
    device_bytes, host_bytes = _size_t(), _size_t()
    sizes = ctypes.byref(device_bytes), ctypes.byref(host_bytes)
    _check(library.cusolverDnXsyevBatched_bufferSize(*arguments, *sizes, batch), "cusolverDnXsyevBatched_bufferSize")
    device_work = torch.empty(max(device_bytes.value, 1), dtype=torch.uint8, device=vectors.device)
    host_work = ctypes.create_string_buffer(max(host_bytes.value, 1))
    _check(
        library.cusolverDnXsyevBatched(
            *arguments,
            device_work.data_ptr(),
            device_bytes.value,
            ctypes.cast(host_work, _pointer),
            host_bytes.value,
            info.data_ptr(),
            batch,
        ),
        "cusolverDnXsyevBatched",
    )


def eigh_ex(matrices: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`eigh` without waiting for the device: eigenvalues, eigenvectors and cuSOLVER's
    flags per matrix (batch shape; 0: converged, > 0: not converged, < 0: a rejected argument),
    by one ``cusolverDnXsyevBatched`` call. Where :func:`batched_eigh_available` is False, it is
    ``torch.linalg.eigh`` (which raises where it fails) with zero flags."""
    if not batched_eigh_available(matrices):
        values, vectors = torch.linalg.eigh(matrices)
        return values, vectors, torch.zeros(matrices.shape[:-2], dtype=torch.int32, device=matrices.device)
    size = matrices.shape[-1]
    # A symmetric matrix reads the same in either order, so the row-major lower triangle that
    # torch.linalg.eigh reads is the column-major upper one; cuSOLVER writes column-major vectors.
    vectors = matrices.reshape(-1, size, size).clone(memory_format=torch.contiguous_format)
    values = torch.empty(vectors.shape[0], size, dtype=matrices.dtype, device=matrices.device)
    info = torch.zeros(vectors.shape[0], dtype=torch.int32, device=matrices.device)
    with torch.cuda.device(matrices.device):  # the handle's device, whatever the current one
        _solve_in_place(_library(), vectors, values, info)
    return values.reshape(matrices.shape[:-1]), vectors.mT.reshape(matrices.shape), info.reshape(matrices.shape[:-2])


def eigh(matrices: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.linalg.eigh(matrices)`` (eigenvalues ascending, eigenvectors as columns; lower
    triangle read), by one ``cusolverDnXsyevBatched`` call for the whole stack where
    :func:`batched_eigh_available`. Matrices the batched solver reports unconverged are redone by
    ``torch.linalg.eigh`` (one host read of cuSOLVER's flags per call)."""
    if not batched_eigh_available(matrices):
        return torch.linalg.eigh(matrices)
    values, vectors, info = eigh_ex(matrices)
    return _redo_unconverged(matrices, values, vectors, info)


def _redo_unconverged(matrices: Tensor, values: Tensor, vectors: Tensor, info: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`eigh_ex`'s result with its unconverged matrices redone by ``torch.linalg.eigh``;
    raises for a rejected argument."""
    info = info.reshape(-1).cpu()
    if bool(info.lt(0).any()):
        raise RuntimeError(f"cusolverDnXsyevBatched rejected argument {-int(info.min())}")
    if bool(info.ne(0).any()):
        size = matrices.shape[-1]
        index = info.nonzero(as_tuple=True)[0].to(matrices.device)
        flat_values, flat_vectors = values.view(-1, size), vectors.view(-1, size, size)
        flat_values[index], flat_vectors[index] = torch.linalg.eigh(matrices.reshape(-1, size, size)[index])
    return values, vectors
