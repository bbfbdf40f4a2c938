"""Where the host time of one optimizer step goes (cProfile of a few steps at LLaMA-1B shapes).

A step is host-bound when the Python side issues work slower than the GPU runs it; this lists
the functions by their own time. ``python benchmarks/host_profile.py sumo-tf32 [model]``.

``--phases`` instead times the step's phases (the optimizer's own methods, inclusive) with the
host clock and no profiler, whose overhead inflates Python-heavy code several times: how long
the host spends in each before the GPU can go on.
"""

from __future__ import annotations

import cProfile
import functools
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from step_time import timed_steps, warmed_up

PHASES = (
    "_queue_finite_check",
    "_prepare_matrices",
    "_finite_flags",
    "_update_parameters",
    "_refresh",
    "_graphed",
    "_fallback_updates",
)


def time_phases(optimizer, steps: int, device: torch.device, tf32: bool) -> None:
    """Median host milliseconds per step spent inside each of :data:`PHASES` (inclusive)."""
    spent: dict[str, float] = {}

    def timed(name, method):
        @functools.wraps(method)
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                spent[name] = spent.get(name, 0.0) + (time.perf_counter() - start) * 1e3

        return wrapper

    for name in PHASES:
        if hasattr(optimizer, name):
            setattr(optimizer, name, timed(name, getattr(optimizer, name)))
    per_step: dict[str, list[float]] = {}
    for _ in range(steps):
        spent.clear()
        start = time.perf_counter()
        (gpu_ms,) = timed_steps(optimizer, 1, device, tf32)
        spent["step (host, until synchronized)"] = (time.perf_counter() - start) * 1e3
        spent["step (CUDA events)"] = gpu_ms
        for name, ms in spent.items():
            per_step.setdefault(name, []).append(ms)
    for name, values in per_step.items():
        print(f"  {statistics.median(values):8.3f} ms  {name}")


def main() -> None:
    phases = "--phases" in sys.argv
    args = [a for a in sys.argv[1:] if a != "--phases"]
    name = args[0] if args else "sumo-tf32"
    model = args[1] if len(args) > 1 else "1b"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    optimizer, tf32 = warmed_up(name, model, device, gap=10**6, warmup=3)
    if phases:
        print(f"=== {name} at {model}: host time per phase, median of 20 plain steps")
        time_phases(optimizer, 20, device, tf32)
        return
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
