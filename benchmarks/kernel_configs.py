"""Grouped addmm_ kernel vs cuBLAS on LLaMA-1B's SUMO products (r = 128), per direction and config.

Directions: projection with momentum ``M ← μM + QᵀG`` (left) / ``GQ`` (right), and the
back-projection ``W ← βW + α Q O`` (left) / ``O Qᵀ`` (right). Prints GPU ms per whole model
(CUDA events, median of 10 after warm-up) and the relative error against float64.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from refresh_costs import median_ms
from step_time import matrix_shapes
from sumo_optim import kernels


def problems(rank=128):
    """(name, outs, lefts, rights) per direction and stack, over the model's matrices."""
    dev = torch.device("cuda")
    by_shape = {}
    for shape in matrix_shapes("1b"):
        by_shape[shape] = by_shape.get(shape, 0) + 1
    result = {"project": [], "back": []}
    for (m, n), count in by_shape.items():
        left = m <= n
        grads = [torch.randn(m, n, device=dev) for _ in range(count)]
        bases = [torch.linalg.qr(torch.randn(m if left else n, rank, device=dev))[0] for _ in range(count)]
        moments = [torch.randn((rank, n) if left else (m, rank), device=dev) for _ in range(count)]
        if left:
            result["project"].append((moments, [q.mT for q in bases], grads))
            result["back"].append((grads, bases, moments))  # grads stand in for the weights
        else:
            result["project"].append((moments, grads, bases))
            result["back"].append((grads, moments, [q.mT for q in bases]))
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--directions", default="project,back")
    parser.add_argument("--precisions", default="tf32,tf32x3,ieee")
    parser.add_argument("--configs", default="all", help="comma-separated indices into the config list")
    args = parser.parse_args()
    torch.manual_seed(0)
    cases = {k: v for k, v in problems().items() if k in args.directions.split(",")}
    configs = [
        dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=st)
        for bm, bn, bk, w, st in [
            (128, 128, 32, 8, 3),
            (128, 128, 32, 4, 3),
            (64, 128, 32, 4, 4),
            (128, 64, 32, 4, 4),
            (64, 64, 32, 4, 4),
            (128, 128, 16, 8, 4),
            (64, 256, 32, 8, 3),
            (128, 256, 32, 8, 3),
        ]
    ]
    if args.configs != "all":
        configs = [configs[int(i)] for i in args.configs.split(",")]
    rows = []
    for direction, stacks in cases.items():
        beta, alpha = (0.95, 1.0) if direction == "project" else (0.99, -1e-3)
        saved = [[o.clone() for o in outs] for outs, _, _ in stacks]
        reference = [
            [beta * o.double() + alpha * a.double() @ b.double() for o, a, b in zip(outs, lefts, rights)]
            for outs, lefts, rights in stacks
        ]

        def error(stacks=stacks, reference=reference):
            num = sum(
                ((o.double() - r).norm() ** 2).item()
                for (outs, _, _), refs in zip(stacks, reference)
                for o, r in zip(outs, refs)
            )
            den = sum((r.norm() ** 2).item() for refs in reference for r in refs)
            return (num / den) ** 0.5

        def restore(stacks=stacks, saved=saved):
            for (outs, _, _), copies in zip(stacks, saved):
                for o, c in zip(outs, copies):
                    o.copy_(c)

        for tf32 in (False, True):
            torch.backends.cuda.matmul.allow_tf32 = tf32

            def cublas(stacks=stacks, beta=beta, alpha=alpha):
                for outs, lefts, rights in stacks:
                    for o, a, b in zip(outs, lefts, rights):
                        o.addmm_(a, b, beta=beta, alpha=alpha)

            ms = median_ms(cublas, repeats=10)
            restore()
            cublas()
            rows.append((direction, f"cuBLAS {'tf32' if tf32 else 'fp32'}", ms, error()))
            restore()
        torch.backends.cuda.matmul.allow_tf32 = False
        for precision, config in itertools.product(args.precisions.split(","), configs):
            config = {**config, "PRECISION": precision}

            def triton_run(config=config, stacks=stacks, beta=beta, alpha=alpha):
                for outs, lefts, rights in stacks:
                    kernels.launch_grouped_addmm(outs, lefts, rights, beta, alpha, config)

            try:
                ms = median_ms(triton_run, repeats=10)
            except Exception as exc:  # out of shared memory etc.
                rows.append((direction, f"{precision} {config}", float("nan"), str(exc)[:40]))
                continue
            restore()
            triton_run()
            rows.append(
                (
                    direction,
                    f"{precision} " + " ".join(f"{v}" for k, v in config.items() if k != "PRECISION"),
                    ms,
                    error(),
                )
            )
            restore()
    print(f"{'direction':8s} {'variant':36s} {'ms':>7s} {'rel err':>9s}")
    for direction, name, ms, err in rows:
        err = f"{err:9.1e}" if isinstance(err, float) else err
        print(f"{direction:8s} {name:36s} {ms:7.2f} {err}")


if __name__ == "__main__":
    main()
