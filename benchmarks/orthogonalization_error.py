"""Orthogonalization error by condition number: exact SVD vs Newton–Schulz (the SUMO paper's claim).

For moments M (r×n, default 128×2048: a rank-128 SUMO moment of a 2048-wide layer) with
singular values spread log-uniformly over [1/κ, 1], stored in float32, each method's output
is compared with the float64 polar factor U Vᵀ of the same stored matrix:

* relative error  ‖O − U Vᵀ‖_F / ‖U Vᵀ‖_F
* orthogonality   ‖O Oᵀ − I‖_F / √r

SUMO's ``"exact"`` setting is the SVD on CPU and the Cholesky-QR2 + polar route on GPUs (beyond
κ ≈ 2e6 in float32 both keep only the singular values above their rank threshold, so the error
against the full ``U Vᵀ`` grows there by design).

Prints a markdown table and writes JSON + markdown under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
from pathlib import Path

import torch

from sumo_optim import orthogonalize, orthogonalize_newton_schulz
from sumo_optim.linalg import orthogonalize_cholesky
from sumo_optim.testing import matrix_with_spectrum

RESULTS = Path(__file__).parent / "results"


def moment_with_condition(rows: int, cols: int, condition: float, generator: torch.Generator) -> torch.Tensor:
    spectrum = torch.logspace(0, -torch.log10(torch.tensor(condition)).item(), rows, dtype=torch.float64)
    return matrix_with_spectrum(spectrum, rows, cols, generator, torch.float32)


METHODS = {
    "SVD, exact (sumo_optim.orthogonalize)": orthogonalize,
    "Cholesky-QR2 + polar, float64 (SUMO's GPU route)": orthogonalize_cholesky,
    "SVD in float32 (torch.linalg.svd)": lambda m: (lambda u, s, vh: u @ vh)(*torch.linalg.svd(m, full_matrices=False)),
    "Newton-Schulz 5, bf16 (Muon)": lambda m: orthogonalize_newton_schulz(m),
    "Newton-Schulz 5, fp32": lambda m: orthogonalize_newton_schulz(m, compute_dtype=torch.float32),
    "Newton-Schulz 10, fp32": lambda m: orthogonalize_newton_schulz(m, steps=10, compute_dtype=torch.float32),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--cols", type=int, default=2048)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    conditions = [1e0, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8]
    generator = torch.Generator().manual_seed(0)
    rows = []
    for condition in conditions:
        errors = {name: [] for name in METHODS}
        orthogonality = {name: [] for name in METHODS}
        for _ in range(args.trials):
            moment = moment_with_condition(args.rows, args.cols, condition, generator).to(args.device)
            u, _, vh = torch.linalg.svd(moment.double(), full_matrices=False)
            reference = u @ vh
            for name, method in METHODS.items():
                result = method(moment).double()
                errors[name].append(((result - reference).norm() / reference.norm()).item())
                gram = result @ result.T - torch.eye(args.rows, dtype=torch.float64, device=result.device)
                orthogonality[name].append((gram.norm() / args.rows**0.5).item())
        rows.append(
            {
                "condition": condition,
                "relative_error": {k: statistics.median(v) for k, v in errors.items()},
                "orthogonality_error": {k: statistics.median(v) for k, v in orthogonality.items()},
            }
        )

    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "CPU"
    header = f"Orthogonalization of {args.rows}×{args.cols} float32 moments, relative error vs float64 U Vᵀ"
    lines = [
        f"{header} (median of {args.trials}; {device_name}; torch {torch.__version__}; {datetime.date.today()})",
        "",
        "| κ | " + " | ".join(METHODS) + " |",
        "|---:|" + "---:|" * len(METHODS),
    ]
    for row in rows:
        lines.append(
            f"| {row['condition']:.0e} | " + " | ".join(f"{row['relative_error'][k]:.1e}" for k in METHODS) + " |"
        )
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = f"orthogonalization_error_{args.device.split(':')[0]}"
    meta = {
        "device": device_name,
        "torch": torch.__version__,
        "date": str(datetime.date.today()),
        "shape": [args.rows, args.cols],
        "trials": args.trials,
    }
    (RESULTS / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    (RESULTS / f"{stem}.md").write_text(table + "\n")
    print(f"\nwritten: {RESULTS / (stem + '.json')}, {RESULTS / (stem + '.md')}")


if __name__ == "__main__":
    main()
