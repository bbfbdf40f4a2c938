"""Replaying a step's work as one CUDA graph, so the host stops paying for each launch.

A low-rank step over a large model is hundreds of small kernels (projections, batched
factorizations, the limiter's norms); on an H100 the host needs longer to queue them than
the GPU to run them. A CUDA graph (``torch.cuda.CUDAGraph``) records the kernels once and
replays them with one launch. It reads and writes the memory it was captured on, so it is
only valid while every input stays at the same address: callers pass a ``key`` naming those
addresses (and whatever else the captured work depends on) and get a fresh capture when the
key changes.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Hashable
from typing import Any

import torch

__all__ = ["GraphedCall", "tensor_key"]


def tensor_key(tensor: torch.Tensor) -> Hashable:
    """What a captured graph depends on in a tensor: its address and layout."""
    return (tensor.data_ptr(), tensor.shape, tensor.stride(), tensor.dtype)


class GraphedCall:
    """Runs ``function`` eagerly the first time a key is seen, captures it in a CUDA graph when the
    same key comes again (the eager call was the warm-up: lazy initializations, compiled
    kernels), and from then on replays the graph while the key stays the same.

    ``function`` must only touch tensors named by the key, queue no host synchronization, and
    have no effect besides its kernels (nothing runs during a capture; the replay after it
    does the work). Its outputs are the graph's own memory, overwritten by the next replay.
    If a capture fails, a warning says why and the function runs eagerly from then on.
    """

    def __init__(self) -> None:
        self.key: Hashable = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs: Any = None
        self.captures = 0
        self.failure: str | None = None

    def __call__(self, key: Hashable, function: Callable[[], Any]) -> Any:
        if self.failure is not None:
            return function()
        if key != self.key:  # new addresses: drop the old graph (and its memory), run eagerly
            self.key, self.graph, self.outputs = key, None, None
            return function()
        if self.graph is None:
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                    outputs = function()
            except Exception as error:  # an operation that cannot be captured
                self.failure = f"{type(error).__name__}: {error}"
                warnings.warn(f"CUDA graph capture failed, stepping eagerly from now on ({self.failure})", stacklevel=3)
                return function()
            self.graph, self.outputs = graph, outputs
            self.captures += 1
        self.graph.replay()
        return self.outputs
