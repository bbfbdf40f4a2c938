"""A/B of the back-projection ``W ← βW + α Q O`` (r-deep) at LLaMA-1B's shapes: cuBLAS vs a Triton
kernel whose tiles move by TMA descriptors, the old W tile loaded before or after the product (GPU only).

The grouped kernel of :mod:`sumo_optim.kernels` forms a 128×128 tensor of 64-bit addresses per
operand tile; loading W's tile before the product then ran out of registers (13.5 vs 7.3 ms on an
H100, NOTES.md). A TMA descriptor (``tl.make_tensor_descriptor``, Hopper) describes a tile by its
corner and loads it asynchronously, so the old W tile can be in flight while the r-deep product
runs. TMA needs row strides of a multiple of 16 bytes: the 24 2048×5461 weights are left out.
Prints GPU ms over the other 144 products (CUDA events, median of 10 after warm-up) per config,
per stack, and the relative error against float64.

Measured on an H200 (``results/backprojection_ab_1b.txt``): the old W tile loaded first was slower
in every configuration; with it loaded after the product, 256×64×32 tiles, 4 warps and 1 stage
beat cuBLAS alone (3.23–3.52 against 3.70 ms). Commit 2a16e54 put the kernel inside
``sumo_optim.kernels.grouped_addmm_``, where it lost (``results/backprojection_grouped_1b.txt``):
5.83 against 5.36 ms over all 168 products, and the plain SUMO step 4–5 ms slower. Not kept.

    python benchmarks/backprojection_ab.py [--configs all|0,3,...]
"""

from __future__ import annotations

import argparse
import itertools
import sys
import traceback
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).parent))
from kernel_configs import problems
from refresh_costs import median_ms
from sumo_optim.kernels import _address_table


@triton.jit
def _back_projection_kernel(
    out_table,
    left_table,
    right_table,
    rows,
    cols,
    inner,
    out_stride_row,
    left_stride_row,
    right_stride,
    beta,
    alpha,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    OUT_FIRST: tl.constexpr,
    RIGHT_TRANSPOSED: tl.constexpr,
):
    """One tile of ``out_g ← β out_g + α left_g right_g`` (row-major out and left; right row-major,
    or the transpose of a row-major matrix); program axis 2 is g. Tiles move by TMA descriptors."""
    g = tl.program_id(2)
    out = tl.load(out_table + g).to(tl.pointer_type(tl.float32))
    left = tl.load(left_table + g).to(tl.pointer_type(tl.float32))
    right = tl.load(right_table + g).to(tl.pointer_type(tl.float32))
    row0 = tl.program_id(0) * BLOCK_M
    col0 = tl.program_id(1) * BLOCK_N
    out_desc = tl.make_tensor_descriptor(out, [rows, cols], [out_stride_row, 1], [BLOCK_M, BLOCK_N])
    if OUT_FIRST:
        old = out_desc.load([row0, col0])
    left_desc = tl.make_tensor_descriptor(left, [rows, inner], [left_stride_row, 1], [BLOCK_M, BLOCK_K])
    if RIGHT_TRANSPOSED:  # right = Pᵀ with P (cols × inner) row-major
        right_desc = tl.make_tensor_descriptor(right, [cols, inner], [right_stride, 1], [BLOCK_N, BLOCK_K])
    else:
        right_desc = tl.make_tensor_descriptor(right, [inner, cols], [right_stride, 1], [BLOCK_K, BLOCK_N])
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, inner, BLOCK_K):
        a = left_desc.load([row0, k])
        if RIGHT_TRANSPOSED:
            b = right_desc.load([col0, k]).T
        else:
            b = right_desc.load([k, col0])
        acc = tl.dot(a, b, acc, input_precision="tf32")
    if not OUT_FIRST:
        old = out_desc.load([row0, col0])
    out_desc.store([row0, col0], beta * old + alpha * acc)


def launch(outs, lefts, rights, beta, alpha, config):
    rows, inner = lefts[0].shape
    cols = rights[0].shape[1]
    device = outs[0].device
    transposed = rights[0].stride(0) == 1
    assert outs[0].stride(1) == 1 and lefts[0].stride(1) == 1 and (transposed or rights[0].stride(1) == 1)
    grid = (triton.cdiv(rows, config["BLOCK_M"]), triton.cdiv(cols, config["BLOCK_N"]), len(outs))
    _back_projection_kernel[grid](
        _address_table(outs, device),
        _address_table(lefts, device),
        _address_table(rights, device),
        rows,
        cols,
        inner,
        outs[0].stride(0),
        lefts[0].stride(0),
        rights[0].stride(1) if transposed else rights[0].stride(0),
        float(beta),
        float(alpha),
        RIGHT_TRANSPOSED=transposed,
        **config,
    )


def _scratch(size: int, alignment: int, stream):
    """Global memory for the descriptors the kernel makes on the device."""
    return torch.empty(size, dtype=torch.int8, device="cuda" if torch.cuda.is_available() else "cpu")


triton.set_allocator(_scratch)


CONFIGS = (
    [
        dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=st, OUT_FIRST=first)
        for (bm, bn), bk, w, st, first in itertools.product(
            [(128, 128), (64, 128), (128, 64), (64, 256)], [64], [4, 8], [2, 3], [True, False]
        )
    ]
    + [
        dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=4, num_stages=st, OUT_FIRST=first)
        for (bm, bn), bk, st, first in itertools.product(
            [(64, 64), (128, 32), (256, 64), (128, 64)], [32, 128], [1, 3], [True, False]
        )
    ]
    + [
        dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=st, OUT_FIRST=False)
        for bm, bn, bk, w, st in [
            (256, 64, 32, 8, 1),
            (256, 32, 32, 4, 1),
            (256, 128, 32, 8, 1),
            (256, 64, 16, 4, 1),
            (256, 64, 64, 4, 1),
            (256, 64, 32, 4, 2),
            (512, 32, 32, 8, 1),
            (256, 32, 64, 4, 1),
        ]
    ]
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="all", help="comma-separated indices into CONFIGS")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = True
    # TMA needs 16-byte aligned row strides: 2048×5461 weights (stride 5461) stay with cuBLAS
    # Bases row-major as SUMO stores them (QR returns them column-major): Q O (left), O Qᵀ (right)
    stacks = []
    for outs, lefts, rights in problems()["back"]:
        if lefts[0].stride(0) == 1:  # the left side: lefts are the bases
            lefts = [q.contiguous() for q in lefts]
        else:
            rights = [q.mT.contiguous().mT for q in rights]
        if outs[0].stride(0) % 4 == 0:
            stacks.append((outs, lefts, rights))
    configs = CONFIGS if args.configs == "all" else [CONFIGS[int(i)] for i in args.configs.split(",")]
    beta, alpha = 0.99, -1e-3
    saved = [[o.clone() for o in outs] for outs, _, _ in stacks]
    reference = [
        [beta * o.double() + alpha * a.double() @ b.double() for o, a, b in zip(outs, lefts, rights)]
        for outs, lefts, rights in stacks
    ]

    def restore():
        for (outs, _, _), copies in zip(stacks, saved):
            for o, c in zip(outs, copies):
                o.copy_(c)

    def error():
        pairs = [(o, r) for (outs, _, _), refs in zip(stacks, reference) for o, r in zip(outs, refs)]
        num = sum(((o.double() - r).norm() ** 2).item() for o, r in pairs)
        return (num / sum((r.norm() ** 2).item() for _, r in pairs)) ** 0.5

    def cublas():
        for outs, lefts, rights in stacks:
            for o, a, b in zip(outs, lefts, rights):
                o.addmm_(a, b, beta=beta, alpha=alpha)

    failures = 0
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, Triton {triton.__version__}")
    print(f"{'variant':44s} {'ms':>7s} {'per stack ms':>24s} {'rel err':>9s}")
    for name, run, per_stack in [("cuBLAS tf32", cublas, None)] + [
        (" ".join(f"{k}={v}" for k, v in c.items()), None, c) for c in configs
    ]:
        if per_stack is not None:

            def run(config=per_stack):
                for outs, lefts, rights in stacks:
                    launch(outs, lefts, rights, beta, alpha, config)

        try:
            total = median_ms(run, repeats=10)
            parts = []
            for outs, lefts, rights in stacks:
                if per_stack is None:
                    parts.append(
                        median_ms(
                            lambda s=(outs, lefts, rights): [
                                o.addmm_(a, b, beta=beta, alpha=alpha) for o, a, b in zip(*s)
                            ],
                            repeats=5,
                        )
                    )
                else:
                    parts.append(
                        median_ms(lambda s=(outs, lefts, rights), c=per_stack: launch(*s, beta, alpha, c), repeats=5)
                    )
        except Exception as exc:  # out of shared memory etc.
            print(f"{name:44s} failed: {exc!r}"[:400])
            if not failures:
                traceback.print_exc()
            failures += 1
            continue
        restore()
        run()
        print(f"{name:44s} {total:7.2f} {' '.join(f'{p:.2f}' for p in parts):>24s} {error():9.1e}", flush=True)
        restore()


if __name__ == "__main__":
    main()
