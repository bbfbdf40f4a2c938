"""SUMO's optimizer step under torch.distributed: replicated vs owner-sharded vs FSDP2 vs HSDP.

LLaMA-1B weight matrices (hidden 2048, intermediate 5461, 24 blocks: q, k, v, o 2048×2048;
gate, up 5461×2048; down 2048×5461), SUMO rank 128, random gradients, no model. Modes:

* ``replicated``: every rank updates every matrix (plain DDP);
* ``sharded``: :func:`sumo_optim.distributed.shard_matrices`: each rank updates the matrices it
  owns and broadcasts them;
* ``fsdp2``: parameters and gradients are ``DTensor``s placed ``(Shard(0),)`` on a 1-D mesh, as
  ``fully_shard`` makes them; whole matrices travel to their owners and back by all-to-all;
* ``hsdp``: the same on a 2-D ``("replicate", "shard")`` mesh, placed ``(Replicate(), Shard(0))``;
  ``--replicate`` replicas (default: 2 from 4 ranks on, else 1) of ``world_size / replicate`` shards.

Per mode: the median of many plain steps and of refresh steps (CUDA events after warm-up,
the slowest rank's median), amortized over K: ``plain + (refresh − plain) / K``; optimizer
state and peak extra memory on the fullest rank; and, as a check of the communication, how
far each matrix's norm after the same steps is from the first mode's.

Run one world size (NVLink multicast must stay off on shared machines, hence
``NCCL_NVLS_ENABLE=0``, which the script also sets when it is unset)::

    NCCL_NVLS_ENABLE=0 torchrun --standalone --nproc-per-node 2 benchmarks/distributed_step_time.py

or every world size of ``--world-sizes`` (default 1, 2, 4, 8) that the GPUs allow, each through
torchrun, with one table of them all (``..._scaling.md`` and ``.json``)::

    python benchmarks/distributed_step_time.py --launch

``--smoke`` runs tiny shapes on CPU (gloo), also without torchrun (``--launch --smoke``: on 1
and 2 processes). ``--dtype bfloat16`` stores weights and gradients in bf16 (and sends them so).
Writes JSON and a markdown table under benchmarks/results/ (``--out-dir`` to change).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

import sumo_optim
from sumo_optim import distributed as sumo_dist

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark, also when loaded by path
from step_time import matrix_shapes, state_bytes

RESULTS = Path(__file__).parent / "results"
MODES = ("replicated", "sharded", "fsdp2", "hsdp")


def setup() -> tuple[int, int, torch.device]:
    """Joins the process group torchrun describes (or a one-process group without torchrun),
    unless the caller already has one."""
    if dist.is_initialized():
        nccl = dist.get_backend() == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        return dist.get_rank(), dist.get_world_size(), device
    if "RANK" not in os.environ:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast off (see the module's docstring)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def replicas(args: argparse.Namespace, world_size: int) -> int:
    """HSDP's replicate size: ``--replicate``, or 2 from 4 ranks on, else 1."""
    return args.replicate or (2 if world_size >= 4 and world_size % 2 == 0 else 1)


def parameters(
    mode: str, shapes: list[tuple[int, int]], device: torch.device, dtype: torch.dtype, replicate: int
) -> list[torch.nn.Parameter]:
    """Weights with random gradients, equal on every rank (DDP's averaged gradients are)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    world_size = dist.get_world_size()
    mesh, placements = None, None
    if mode == "fsdp2":
        mesh, placements = init_device_mesh(device.type, (world_size,)), [Shard(0)]
    elif mode == "hsdp":
        mesh = init_device_mesh(
            device.type, (replicate, world_size // replicate), mesh_dim_names=("replicate", "shard")
        )
        placements = [Replicate(), Shard(0)]
    generator = torch.Generator(device).manual_seed(0)
    params = []
    for shape in shapes:
        weights = (torch.randn(shape, device=device, generator=generator) * 0.02).to(dtype)
        grad = torch.randn(shape, device=device, generator=generator).to(dtype)
        if mesh is not None:
            weights, grad = (distribute_tensor(t, mesh, placements) for t in (weights, grad))
        param = torch.nn.Parameter(weights)
        param.grad = grad
        params.append(param)
    return params


def timed_steps(optimizer: torch.optim.Optimizer, steps: int, device: torch.device) -> list[float]:
    """Milliseconds of each step, ranks started together."""
    times = []
    for _ in range(steps):
        dist.barrier()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            optimizer.step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            optimizer.step()
            times.append((time.perf_counter() - begin) * 1e3)
    return times


def slowest(value: float, device: torch.device) -> float:
    """The largest value over ranks."""
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.item()


def run_mode(mode: str, args: argparse.Namespace, shapes: list[tuple[int, int]], device: torch.device) -> dict:
    params = parameters(mode, shapes, device, getattr(torch, args.dtype), replicas(args, dist.get_world_size()))
    optimizer = sumo_optim.SUMO(params, lr=1e-3, rank=args.rank, update_freq=args.update_freq)
    if mode == "sharded":
        sumo_dist.shard_matrices(optimizer)
    timed_steps(optimizer, args.warmup, device)  # the first step refreshes
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    plain = statistics.median(timed_steps(optimizer, args.steps, device))
    peak_total = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    peak = peak_total - baseline
    for group in optimizer.param_groups:
        group["update_freq"] = 1  # every step refreshes
    refresh = statistics.median(timed_steps(optimizer, args.refresh_steps, device))
    plain, refresh = slowest(plain, device), slowest(refresh, device)
    # Each matrix's norm after the same steps: the modes must agree (a check of the communication).
    norms = torch.stack([(p.full_tensor() if sumo_dist.is_dtensor(p) else p).double().norm() for p in params])
    result = {
        "mode": mode,
        "plain_ms": plain,
        "refresh_ms": refresh,
        "amortized_ms": plain + (refresh - plain) / args.update_freq,
        "state_mib_per_rank": slowest(state_bytes(optimizer), device) / 2**20,
        "peak_extra_mib_per_rank": slowest(peak, device) / 2**20,
        "peak_mib_per_rank": slowest(peak_total, device) / 2**20,
        "norms": norms.cpu(),
    }
    del optimizer, params
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [
        f"SUMO step under torch.distributed ({meta['device']}, torch {meta['torch']}, {meta['date']}; "
        f"{meta['matrices']} matrices, {meta['parameters'] / 1e9:.2f} B {meta.get('dtype', 'float32')} "
        f"parameters; r = {meta['rank']}; K = {meta['update_freq']})",
        "",
        "| ranks | mode | plain ms | refresh ms | amortized ms | state MiB/rank | peak MiB/rank | peak extra MiB/rank "
        "| Δ weights |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        mode = (
            f"hsdp {row['replicate']}×{row['world_size'] // row['replicate']}" if row["mode"] == "hsdp" else row["mode"]
        )
        lines.append(
            f"| {row['world_size']} | {mode} | {row['plain_ms']:.2f} | {row['refresh_ms']:.2f} "
            f"| {row['amortized_ms']:.2f} | {row['state_mib_per_rank']:.1f} | {row['peak_mib_per_rank']:.1f} "
            f"| {row['peak_extra_mib_per_rank']:.1f} "
            f"| {row['norm_difference']:.1e} |"
        )
    lines += [
        "",
        "Peak: the most memory allocated during plain steps (weights, gradients, states, buffers); peak extra: "
        "above what was allocated before them. Δ weights: largest relative difference of a matrix's norm from "
        "the first mode's, same steps and world size. hsdp R×S: R replicas of S shards.",
    ]
    return "\n".join(lines) + "\n"


def launch(args: argparse.Namespace, argv: list[str]) -> None:
    """Runs this script through torchrun at each world size the devices allow; writes one table."""
    available = 2 if args.smoke else torch.cuda.device_count()
    sizes = [n for n in (int(size) for size in args.world_sizes.split(",")) if n <= available]
    if not sizes:
        raise SystemExit(f"no world size of {args.world_sizes} fits {available} device(s)")
    forwarded = [arg for arg in argv if arg != "--launch"]
    results = []
    for size in sizes:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(size)]
        subprocess.run([*command, __file__, *forwarded], check=True, env={"NCCL_NVLS_ENABLE": "0", **os.environ})
        results.append(
            json.loads(result_stem(args, "smoke" if args.smoke else "cuda", size).with_suffix(".json").read_text())
        )
    meta = {key: value for key, value in results[0].items() if key not in ("rows", "world_size")}
    rows = [row for result in results for row in result["rows"]]
    table = markdown(meta, rows)
    print(table)
    stem = Path(args.out_dir) / f"distributed_step_time_{'smoke' if args.smoke else 'cuda'}_scaling"
    stem.with_suffix(".json").write_text(json.dumps({**meta, "world_sizes": sizes, "rows": rows}, indent=2) + "\n")
    stem.with_suffix(".md").write_text(table)


def result_stem(args: argparse.Namespace, device_type: str, world_size: int) -> Path:
    return Path(args.out_dir) / f"distributed_step_time_{'smoke' if args.smoke else device_type}_ws{world_size}"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--update-freq", type=int, default=200, help="K, for the amortized time")
    parser.add_argument("--steps", type=int, default=20, help="timed plain steps")
    parser.add_argument("--refresh-steps", type=int, default=5, help="timed refresh steps")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="weights and gradients")
    parser.add_argument("--replicate", type=int, default=0, help="HSDP replicas (0: 2 from 4 ranks on, else 1)")
    parser.add_argument("--launch", action="store_true", help="run every --world-sizes through torchrun")
    parser.add_argument("--world-sizes", default="1,2,4,8", help="with --launch")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU")
    parser.add_argument("--out-dir", default=str(RESULTS))
    args = parser.parse_args(argv)
    if args.launch:
        launch(args, argv)
        return
    if args.smoke:
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
        args.rank, args.steps, args.refresh_steps, args.warmup = 8, 2, 2, 1
    owns_group = not dist.is_initialized()
    rank, world_size, device = setup()
    shapes = matrix_shapes("tiny" if args.smoke else "1b")
    modes = args.modes.split(",")
    if "hsdp" in modes and world_size % replicas(args, world_size):
        modes.remove("hsdp")  # the replicas do not divide the ranks
    rows = [run_mode(mode, args, shapes, device) for mode in modes]
    reference = rows[0]["norms"]
    for row in rows:
        row["norm_difference"] = ((row.pop("norms") - reference).abs() / reference).max().item()
        row["world_size"] = world_size
        if row["mode"] == "hsdp":
            row["replicate"] = replicas(args, world_size)
    meta = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "world_size": world_size,
        "matrices": len(shapes),
        "parameters": sum(m * n for m, n in shapes),
        "dtype": args.dtype,
        "rank": args.rank,
        "update_freq": args.update_freq,
        "steps": args.steps,
        "refresh_steps": args.refresh_steps,
    }
    if rank == 0:
        table = markdown(meta, rows)
        print(table)
        stem = result_stem(args, device.type, world_size)
        stem.parent.mkdir(parents=True, exist_ok=True)
        stem.with_suffix(".json").write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
        stem.with_suffix(".md").write_text(table)
    if owns_group:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # With torch 2.13 and gloo, a process sometimes aborts in C++ teardown at interpreter exit, after
    # all work is done (see tests/test_distributed.py): leave at once with success instead.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
