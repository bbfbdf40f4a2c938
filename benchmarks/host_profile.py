"""Where the host time of one optimizer step goes (cProfile of a few steps at LLaMA-1B shapes).

A step is host-bound when the Python side issues work slower than the GPU runs it; this lists
the functions by their own time. ``python benchmarks/host_profile.py sumo-tf32 [model]``.
"""

from __future__ import annotations

import cProfile
import pstats
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from step_time import build, matrix_shapes, timed_steps


def main() -> None:
    name = sys.argv[1] if len(sys.argv) > 1 else "sumo-tf32"
    model = sys.argv[2] if len(sys.argv) > 2 else "1b"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    params = [torch.randn(s, device=device).requires_grad_() for s in matrix_shapes(model)]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    optimizer = build(name, params, 128, 10**6)
    tf32 = name.endswith("tf32")
    timed_steps(optimizer, 3, device, tf32)
    profiler = cProfile.Profile()
    profiler.enable()
    timed_steps(optimizer, 5, device, tf32)
    profiler.disable()
    print(f"=== {name} at {model}: 5 plain steps, own time per function")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    print(f"=== {name} at {model}: the library's functions by cumulative time")
    pstats.Stats(profiler).sort_stats("cumulative").print_stats("sumo_optim", 30)


if __name__ == "__main__":
    main()
