"""Runs another benchmark script with PyTorch's preferred BLAS library set (GPU only).

``python benchmarks/with_blas.py cublaslt benchmarks/kernel_breakdown.py sumo-tf32`` runs
``kernel_breakdown.py sumo-tf32`` after ``torch.backends.cuda.preferred_blas_library("cublaslt")``;
``cublas`` is the default. The cuBLASLt A/B in NOTES.md (its tables are in the git history).
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import torch


def main() -> None:
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    torch.backends.cuda.preferred_blas_library(sys.argv[1])
    print("preferred BLAS:", torch.backends.cuda.preferred_blas_library(), flush=True)
    sys.argv = sys.argv[2:]
    sys.path.insert(0, str(Path(__file__).parent))
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
