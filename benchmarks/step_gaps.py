"""Where the GPU waits during an optimizer step: idle gaps on the GPU timeline and what the host
was doing meanwhile (GPU only).

``python benchmarks/step_gaps.py sumo-graph-tf32 [model]`` profiles three plain steps (no
refresh) at LLaMA shapes with ``torch.profiler`` and prints, per step, the wall time, the GPU
busy time, and each gap of more than 50 µs between kernels with the first host operation that
began in it (and its innermost ``sumo_optim`` frame).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.autograd import DeviceType

sys.path.insert(0, str(Path(__file__).parent))
from step_time import timed_steps, warmed_up

PROFILER_ARTIFACTS = ("Activity Buffer Request", "Buffer Flush")


def our_frame(event) -> str:
    for frame in event.stack or []:
        if "sumo_optim" in frame:
            return frame.split("sumo_optim/")[-1]
    return ""


def main() -> None:
    name = sys.argv[1] if len(sys.argv) > 1 else "sumo-graph-tf32"
    model = sys.argv[2] if len(sys.argv) > 2 else "1b"
    device = torch.device("cuda")
    optimizer, tf32 = warmed_up(name, model, device)
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities, with_stack=True) as profiler:
        timed_steps(optimizer, 3, device, tf32)
    events = profiler.events()
    steps = [e for e in events if e.name.startswith("Optimizer.step#") and e.device_type == DeviceType.CPU]
    device_events = [
        e
        for e in events
        if e.device_type == DeviceType.CUDA
        and e.name not in PROFILER_ARTIFACTS
        and not e.name.startswith("Optimizer.step#")  # the step's annotation on the GPU timeline
    ]
    kernels = sorted((e.time_range.start, e.time_range.end) for e in device_events)
    totals: dict[str, float] = {}
    for e in device_events:
        totals[e.name[:60]] = totals.get(e.name[:60], 0.0) + e.time_range.elapsed_us() / 3
    print(f"{name}: device time per step by name (top 12 of {len(totals)})")
    for kernel, us in sorted(totals.items(), key=lambda item: -item[1])[:12]:
        print(f"  {us / 1e3:7.3f} ms  {kernel}")
    host_ops = sorted(
        (e for e in events if e.device_type == DeviceType.CPU and not e.name.startswith("Optimizer.step#")),
        key=lambda e: e.time_range.start,
    )
    for i, step in enumerate(steps):
        begin, end = step.time_range.start, step.time_range.end
        upper = steps[i + 1].time_range.start if i + 1 < len(steps) else float("inf")
        inside = [(s, e) for s, e in kernels if begin <= s < upper]
        last_end = max((e for _, e in inside), default=end)
        busy, gaps, cursor = 0.0, [], begin
        for s, e in inside:
            if s > cursor + 50:
                gaps.append((cursor, s))
            busy += max(0.0, e - max(s, cursor))
            cursor = max(cursor, e)
        print(
            f"\n{name}: step host {(end - begin) / 1e3:.2f} ms, until last kernel {(last_end - begin) / 1e3:.2f} ms, "
            f"GPU busy {busy / 1e3:.2f} ms, {len(inside)} kernels"
        )
        for s, e in gaps:
            op = next((o for o in host_ops if s <= o.time_range.start < e), None)
            what = f"{op.name} ({our_frame(op)})" if op else "-"
            print(f"  gap {(e - s) / 1e3:6.2f} ms at +{(s - begin) / 1e3:6.2f} ms: host begins {what}")


if __name__ == "__main__":
    main()
