"""Probe: cost of the building blocks of a low-launch SUMO step at LLaMA-1B shapes (GPU)."""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from step_time import build, force_refresh_next, matrix_shapes


def timed(fn, repeats=10, warmup=2):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    gpu, host = [], []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        start.record()
        fn()
        end.record()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        gpu.append(start.elapsed_time(end))
        host.append((t1 - t0) * 1e3)
    return statistics.median(gpu), statistics.median(host)


def graphed(fn):
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def main():
    dev = torch.device("cuda")
    shapes = matrix_shapes("1b")
    r = 128
    g = torch.Generator(device=dev).manual_seed(0)
    weights = [torch.randn(s, device=dev, generator=g) for s in shapes]
    grads = [torch.randn(s, device=dev, generator=g) for s in shapes]
    sides = ["left" if m <= n else "right" for m, n in shapes]
    bases = [torch.linalg.qr(torch.randn(min(s), r, device=dev, generator=g))[0] for s in shapes]
    moments = [torch.randn((r, n) if sd == "left" else (m, r), device=dev) for (m, n), sd in zip(shapes, sides)]
    rows = []

    def project():
        for G, Q, M, sd in zip(grads, bases, moments, sides):
            if sd == "left":
                torch.mm(Q.mT, G, out=M)
            else:
                torch.mm(G, Q, out=M)

    def back():
        for W, Q, M, sd in zip(weights, bases, moments, sides):
            if sd == "left":
                W.addmm_(Q, M, beta=0.99, alpha=-1e-3)
            else:
                W.addmm_(M, Q.mT, beta=0.99, alpha=-1e-3)

    def foreach_moment():
        torch._foreach_mul_(moments, 0.95)
        torch._foreach_add_(moments, moments)

    def finite_check():
        torch.stack([torch.linalg.vector_norm(G, float("inf")) for G in grads]).isfinite().tolist()

    for tf32 in (False, True) if "--profile-only" not in sys.argv else ():
        torch.backends.cuda.matmul.allow_tf32 = tf32
        for name, fn in [("project 168 mm", project), ("back 168 addmm_", back)]:
            rows.append((f"{name} tf32={tf32}", *timed(fn)))
            rows.append((f"{name} tf32={tf32} graphed", *timed(graphed(fn))))
    torch.backends.cuda.matmul.allow_tf32 = False
    if "--profile-only" in sys.argv:
        rows.clear()
    rows.append(("foreach mul+add moments", *timed(foreach_moment)))
    rows.append(("finite check inf-norm per grad + sync", *timed(finite_check)))
    for batch, dim in [(168, 128), (168, 136), (1, 136)] if "--profile-only" not in sys.argv else ():
        a = torch.randn(batch, dim, dim * 2, device=dev, dtype=torch.float64)
        spd = a @ a.mT
        rows.append((f"cholesky_ex fp64 {batch}x{dim}", *timed(lambda spd=spd: torch.linalg.cholesky_ex(spd))))
        rows.append((f"eigh fp64 {batch}x{dim}", *timed(lambda spd=spd: torch.linalg.eigh(spd), repeats=3, warmup=1)))
        single = spd.float()
        rows.append((f"eigh fp32 {batch}x{dim}", *timed(lambda s=single: torch.linalg.eigh(s), repeats=3, warmup=1)))
    print(f"{'probe':48s} {'gpu ms':>8s} {'host ms':>8s}")
    for name, gpu_ms, host_ms in rows:
        print(f"{name:48s} {gpu_ms:8.2f} {host_ms:8.2f}")

    # Where each optimizer's step spends its time (plain and refresh): host vs GPU, by kernel.
    params = [w.requires_grad_() for w in weights]
    for p, G in zip(params, grads):
        p.grad = G
    for name in _option("--profile", "sumo").split(","):
        torch.backends.cuda.matmul.allow_tf32 = name.endswith("tf32")
        opt = build(name, params, r, 200)
        for label, refresh in (("plain", False), ("refresh", True)):
            for _ in range(3):
                opt.step()
            if refresh:
                force_refresh_next(opt, 200)
            torch.cuda.synchronize()
            activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            with torch.profiler.profile(activities=activities) as prof:
                t0 = time.perf_counter()
                opt.step()
                t1 = time.perf_counter()
                torch.cuda.synchronize()
                wall = (time.perf_counter() - t0) * 1e3
            # As the table's "Self CUDA time total": device events without the step's own annotation.
            kernels = [
                e
                for e in prof.events()
                if e.device_type == torch.autograd.DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
            ]
            busy = sum(e.self_device_time_total for e in kernels) / 1e3
            print(
                f"\n=== {name} {label} step: wall {wall:.1f} ms, host {1e3 * (t1 - t0):.1f} ms, "
                f"GPU busy {busy:.1f} ms in {len(kernels)} kernels (profiled)"
            )
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))
        del opt
        torch.cuda.empty_cache()


def _option(flag: str, default: str) -> str:
    return sys.argv[sys.argv.index(flag) + 1] if flag in sys.argv else default


if __name__ == "__main__":
    main()
