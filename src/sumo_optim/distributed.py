"""Data-parallel and FSDP2 training with the library's optimizers: a thin owner layer.

Three ways to run, all giving the single-process result (up to the reduction order of the
gradients' all-reduce):

* **replicated** (DDP, the default): gradients are equal on every rank, and every random
  draw depends only on (seed, parameter index, step) (:func:`~sumo_optim.subspace.refresh_generator`),
  so every rank computes the same update. Nothing to do.
* **owner-sharded** (DDP, :func:`shard_matrices`): each matrix has one owner rank
  (:func:`assign_owners`, balanced by size); only the owner runs the matrix rule and keeps
  its low-rank state, then broadcasts the new weights, as in Muon's distributed variant.
  Non-matrix parameters (AdamW) are updated on every rank.
* **FSDP2** (``torch.distributed.fsdp.fully_shard``; parameters are ``DTensor``s sharded on
  dim 0): automatic. The owner of a matrix gathers the whole gradient and weight
  (``dist.gather`` of the shards), runs the matrix rule on them, and scatters the new weight
  back (``dist.scatter``), all asynchronous. Non-matrix parameters are updated shard by
  shard, their AdamW states being ``DTensor``s too.

In both owner modes low-rank states live on the owner only (state memory divided by the
world size). Checkpoints (:func:`save_checkpoint`, :func:`load_checkpoint`) go through
``torch.distributed.checkpoint`` with states keyed by parameter name, so a run can resume on
another world size: owners are recomputed and each loads the states of the matrices it owns.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .base import SubspaceOptimizer, Work, register_dtensor_sharding
from .dtensors import is_dtensor, local_tensor

__all__ = [
    "MatrixSharding",
    "assign_owners",
    "load_checkpoint",
    "matrix_owners",
    "optimizer_state_dict",
    "save_checkpoint",
    "shard_matrices",
]


@dataclass(frozen=True)
class MatrixSharding:
    """Owner-sharded mode over ``process_group`` (``None``: the default group)."""

    process_group: Any = None

    def agree_on_finite(self, finite: list[bool], work: Work) -> list[bool]:
        return finite  # DDP's gradients are whole and equal on every rank

    def step(self, optimizer: SubspaceOptimizer, work: Work) -> None:
        owner_step(optimizer, work, self._group())

    def owners(self, optimizer: SubspaceOptimizer) -> tuple[dict[int, int], int]:
        group = self._group()
        return matrix_owners(optimizer, dist.get_world_size(group)), dist.get_rank(group)

    def _group(self) -> Any:
        return self.process_group if self.process_group is not None else dist.group.WORLD


class DTensorSharding:
    """FSDP2: each matrix's owner gathers it, updates it and scatters it back."""

    def agree_on_finite(self, finite: list[bool], work: Work) -> list[bool]:
        return agree_on_finite(finite, work)

    def step(self, optimizer: SubspaceOptimizer, work: Work) -> None:
        owner_step(optimizer, work, _owner_group(optimizer))

    def owners(self, optimizer: SubspaceOptimizer) -> tuple[dict[int, int], int]:
        group = _owner_group(optimizer)
        return matrix_owners(optimizer, dist.get_world_size(group)), dist.get_rank(group)


register_dtensor_sharding(DTensorSharding())


def shard_matrices(optimizer: SubspaceOptimizer, process_group: Any = None) -> SubspaceOptimizer:
    """Switches ``optimizer`` (on every rank) to owner-sharded mode; returns it.

    Each matrix is then updated by its owner only and broadcast; its state lives on the
    owner. Call it before the first step, on a model whose gradients are averaged (DDP).
    ``optimizer.state_dict()`` then holds this rank's states only: checkpoint with
    :func:`save_checkpoint`.
    """
    if optimizer.layerwise:
        raise ValueError("owner-sharded mode does not support layerwise=True")
    optimizer.sharding = MatrixSharding(process_group)
    return optimizer


def assign_owners(sizes: Sequence[int], world_size: int) -> list[int]:
    """Owner rank of each item: largest first, each to the least-loaded rank (ties: lowest rank).

    Deterministic, so every rank computes the same assignment without communicating; the
    heaviest rank carries at most the mean load plus the largest item.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    owners = [0] * len(sizes)
    loads = [(0, rank) for rank in range(world_size)]
    for item in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        load, rank = heapq.heappop(loads)
        owners[item] = rank
        heapq.heappush(loads, (load + sizes[item], rank))
    return owners


def matrix_owners(optimizer: SubspaceOptimizer, world_size: int) -> dict[int, int]:
    """Parameter index (over all groups) → owner rank, for every parameter the matrix rule updates."""
    matrices = [
        (index, p.numel())
        for index, (p, group) in enumerate((p, g) for g in optimizer.param_groups for p in g["params"])
        if optimizer._uses_matrix_rule(p, group)
    ]
    owners = assign_owners([size for _, size in matrices], world_size)
    return {index: owner for (index, _), owner in zip(matrices, owners)}


def _owner_group(optimizer: SubspaceOptimizer) -> Any:
    """The process group over which FSDP2 matrices are owned."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if is_dtensor(p) and optimizer._uses_matrix_rule(p, group):
                if p.device_mesh.ndim != 1:
                    raise NotImplementedError("sumo_optim supports FSDP2 on a 1-D device mesh only")
                return p.device_mesh.get_group()
    raise ValueError("no DTensor matrix")


def agree_on_finite(finite: list[bool], work: Work) -> list[bool]:
    """Under FSDP2 each rank sees only its shard of a gradient: a gradient is finite only if
    it is on every rank (one all-reduce). Plain gradients are left as they are."""
    dtensors = [p.grad for p, _, _ in work if is_dtensor(p.grad)]
    if not dtensors:
        return finite
    flags = torch.tensor(finite, dtype=torch.int32, device=local_tensor(dtensors[0]).device)
    dist.all_reduce(flags, op=dist.ReduceOp.MIN, group=dtensors[0].device_mesh.get_group())
    return [bool(flag) for flag in flags.tolist()]


# Elements of whole FSDP2 matrices in flight at once: bounds the gathered weights and gradients
# an owner holds (2 × 4 B × 2**27 = 1 GiB in float32) instead of gathering every matrix at once.
BUCKET_ELEMENTS = 2**27


def owner_step(optimizer: SubspaceOptimizer, work: Work, process_group: Any) -> None:
    """One step in owner mode: the rest on every rank, then the matrices bucket by bucket, each on
    its owner, with the new weights sent from the owners to every rank."""
    owners = matrix_owners(optimizer, dist.get_world_size(process_group))
    optimizer._update_parameters([item for item in work if item[2] not in owners])
    bucket, size = [], 0
    for p, group, index in work:
        if index not in owners:
            continue
        if bucket and size + p.numel() > BUCKET_ELEMENTS:
            _owner_step_bucket(optimizer, bucket, process_group)
            bucket, size = [], 0
        bucket.append((p, group, index, owners[index]))
        size += p.numel() if is_dtensor(p) else 0  # DDP's matrices are whole already: one bucket
    if bucket:
        _owner_step_bucket(optimizer, bucket, process_group)


def _owner_step_bucket(
    optimizer: SubspaceOptimizer, matrices: list[tuple[Tensor, dict[str, Any], int, int]], process_group: Any
) -> None:
    """Gather (FSDP2) or take (DDP) each matrix on its owner, update it there, send it back."""
    rank = dist.get_rank(process_group)
    # The owner's stand-in for a parameter: the parameter itself, or the whole gathered DTensor.
    stand_ins: dict[int, Tensor] = {}
    gathered = []
    for p, _, index, owner in matrices:
        if is_dtensor(p):
            gathered.append((index, _gather_rows(p, owner, process_group), _gather_rows(p.grad, owner, process_group)))
        elif owner == rank:
            stand_ins[index] = p
    for index, weights, grad in gathered:  # every rank waits; only the owner receives
        whole_weights, whole_grad = weights(), grad()
        if whole_weights is not None:
            whole_weights.grad = whole_grad
            stand_ins[index] = whole_weights
    owned = [(stand_ins[index], group, index) for _, group, index, _ in matrices if index in stand_ins]
    _with_states_moved(optimizer, {index: p for p, _, index, _ in matrices if index in stand_ins}, stand_ins, owned)
    finish = []
    for p, _, index, owner in matrices:
        if is_dtensor(p):
            finish.append(_scatter_rows(stand_ins.get(index), p, owner, process_group))
        else:
            handle = dist.broadcast(p, dist.get_global_rank(process_group, owner), group=process_group, async_op=True)
            finish.append(handle.wait)
    for done in finish:
        done()


def _rows_per_rank(tensor: Tensor, world_size: int) -> int:
    """Rows of each rank's (padded) shard of a ``Shard(0)`` DTensor: ``ceil(m / world_size)``."""
    placements = tuple(tensor.placements)
    if len(placements) != 1 or not placements[0].is_shard(0):
        raise NotImplementedError(f"sumo_optim supports FSDP2 matrices sharded as (Shard(0),), got {placements}")
    return -(-tensor.shape[0] // world_size)


def _padded_rows(tensor: Tensor, rows: int) -> Tensor:
    """``tensor`` with zero rows appended up to ``rows`` (itself, contiguous, when it has them)."""
    if tensor.shape[0] == rows:
        return tensor.contiguous()
    padded = tensor.new_zeros((rows, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    return padded


def _gather_rows(tensor: Tensor, owner: int, process_group: Any) -> Callable[[], Tensor | None]:
    """Starts gathering a ``Shard(0)`` DTensor's shards on ``owner``; the returned function
    waits and gives the whole tensor there (``None`` elsewhere)."""
    world_size = dist.get_world_size(process_group)
    rows = _rows_per_rank(tensor, world_size)
    local = _padded_rows(tensor.to_local(), rows)
    pieces = [torch.empty_like(local) for _ in range(world_size)] if dist.get_rank(process_group) == owner else None
    handle = dist.gather(local, pieces, dist.get_global_rank(process_group, owner), group=process_group, async_op=True)

    def result() -> Tensor | None:
        handle.wait()
        return None if pieces is None else torch.cat(pieces)[: tensor.shape[0]]

    return result


def _scatter_rows(full: Tensor | None, p: Tensor, owner: int, process_group: Any) -> Callable[[], None]:
    """Starts sending each rank its rows of ``full`` (given on ``owner``) into ``p``'s local shard;
    the returned function waits and copies."""
    world_size = dist.get_world_size(process_group)
    rows = _rows_per_rank(p, world_size)
    local = p.to_local()
    received = torch.empty((rows, *local.shape[1:]), dtype=local.dtype, device=local.device)
    pieces = None if full is None else list(_padded_rows(full, rows * world_size).split(rows))
    handle = dist.scatter(
        received, pieces, dist.get_global_rank(process_group, owner), group=process_group, async_op=True
    )

    def finish() -> None:
        handle.wait()
        local.copy_(received[: local.shape[0]])

    return finish


def _with_states_moved(
    optimizer: SubspaceOptimizer, params: dict[int, Tensor], stand_ins: dict[int, Tensor], owned: Work
) -> None:
    """Runs the algorithm's own ``_update_parameters`` on the stand-ins, with the parameters'
    states moved onto them for the call."""
    moved = [(params[index], stand_in) for index, stand_in in stand_ins.items() if stand_in is not params[index]]
    for p, stand_in in moved:
        optimizer.state[stand_in] = optimizer.state.pop(p, {})
    try:
        optimizer._update_parameters(owned)
    finally:
        for p, stand_in in moved:
            optimizer.state[p] = optimizer.state.pop(stand_in)
            stand_in.grad = None


# ----------------------------------------------------------------------------- checkpoints
def _parameter_names(model: nn.Module) -> dict[Tensor, str]:
    """Each parameter's name as ``get_model_state_dict`` spells it (without DDP's ``module.``)."""
    names = {}
    for name, p in model.named_parameters():
        parts = [part for part in name.split(".") if part not in ("module", "_orig_mod")]
        names[p] = ".".join(parts)
    return names


def _owned_indices(optimizer: SubspaceOptimizer) -> tuple[dict[int, int], int]:
    sharding = optimizer._step_sharding()
    return ({}, 0) if sharding is None else sharding.owners(optimizer)


def optimizer_state_dict(model: nn.Module, optimizer: SubspaceOptimizer) -> dict[str, Any]:
    """This rank's part of the optimizer state, flat and keyed by parameter name, for DCP:
    ``optimizer.state.<name>.<state>`` and ``optimizer.param_groups`` (hyperparameters).

    Matrix states appear on their owner only (whole tensors); states of parameters updated on
    every rank are plain tensors (DDP) or ``DTensor`` shards (FSDP2).
    """
    names = _parameter_names(model)
    owners, rank = _owned_indices(optimizer)
    flat: dict[str, Any] = {}
    groups = []
    index = 0
    for group in optimizer.param_groups:
        groups.append({key: value for key, value in group.items() if key != "params"})
        for p in group["params"]:
            if owners.get(index, rank) == rank:
                for key, value in optimizer.state.get(p, {}).items():
                    flat[f"optimizer.state.{names[p]}.{key}"] = value
            index += 1
    flat["optimizer.param_groups"] = groups
    return flat


def save_checkpoint(checkpoint_id: str, model: nn.Module, optimizer: SubspaceOptimizer) -> None:
    """Saves model and optimizer into the directory ``checkpoint_id`` with
    ``torch.distributed.checkpoint`` (call on every rank)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = {f"model.{key}": value for key, value in get_model_state_dict(model).items()}
    state.update(optimizer_state_dict(model, optimizer))
    dcp.save(state, checkpoint_id=checkpoint_id)


def load_checkpoint(checkpoint_id: str, model: nn.Module, optimizer: SubspaceOptimizer) -> None:
    """Loads what :func:`save_checkpoint` wrote, on this or another world size (every rank).

    Owners are recomputed for the current world size; each rank reads the states of its own
    matrices and its shard of the rest.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
    from torch.distributed.tensor import empty as dtensor_empty

    saved = dcp.FileSystemReader(checkpoint_id).read_metadata().state_dict_metadata
    model_state = get_model_state_dict(model)
    state: dict[str, Any] = {f"model.{key}": value for key, value in model_state.items()}
    # Filled in place by DCP (which stores each hyperparameter as its own entry).
    state["optimizer.param_groups"] = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    names = _parameter_names(model)
    owners, rank = _owned_indices(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    wanted: dict[str, tuple[Tensor, str]] = {}
    for index, p in enumerate(params):
        if owners.get(index, rank) != rank:
            continue
        prefix = f"optimizer.state.{names[p]}."
        for key, meta in saved.items():
            if not key.startswith(prefix) or "." in key[len(prefix) :]:
                continue
            wanted[key] = (p, key[len(prefix) :])
            if isinstance(meta, BytesStorageMetadata):
                state[key] = None
            elif is_dtensor(p) and index not in owners and tuple(meta.size) == tuple(p.shape):
                state[key] = dtensor_empty(
                    meta.size, dtype=meta.properties.dtype, device_mesh=p.device_mesh, placements=p.placements
                )
            else:
                state[key] = torch.empty(meta.size, dtype=meta.properties.dtype, device=local_tensor(p).device)
    dcp.load(state, checkpoint_id=checkpoint_id)
    set_model_state_dict(model, {key: state[f"model.{key}"] for key in model_state})
    saved_groups = state["optimizer.param_groups"]
    for group, saved_group in zip(optimizer.param_groups, saved_groups):
        group.update(saved_group)
    optimizer.state.clear()
    for key, (p, name) in wanted.items():
        optimizer.state[p][name] = state[key]
    groups = [g for g in optimizer.param_groups for _ in g["params"]]
    for index, p in enumerate(params):
        if p in optimizer.state:
            optimizer._check_loaded_state(index, p, groups[index], optimizer.state[p])
