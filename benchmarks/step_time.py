"""Optimizer step time, memory and accuracy on the weight shapes of GaLore's LLaMA models.

For each model (its attention and MLP matrices; embeddings and norms are left out, as they
take AdamW in every low-rank method) and rank, every optimizer gets random gradients and
steps repeatedly. Reported per optimizer:

* step time: median over many steps, timed with CUDA events after warm-up (host clock on CPU);
  for subspace methods the refresh step is timed separately and amortized over K steps:
  ``amortized = plain + (refresh − plain) / K``;
* peak extra memory during a step, optimizer-state bytes, and memory held between steps
  besides the state ("held": a CUDA graph's pool with ``cuda_graph=True``);
* for SUMO, the orthogonalization's accuracy on its real moments: relative distance to the
  float64 ``U Vᵀ`` and ``‖O Oᵀ − I‖_F / √r``; and the effect of TF32 projections on the update.

Run on a GPU for real numbers (``python benchmarks/step_time.py``); ``--smoke`` runs tiny shapes
on CPU; ``--gradients power`` gives the gradients a decaying spectrum (the iterative refresh's
iteration count depends on it; i.i.d. Gaussian gradients are its worst case). Optimizer names
(``galore``: exact SVD refresh, ``galore-iterative``, ``galore-randomized``;
``galore-adafactor``, ``galore-adafactor-iterative``; ``mofasgd``,
``mofasgd-warm``: its warm-started core solver) take ``-graph``
(``cuda_graph=True``) and then ``-tf32`` (TF32 matmuls allowed while timing) suffixes.
``--dtype bfloat16`` steps bf16 weights; with ``--matrix-piece-bytes`` (the optimizers'
``matrix_piece_bytes``) it measures what stepping their float32 working copies in pieces costs. Writes
JSON and a markdown table under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import statistics
import time
from pathlib import Path

import torch

import sumo_optim
from sumo_optim.distributed import local_tensor
from sumo_optim.linalg import orthogonalize_cholesky
from sumo_optim.testing import galore_torch_adamw

RESULTS = Path(__file__).parent / "results"

# GaLore's LLaMA configs: hidden, intermediate, layers.
MODELS = {
    "tiny": (64, 176, 2),
    "60m": (512, 1376, 8),
    "130m": (768, 2048, 12),
    "350m": (1024, 2736, 24),
    "1b": (2048, 5461, 24),
    "7b": (4096, 11008, 32),
}


def matrix_shapes(model: str, layers: int | None = None) -> list[tuple[int, int]]:
    """(out, in) of q, k, v, o, gate, up, down in each of the first ``layers`` blocks."""
    hidden, intermediate, total = MODELS[model]
    block = [(hidden, hidden)] * 4 + [(intermediate, hidden)] * 2 + [(hidden, intermediate)]
    return block * (layers or total)


# ``matrix_piece_bytes`` of ours that step matrices together (``--matrix-piece-bytes``)
PIECE_BYTES: int | None = sumo_optim.base.MATRIX_PIECE_BYTES


def piece_bytes(text: str) -> int | None:
    """``--matrix-piece-bytes``: a byte count (``1e9`` allowed) or ``none``."""
    return None if text.lower() == "none" else int(float(text))


def build(name: str, params: list[torch.Tensor], rank: int, gap: int):
    """The optimizer a benchmark name stands for; a "-tf32" suffix only changes how it is timed,
    "-graph" (before it) turns on ``cuda_graph`` (SUMO, GaLore, GoLore)."""
    name = name.removesuffix("-tf32")
    graph = name.endswith("-graph")
    name = name.removesuffix("-graph")
    if graph and (name in ("adamw-fused", "muon", "galore-torch", "mofasgd", "mofasgd-warm") or "adafactor" in name):
        raise ValueError(f"{name} has no cuda_graph option")
    if name == "adamw-fused":
        return torch.optim.AdamW(params, lr=1e-3, fused=True)
    if name == "muon":
        return torch.optim.Muon(params, lr=0.02)
    if name == "galore-torch":
        galore = galore_torch_adamw()
        group = {"params": params, "rank": rank, "update_proj_gap": gap, "scale": 0.25, "proj_type": "std"}
        return galore([group], lr=1e-2)
    ours = {"cuda_graph": graph, "matrix_piece_bytes": PIECE_BYTES}
    if name == "sumo":
        return sumo_optim.SUMO(params, lr=0.02, rank=rank, update_freq=gap, **ours)
    if name == "sumo-svd":
        return sumo_optim.SUMO(params, lr=0.02, rank=rank, update_freq=gap, orthogonalization="svd", **ours)
    if name in ("mofasgd", "mofasgd-warm"):
        return sumo_optim.MoFaSGD(params, lr=0.02, rank=rank, core_solver="warm" if name.endswith("warm") else "eigh")
    if name == "golore":
        return sumo_optim.GoLore(params, total_steps=10**6, lr=1e-2, rank=rank, update_proj_gap=gap, scale=0.25, **ours)
    refresh = next((r for r in ("randomized", "iterative") if name.endswith(r)), "svd")
    if name.startswith("galore-adafactor"):  # matrix by matrix, Adafactor's relative step size
        return sumo_optim.GaLoreAdafactor(params, rank=rank, update_proj_gap=gap, scale=0.25, refresh=refresh)
    return sumo_optim.GaLoreAdamW(params, lr=1e-2, rank=rank, update_proj_gap=gap, scale=0.25, refresh=refresh, **ours)


def force_refresh_next(optimizer: torch.optim.Optimizer, gap: int) -> None:
    """Sets every step counter so that the next step refreshes the subspace."""
    for state in optimizer.state.values():
        if isinstance(state.get("step"), int):
            state["step"] = gap  # ours refresh at step K+1; galore-torch when step % K == 0 before counting


def timed_steps(optimizer, steps: int, device: torch.device, tf32: bool) -> list[float]:
    times = []
    matmul = torch.backends.cuda.matmul
    for _ in range(steps):
        previous = matmul.allow_tf32
        matmul.allow_tf32 = tf32
        try:
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                optimizer.step()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                optimizer.step()
                times.append((time.perf_counter() - t0) * 1e3)
        finally:
            matmul.allow_tf32 = previous
    return times


def warmed_up(name: str, model: str, device: torch.device, gap: int = 200, warmup: int = 4):
    """``build(name)`` over LLaMA ``model``'s matrices with random gradients, after ``warmup``
    plain steps; and whether it is timed under TF32 (the name's "-tf32" suffix)."""
    params = [torch.randn(s, device=device).requires_grad_() for s in matrix_shapes(model)]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    optimizer = build(name, params, 128, gap)
    tf32 = name.endswith("tf32")
    timed_steps(optimizer, warmup, device, tf32)
    return optimizer, tf32


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer's state tensors on this rank (a DTensor counts its local shard)."""
    return sum(
        local_tensor(v).numel() * v.element_size()
        for s in optimizer.state.values()
        for v in s.values()
        if isinstance(v, torch.Tensor)
    )


def sumo_accuracy(optimizer: torch.optim.Optimizer, samples: int = 8) -> dict[str, float]:
    """Distance of the fast orthogonalization to the float64 U Vᵀ on the optimizer's own moments."""
    moments = [s["moment"] for s in optimizer.state.values() if "moment" in s][:samples]
    errors, orthogonality = [], []
    for moment in moments:
        result = orthogonalize_cholesky(moment).double()
        u, _, vh = torch.linalg.svd(moment.double(), full_matrices=False)
        reference = u @ vh
        errors.append(((result - reference).norm() / reference.norm()).item())
        small = result if result.shape[0] <= result.shape[1] else result.mT
        gram = small @ small.mT - torch.eye(small.shape[0], dtype=torch.float64, device=small.device)
        orthogonality.append((gram.norm() / small.shape[0] ** 0.5).item())
    return {"max_relative_error_vs_fp64": max(errors), "max_orthogonality_error": max(orthogonality)}


def tf32_update_error(params, optimizer) -> float:
    """Relative difference between one SUMO step's update with TF32 and with FP32 projections."""
    saved_state = {k: v.clone() for k, v in enumerate(p.detach() for p in params)}
    checkpoint = optimizer.state_dict()
    deltas = []
    for tf32 in (False, True):
        optimizer.load_state_dict(checkpoint)
        with torch.no_grad():
            for i, p in enumerate(params):
                p.copy_(saved_state[i])
        timed_steps(optimizer, 1, params[0].device, tf32)
        deltas.append(torch.cat([(p.detach() - saved_state[i]).flatten() for i, p in enumerate(params)]))
    return ((deltas[1] - deltas[0]).norm() / deltas[0].norm()).item()


def power_law_gradient(shape: tuple[int, int], device: torch.device, generator: torch.Generator) -> torch.Tensor:
    """``U diag(i^−0.8) Vᵀ`` with random orthonormal U, V, scaled to the Frobenius norm of the
    Gaussian gradients (1e-3 per entry): a decaying spectrum, as real gradients have."""
    m, n = shape
    k = min(m, n)
    u = torch.linalg.qr(torch.randn(m, k, device=device, generator=generator))[0]
    v = torch.linalg.qr(torch.randn(n, k, device=device, generator=generator))[0]
    spectrum = torch.arange(1, k + 1, device=device, dtype=torch.float32) ** -0.8
    return (u * (spectrum * 1e-3 * (m * n) ** 0.5 / spectrum.norm())) @ v.T


def run_one(name, shapes, rank, gap, device, steps, warmup, gradients="gaussian", dtype=torch.float32):
    """One optimizer's row; ``gradients``: "gaussian" (i.i.d., a flat spectrum) or "power"
    (:func:`power_law_gradient`, one per shape; what the iterative refresh's cost depends on);
    weights and gradients in ``dtype``."""
    generator = torch.Generator(device=device).manual_seed(0)
    params = [
        torch.randn(s, device=device, generator=generator).div_(s[1] ** 0.5).to(dtype).requires_grad_() for s in shapes
    ]
    power = {s: power_law_gradient(s, device, generator) for s in set(shapes)} if gradients == "power" else {}
    for p in params:
        shape = tuple(p.shape)
        grad = power[shape].clone() if power else torch.randn(shape, device=device, generator=generator) * 1e-3
        p.grad = grad.to(dtype)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    reserved_before = torch.cuda.memory_reserved() if device.type == "cuda" else 0
    optimizer = build(name, params, rank, gap)
    tf32 = name.endswith("tf32")
    refresh_ms = None
    timed_steps(optimizer, warmup, device, tf32)  # includes the first (refresh) step
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    plain = statistics.median(timed_steps(optimizer, steps, device, tf32))
    peak_extra = (torch.cuda.max_memory_allocated() - before) if device.type == "cuda" else 0
    if name not in ("adamw-fused", "muon"):
        refreshes = []
        for _ in range(2):
            force_refresh_next(optimizer, gap)
            refreshes.append(timed_steps(optimizer, 1, device, tf32)[0])
        refresh_ms = min(refreshes)
    if device.type == "cuda":  # what stays reserved between steps besides the state (a CUDA graph's pool)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    held = torch.cuda.memory_reserved() - reserved_before - state_bytes(optimizer) if device.type == "cuda" else 0
    result = {
        "optimizer": name,
        "step_ms": plain,
        "refresh_ms": refresh_ms,
        "amortized_ms": plain if refresh_ms is None else plain + (refresh_ms - plain) / gap,
        "peak_extra_bytes": peak_extra,
        "held_extra_bytes": max(held, 0),
        "state_bytes": state_bytes(optimizer),
        "params": sum(p.numel() for p in params),
    }
    if name.startswith("sumo"):
        result.update(sumo_accuracy(optimizer))
        if name == "sumo":
            result["tf32_update_relative_error"] = tf32_update_error(params, optimizer)
    del optimizer, params
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def profile_step(name, shapes, rank, gap, device) -> None:
    """Kernel-level time of a few plain steps (no refresh), biggest first."""
    params = [torch.randn(s, device=device).requires_grad_() for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    optimizer = build(name, params, rank, gap)
    timed_steps(optimizer, 3, device, name.endswith("tf32"))
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        timed_steps(optimizer, 3, device, name.endswith("tf32"))
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print(profiler.key_averages().table(sort_by=sort, row_limit=25))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="60m,130m,350m,1b,7b")
    parser.add_argument("--ranks", default="128")
    parser.add_argument("--update-freq", type=int, default=200)
    parser.add_argument(
        "--optimizers",
        default="adamw-fused,muon,galore-torch,sumo,sumo-tf32,galore,galore-randomized,golore,mofasgd",
    )
    parser.add_argument("--layers-7b", type=int, default=4, help="7B blocks timed (scaled to 32 in the table)")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU")
    parser.add_argument(
        "--gradients",
        choices=("gaussian", "power"),
        default="gaussian",
        help="random gradients: i.i.d. Gaussian, or a power-law spectrum (σ_i ∝ i^-0.8) per shape",
    )
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="weights and gradients")
    parser.add_argument(
        "--matrix-piece-bytes",
        type=piece_bytes,
        default=sumo_optim.base.MATRIX_PIECE_BYTES,
        help="the optimizers' matrix_piece_bytes: float32 working copies of bf16 matrices per piece of a step "
        "(default 2**30; none: all at once)",
    )
    parser.add_argument("--out", default=None, help="file stem under benchmarks/results/, or a path")
    parser.add_argument("--profile", default=None, help="print a torch.profiler table of this optimizer's step")
    args = parser.parse_args(argv)
    global PIECE_BYTES
    PIECE_BYTES = args.matrix_piece_bytes
    dtype = getattr(torch, args.dtype)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    models = ["tiny"] if args.smoke else args.models.split(",")
    ranks = [8] if args.smoke else [int(r) for r in args.ranks.split(",")]
    names = []
    for name in args.optimizers.split(","):
        base = name.removesuffix("-tf32").removesuffix("-graph")
        known = base in (
            "adamw-fused",
            "muon",
            "sumo",
            "sumo-svd",
            "galore-randomized",
            "galore-iterative",
            "galore-adafactor",
            "galore-adafactor-iterative",
            "mofasgd-warm",
        )
        if base == "galore-torch" and galore_torch_adamw() is None:
            print("skipping galore-torch: not installed (pip install galore-torch==1.0 --no-deps)")
        elif not known and base != "galore-torch" and base not in sumo_optim.available():
            print(f"skipping {name}: not in sumo_optim.available()")
        else:
            names.append(name)
    rows = []
    for model in models:
        layers = args.layers_7b if model == "7b" else None
        scale = MODELS[model][2] / layers if layers else 1
        shapes = matrix_shapes(model, layers)
        for rank in ranks:
            for name in names:
                with contextlib.suppress(torch.cuda.OutOfMemoryError):
                    t0 = time.perf_counter()
                    row = run_one(
                        name, shapes, rank, args.update_freq, device, args.steps, args.warmup, args.gradients, dtype
                    )
                    row.update(model=model, rank=rank, layers_timed=len(shapes) // 7, scale_to_full=scale)
                    rows.append(row)
                    print(
                        f"{model:>5} r={rank:<4} {name:<13} step {row['step_ms'] * scale:9.2f} ms  "
                        f"amortized {row['amortized_ms'] * scale:9.2f} ms  ({time.perf_counter() - t0:.0f} s)",
                        flush=True,
                    )
    if args.profile:
        profile_step(
            args.profile,
            matrix_shapes(models[-1], args.layers_7b if models[-1] == "7b" else None),
            ranks[0],
            args.update_freq,
            device,
        )
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    meta = {
        "device": device_name,
        "torch": torch.__version__,
        "date": str(datetime.date.today()),
        "update_freq": args.update_freq,
        "steps": args.steps,
        "gradients": args.gradients,
        "dtype": args.dtype,
        "matrix_piece_bytes": PIECE_BYTES,
    }
    pieces = f", working copies in pieces of {PIECE_BYTES} bytes" if PIECE_BYTES else ", working copies all at once"
    lines = [
        f"Optimizer step on LLaMA weight matrices ({device_name}, torch {torch.__version__}, {meta['date']}; "
        f"K = {args.update_freq}; 7B timed on {args.layers_7b} blocks and scaled to 32; {args.gradients} gradients; "
        f"{args.dtype} weights" + (pieces if args.dtype != "float32" else "") + ")",
        "",
        "| model | r | optimizer | step ms | amortized ms | × AdamW | state MiB | peak extra MiB | held MiB "
        "| UVᵀ error |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        base = next(
            (
                r
                for r in rows
                if r["model"] == row["model"] and r["rank"] == row["rank"] and r["optimizer"] == "adamw-fused"
            ),
            None,
        )
        ratio = f"{row['amortized_ms'] / base['amortized_ms']:.2f}" if base else ""
        scale = row["scale_to_full"]
        error = row.get("max_relative_error_vs_fp64")
        lines.append(
            f"| {row['model']} | {row['rank']} | {row['optimizer']} | {row['step_ms'] * scale:.2f} | "
            f"{row['amortized_ms'] * scale:.2f} | {ratio} | {row['state_bytes'] * scale / 2**20:.0f} | "
            f"{row['peak_extra_bytes'] * scale / 2**20:.0f} | {row.get('held_extra_bytes', 0) * scale / 2**20:.0f} | "
            f"{'' if error is None else f'{error:.1e}'} |"
        )
    table = "\n".join(lines)
    print("\n" + table)
    stem = RESULTS / (args.out or f"step_time_{'smoke' if args.smoke else device.type}")
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_name(f"{stem.name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    stem.with_name(f"{stem.name}.md").write_text(table + "\n")
    print(f"\nwritten: {stem}.json and .md")


if __name__ == "__main__":
    main()
