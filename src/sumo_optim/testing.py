"""Reference implementations the tests and benchmarks compare against."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
import types
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .linalg import _largest_entry_positive

__all__ = [
    "galore_torch_adafactor",
    "galore_torch_adamw",
    "galore_torch_adamw8bit",
    "matrix_with_spectrum",
    "svd_with_sign_convention",
]


def matrix_with_spectrum(
    singular_values: Sequence[float] | Tensor,
    rows: int,
    cols: int,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """A ``rows × cols`` matrix ``U diag(s) Vᵀ`` with random orthonormal ``U`` and ``V`` (one column
    per singular value), built in float64 and returned in ``dtype``."""
    k = len(singular_values)
    u, _ = torch.linalg.qr(torch.randn(rows, k, generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, k, generator=generator, dtype=torch.float64))
    s = torch.as_tensor(singular_values, dtype=torch.float64)
    return ((u * s) @ v.T).to(dtype)


def svd_with_sign_convention(svd: Any) -> Any:
    """``svd`` (``torch.linalg.svd``) with each of U's and V's columns signed as
    :func:`~sumo_optim.linalg.iterative_top_singular_vectors` signs them (largest entry positive):
    what the exact and iterative refreshes are compared through (LAPACK's signs are arbitrary)."""

    def signed(matrix: Tensor, full_matrices: bool = True) -> tuple[Tensor, Tensor, Tensor]:
        u, s, vh = svd(matrix, full_matrices=full_matrices)
        return _largest_entry_positive(u), s, _largest_entry_positive(vh.mT).mT

    return signed


def _galore_torch_class(module: str, name: str) -> Any:
    """``galore_torch.<module>.<name>``, or ``None`` when it cannot be imported.

    Imported without running the package's ``__init__``, which needs bitsandbytes (for the
    8-bit variant) even when only another variant is used.
    """
    if "galore_torch" not in sys.modules:
        spec = importlib.util.find_spec("galore_torch")
        if spec is None:
            return None
        package = types.ModuleType("galore_torch")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["galore_torch"] = package
    try:
        return getattr(importlib.import_module(f"galore_torch.{module}"), name)
    except ImportError:  # e.g. the Adafactor module needs transformers
        return None


@functools.cache
def galore_torch_adamw() -> Any:
    """galore-torch 1.0's ``GaLoreAdamW`` class, or ``None`` when the package is not installed."""
    return _galore_torch_class("adamw", "AdamW")


@functools.cache
def galore_torch_adafactor() -> Any:
    """galore-torch 1.0's ``GaLoreAdafactor`` class, or ``None`` when it (or transformers) is missing."""
    return _galore_torch_class("adafactor", "Adafactor")


@functools.cache
def galore_torch_adamw8bit() -> Any:
    """galore-torch 1.0's ``GaLoreAdamW8bit`` class, or ``None`` when it (or bitsandbytes) is missing."""
    return _galore_torch_class("adamw8bit", "AdamW8bit")
