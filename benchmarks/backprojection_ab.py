"""A/B of the back-projection ``W ← βW + α Q O`` (r-deep) at LLaMA-1B's shapes: cuBLAS against the
Triton kernel of :mod:`sumo_optim.kernels` whose tiles move by TMA descriptors (GPU only).

The grouped kernel for the projections forms a 128×128 tensor of 64-bit addresses per operand
tile; for the back-projection it lost to cuBLAS (7.3 vs 6.5 ms on an H100, NOTES.md). A TMA
descriptor (``tl.make_tensor_descriptor``, Hopper) describes a tile by its corner and loads it
asynchronously. TMA needs row strides of a multiple of 16 bytes: the 24 2048×5461 weights stay
with cuBLAS. Prints GPU ms (CUDA events, median of 10 after warm-up) over the other 144 products
per config and per stack, the relative error against float64, and last ``grouped_addmm_`` over
all 168 products (kernel where it applies, cuBLAS elsewhere) against the ``addmm_`` loop.

Until commit 32f6638 the kernel lived in this script, with a variant that loaded the old W tile
before the product (``OUT_FIRST``; slower in every configuration, ``results/backprojection_ab_1b.txt``).

    python benchmarks/backprojection_ab.py [--configs default|all|0,3,...]
"""

from __future__ import annotations

import argparse
import itertools
import sys
import traceback
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).parent))
from kernel_configs import problems
from refresh_costs import median_ms
from sumo_optim import kernels

CONFIGS = [
    dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=st)
    for (bm, bn), bk, w, st in itertools.product(
        [(256, 64), (128, 64), (128, 128), (64, 64), (128, 32)], [32, 64], [4, 8], [1, 2]
    )
]


def back_projections() -> list[tuple[list, list, list]]:
    """LLaMA-1B's back-projections per stack, bases row-major as SUMO stores them (QR returns them
    column-major): ``Q O`` on the left side, ``O Qᵀ`` on the right."""
    stacks = []
    for outs, lefts, rights in problems()["back"]:
        if lefts[0].stride(0) == 1:  # the left side: lefts are the bases
            lefts = [q.contiguous() for q in lefts]
        else:
            rights = [q.mT.contiguous().mT for q in rights]
        stacks.append((outs, lefts, rights))
    return stacks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="default", help="default, all, or comma-separated indices into CONFIGS")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = True
    every = back_projections()
    stacks = [s for s in every if kernels._uses_back_projection_kernel(*s)]
    if args.configs == "default":
        configs = [kernels.BACK_PROJECTION_CONFIG]
    else:
        configs = CONFIGS if args.configs == "all" else [CONFIGS[int(i)] for i in args.configs.split(",")]
    beta, alpha = 0.99, -1e-3
    saved = [[o.clone() for o in outs] for outs, _, _ in every]
    reference = [
        [beta * o.double() + alpha * a.double() @ b.double() for o, a, b in zip(outs, lefts, rights)]
        for outs, lefts, rights in every
    ]

    def restore():
        for (outs, _, _), copies in zip(every, saved):
            for o, c in zip(outs, copies):
                o.copy_(c)

    def error(chosen):
        pairs = [
            (o, r)
            for (outs, _, _), refs in zip(every, reference)
            if any(outs is s[0] for s in chosen)
            for o, r in zip(outs, refs)
        ]
        num = sum(((o.double() - r).norm() ** 2).item() for o, r in pairs)
        return (num / sum((r.norm() ** 2).item() for _, r in pairs)) ** 0.5

    def cublas(chosen):
        for outs, lefts, rights in chosen:
            for o, a, b in zip(outs, lefts, rights):
                o.addmm_(a, b, beta=beta, alpha=alpha)

    def grouped(chosen):
        for outs, lefts, rights in chosen:
            kernels.grouped_addmm_(outs, lefts, rights, beta, alpha)

    def row(name, run, chosen):
        total = median_ms(lambda: run(chosen), repeats=10)
        parts = [median_ms(lambda s=s: run([s]), repeats=5) for s in chosen]
        restore()
        run(chosen)
        print(f"{name:52s} {total:7.2f} {' '.join(f'{p:.2f}' for p in parts):>24s} {error(chosen):9.1e}", flush=True)
        restore()

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, Triton {triton.__version__}")
    print(f"{len(stacks)} stacks the kernel takes ({sum(len(s[0]) for s in stacks)} products)")
    print(f"{'variant':52s} {'ms':>7s} {'per stack ms':>24s} {'rel err':>9s}")
    row("cuBLAS tf32", cublas, stacks)
    failures = 0
    for config in configs:
        name = " ".join(f"{k}={v}" for k, v in config.items())

        def kernel(chosen, config=config):
            for outs, lefts, rights in chosen:
                kernels.launch_back_projection(outs, lefts, rights, beta, alpha, config)

        try:
            row(name, kernel, stacks)
        except Exception as exc:  # out of shared memory etc.
            print(f"{name:52s} failed: {exc!r}"[:300])
            if not failures:
                traceback.print_exc()
            failures += 1
    print(f"all {len(every)} stacks ({sum(len(s[0]) for s in every)} products):")
    row("addmm_ loop (cuBLAS tf32)", cublas, every)
    row("grouped_addmm_ (the kernel where it applies)", grouped, every)


if __name__ == "__main__":
    main()
