"""A/B probes of two step-path changes at LLaMA shapes (GPU; ``--smoke`` runs tiny shapes on CPU).

``qr``: the one CholeskyQR2 (:func:`sumo_optim.linalg.cholesky_qr2`) against the three it
replaced (copied below from commit 5ed5440), each on its caller's stacks: the randomized
refresh's sketches (m×(r+8), float32), MoFaSGD's ``[U, G V]`` and ``[V, Gᵀ U]`` (m×2r, float32)
and SUMO's float64 route (wide r×n moments, ``Q`` not formed). Prints ms per stack, old and new,
and the largest difference of their ``R`` (relative to its largest entry).

``refresh``: GaLore's refresh per stack of equal shapes, on gradients with a power-law spectrum
(σ_i ∝ i^−α): the exact SVD (timed on two matrices, scaled to the stack), ``"iterative"``
(:func:`sumo_optim.linalg.iterative_top_singular_vectors`, whole stack) and ``"randomized"``;
iterations, fallbacks, and the largest distance of a basis vector to the float64 SVD's (up to
sign; two matrices per stack); and the same iterative method with its check at every iteration
from the second (as before 2026-12-04).

``--alpha 0`` draws i.i.d. Gaussian gradients instead (a flat spectrum: the iterative refresh's
worst case, up to 30 iterations and then the SVD).

``eigh``: ``eigh`` of 32 and of one-per-matrix k×k matrices, float64 and float32, by each
backend of ``torch.linalg.eigh`` (cuSOLVER, MAGMA) and by one batched cuSOLVER call
(:func:`sumo_optim.cusolver.eigh`), with residuals.

``polar``: SUMO's r×r float64 polar iteration (:func:`sumo_optim.linalg.polar_schedule`, Polar
Express) against the one it replaced (Muon's quintic, then 6 cubic Newton–Schulz steps; copied
below), on one batch of the model's r×r factors (one per matrix, as in a step), plain and replayed
as a CUDA graph, and the error of each against the float64 SVD's ``U Vᵀ`` for κ = 1, 1e3, 1e6.

``scalars``: the back-projection ``W ← βW + α Q O`` of every matrix (TF32) by ``addmm_`` with
host scalars against :func:`sumo_optim.cublas.addmm_many_` (one call per stack) with β and α in device memory, plain and
replayed as a CUDA graph (the scalars changed between replays), and each one's error against
float64; then per stack the graphed time by the operands' layouts (row- or column-major).

    python benchmarks/fastpath_ab.py qr,refresh,eigh,polar,scalars [--model 1b] [--rank 128] [--alpha 0.8]
"""

from __future__ import annotations

import argparse
import functools
import itertools
import math
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from step_time import matrix_shapes
from sumo_optim import cublas, cusolver
from sumo_optim.linalg import (
    NEWTON_SCHULZ_COEFFICIENTS,
    _polar_of_square,
    cholesky_qr2,
    iterative_top_singular_vectors,
    randomized_top_singular_vectors,
)
from sumo_optim.subspace import REFRESH_CHUNK, choose_side


def timed_ms(fn, repeats: int = 5) -> float:
    """Median wall time of ``fn`` (CUDA events on a GPU), after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


# The three CholeskyQR2s before the merge (5ed5440), for the A/B.
def old_orthonormal_columns(matrix):  # linalg.orthonormal_columns: the randomized refresh
    q = matrix
    for _ in range(2):
        lower, info = torch.linalg.cholesky_ex((q.mT @ q).to(torch.float64))
        if bool(info.any()):
            return torch.linalg.qr(matrix)[0]
        q = torch.linalg.solve_triangular(lower.mT.to(q.dtype), q, upper=True, left=False)
    return q


def old_thin_qr(matrix):  # mofasgd.thin_qr
    q, r = matrix.to(torch.float64), None
    for _ in range(2):
        gram = q.mT @ q
        lower, info = torch.linalg.cholesky_ex(gram)
        diagonal = lower.diagonal(dim1=-2, dim2=-1)
        if r is None:
            conditioned = diagonal.amin(-1) > 1e-7 * diagonal.amax(-1)
        else:
            identity = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
            conditioned = (gram - identity).abs().amax((-2, -1)) < 0.1
        if not bool(((info == 0) & conditioned).all()):
            return torch.linalg.qr(matrix)
        q = torch.linalg.solve_triangular(lower.mT, q, upper=True, left=False)
        r = lower.mT if r is None else lower.mT @ r
    return q.to(matrix.dtype), r.to(matrix.dtype)


def old_cholesky_qr2(batch):  # linalg._cholesky_qr2: SUMO's float64 route, wide r×n
    batch = batch.to(torch.float64)
    identity = torch.eye(batch.shape[-2], dtype=torch.float64, device=batch.device)
    lower1, info1 = torch.linalg.cholesky_ex(batch @ batch.mT)
    inverse1 = torch.linalg.solve_triangular(lower1, identity, upper=False)
    rows_1 = inverse1 @ batch
    gram2 = rows_1 @ rows_1.mT
    lower2, info2 = torch.linalg.cholesky_ex(gram2)
    trusted = (info1 == 0) & (info2 == 0) & torch.isfinite(gram2).all(dim=(-2, -1))
    inverse2 = torch.linalg.solve_triangular(lower2, identity, upper=False)
    return lower1 @ lower2, inverse1, inverse2, trusted


def new_orthonormal_columns(matrix):
    return cholesky_qr2(matrix).q.to(matrix.dtype)


def new_thin_qr(matrix):
    q, r, _, _ = cholesky_qr2(matrix)
    return q.to(matrix.dtype), r.to(matrix.dtype)


def new_sumo_route(batch):
    qr = cholesky_qr2(batch.mT, fallback=False, compute_q=False)
    return qr.r.mT, qr.r_inverse.mT, qr.trusted


def r_difference(old_r: torch.Tensor, new_r: torch.Tensor) -> float:
    old_r, new_r = old_r.double(), new_r.double()
    return ((old_r - new_r).abs().amax() / old_r.abs().amax()).item()


def ab_row(caller: str, stack: str, old, new, difference: float) -> None:
    """One printed row: the median ms of ``old()`` and ``new()``."""
    print(f"{caller:<22} {stack:<16} {timed_ms(old):9.2f} {timed_ms(new):9.2f}  {difference:.1e}")


def qr_ab(shapes, rank: int, device: torch.device) -> None:
    print(f"{'caller':<22} {'stack':<16} {'old ms':>9} {'new ms':>9}  R difference")
    sketch = rank + 8
    for (m, n), count in Counter(shapes).items():
        short = min(m, n)
        # randomized refresh: orth(A Ω), A seen from its projected side (rows = the short side);
        # Q is unique up to column signs, so |QᵀA| (= |R|) is compared, old and new against Householder
        tall = torch.randn(count, short, sketch, device=device)
        exact_r = torch.linalg.qr(tall.double())[1].abs()
        difference = max(
            r_difference(exact_r, (f(tall).double().mT @ tall.double()).abs())
            for f in (old_orthonormal_columns, new_orthonormal_columns)
        )
        stack = f"{count}×{short}×{sketch}"
        ab_row(
            "randomized refresh",
            stack,
            lambda x=tall: old_orthonormal_columns(x),
            lambda x=tall: new_orthonormal_columns(x),
            difference,
        )
        for rows in (m, n):  # MoFaSGD: [U, G V] (m×2r) and [V, Gᵀ U] (n×2r)
            factors = torch.randn(count, rows, 2 * rank, device=device)
            difference = r_difference(old_thin_qr(factors)[1], new_thin_qr(factors)[1])
            stack = f"{count}×{rows}×{2 * rank}"
            ab_row(
                "MoFaSGD thin QR", stack, lambda x=factors: old_thin_qr(x), lambda x=factors: new_thin_qr(x), difference
            )
        wide = torch.randn(count, rank, max(m, n), device=device)  # SUMO: the moment r×n, float64 inside
        difference = r_difference(old_cholesky_qr2(wide)[0].mT, new_sumo_route(wide)[0].mT)
        stack = f"{count}×{rank}×{max(m, n)}"
        ab_row(
            "SUMO float64 route",
            stack,
            lambda x=wide: old_cholesky_qr2(x),
            lambda x=wide: new_sumo_route(x),
            difference,
        )


def power_law_stack(count: int, m: int, n: int, alpha: float, device: torch.device) -> torch.Tensor:
    if alpha == 0:  # i.i.d. Gaussian: a flat spectrum
        return torch.randn(count, m, n, device=device)
    k = min(m, n)
    spectrum = torch.arange(1, k + 1, device=device, dtype=torch.float32) ** -alpha
    u = torch.linalg.qr(torch.randn(count, m, k, device=device))[0]
    v = torch.linalg.qr(torch.randn(count, n, k, device=device))[0]
    return (u * spectrum.unsqueeze(-2)) @ v.mT


def column_error(basis: torch.Tensor, exact: torch.Tensor) -> float:
    basis, exact = basis.double(), exact.double()
    signs = torch.sign((basis * exact).sum(0))
    return (basis * signs - exact).norm(dim=0).max().item()


def refresh_ab(shapes, rank: int, alpha: float, device: torch.device) -> None:
    kind = "Gaussian gradients (flat spectrum)" if alpha == 0 else f"power-law gradients, σ_i ∝ i^-{alpha}"
    print(f"{kind}; ms per stack (exact SVD: 2 matrices timed, scaled)")
    print(f"{'stack':<16} {'svd ms':>10} {'iterative ms':>13} {'checks 2,3,.. ms':>16} {'randomized ms':>14}", end="")
    print("  iterations  fallbacks", end="")
    print("  vector error: iterative / randomized / fp32 svd")
    for (m, n), count in Counter(shapes).items():
        count = min(count, REFRESH_CHUNK)
        side = choose_side((m, n), rank, "std")
        grads = list(power_law_stack(count, m, n, alpha, device).unbind())
        svd_ms = timed_ms(lambda grads=grads: [torch.linalg.svd(g, full_matrices=False) for g in grads[:2]], repeats=1)
        iterative_ms = timed_ms(
            lambda grads=grads, side=side: iterative_top_singular_vectors(grads, rank, side), repeats=3
        )
        every_ms = timed_ms(  # Rayleigh–Ritz and the check at every iteration from the second (before 2026-12-04)
            lambda grads=grads, side=side: iterative_top_singular_vectors(
                grads, rank, side, min_iterations=2, check_every=1
            ),
            repeats=3,
        )
        randomized_ms = timed_ms(
            lambda grads=grads, side=side: randomized_top_singular_vectors(grads, rank, side), repeats=3
        )
        result = iterative_top_singular_vectors(grads, rank, side)
        randomized = randomized_top_singular_vectors(grads, rank, side)
        errors = [0.0, 0.0, 0.0]
        for i in range(2):
            u, _, vh = torch.linalg.svd(grads[i].double(), full_matrices=False)
            u32, _, vh32 = torch.linalg.svd(grads[i], full_matrices=False)
            exact, fp32 = (u[:, :rank], u32[:, :rank]) if side == "left" else (vh[:rank].mT, vh32[:rank].mT)
            for j, basis in enumerate((result.bases[i], randomized[i], fp32)):
                errors[j] = max(errors[j], column_error(basis, exact))
        print(
            f"{f'{count}×{m}×{n}':<16} {svd_ms * count / 2:10.1f} {iterative_ms:13.1f} {every_ms:16.1f} "
            f"{randomized_ms:14.1f}  "
            f"{result.iterations:10d}  {int(result.fell_back.sum()):9d}  "
            f"{errors[0]:.1e} / {errors[1]:.1e} / {errors[2]:.1e}"
        )


def eigh_residual(spd: torch.Tensor, values: torch.Tensor, vectors: torch.Tensor) -> float:
    """Largest ``max(‖A V − V Λ‖_F, ‖A‖_F ‖VᵀV − I‖_F) / ‖A‖_F`` over the batch, in float64."""
    a, values, vectors = spd.double(), values.double(), vectors.double()
    norm = a.norm(dim=(-2, -1))
    residual = (a @ vectors - vectors * values.unsqueeze(-2)).norm(dim=(-2, -1)) / norm
    identity = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    return max(residual.max().item(), (vectors.mT @ vectors - identity).norm(dim=(-2, -1)).max().item())


def eigh_probe(rank: int, count: int, device: torch.device) -> None:
    """``eigh`` of a batch of SPD k×k matrices (the iterative refresh's Rayleigh–Ritz, k = 2r, 32 per
    chunk; MoFaSGD's cores, 2r and r + 16, one per matrix) by each linear-algebra backend of
    ``torch.linalg.eigh`` and by one batched cuSOLVER call (:func:`sumo_optim.cusolver.eigh`),
    in float64 and float32, with each result's residual (:func:`eigh_residual`)."""
    print("eigh of a batch of SPD k×k matrices: ms (residual)")
    solvers = {"default": torch.linalg.eigh}
    if device.type == "cuda":
        solvers = {"cusolver": torch.linalg.eigh, "magma": torch.linalg.eigh, "batched": cusolver.eigh}
    for k in (2 * rank, rank + 16):
        for batch in sorted({32, count}):
            x = torch.randn(batch, k, k, device=device, dtype=torch.float64)
            spd = x @ x.mT + torch.eye(k, device=device, dtype=torch.float64)
            for name, solver in solvers.items():
                if device.type == "cuda":
                    torch.backends.cuda.preferred_linalg_library("magma" if name == "magma" else "cusolver")
                for dtype in (torch.float64, torch.float32):
                    matrices = spd.to(dtype)
                    ms = timed_ms(lambda solver=solver, matrices=matrices: solver(matrices))
                    residual = eigh_residual(spd, *solver(matrices))
                    print(f"  k = {k:4d}  batch {batch:4d}  {name:<9} {dtype!s:<14} {ms:9.2f}  ({residual:.1e})")
    if device.type == "cuda":
        torch.backends.cuda.preferred_linalg_library("default")


def old_polar_of_square(factor: torch.Tensor, smallest: float) -> torch.Tensor:
    """``linalg._polar_of_square`` before 2026-12-04 (commit d11d932)."""
    x = factor / factor.norm(dim=(-2, -1), keepdim=True)
    a, b, c = NEWTON_SCHULZ_COEFFICIENTS
    for _ in range(max(0, math.ceil(math.log(0.5 / smallest) / math.log(a)))):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    for _ in range(6):
        x = torch.baddbmm(x, x @ x.mT, x, beta=1.5, alpha=-0.5)
    return x


def graphed_ms(fn) -> float:
    """Median ms of ``fn`` replayed as a CUDA graph (``fn`` plain off a GPU)."""
    if not torch.cuda.is_available():
        return timed_ms(fn)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # warm-up off the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return timed_ms(graph.replay)


def polar_ab(shapes, rank: int, device: torch.device) -> None:
    smallest = 4 * torch.finfo(torch.float32).eps / math.sqrt(rank)  # SUMO's ℓ for float32 moments
    count = len(shapes)
    print(f"polar of {count} {rank}×{rank} float64 factors, ℓ = {smallest:.2e}; ms plain / graph; error vs SVD")
    print(
        f"{'κ':>6} {'old ms':>8} {'new ms':>8} {'old graph':>10} {'new graph':>10} {'old error':>10} {'new error':>10}"
    )
    for condition in (1e0, 1e3, 1e6):
        spectrum = torch.logspace(0, -math.log10(condition), rank, device=device, dtype=torch.float64)
        u = torch.linalg.qr(torch.randn(count, rank, rank, device=device, dtype=torch.float64))[0]
        v = torch.linalg.qr(torch.randn(count, rank, rank, device=device, dtype=torch.float64))[0]
        factors = (u * spectrum) @ v.mT
        reference = u @ v.mT
        row = []
        for polar in (old_polar_of_square, _polar_of_square):
            row.append(timed_ms(lambda polar=polar, factors=factors: polar(factors, smallest)))
        for polar in (old_polar_of_square, _polar_of_square):
            row.append(graphed_ms(lambda polar=polar, factors=factors: polar(factors, smallest)))
        for polar in (old_polar_of_square, _polar_of_square):
            row.append(((polar(factors, smallest) - reference).norm() / reference.norm()).item())
        print(
            f"{condition:6.0e} {row[0]:8.2f} {row[1]:8.2f} {row[2]:10.2f} {row[3]:10.2f} {row[4]:10.1e} {row[5]:10.1e}"
        )


def back_projection_problems(shapes, rank: int, device: torch.device):
    """(weights, left, right) per matrix as SUMO's back-projection has them: ``Q O`` (Q: m×r basis,
    O: r×n) where the basis is on the left, else ``D Qᵀ`` (Qᵀ a transposed view of the n×r basis)."""
    problems = []
    for m, n in shapes:
        weights = torch.randn(m, n, device=device)
        if choose_side((m, n), rank) == "left":
            basis = torch.linalg.qr(torch.randn(m, rank, device=device))[0]
            problems.append((weights, basis, torch.randn(rank, n, device=device)))
        else:
            basis = torch.linalg.qr(torch.randn(n, rank, device=device))[0]
            problems.append((weights, torch.randn(m, rank, device=device), basis.mT))
    return problems


def _as_layout(matrix: torch.Tensor, layout: str) -> torch.Tensor:
    """``matrix``'s values, row-major or column-major."""
    if layout == "row":
        return matrix.contiguous()
    return matrix.mT.contiguous().mT


def scalars_ab(shapes, rank: int, device: torch.device) -> None:
    torch.backends.cuda.matmul.allow_tf32 = True
    problems = back_projection_problems(shapes, rank, device)
    scalars = torch.tensor([1 - 1e-4, -1e-3], device=device)  # β, α

    def host():
        for weights, left, right in problems:
            weights.addmm_(left, right, beta=1 - 1e-4, alpha=-1e-3)

    stacks = {}
    for problem in problems:
        stacks.setdefault(tuple((x.shape, x.stride()) for x in problem), []).append(problem)

    def on_device():
        for members in stacks.values():
            cublas.addmm_many_(*zip(*members), scalars[0:1], scalars[1:2])

    print(f"back-projection of {len(problems)} matrices, TF32: ms plain / graph; relative error vs float64")
    print(f"{'scalars':>8} {'plain':>8} {'graph':>8} {'error':>10}")
    for name, fn in (("host", host), ("device", on_device)):
        ms = timed_ms(fn, repeats=10), graphed_ms(fn)
        weights, left, right = problems[-1]
        before = weights.double()
        fn()
        reference = (1 - 1e-4) * before + -1e-3 * (left.double() @ right.double())
        error = ((weights.double() - reference).norm() / (reference - before).norm()).item()
        print(f"{name:>8} {ms[0]:8.2f} {ms[1]:8.2f} {error:10.1e}")
    print("per stack, graphed ms, by the operands' layouts (row-major, or column-major: a transposed view)")
    print(f"{'stack':>22} {'left':>7} {'right':>7} {'ms':>7}")
    for members in stacks.values():
        weights, left, right = members[0]
        for left_layout, right_layout in itertools.product(("row", "column"), repeat=2):
            lefts = [_as_layout(x[1], left_layout) for x in members]
            rights = [_as_layout(x[2], right_layout) for x in members]
            outs = [x[0] for x in members]
            ms = graphed_ms(functools.partial(cublas.addmm_many_, outs, lefts, rights, scalars[0:1], scalars[1:2]))
            name = f"{len(members)} × {tuple(weights.shape)}"
            print(f"{name:>22} {left_layout:>7} {right_layout:>7} {ms:7.3f}")
    if device.type == "cuda":  # a replay reads the scalars as they are then
        weights, left, right = problems[0]
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            cublas.addmm_many_([weights], [left], [right], scalars[0:1], scalars[1:2])
        scalars.copy_(torch.tensor([0.5, 2.0]))
        before = weights.double()
        graph.replay()
        reference = 0.5 * before + 2.0 * (left.double() @ right.double())
        error = ((weights.double() - reference).norm() / reference.norm()).item()
        print(f"replay with new scalars: relative error {error:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("probes", nargs="?", default="qr,refresh")
    parser.add_argument("--model", default="1b")
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--alpha", type=float, default=0.8)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    shapes = matrix_shapes("tiny") if args.smoke else matrix_shapes(args.model)
    rank = 8 if args.smoke else args.rank
    torch.manual_seed(0)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"{'tiny' if args.smoke else args.model}, r = {rank}, {name}, torch {torch.__version__}")
    if "qr" in args.probes:
        qr_ab(shapes, rank, device)
    if "refresh" in args.probes:
        refresh_ab(shapes, rank, args.alpha, device)
    if "eigh" in args.probes:
        eigh_probe(rank, len(shapes), device)
    if "polar" in args.probes:
        polar_ab(shapes, rank, device)
    if "scalars" in args.probes:
        scalars_ab(shapes, rank, device)


if __name__ == "__main__":
    main()
