"""``DTensor`` checks that need no import of ``torch.distributed.tensor`` (which takes seconds)."""

from __future__ import annotations

import sys
from typing import Any

from torch import Tensor

__all__ = ["is_dtensor", "local_tensor"]


def is_dtensor(tensor: Any) -> bool:
    """True for a ``DTensor`` (an FSDP2 parameter or gradient); no ``DTensor`` exists before
    ``torch.distributed.tensor`` is imported."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def local_tensor(tensor: Tensor) -> Tensor:
    """This rank's shard of a ``DTensor``; a plain tensor itself."""
    return tensor.to_local() if is_dtensor(tensor) else tensor
