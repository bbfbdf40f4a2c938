"""Reference implementations the tests and benchmarks compare against."""

from __future__ import annotations

import functools
import importlib.util
import sys
import types
from typing import Any

__all__ = ["galore_torch_adamw"]


@functools.cache
def galore_torch_adamw() -> Any:
    """galore-torch 1.0's ``GaLoreAdamW`` class, or ``None`` when the package is not installed.

    Imported without running the package's ``__init__``, which needs bitsandbytes (for the
    8-bit variant) even when only the AdamW variant is used.
    """
    spec = importlib.util.find_spec("galore_torch") if "galore_torch" not in sys.modules else None
    if spec is None and "galore_torch" not in sys.modules:
        return None
    if spec is not None:
        package = types.ModuleType("galore_torch")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["galore_torch"] = package
    from galore_torch.adamw import AdamW

    return AdamW
