"""Cost of the pieces of a subspace refresh for one LLaMA-1B MLP matrix (2048×5461, r = 128).

Times (CUDA events, median of repeats) the exact truncated SVD against the randomized range
finder and the ways of truncating its sketch to rank r, and reports each basis's subspace
error against the exact top-r singular subspace: ‖P − P_exact‖_F / √(2r) with P = Q Qᵀ.
"""

from __future__ import annotations

import functools
import statistics

import torch


def median_ms(fn, repeats: int = 7) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    device = torch.device("cuda")
    torch.manual_seed(0)
    m, n, r, p = 2048, 5461, 128, 8
    # a gradient-like spectrum: power-law decay plus noise
    u, _ = torch.linalg.qr(torch.randn(m, m, device=device))
    v, _ = torch.linalg.qr(torch.randn(n, m, device=device))
    s = torch.arange(1, m + 1, device=device, dtype=torch.float32) ** -0.8
    grad = (u * s) @ v.T
    exact = torch.linalg.svd(grad, full_matrices=False)[0][:, :r]

    def error(q):
        d = q.double() @ q.double().T - exact.double() @ exact.double().T
        return (d.norm() / (2 * r) ** 0.5).item()

    def sketch(power_iterations, k):
        omega = torch.randn(n, k, device=device)
        q, _ = torch.linalg.qr(grad @ omega)
        for _ in range(power_iterations):
            q, _ = torch.linalg.qr(grad.T @ q)
            q, _ = torch.linalg.qr(grad @ q)
        return q

    def truncate_svd(q):
        return q @ torch.linalg.svd(q.T @ grad, full_matrices=False)[0][:, :r]

    def truncate_eigh(q):
        b = (q.T @ grad).double()
        _, vecs = torch.linalg.eigh(b @ b.T)
        return q @ vecs[:, -r:].flip(-1).float()

    rows = [("exact SVD (torch.linalg.svd, fp32)", median_ms(lambda: torch.linalg.svd(grad), 3), error(exact))]
    for q_iter in (1, 2):
        q = sketch(q_iter, r + p)
        small = sketch(q_iter, r)
        rows += [
            (f"sketch k={r + p}, q={q_iter} (QR)", median_ms(functools.partial(sketch, q_iter, r + p)), None),
            ("  + truncate by SVD of B (k×n)", median_ms(functools.partial(truncate_svd, q)), error(truncate_svd(q))),
            (
                "  + truncate by fp64 eigh of B Bᵀ",
                median_ms(functools.partial(truncate_eigh, q)),
                error(truncate_eigh(q)),
            ),
            (f"sketch k={r}, q={q_iter}, no truncation", median_ms(functools.partial(sketch, q_iter, r)), error(small)),
        ]
    stack = torch.randn(96, r + p, r + p, device=device, dtype=torch.float64)
    stack = stack @ stack.mT
    rows.append(("batched fp64 eigh, 96 × 136×136", median_ms(lambda: torch.linalg.eigh(stack), 3), None))
    rows.append(("QR of 2048×136", median_ms(lambda: torch.linalg.qr(grad[:, :136])), None))
    print(f"| piece ({torch.cuda.get_device_name()}, torch {torch.__version__}) | ms | subspace error |")
    print("|---|---:|---:|")
    for name, ms, err in rows:
        print(f"| {name} | {ms:.2f} | {'' if err is None else f'{err:.1e}'} |")


if __name__ == "__main__":
    main()
