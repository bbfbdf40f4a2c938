"""Data-parallel, FSDP2 and HSDP training with the library's optimizers: a thin owner layer.

Four ways to run, all giving the single-process result (up to the reduction order of the
gradients' all-reduce):

* **replicated** (DDP, the default): gradients are equal on every rank, and every random
  draw depends only on (seed, parameter index, step) (:func:`~sumo_optim.subspace.refresh_generator`),
  so every rank computes the same update. Nothing to do.
* **owner-sharded** (DDP, :func:`shard_matrices`): each matrix has one owner rank
  (:func:`assign_owners`); only the owner runs the matrix rule and keeps its low-rank state,
  then broadcasts the new weights, as in Muon's distributed variant. Non-matrix parameters
  (AdamW) are updated on every rank.
* **FSDP2** (``torch.distributed.fsdp.fully_shard`` on a 1-D mesh; parameters are ``DTensor``s
  placed ``(Shard(0),)``) and **HSDP** (``fully_shard`` on a 2-D ``("replicate", "shard")``
  mesh; placed ``(Replicate(), Shard(0))``): automatic. The matrices are dealt in batches of
  ``W`` (the shard dimension's size), one per rank (:func:`owner_batches`). Per batch,
  all-to-alls hand each owner the whole gradient and weight of its matrix, gathered from
  everyone's shards; the owner runs the matrix rule on them; another all-to-all returns each
  rank its rows of the new weights. Consecutive batches form groups of about
  :data:`GROUP_ELEMENTS` elements per owner, computed together (equal shapes in one stack);
  the next group's gathers and the last group's returns are in flight while a group is
  computed. Tensors travel in the parameters' dtype (bf16 for bf16 weights, which loses
  nothing). Under HSDP every replica group does the same work with the same result.
  Non-matrix parameters are updated shard by shard, their AdamW states being ``DTensor``s too.

In the owner modes low-rank states live on the owner only (state memory divided by the
world size, or by the shard size under HSDP). Checkpoints (:func:`save_checkpoint`,
:func:`load_checkpoint`) go through ``torch.distributed.checkpoint`` with states keyed by
parameter name, so a run can resume on another world size or mesh: owners are recomputed and
each rank loads the states of the matrices it owns.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .base import SubspaceOptimizer, Work, register_dtensor_sharding
from .dtensors import is_dtensor, local_tensor

__all__ = [
    "GROUP_ELEMENTS",
    "DTensorSharding",
    "MatrixSharding",
    "assign_owners",
    "load_checkpoint",
    "matrix_owners",
    "optimizer_state_dict",
    "owner_batches",
    "save_checkpoint",
    "shard_matrices",
]

# Elements of whole FSDP2/HSDP matrices an owner computes together (at least one batch's). About
# three groups are in flight at once (one computed, the next gathered, the last returned), each
# holding weights and gradients: 6 × 4 B × 2**26 = 1.5 GiB per rank in float32 at most.
GROUP_ELEMENTS = 2**26


# ---------------------------------------------------------------------------------- owners
def owner_batches(sizes: Sequence[int], world_size: int) -> list[list[int | None]]:
    """Items dealt to ranks in rounds: ``batches[k][rank]`` is the item ``rank`` owns in round
    ``k`` (``None``: none).

    Largest first, each round of ``world_size`` dealt in the direction opposite to the last
    (rank 0 up, then down), so the heaviest rank carries at most the mean load plus the largest
    item. Deterministic: every rank computes the same rounds without communicating.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i], i))
    batches: list[list[int | None]] = []
    for start in range(0, len(order), world_size):
        batch: list[int | None] = [None] * world_size
        ranks = range(world_size) if len(batches) % 2 == 0 else range(world_size - 1, -1, -1)
        for item, rank in zip(order[start : start + world_size], ranks):
            batch[rank] = item
        batches.append(batch)
    return batches


def assign_owners(sizes: Sequence[int], world_size: int) -> list[int]:
    """Owner rank of each item, as :func:`owner_batches` deals them."""
    owners = [0] * len(sizes)
    for batch in owner_batches(sizes, world_size):
        for rank, item in enumerate(batch):
            if item is not None:
                owners[item] = rank
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


# ------------------------------------------------------------------------ owner-sharded DDP
@dataclass(frozen=True)
class MatrixSharding:
    """Owner-sharded DDP over ``process_group`` (``None``: the default group): each matrix is
    updated on its owner (:func:`matrix_owners`) and broadcast from there."""

    process_group: Any = None

    def agree_on_finite(self, finite: list[bool], work: Work) -> list[bool]:
        return finite  # DDP's gradients are whole and equal on every rank

    def step(self, optimizer: SubspaceOptimizer, work: Work) -> None:
        owners, rank = self.owners(optimizer)
        group = self._group()
        optimizer._update_parameters([item for item in work if owners.get(item[2], rank) == rank])
        handles = [
            dist.broadcast(p, dist.get_global_rank(group, owners[index]), group=group, async_op=True)
            for p, _, index in work
            if index in owners
        ]
        for handle in handles:
            handle.wait()

    def owners(self, optimizer: SubspaceOptimizer) -> tuple[dict[int, int], int]:
        group = self._group()
        return matrix_owners(optimizer, dist.get_world_size(group)), dist.get_rank(group)

    def _group(self) -> Any:
        return self.process_group if self.process_group is not None else dist.group.WORLD


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


# ----------------------------------------------------------------------------- FSDP2, HSDP
def _shard_dim(tensor: Tensor) -> int:
    """The mesh dimension over which a ``DTensor`` is sharded on its rows (the others replicate)."""
    placements = tuple(tensor.placements)
    shards = [dim for dim, placement in enumerate(placements) if not placement.is_replicate()]
    if len(shards) != 1 or not placements[shards[0]].is_shard(0):
        raise NotImplementedError(
            f"sumo_optim supports DTensors placed (Shard(0),) (FSDP2) or (Replicate(), Shard(0)) (HSDP), "
            f"got {placements}"
        )
    return shards[0]


def _row_counts(rows: int, world_size: int) -> list[int]:
    """Rows of each rank's shard of a ``Shard(0)`` tensor (``torch.chunk``'s split, empty shards last)."""
    per_rank = -(-rows // world_size)
    return [max(0, min(rows, (rank + 1) * per_rank) - rank * per_rank) for rank in range(world_size)]


def _shard_sizes(p: Tensor, world_size: int) -> list[int]:
    """Elements of each rank's shard of ``p``."""
    row = p.numel() // p.shape[0] if p.shape[0] else 0
    return [rows * row for rows in _row_counts(p.shape[0], world_size)]


@dataclass(frozen=True)
class _Layout:
    """Who owns which ``DTensor`` matrix: ``batches[k][rank]`` is a parameter index or ``None``."""

    group: Any  # the shard dimension's process group
    rank: int  # this rank in it
    world_size: int
    batches: list[list[int | None]]


def _layout(optimizer: SubspaceOptimizer) -> _Layout:
    matrices = [
        (index, p)
        for index, (p, group) in enumerate((p, g) for g in optimizer.param_groups for p in g["params"])
        if is_dtensor(p) and optimizer._uses_matrix_rule(p, group)
    ]
    mesh, dim = matrices[0][1].device_mesh, _shard_dim(matrices[0][1])
    for _, p in matrices:
        if p.device_mesh != mesh or _shard_dim(p) != dim:
            raise NotImplementedError("sumo_optim supports DTensor matrices on one device mesh only")
    world_size = mesh.size(dim)
    matrices.sort(key=lambda item: tuple(item[1].shape))  # equal shapes together, within equal sizes
    batches = owner_batches([p.numel() for _, p in matrices], world_size)
    indices = [[None if item is None else matrices[item][0] for item in batch] for batch in batches]
    return _Layout(mesh.get_group(dim), mesh.get_local_rank(dim), world_size, indices)


@dataclass(frozen=True)
class _InFlight:
    """An all-to-all under way; :meth:`wait` gives what arrived."""

    handle: Any
    received: Tensor
    sent: Tensor  # kept alive until the transfer is done

    def wait(self) -> Tensor:
        self.handle.wait()
        return self.received


def _all_to_all(
    pieces: list[Tensor], input_sizes: list[int], output_sizes: list[int], dtype: torch.dtype, device: Any, group: Any
) -> _InFlight:
    """Starts ``dist.all_to_all_single`` of ``pieces`` (flattened and concatenated, as
    ``input_sizes`` splits them: one part per rank, in rank order), asynchronously."""
    if len(pieces) == 1 and pieces[0].dtype == dtype and pieces[0].is_contiguous():
        sent = pieces[0].view(-1)
    elif pieces:
        sent = torch.cat([piece.reshape(-1).to(dtype) for piece in pieces])
    else:
        sent = torch.empty(0, dtype=dtype, device=device)
    received = torch.empty(sum(output_sizes), dtype=dtype, device=device)
    handle = dist.all_to_all_single(received, sent, output_sizes, input_sizes, group=group, async_op=True)
    return _InFlight(handle, received, sent)


class _Transfer:
    """One batch of matrices in flight: gathered onto their owners, then their rows returned."""

    def __init__(self, batch: list[int | None], params: dict[int, Tensor], layout: _Layout) -> None:
        self.batch, self.params, self.layout = batch, params, layout
        self.present = [params[index] for index in batch if index is not None]
        self.dtype = functools.reduce(torch.promote_types, (p.dtype for p in self.present))
        self.device = local_tensor(self.present[0]).device
        self.mine = batch[layout.rank]
        # What this rank sends each owner (its rows of the owner's matrix), and receives back.
        self.local_sizes = [0 if index is None else local_tensor(params[index]).numel() for index in batch]
        self.owned_sizes = [0] * layout.world_size
        if self.mine is not None:
            self.owned_sizes = _shard_sizes(params[self.mine], layout.world_size)
            if self.owned_sizes[layout.rank] != self.local_sizes[layout.rank]:
                raise NotImplementedError(f"unexpected shard of shape {tuple(local_tensor(params[self.mine]).shape)}")

    def gather(self) -> Callable[[], tuple[int, Tensor] | None]:
        """Starts sending each owner this rank's rows of its weights and gradient; the returned
        function waits and gives (index, whole weights with ``.grad``) on an owner, else ``None``."""
        arrived = [
            _all_to_all(
                [local_tensor(t) for t in tensors],
                self.local_sizes,
                self.owned_sizes,
                self.dtype,
                self.device,
                self.layout.group,
            )
            for tensors in (self.present, [p.grad for p in self.present])
        ]

        def result() -> tuple[int, Tensor] | None:
            weights, grad = (transfer.wait() for transfer in arrived)
            if self.mine is None:
                return None
            p = self.params[self.mine]
            whole = weights.view(p.shape).to(p.dtype)
            whole.grad = grad.view(p.shape).to(p.dtype)
            return self.mine, whole

        return result

    def give_back(self, whole: Tensor | None) -> Callable[[], None]:
        """Starts sending each rank its rows of the owner's new weights ``whole``; the returned
        function waits and writes them into this rank's shards."""
        pieces = [] if whole is None else [whole]
        arrived = _all_to_all(pieces, self.owned_sizes, self.local_sizes, self.dtype, self.device, self.layout.group)

        def finish() -> None:
            for index, rows in zip(self.batch, arrived.wait().split(self.local_sizes)):
                if index is not None:
                    local = local_tensor(self.params[index])
                    local.copy_(rows.view(local.shape))

        return finish


class DTensorSharding:
    """FSDP2 and HSDP: each ``DTensor`` matrix is updated whole on its owner within the shard
    dimension, batch by batch through all-to-alls (see the module's docstring)."""

    def agree_on_finite(self, finite: list[bool], work: Work) -> list[bool]:
        """Each rank sees only its shard of a gradient: a gradient is finite only if it is on
        every rank of the shard dimension (one all-reduce; replicas have equal gradients)."""
        dtensors = [p.grad for p, _, _ in work if is_dtensor(p.grad)]
        if not dtensors:
            return finite
        grad = dtensors[0]
        flags = torch.tensor(finite, dtype=torch.int32, device=local_tensor(grad).device)
        dist.all_reduce(flags, op=dist.ReduceOp.MIN, group=grad.device_mesh.get_group(_shard_dim(grad)))
        return [bool(flag) for flag in flags.tolist()]

    def step(self, optimizer: SubspaceOptimizer, work: Work) -> None:
        layout = _layout(optimizer)
        params = {index: p for p, _, index in work}
        owned = {index for batch in layout.batches for index in batch if index is not None}
        batches = [[index if index in params else None for index in batch] for batch in layout.batches]
        transfers = [_Transfer(batch, params, layout) for batch in batches if any(i is not None for i in batch)]
        groups = _groups(transfers)
        gathering = [transfer.gather() for transfer in groups[0]] if groups else []
        # The rest (and any matrix that is not a DTensor) on every rank, while the first group travels.
        optimizer._update_parameters([item for item in work if item[2] not in owned])
        returning: list[Callable[[], None]] = []
        param_groups = {index: group for _, group, index in work}
        for number, current in enumerate(groups):
            following = [transfer.gather() for transfer in groups[number + 1]] if number + 1 < len(groups) else []
            arrived = [gathered() for gathered in gathering]  # (index, whole matrix) on owners, else None
            mine = [(params[index], whole, param_groups[index], index) for index, whole in filter(None, arrived)]
            _update_wholes(optimizer, mine)
            for finish in returning:  # the previous group's rows are back
                finish()
            returning = [
                transfer.give_back(None if item is None else item[1]) for transfer, item in zip(current, arrived)
            ]
            gathering = following
        for finish in returning:
            finish()

    def owners(self, optimizer: SubspaceOptimizer) -> tuple[dict[int, int], int]:
        layout = _layout(optimizer)
        owners = {index: rank for batch in layout.batches for rank, index in enumerate(batch) if index is not None}
        return owners, layout.rank


register_dtensor_sharding(DTensorSharding())


def _groups(transfers: list[_Transfer]) -> list[list[_Transfer]]:
    """Consecutive batches, each group's largest matrices adding up to about :data:`GROUP_ELEMENTS`."""
    groups: list[list[_Transfer]] = []
    size = 0
    for transfer in transfers:
        largest = max(p.numel() for p in transfer.present)
        if not groups or size + largest > GROUP_ELEMENTS:
            groups.append([])
            size = 0
        groups[-1].append(transfer)
        size += largest
    return groups


def _update_wholes(optimizer: SubspaceOptimizer, wholes: list[tuple[Tensor, Tensor, dict[str, Any], int]]) -> None:
    """Runs the algorithm's own ``_update_parameters`` on the gathered matrices (parameter, whole
    matrix, group, index), with each parameter's state moved onto its whole matrix for the call."""
    if not wholes:
        return
    for p, whole, _, _ in wholes:
        optimizer.state[whole] = optimizer.state.pop(p, {})
    try:
        optimizer._update_parameters([(whole, group, index) for _, whole, group, index in wholes])
    finally:
        for p, whole, _, _ in wholes:
            optimizer.state[p] = optimizer.state.pop(whole)
            whole.grad = None


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
