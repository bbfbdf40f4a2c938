"""GPU time of one plain optimizer step by kernel and by ``addmm_`` shape (GPU only).

``python benchmarks/kernel_breakdown.py sumo-tf32,galore-randomized-tf32 [model]`` profiles one
plain step (no refresh) of each named optimizer (``step_time.build`` names) at LLaMA shapes and
prints the ``addmm_`` products grouped by input shapes, the step's GPU time (the sum of its
device events), and the 32 costliest kernels. Which cuBLAS kernel a product gets shows here:
a transposed operand with an unaligned leading dimension sends it to a slower one (NOTES.md, "Tried").
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.autograd import DeviceType

sys.path.insert(0, str(Path(__file__).parent))
from step_gaps import PROFILER_ARTIFACTS
from step_time import timed_steps, warmed_up


def main() -> None:
    names = sys.argv[1].split(",") if len(sys.argv) > 1 else ["sumo-tf32"]
    model = sys.argv[2] if len(sys.argv) > 2 else "1b"
    device = torch.device("cuda")
    for name in names:
        torch.manual_seed(0)
        optimizer, tf32 = warmed_up(name, model, device)
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities, record_shapes=True) as profiler:
            timed_steps(optimizer, 1, device, tf32)
        print(f"=== {name} at {model}")
        for row in profiler.key_averages(group_by_input_shape=True):
            if row.key == "aten::addmm_":
                print(f"  addmm_ x{row.count} shapes={row.input_shapes[:3]} GPU {row.device_time_total / 1e3:.2f} ms")
        kernels = [
            e
            for e in profiler.events()
            if e.device_type == DeviceType.CUDA
            and e.name not in PROFILER_ARTIFACTS
            and not e.name.startswith("Optimizer")  # the step's own annotation
        ]
        print(f"  GPU total {sum(e.time_range.elapsed_us() for e in kernels) / 1e3:.2f} ms")
        by_name: dict[str, list[float]] = {}
        for e in kernels:
            count_and_us = by_name.setdefault(e.name[:110], [0, 0.0])
            count_and_us[0] += 1
            count_and_us[1] += e.time_range.elapsed_us()
        for kernel, (count, us) in sorted(by_name.items(), key=lambda item: -item[1][1])[:32]:
            print(f"  {count:4d} {us / 1e3:6.2f} ms {kernel}")
        del optimizer
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
