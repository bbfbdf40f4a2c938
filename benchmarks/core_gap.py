"""Whether MoFaSGD's core could be solved in float32 and refined in float64 (CPU, ~30 s).

Trains the bundled tiny LLaMA on Shakespeare with MoFaSGD (``configs/tiny-cpu.yaml``, rank 64,
so 128×128 cores; 60 steps) and keeps the cores its steps solve. For a few steps it prints the
gap that decides the top r of ``A = KᵀK``, ``(λ_r − λ_{r+1}) / λ_1``, and what happens to a
float32 ``eigh`` of ``A`` refined in float64 by Ogita & Aishima's iteration (2018, Algorithm 1:
``R = I − XᵀX``, ``S = XᵀAX``, ``λ̃ᵢ = sᵢᵢ / (1 − rᵢᵢ)``, ``X ← X + X E`` with
``Eᵢⱼ = (sᵢⱼ + λ̃ⱼ rᵢⱼ) / (λ̃ⱼ − λ̃ᵢ)`` outside clusters of width δ, ``rᵢⱼ / 2`` inside): the largest
distance of its top-r subspace to float64 ``eigh``'s after each iteration.

    python benchmarks/core_gap.py [--steps 60] [--out benchmarks/results/core_gap_tiny.txt]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
from pathlib import Path

import torch

from sumo_optim import mofasgd
from sumo_train.cli import main as train


def refine(a: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One Ogita–Aishima step for symmetric ``a`` (float64) and approximate eigenvectors ``x``;
    returns the new ``x`` and the eigenvalue estimates."""
    eye = torch.eye(a.shape[-1], dtype=a.dtype)
    r = eye - x.mT @ x
    s = x.mT @ a @ x
    values = s.diagonal(dim1=-2, dim2=-1) / (1 - r.diagonal(dim1=-2, dim2=-1))
    off = s - torch.diag_embed(values)
    delta = 2 * (torch.linalg.matrix_norm(off) + torch.linalg.matrix_norm(a) * torch.linalg.matrix_norm(r))
    difference = values.unsqueeze(-2) - values.unsqueeze(-1)  # λ̃ⱼ − λ̃ᵢ at [i, j]
    separated = difference.abs() > delta[..., None, None]
    e = torch.where(separated, (s + values.unsqueeze(-2) * r) / torch.where(separated, difference, 1.0), r / 2)
    return x + x @ e, values


def top_subspace_distance(x: torch.Tensor, values: torch.Tensor, exact: torch.Tensor, rank: int) -> torch.Tensor:
    """Largest ‖X_r X_rᵀ − V_r V_rᵀ‖₂ over the batch (X_r: the columns of the ``rank`` largest ``values``)."""
    order = values.argsort(-1, descending=True)[..., :rank]
    top = x.gather(-1, order.unsqueeze(-2).expand(*x.shape[:-1], rank))
    return torch.linalg.matrix_norm(top @ top.mT - exact @ exact.mT, ord=2).max()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--out", default="benchmarks/results/core_gap_tiny.txt")
    args = parser.parse_args()
    cores = []
    solve = mofasgd.top_singular_triplets_ex

    def keeping(matrix, rank):
        cores.append(matrix.detach().to(torch.float64).cpu())
        return solve(matrix, rank)

    mofasgd.top_singular_triplets_ex = keeping
    with tempfile.TemporaryDirectory() as run_dir, contextlib.redirect_stdout(io.StringIO()):
        options = ["--optimizer", "mofasgd", "--rank", "64", "--steps", str(args.steps), "--eval-every", "1000"]
        train(["pretrain", "--config", "configs/tiny-cpu.yaml", *options, "--run-dir", run_dir, "--no-progress"])
    mofasgd.top_singular_triplets_ex = solve
    lines = [
        f"# benchmarks/core_gap.py --steps {args.steps}; torch {torch.__version__}, CPU; MoFaSGD cores of tiny-cpu.yaml"
        " at rank 64 (2r = 128)",
        "solve cores  gap median  gap min   subspace distance after float32 eigh and 0..N refinements",
    ]
    for step in sorted({1, len(cores) // 6, len(cores) // 2, len(cores) - 1}):
        core = cores[step]
        rank = core.shape[-1] // 2
        a = core.mT @ core
        values, vectors = torch.linalg.eigh(a)
        exact = vectors[..., -rank:]
        gap = (values[..., -rank] - values[..., -rank - 1]) / values[..., -1]
        x = torch.linalg.eigh(a.float())[1].double()
        distances = [top_subspace_distance(x, (x.mT @ a @ x).diagonal(dim1=-2, dim2=-1), exact, rank)]
        for _ in range(args.iterations):
            x, estimates = refine(a, x)
            distances.append(top_subspace_distance(x, estimates, exact, rank))
        lines.append(
            f"{step + 1:4d}  {len(core):5d}  {gap.median():10.1e}  {gap.min():8.1e}   "
            + " ".join(f"{d:.1e}" for d in distances)
        )
    text = "\n".join(lines) + "\n"
    print(text, end="")
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
