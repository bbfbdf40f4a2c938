"""Every optimizer under torch.distributed (gloo, CPU, 2 or 4 processes) equals the single-process run.

Scenarios, one spawn each, looping over the optimizers inside: DDP replicated and owner-sharded;
FSDP2 with a DCP checkpoint at step 3, and HSDP 2×1 and 1×2; on 4 processes, FSDP2 and HSDP (2 replicas × 2 shards),
the latter also resuming the 2-rank FSDP2 checkpoint and writing its own; resuming checkpoints
in fresh processes on 2 ranks (FSDP2's and HSDP's) and on 1 rank (another world size). The
reference is one process on the full batch. Layer-wise mode, which would update on local
gradients, is refused on 2 ranks.
"""

from __future__ import annotations

import datetime
import faulthandler
import importlib.util
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import sumo_optim
from sumo_optim import distributed as sumo_dist

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)

STEPS, CHECKPOINT_STEP, BATCH = 6, 3, 8
# Small ranks and refresh periods of 2, so bases are refreshed (and transported) in 6 steps.
OPTIMIZERS = {
    "sumo": ("sumo", dict(lr=0.02, rank=3, update_freq=2)),
    "sumo_svd_limiter": (
        "sumo",
        dict(lr=0.02, rank=3, update_freq=2, refresh="svd", limiter=1.1, weight_decay=0.01),
    ),
    "galore": ("galore", dict(lr=0.01, rank=3, update_proj_gap=2, weight_decay=0.01)),
    "golore": ("golore", dict(lr=0.01, rank=3, update_proj_gap=2, total_steps=STEPS, random_fraction=0.5, seed=3)),
    "mofasgd": ("mofasgd", dict(lr=0.02, rank=3)),
    "galore_adafactor": ("galore_adafactor", dict(rank=3, update_proj_gap=2, beta1=0.9)),
}


class MLP(nn.Module):
    """Three linear layers (12×8, 12×12, 5×12: 5 rows shard unevenly), biases and a 1-D scale."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 12)
        self.fc2 = nn.Linear(12, 12)
        self.fc3 = nn.Linear(12, 5, bias=False)
        self.scale = nn.Parameter(torch.ones(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x))))) * self.scale


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)
    return torch.randn(BATCH, 8, generator=generator), torch.randn(BATCH, 5, generator=generator)


def build(name: str, model: nn.Module, **extra: Any) -> sumo_optim.SubspaceOptimizer:
    algorithm, options = OPTIMIZERS[name]
    return sumo_optim.create(algorithm, sumo_optim.param_groups(model), **options, **extra)


def train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: range, rank: int = 0, world: int = 1) -> None:
    for step in steps:
        inputs, targets = batch(step)
        inputs, targets = inputs.chunk(world)[rank], targets.chunk(world)[rank]
        loss = nn.functional.mse_loss(model(inputs), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def reference(name: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = MLP()
    train(model, build(name, model), range(STEPS))
    return {key: value.detach().clone() for key, value in model.named_parameters()}


def full_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Whole parameters by name, gathered from FSDP2 shards where needed (collective)."""
    names = sumo_dist._parameter_names(model)
    return {names[p]: (p.full_tensor() if sumo_dist.is_dtensor(p) else p).detach().clone() for p in model.parameters()}


def assert_close(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], label: str) -> None:
    assert got.keys() == expected.keys(), label
    for key in expected:
        message = f"{label} {key}"
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6, msg=lambda m, s=message: f"{s}: {m}")


# The optimizers of the 4-process (HSDP) scenario: refreshes by SVD (GaLore), random (GoLore),
# power iteration (SUMO) and MoFaSGD's own.
FOUR_RANK_OPTIMIZERS = ("sumo", "galore", "golore", "mofasgd")


def fsdp_model(world: int, replicate: int = 1, hsdp: bool = False, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The MLP (in ``dtype``) under FSDP2 on ``world`` ranks, or HSDP (``replicate > 1`` or
    ``hsdp``: a 2-D mesh) with ``replicate`` replicas of ``world // replicate`` shards."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = MLP().to(dtype)
    if replicate > 1 or hsdp:
        mesh = init_device_mesh("cpu", (replicate, world // replicate), mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh("cpu", (world,))
    for layer in (model.fc1, model.fc2, model.fc3):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


# --------------------------------------------------------------------------- scenarios
def ddp_scenario(rank: int, world: int, directory: Path) -> None:
    """DDP, replicated and owner-sharded; each run saved at step 3 and resumed in the other mode
    (so matrices change owners: all of them, or half)."""
    from torch.nn.parallel import DistributedDataParallel

    def ddp_run(name: str, sharded: bool) -> tuple[nn.Module, sumo_optim.SubspaceOptimizer]:
        torch.manual_seed(0)
        model = DistributedDataParallel(MLP())
        optimizer = build(name, model)
        if sharded:
            sumo_dist.shard_matrices(optimizer)
        return model, optimizer

    for name in OPTIMIZERS:
        expected = reference(name)
        for sharded in (False, True):
            label = f"{name} DDP {'sharded' if sharded else 'replicated'} rank {rank}"
            model, optimizer = ddp_run(name, sharded)
            train(model, optimizer, range(CHECKPOINT_STEP), rank, world)
            checkpoint = str(directory / f"ddp-{name}-{sharded}")
            sumo_dist.save_checkpoint(checkpoint, model, optimizer)
            train(model, optimizer, range(CHECKPOINT_STEP, STEPS), rank, world)
            assert_close(full_parameters(model.module), expected, label)
            flat = torch.cat([p.detach().flatten() for p in model.parameters()])
            copies = [torch.empty_like(flat) for _ in range(world)]
            dist.all_gather(copies, flat)
            assert all(torch.equal(copy, flat) for copy in copies), f"{label}: ranks differ"
            matrices = [p for p in model.parameters() if p.ndim == 2]
            with_state = torch.tensor(sum(bool(optimizer.state.get(p)) for p in matrices))
            dist.all_reduce(with_state)
            # Low-rank states live on the owner only in sharded mode, on every rank otherwise.
            assert with_state.item() == len(matrices) * (1 if sharded else world), label

            model, optimizer = ddp_run(name, not sharded)
            sumo_dist.load_checkpoint(checkpoint, model, optimizer)
            train(model, optimizer, range(CHECKPOINT_STEP, STEPS), rank, world)
            assert_close(full_parameters(model.module), expected, f"{label}, resumed in the other mode")


def fsdp_scenario(rank: int, world: int, directory: Path) -> None:
    default_group = sumo_dist.GROUP_ELEMENTS
    for i, name in enumerate(OPTIMIZERS):
        # Every other optimizer computes one batch of matrices at a time (groups of 1 element).
        sumo_dist.GROUP_ELEMENTS = 1 if i % 2 else default_group
        model = fsdp_model(world)
        optimizer = build(name, model)
        train(model, optimizer, range(CHECKPOINT_STEP), rank, world)
        sumo_dist.save_checkpoint(str(directory / name), model, optimizer)
        train(model, optimizer, range(CHECKPOINT_STEP, STEPS), rank, world)
        got = full_parameters(model)
        assert_close(got, reference(name), f"{name} FSDP2 rank {rank}")
        if rank == 0:
            torch.save(got, directory / f"{name}.final.pt")
        matrices = [p for p in model.parameters() if p.ndim == 2]
        assert sum(bool(optimizer.state.get(p)) for p in matrices) < len(matrices)  # owner-only states

    # HSDP on 2 ranks: 2 replicas of 1 shard (each rank owns every matrix) and 1 replica of 2 shards.
    for name in FOUR_RANK_OPTIMIZERS:
        expected = reference(name)
        for replicate in (2, 1):
            label = f"{name} HSDP {replicate}×{world // replicate} rank {rank}"
            model = fsdp_model(world, replicate, hsdp=True)
            optimizer = build(name, model)
            train(model, optimizer, range(STEPS), rank, world)
            assert_close(full_parameters(model), expected, label)
            matrices = [p for p in model.parameters() if p.ndim == 2]
            with_state = torch.tensor(sum(bool(optimizer.state.get(p)) for p in matrices))
            dist.all_reduce(with_state)
            assert with_state.item() == len(matrices) * replicate, label  # one owner per replica group

    # A NaN in one rank's shard of a gradient: every rank skips that matrix (nonfinite="skip").
    model = fsdp_model(world)
    optimizer = sumo_optim.SUMO(sumo_optim.param_groups(model), lr=0.02, rank=3, nonfinite="skip")
    train(model, optimizer, range(1), rank, world)
    before = full_parameters(model)
    model(batch(0)[0]).sum().backward()
    if rank == world - 1:
        model.fc1.weight.grad.to_local()[0, 0] = float("nan")
    optimizer.step()
    after = full_parameters(model)
    assert torch.equal(after["fc1.weight"], before["fc1.weight"])
    assert not torch.equal(after["fc2.weight"], before["fc2.weight"])


def four_rank_scenario(rank: int, world: int, directory: Path) -> None:
    """FSDP2 on 4 ranks (a 5-row matrix leaves one rank an empty shard) and HSDP 2 × 2, both from
    scratch; HSDP writes its step-3 checkpoint, then resumes the 2-rank FSDP2 run's."""
    for name in FOUR_RANK_OPTIMIZERS:
        expected = reference(name)
        for replicate in (1, 2):
            label = f"{name} {'HSDP 2×2' if replicate > 1 else 'FSDP2 ×4'} rank {rank}"
            model = fsdp_model(world, replicate)
            optimizer = build(name, model)
            train(model, optimizer, range(CHECKPOINT_STEP), rank, world)
            if replicate > 1:
                sumo_dist.save_checkpoint(str(directory / f"hsdp-{name}"), model, optimizer)
            train(model, optimizer, range(CHECKPOINT_STEP, STEPS), rank, world)
            assert_close(full_parameters(model), expected, label)
            matrices = [p for p in model.parameters() if p.ndim == 2]
            with_state = torch.tensor(sum(bool(optimizer.state.get(p)) for p in matrices))
            dist.all_reduce(with_state)
            assert with_state.item() == len(matrices) * replicate, label  # one owner per replica group

        model = fsdp_model(world, replicate=2)
        optimizer = build(name, model)
        sumo_dist.load_checkpoint(str(directory / name), model, optimizer)
        train(model, optimizer, range(CHECKPOINT_STEP, STEPS), rank, world)
        assert_close(full_parameters(model), expected, f"{name} FSDP2 ×2 checkpoint resumed under HSDP 2×2")


def resume_scenario(rank: int, world: int, directory: Path) -> None:
    """Fresh processes: load the step-3 checkpoint of the 2-rank FSDP2 run (and, when written, of
    the HSDP 2×2 run), finish, compare."""
    for name in OPTIMIZERS:
        for checkpoint in (name, f"hsdp-{name}"):
            if not (directory / checkpoint).exists():
                continue
            model = fsdp_model(world)
            optimizer = build(name, model)
            sumo_dist.load_checkpoint(str(directory / checkpoint), model, optimizer)
            train(model, optimizer, range(CHECKPOINT_STEP, STEPS), rank, world)
            expected = torch.load(directory / f"{name}.final.pt")
            assert_close(full_parameters(model), expected, f"{checkpoint} resumed on {world} rank(s), rank {rank}")


def pieces_scenario(rank: int, world: int, directory: Path) -> None:
    """Owner-sharded DDP and FSDP2 step their bf16 matrices in pieces (``matrix_piece_bytes``
    of one matrix's float32 copies): equal bit for bit to all of a rank's matrices at once."""
    from torch.nn.parallel import DistributedDataParallel

    from sumo_optim import base

    pieces = base.SubspaceOptimizer._pieces
    counts: list[int] = []

    def counted(optimizer, work):
        result = pieces(optimizer, work)
        counts.append(len(result))
        return result

    def run(name: str, mode: str, piece_bytes: int | None) -> dict[str, torch.Tensor]:
        if mode == "fsdp":
            model = fsdp_model(world, dtype=torch.bfloat16)
        else:
            torch.manual_seed(0)
            model = DistributedDataParallel(MLP().to(torch.bfloat16))
        optimizer = build(name, model, matrix_piece_bytes=piece_bytes)
        if mode == "ddp":
            sumo_dist.shard_matrices(optimizer)
        for step in range(4):
            inputs, targets = (t.chunk(world)[rank].to(torch.bfloat16) for t in batch(step))
            nn.functional.mse_loss(model(inputs), targets).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return full_parameters(model.module if mode == "ddp" else model)

    with mock.patch.object(base.SubspaceOptimizer, "_pieces", counted):
        for name in ("sumo", "galore"):
            for mode in ("ddp", "fsdp"):
                whole = run(name, mode, None)
                counts.clear()
                pieced = run(name, mode, 1)
                most = torch.tensor(max(counts))
                dist.all_reduce(most, op=dist.ReduceOp.MAX)  # (a rank that owns one matrix has one piece)
                assert most.item() > 1, f"{name} {mode}: no step went in pieces"
                for key, value in whole.items():
                    assert torch.equal(pieced[key], value), f"{name} {mode} rank {rank} {key}"


def layerwise_scenario(rank: int, world: int, directory: Path) -> None:
    """Layer-wise mode updates on each rank's local gradient, before DDP's all-reduce: refused
    when built under the group, and by its hook if it was built before the group existed."""
    from torch.nn.parallel import DistributedDataParallel

    for name in OPTIMIZERS:
        algorithm, options = OPTIMIZERS[name]
        with pytest.raises(RuntimeError, match=r"layer-wise.*before DDP's all-reduce.*single-process"):
            sumo_optim.create(algorithm, sumo_optim.param_groups(MLP()), **options, layerwise=True)

    model = MLP()
    with mock.patch.object(dist, "is_initialized", return_value=False):  # as if built before the group
        optimizer = sumo_optim.SUMO(sumo_optim.param_groups(model), lr=0.02, rank=3, layerwise=True)
    wrapped = DistributedDataParallel(model)  # (copies rank 0's weights)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="layer-wise"):
        wrapped(batch(0)[0]).sum().backward()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    optimizer.remove_hooks()


def _worker(rank: int, world: int, scenario: str, directory: str, store: str) -> None:
    faulthandler.enable()  # a crash in C++ (gloo) still shows where Python was
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    # A short timeout turns a collective that some rank never joins into an error, not a hang.
    timeout = datetime.timedelta(seconds=60)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=timeout)
    try:
        globals()[scenario](rank, world, Path(directory))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    # With torch 2.13 and gloo, a process sometimes aborts in C++ teardown at interpreter exit,
    # after all work is done and the group destroyed ("terminate called without an active
    # exception", about 1 run in 10; cause not found): leave at once with success instead.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(scenario: str, world: int, directory: Path) -> None:
    store = directory / f"store-{scenario}-{world}-{socket.gethostname()}"
    mp.spawn(_worker, args=(world, scenario, str(directory), str(store)), nprocs=world, join=True)


# ------------------------------------------------------------------------------- tests
def test_owner_assignment_is_balanced_and_deterministic():
    sizes = [96, 144, 60, 60, 30, 144]
    owners = sumo_dist.assign_owners(sizes, 2)
    assert owners == sumo_dist.assign_owners(sizes, 2)
    loads = [sum(s for s, o in zip(sizes, owners) if o == r) for r in range(2)]
    assert max(loads) - min(loads) <= max(sizes)
    assert sumo_dist.assign_owners(sizes, 1) == [0] * len(sizes)


def test_ddp_replicated_and_sharded_equal_single_process(tmp_path):
    spawn("ddp_scenario", 2, tmp_path)


def test_owner_batches_deal_one_matrix_per_rank_in_alternating_rounds():
    assert sumo_dist.owner_batches([5, 9, 7, 1, 3], 2) == [[1, 2], [4, 0], [3, None]]
    assert sumo_dist.owner_batches([2, 2], 3) == [[0, 1, None]]
    assert sumo_dist.assign_owners([5, 9, 7, 1, 3], 2) == [1, 0, 1, 0, 0]


def test_fsdp2_hsdp_and_checkpoint_resume_across_world_sizes_and_meshes(tmp_path):
    """FSDP2 and HSDP (2×1, 1×2) on 2 ranks; FSDP2 and HSDP 2×2 on 4 (HSDP resumes FSDP2's checkpoint); FSDP2 on 2
    and 1 ranks resume both FSDP2's and HSDP's checkpoints."""
    spawn("fsdp_scenario", 2, tmp_path)
    spawn("four_rank_scenario", 4, tmp_path)
    spawn("resume_scenario", 2, tmp_path)
    spawn("resume_scenario", 1, tmp_path)


def test_sharded_steps_of_bf16_matrices_in_pieces_equal_the_whole(tmp_path):
    spawn("pieces_scenario", 2, tmp_path)


def test_layerwise_mode_is_refused_on_two_ranks(tmp_path):
    spawn("layerwise_scenario", 2, tmp_path)


def benchmark_scenario(rank: int, world: int, directory: Path) -> None:
    """benchmarks/distributed_step_time.py's main() at CPU size, in this process group."""
    path = Path(__file__).parents[1] / "benchmarks" / "distributed_step_time.py"
    spec = importlib.util.spec_from_file_location("distributed_step_time", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(["--smoke", "--out-dir", str(directory)])


def test_benchmark_smoke_runs_on_two_ranks(tmp_path):
    spawn("benchmark_scenario", 2, tmp_path)
    result = json.loads((tmp_path / "distributed_step_time_smoke_ws2.json").read_text())
    assert [row["mode"] for row in result["rows"]] == ["replicated", "sharded", "fsdp2", "hsdp"]
    assert all(row["plain_ms"] > 0 and row["norm_difference"] < 1e-5 for row in result["rows"])
