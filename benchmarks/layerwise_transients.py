"""Peak memory that one layer-wise step of the 7B recipe adds on top of backward, for one bf16 matrix (CPU).

One LLaMA-7B MLP matrix (4096 × 11008, bf16; ``--rows``/``--cols``) trained by SUMO in layer-wise mode over two
micro-batches (``layerwise_refresh="first"``, bf16 Q and M, 8-bit AdamW moments, stochastic
rounding, rank 128, refresh every 2 steps; ``--optimizer galore8bit``: GaLoreAdamW8bit with a
randomized refresh, as ``benchmarks/memory.py``'s recipe rows). With ``--adamw-part`` the matrix
is in the AdamW part instead, as the embeddings and head are (``--rows 32000 --cols 4096``).
After two warm-up steps, the process's peak resident memory (Linux
``VmHWM``, reset through ``/proc/self/clear_refs``) is measured over step 3, a refresh, and
step 4, a step inside the basis, and over the same two backward passes without the optimizer,
which is the part backward itself needs (its bf16 gradient).

    python benchmarks/layerwise_transients.py                    # this checkout's src/
    python benchmarks/layerwise_transients.py --src /old/src     # another checkout, to compare

Each measurement runs in a fresh process. glibc's allocator keeps freed large blocks unless
``MALLOC_MMAP_THRESHOLD_`` is fixed, so the script sets it for its workers. Writes
``benchmarks/results/layerwise_transients.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("refresh step", "step inside the basis", "backward alone")


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith(key)).split()[1])


def worker(src: str, which: str, rows: int, cols: int, optimizer_name: str, adamw_part: bool) -> float:
    """MiB by which the peak resident memory exceeds the memory before the measured step."""
    sys.path.insert(0, src)
    import torch

    import sumo_optim

    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(rows, cols).bfloat16())
    target = torch.randn(rows, cols).bfloat16()
    group = {"params": [weight], "subspace": False} if adamw_part else {"params": [weight], "rank": 128}
    recipe = {"layerwise": True, "layerwise_accumulation_steps": 2, "layerwise_refresh": "first"}
    recipe["bf16_stochastic_rounding"] = True
    if optimizer_name == "sumo":
        options = {"update_freq": 2, "state_dtype": torch.bfloat16, "adamw_state_bits": 8}
    else:
        options = {"update_proj_gap": 2, "refresh": "randomized"}
    optimizer = sumo_optim.create(optimizer_name, [group], lr=0.01, **recipe, **options)

    def step() -> None:
        for _ in range(2):
            (weight * target).sum().backward()
        optimizer.step()
        optimizer.zero_grad()

    step(), step()  # steps 1 (the first refresh) and 2
    if which == STEPS[1]:
        step()  # step 3 refreshes; step 4 is measured
    if which == STEPS[2]:
        optimizer.remove_hooks()
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets VmHWM to the current resident size
    before = _status_kib("VmRSS:")
    if which == STEPS[2]:
        for _ in range(2):
            (weight * target).sum().backward()
            weight.grad = None
    else:
        step()
    # the kernel syncs its per-thread RSS counters lazily: a step that adds nothing may read a few pages below 0
    return max(0, _status_kib("VmHWM:") - before) / 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", default=str(ROOT / "src"), help="the src/ folder whose sumo_optim is measured")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "layerwise_transients.json")
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=11008)
    parser.add_argument("--optimizer", choices=("sumo", "galore8bit"), default="sumo")
    parser.add_argument("--adamw-part", action="store_true", help="the matrix in the AdamW part (embeddings, head)")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(*args.worker, args.rows, args.cols, args.optimizer, args.adamw_part)))
        return 0
    if not Path("/proc/self/clear_refs").exists():
        parser.error("needs Linux's /proc/self/clear_refs to reset the peak resident memory")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    peaks = {}
    for which in STEPS:
        command = [sys.executable, __file__, "--worker", args.src, which, "--rows", str(args.rows)]
        command += ["--cols", str(args.cols), "--optimizer", args.optimizer] + ["--adamw-part"] * args.adamw_part
        done = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
        peaks[which] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{which}: peak +{peaks[which]:.0f} MiB", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {"src": args.src, "shape": [args.rows, args.cols], "optimizer": args.optimizer}
    record |= {"adamw_part": args.adamw_part, "peak_mib": peaks}
    args.out.write_text(json.dumps(record, indent=2))
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
