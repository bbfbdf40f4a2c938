"""Where MoFaSGD's factor update spends its time at LLaMA shapes, and how fast and how exact the
candidate ways to take the top r of the 2r×2r core's SVD are (GPU).

``python benchmarks/mofasgd_core.py [model] [rank]`` builds one stack per weight shape (random
orthonormal factors, a random gradient), times the whole update
(:func:`sumo_optim.mofasgd.update_momentum_factors`), its two thin QRs, and the core SVD by each
candidate, and prints for each candidate the distance of its top-r singular subspaces and values
to the float64 ``torch.linalg.svd``. CUDA events after warm-up, median of repeats.
``core_solver="warm"`` (:func:`sumo_optim.mofasgd.warm_top_singular_triplets`) is timed on the
update's own cores, where its warm start holds, with the number that fell back to ``eigh``.
``--smoke`` (or no GPU) runs tiny shapes on CPU.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from fastpath_ab import timed_ms
from step_time import matrix_shapes
from sumo_optim import cusolver
from sumo_optim.mofasgd import update_momentum_factors, warm_top_singular_triplets

gpu_ms = functools.partial(timed_ms, repeats=5)  # the float32 SVD candidates take seconds per call


def svd_default(core):
    return torch.linalg.svd(core)


def svd_gesvdj(core):
    return torch.linalg.svd(core, driver="gesvdj")


def svd_gesvda(core):
    return torch.linalg.svd(core, driver="gesvda")


def svd_float64(core):
    u, s, vh = torch.linalg.svd(core.double())
    return u.to(core.dtype), s.to(core.dtype), vh.to(core.dtype)


def svd_float64_gesvdj(core):
    u, s, vh = torch.linalg.svd(core.double(), driver="gesvdj")
    return u.to(core.dtype), s.to(core.dtype), vh.to(core.dtype)


def eigh_gram_float64(core, eigh=torch.linalg.eigh):
    """Right singular vectors from the eigenvectors of KᵀK (float64, by ``eigh``), left ones as K V / σ."""
    core64 = core.double()
    values, vectors = eigh(core64.mT @ core64)
    vectors = vectors.flip(-1)
    sigma = values.flip(-1).clamp_min(0).sqrt()
    left = (core64 @ vectors) / sigma.clamp_min(torch.finfo(torch.float64).tiny).unsqueeze(-2)
    return left.to(core.dtype), sigma.to(core.dtype), vectors.mT.to(core.dtype)


CANDIDATES = {
    "svd (default driver)": svd_default,
    "svd gesvdj": svd_gesvdj,
    "svd gesvda": svd_gesvda,
    "svd float64": svd_float64,
    "svd float64 gesvdj": svd_float64_gesvdj,
    "eigh of KᵀK float64": eigh_gram_float64,
    "eigh of KᵀK float64, batched": functools.partial(eigh_gram_float64, eigh=cusolver.eigh),
}


class _capture_cores:  # noqa: N801 - a context manager
    """Records the cores that :func:`update_momentum_factors` hands to ``top_singular_triplets``."""

    def __init__(self, into: list) -> None:
        self.into = into

    def __enter__(self) -> None:
        import sumo_optim.mofasgd as module

        self.module, self.original = module, module.top_singular_triplets

        def recording(core, rank):
            self.into.append(core)
            return self.original(core, rank)

        module.top_singular_triplets = recording

    def __exit__(self, *exc: object) -> None:
        self.module.top_singular_triplets = self.original


def main() -> None:
    arguments = [a for a in sys.argv[1:] if a != "--smoke"]
    smoke = "--smoke" in sys.argv or not torch.cuda.is_available()
    model = "tiny" if smoke else (arguments[0] if arguments else "1b")
    rank = 8 if smoke else (int(arguments[1]) if len(arguments) > 1 else 128)
    device = torch.device("cpu" if smoke else "cuda")
    torch.manual_seed(0)
    counts: dict[tuple[int, int], int] = {}
    for shape in matrix_shapes(model):
        counts[shape] = counts.get(shape, 0) + 1
    name = "CPU" if smoke else torch.cuda.get_device_name()
    print(f"MoFaSGD factor update at {model}, r = {rank}, {name}, torch {torch.__version__}")
    totals: dict[str, float] = {}
    for (m, n), count in counts.items():
        u = torch.linalg.qr(torch.randn(count, m, rank, device=device))[0]
        v = torch.linalg.qr(torch.randn(count, n, rank, device=device))[0]
        sigma = torch.rand(count, rank, device=device).sort(dim=-1, descending=True).values
        grad = torch.randn(count, m, n, device=device) * 1e-2
        rows = {
            "whole update": gpu_ms(lambda: update_momentum_factors(u, sigma, v, grad, 0.95)),  # noqa: B023
            "whole update, core_solver=warm": gpu_ms(
                lambda: update_momentum_factors(u, sigma, v, grad, 0.95, "warm")  # noqa: B023
            ),
            "QR of [U, G V]": gpu_ms(lambda: torch.linalg.qr(torch.cat([u, grad @ v], dim=-1))),  # noqa: B023
            "QR of [V, Gᵀ U]": gpu_ms(lambda: torch.linalg.qr(torch.cat([v, grad.mT @ u], dim=-1))),  # noqa: B023
        }
        own_cores = []
        with _capture_cores(own_cores):
            update_momentum_factors(u, sigma, v, grad, 0.95)
        own = own_cores[0]
        rows["core: eigh of KᵀK float64 (own cores)"] = gpu_ms(lambda: eigh_gram_float64(own))  # noqa: B023
        rows["core: warm subspace iteration (own cores)"] = gpu_ms(lambda: warm_top_singular_triplets(own, rank))  # noqa: B023
        fell_back = int(warm_top_singular_triplets(own, rank)[3].sum())
        print(f"=== {count} × {m}×{n}: warm core solver fell back on {fell_back} of {count} own cores")
        spectrum = torch.diag_embed(torch.logspace(0, -6, 2 * rank, device=device))
        core = torch.randn(count, 2 * rank, 2 * rank, device=device) @ spectrum
        core = core @ torch.randn(count, 2 * rank, 2 * rank, device=device)
        reference_left, reference_values, _ = torch.linalg.svd(core.double())
        reference_projector = reference_left[..., :rank] @ reference_left[..., :rank].mT
        print(f"=== {count} × {m}×{n}: core {2 * rank}×{2 * rank}")
        for name, candidate in CANDIDATES.items():
            try:
                left, values, _ = candidate(core)
            except RuntimeError as error:
                print(f"  {name:24s} failed: {str(error)[:90]}")
                continue
            rows[f"core: {name}"] = gpu_ms(lambda candidate=candidate: candidate(core))  # noqa: B023
            projector = left[..., :rank].double() @ left[..., :rank].double().mT
            subspace = (projector - reference_projector).norm(dim=(-2, -1)).max().item()
            value_error = (values[..., :rank].double() - reference_values[..., :rank]).abs().max()
            relative = (value_error / reference_values.max()).item()
            print(f"  {name:24s} top-r subspace error {subspace:.1e}, σ error {relative:.1e} (of σ_max)")
        for name, ms in rows.items():
            print(f"  {ms:9.2f} ms  {name}")
            totals[name] = totals.get(name, 0.0) + ms
    print("=== all stacks")
    for name, ms in totals.items():
        print(f"  {ms:9.2f} ms  {name}")


if __name__ == "__main__":
    main()
