"""What every optimizer of the library shares: routing, AdamW, checks, state handling.

Each parameter is sent either to the algorithm's matrix rule (2-D weights, and weights of
more dimensions viewed as ``(shape[0], -1)``, in a group with ``subspace=True``) or to
AdamW (everything else: biases, norms, and whole groups with ``subspace=False``, which is
how embeddings and the output head are usually trained). Subclasses write the matrix rule
only; they never see sparse, complex or non-finite gradients.

Numerics: states and the update are kept in ``float32`` for low-precision parameters
(bf16/fp16) and in the parameter's dtype otherwise; the new weights are rounded to the
parameter's dtype once per step: to nearest, or, for bf16 parameters of a group with
``bf16_stochastic_rounding=True``, stochastically (:mod:`sumo_optim.rounding`). With
``adamw_state_bits=8``, AdamW's two moments are stored block-wise quantized to 8 bits
(:mod:`sumo_optim.quantization`; see :meth:`SubspaceOptimizer._store_vector_moments`).
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Callable, Hashable, Iterable
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from . import linalg
from .cuda_graph import GraphedCall, tensor_key
from .dtensors import is_dtensor, local_tensor
from .quantization import BLOCK_SIZE, dequantize_blockwise, quantize_blockwise
from .rounding import stochastic_round_to_bf16
from .stacks import Matrix, project_, project_checked
from .subspace import choose_side, refresh_generator

__all__ = ["NONFINITE_POLICIES", "StepSharding", "SubspaceOptimizer", "adamw_update", "register_dtensor_sharding"]

NONFINITE_POLICIES = ("raise", "skip")
ADAMW_STATE_BITS = (32, 8)
ROUNDING_STREAM = 1  # :func:`~sumo_optim.subspace.refresh_generator`'s stream for stochastic rounding
LAYERWISE_REFRESH = ("sum", "first")
# Elements of one chunk of an elementwise (AdamW) step of a large parameter: a multiple of the
# 8-bit block, 64 MiB of float32 (:meth:`SubspaceOptimizer._update_vector_in_chunks`).
VECTOR_CHUNK = 2**24
# Default bytes of float32 working copies (weights and gradient of bf16/fp16 matrices) that one
# step holds at once when it steps matrices together (``matrix_piece_bytes``): the matrices go
# through in pieces of about this size (:meth:`SubspaceOptimizer._pieces`), not all at once (4×
# their bf16 bytes: 50 GiB at LLaMA-7B).
MATRIX_PIECE_BYTES = 2**30

# (parameter, its group, its index over all groups), for each parameter a step updates.
Work = list[tuple[Tensor, dict[str, Any], int]]


class StepSharding(Protocol):
    """How a step's matrices are split over ranks (:mod:`sumo_optim.distributed` implements it).

    The optimizer calls it once gradients are checked; it updates the parameters through the
    optimizer's own :meth:`SubspaceOptimizer._update_parameters`.
    """

    def agree_on_finite(self, finite: list[bool], work: Work) -> list[bool]:
        """The finiteness flags of ``work``'s gradients, agreed over ranks (each may see a shard)."""

    def step(self, optimizer: SubspaceOptimizer, work: Work) -> None:
        """Updates every parameter of ``work`` (gradients checked and finite)."""

    def owners(self, optimizer: SubspaceOptimizer) -> tuple[dict[int, int], int]:
        """(parameter index → owner rank, for the matrices that have one; this rank)."""


_dtensor_sharding: StepSharding | None = None


def register_dtensor_sharding(sharding: StepSharding) -> None:
    """Sets the sharding used when matrices are ``DTensor``s (FSDP2, HSDP); :mod:`sumo_optim.distributed`
    registers its own on import."""
    global _dtensor_sharding
    _dtensor_sharding = sharding


def adamw_update(
    weights: Tensor,
    grad: Tensor,
    state: dict[str, Any],
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
) -> None:
    """One AdamW step in place, exactly as ``torch.optim.AdamW`` (Loshchilov & Hutter, Alg. 2).

    ``state["step"]`` must already count this step.
    """
    if "exp_avg" not in state:
        state["exp_avg"] = torch.zeros_like(weights)
        state["exp_avg_sq"] = torch.zeros_like(weights)
    beta1, beta2 = betas
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    weights.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1 ** state["step"]
    bias_correction2 = 1 - beta2 ** state["step"]
    denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(eps)
    weights.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


class SubspaceOptimizer(Optimizer):
    """Base class: a low-rank rule for matrices, AdamW for the rest, in one optimizer.

    Subclasses define :meth:`_matrix_step` (and may extend :meth:`_validate_group` and
    :meth:`_expected_state_shapes`), or, with ``steps_matrices_together = True``,
    :meth:`_step_matrices`, which then gets the matrices of a step together (to work on stacks
    of equal shapes): all of them, or, for bf16/fp16 matrices (float32 working copies), pieces of
    about ``matrix_piece_bytes`` of copies (:meth:`_pieces`; default :data:`MATRIX_PIECE_BYTES`,
    ``None``: all at once). Every group carries ``lr``,
    ``weight_decay``, ``subspace``, ``adamw_betas``, ``adamw_eps``, ``nonfinite``, ``seed``,
    ``bf16_stochastic_rounding`` and ``adamw_state_bits``.

    With ``cuda_graph=True``, such a subclass can run the part of its step that only queues
    kernels through :meth:`_graphed`: on CUDA it is captured as one CUDA graph
    (:mod:`sumo_optim.cuda_graph`) once gradients and states have stayed at the same addresses
    for two steps (as they do in a training loop), replayed while they stay, and re-captured
    when they move (a new checkpoint, other gradients). States must then be updated in place.

    With ``layerwise=True`` (:meth:`_register_layerwise_hooks`), each parameter is updated in a
    hook of its own as soon as its gradient exists. The hooks do not keep the optimizer alive;
    :meth:`remove_hooks` takes them off the parameters (after which backward updates nothing).
    Layer-wise mode is single-process only: it raises ``RuntimeError`` under
    ``torch.distributed`` with more than one rank (it would update on each rank's local
    gradient, before DDP's all-reduce). With ``layerwise_accumulation_steps=N > 1`` the hooks
    accumulate N backward passes per update (:meth:`_layerwise_update`); ``step()`` must then
    be called once after every N of them.
    """

    steps_matrices_together = False
    # Whether the matrix rule can take its new basis from a layer-wise accumulation's first
    # micro-batch and read only projections after it (``layerwise_refresh="first"``).
    refreshes_from_first_micro_batch = False
    # Whether the vector rule is elementwise, so a large parameter can be stepped in chunks.
    vector_step_is_elementwise = True
    # Group entries that the graphed part of a step reads (a change means a new capture).
    graph_hyperparameters: tuple[str, ...] = ()

    def __init__(
        self,
        params: Any,
        defaults: dict[str, Any],
        layerwise: bool = False,
        cuda_graph: bool = False,
        layerwise_accumulation_steps: int = 1,
        layerwise_refresh: str = "sum",
        matrix_piece_bytes: int | None = MATRIX_PIECE_BYTES,
    ) -> None:
        if matrix_piece_bytes is not None and not _is_positive_int(matrix_piece_bytes):
            raise ValueError(
                f"matrix_piece_bytes must be an int >= 1 or None (all at once), got {matrix_piece_bytes!r}"
            )
        self.matrix_piece_bytes = matrix_piece_bytes
        steps = layerwise_accumulation_steps
        if not _is_positive_int(steps):
            raise ValueError(f"layerwise_accumulation_steps must be an int >= 1, got {steps!r}")
        if steps > 1 and not layerwise:
            raise ValueError(
                f"layerwise_accumulation_steps={steps} needs layerwise=True; without it, gradients "
                "accumulate in .grad over backward passes and one step() uses them all"
            )
        if layerwise_refresh not in LAYERWISE_REFRESH:
            raise ValueError(f"layerwise_refresh must be one of {LAYERWISE_REFRESH}, got {layerwise_refresh!r}")
        if layerwise_refresh == "first" and not layerwise:
            raise ValueError("layerwise_refresh='first' needs layerwise=True (it says what a layer-wise refresh reads)")
        if layerwise_refresh == "first" and not self.refreshes_from_first_micro_batch:
            raise ValueError(
                f"{type(self).__name__} has no layerwise_refresh='first': its step reads the whole gradient, "
                "not only its projection"
            )
        # Layer-wise accumulation, per parameter index: micro-batches accumulated so far in this
        # step, Σ project(G_i) for matrices that accumulate projections, updates since step(), and
        # the matrices whose basis for the coming update is already refreshed (``"first"``).
        self.layerwise_accumulation_steps = steps
        self.layerwise_refresh = layerwise_refresh
        self._refreshed_early: set[int] = set()
        self._micro_batches: dict[int, int] = {}
        self._projected_sums: dict[int, Tensor] = {}
        self._updates_since_step: dict[int, int] = {}
        if layerwise and cuda_graph:
            raise ValueError("cuda_graph=True replays a whole step's matrices; it does not combine with layerwise=True")
        if layerwise:
            _refuse_layerwise_under_data_parallel()
        defaults = {
            "subspace": True,
            "nonfinite": "raise",
            "seed": 0,
            "bf16_stochastic_rounding": False,
            "adamw_state_bits": 32,
            **defaults,
        }
        super().__init__(params, defaults)
        self.layerwise = layerwise
        self.cuda_graph = GraphedCall() if cuda_graph else None
        self.projection_graph = GraphedCall() if cuda_graph else None  # :meth:`_project`'s own
        # Owner-sharded mode under DDP (see :func:`sumo_optim.distributed.shard_matrices`).
        self.sharding: StepSharding | None = None
        self._layerwise_handles: list[RemovableHandle] = []
        if layerwise:
            self._register_layerwise_hooks()

    def _register_layerwise_hooks(self) -> None:
        """Layer-wise mode (GaLore, §4.3): each parameter is updated in a post-accumulate-grad hook
        as soon as its gradient is ready, and the gradient is freed at once, so at most a few
        gradients exist at any time. ``step()`` then only runs the closure (and, with
        ``layerwise_accumulation_steps > 1``, checks that every accumulation is complete).

        The hooks hold the optimizer by weak reference (a parameter never keeps its optimizer
        alive) and look up their group when they fire (so ``load_state_dict``'s new groups count).
        """
        optimizer = weakref.ref(self)
        index = 0
        for number, group in enumerate(self.param_groups):
            for p in group["params"]:
                if p.requires_grad:
                    hook = functools.partial(_layerwise_hook, optimizer, number, index)
                    self._layerwise_handles.append(p.register_post_accumulate_grad_hook(hook))
                index += 1

    def remove_hooks(self) -> None:
        """Removes layer-wise mode's gradient hooks (idempotent; nothing to do otherwise): backward
        then no longer updates any weight, and ``step()`` still does nothing."""
        for handle in self._layerwise_handles:
            handle.remove()
        self._layerwise_handles.clear()
        self._micro_batches.clear()  # an unfinished accumulation is dropped with the hooks
        self._projected_sums.clear()

    def _layerwise_update(self, p: Tensor, group: dict[str, Any], index: int) -> None:
        """The hook's work for one backward pass: with ``layerwise_accumulation_steps = N``, the
        update comes at the N-th pass over ``p`` and uses the sum of the N gradients.

        A matrix whose next step reads the gradient only through ``R = project(G)`` (a basis
        exists and the step does not refresh it: :meth:`_reads_only_projection`) keeps ``Σ R_i``
        (r×n or m×r, in the state dtype) and frees each ``G_i`` at once. Every other parameter
        (AdamW's, a matrix on its first or a refresh step, a rule that reads ``G`` itself:
        MoFaSGD, GaLoreAdafactor, SUMO with ``complement_scale > 0``)
        keeps its gradient in ``.grad``, where backward sums the N of them, as without
        layer-wise mode; its update, the refresh included, is then the one of the summed
        gradient, and the gradient is freed right after it.
        """
        if is_dtensor(p) and self._uses_matrix_rule(p, group):
            raise NotImplementedError("layerwise=True does not support FSDP2 (sharded) matrices")
        with torch.no_grad():
            work = [(p, group, index)]
            if self.layerwise_accumulation_steps > 1:
                self._check_gradients(work)
                count = self._micro_batches.pop(index, 0) + 1
                if count == 1 and self._uses_matrix_rule(p, group):
                    if (
                        not self._reads_only_projection(p, group)
                        and self._refreshes_early(p, group)
                        and self._finite_gradients(work)[0]  # else kept whole: its step is skipped
                    ):
                        self._refresh_from_first_micro_batch(p, group, index)
                    if index in self._refreshed_early or self._reads_only_projection(p, group):
                        self._projected_sums[index] = self._add_projection(p, group, None)
                elif index in self._projected_sums:
                    self._add_projection(p, group, self._projected_sums[index])
                if index in self._projected_sums:
                    p.grad = None
                if count < self.layerwise_accumulation_steps:
                    self._micro_batches[index] = count
                    return
                self._updates_since_step[index] = self._updates_since_step.get(index, 0) + 1
                projected = self._projected_sums.pop(index, None)
                if projected is not None:
                    self._update_from_projection(p, group, index, projected)
                    return
            if self._finite_gradients(work)[0]:
                self._update_parameter(p, group, index)
            else:
                self.state[p]["skipped_steps"] = self.state[p].get("skipped_steps", 0) + 1
        p.grad = None

    def _refreshes_early(self, p: Tensor, group: dict[str, Any]) -> bool:
        """Whether matrix ``p``'s coming refresh is taken from the first micro-batch
        (``layerwise_refresh="first"``; subclasses say which matrices can)."""
        return self.layerwise_refresh == "first"

    def _refresh_from_first_micro_batch(self, p: Tensor, group: dict[str, Any], index: int) -> None:
        """With ``layerwise_refresh="first"``: the refresh (or first step) of matrix ``p`` made
        now, from the first micro-batch's gradient ``G_1``, by the rule's own refresh
        (:meth:`_refresh_basis`), as it would run at the update (same step count, so the same
        random draws). The update then reads only ``Σ project(G_i)`` in the new basis and skips
        its refresh; no full gradient outlives its micro-batch. A bf16/fp16 gradient stays as it
        is where the rule's refresh converts it a block at a time (:meth:`_refreshes_in_blocks`),
        else it is copied to float32 whole."""
        raw = p.grad.reshape(p.shape[0], -1)
        in_blocks = raw.dtype in (torch.bfloat16, torch.float16) and self._refreshes_in_blocks(group)
        if in_blocks:  # a float32 stand-in with the gradient's shape and device, no data
            grad = torch.empty((), dtype=torch.float32, device=raw.device).expand(raw.shape)
        else:
            grad = self._working_copy(raw)
        state = self._count_step(p, group, index)  # the refresh belongs to the coming update
        try:
            stand_in = torch.empty(grad.shape, dtype=grad.dtype, device="meta")
            item = Matrix(stand_in, grad, state, group, self._side(grad.shape, group))
            item.source = raw if in_blocks else None
            self._refresh_basis(item)
        finally:
            state["step"] -= 1
        self._refreshed_early.add(index)

    def _refreshes_in_blocks(self, group: dict[str, Any]) -> bool:
        """Whether the group's refresh reads a bf16/fp16 gradient from ``Matrix.source``,
        converting it a block at a time (no subclass does by default)."""
        return False

    def _refresh_basis(self, item: Matrix) -> None:
        """The rule's refresh of one matrix whose step is counted (its state created if new)."""
        raise NotImplementedError

    def _reads_only_projection(self, p: Tensor, group: dict[str, Any]) -> bool:
        """Whether the next step of matrix ``p`` reads its gradient only through :meth:`_project`
        (then layer-wise accumulation keeps ``Σ project(G_i)``); :meth:`_checks_projection` by
        default."""
        return self._checks_projection(p, group)

    def _add_projection(self, p: Tensor, group: dict[str, Any], total: Tensor | None) -> Tensor:
        """``total ← total + project(G)`` in place for matrix ``p`` (a new tensor when ``total``
        is None), with ``G`` its gradient as the step's working copy would be (2-D, ≥ float32)
        and the basis in its dtype (a copy where it is stored in another).

        A bf16/fp16 gradient is converted to float32 a block of ``linalg.CONVERT_VALUES`` values
        at a time (whole columns of ``G`` for a left basis, whole rows for a right one): each
        entry of ``project(G)`` reads one column or row of ``G``, so the result is the product
        of the whole float32 copy, without that copy (172 MiB for a LLaMA-7B MLP matrix)."""
        raw = p.grad.reshape(p.shape[0], -1)
        m, n = raw.shape
        working = torch.promote_types(raw.dtype, torch.float32)
        state = self.state[p]
        if "basis" in state and state["basis"].dtype != working:
            state = {"basis": state["basis"].to(working)}
        side, beta = self._side((m, n), group), 0.0 if total is None else 1.0
        if total is None:
            rank = state["basis"].shape[1] if side != "full" else None
            total = raw.new_empty({"left": (rank, n), "right": (m, rank), "full": (m, n)}[side], dtype=working)
        everything = slice(None)
        if raw.dtype == working:
            blocks = [(everything, everything)]
        elif side == "left":  # R = Qᵀ G: column blocks of G give column blocks of R
            blocks = [(everything, columns) for columns in linalg.convert_blocks(n, m)]
        else:  # R = G Q (or G): row blocks
            blocks = [(rows, everything) for rows in linalg.convert_blocks(m, n)]
        for rows, columns in blocks:
            grad = self._working_copy(raw[rows, columns])
            item = Matrix(p, grad, state, group, side)
            out = total[:, columns] if side == "left" else total[rows]
            project_([out], [item], beta)
        return total

    def _update_from_projection(self, p: Tensor, group: dict[str, Any], index: int, projected: Tensor) -> None:
        """The step of matrix ``p`` from its accumulated projected gradient ``Σ project(G_i)``,
        checked for NaN/Inf like a projection in :meth:`step`. The rule never reads the full
        gradient on such a step; the :class:`Matrix` gets a shape-only (meta) stand-in for it.
        For bf16/fp16 weights it gets a shape-only stand-in for the weights too: its
        back-projection is deferred and applied by :meth:`_back_project_in_blocks`."""
        work = [(p, group, index)]
        flags = torch.linalg.vector_norm(projected, float("inf")).isfinite().reshape(1)
        if not self._finite_flags(work, [([0], flags)])[0]:
            self.state[p]["skipped_steps"] = self.state[p].get("skipped_steps", 0) + 1
            return
        shape = (p.shape[0], math.prod(p.shape[1:]))
        stand_in = torch.empty(shape, dtype=projected.dtype, device="meta")
        state = self._count_step(p, group, index)
        in_blocks = p.dtype in (torch.bfloat16, torch.float16) and p.is_contiguous()
        if in_blocks:  # no float32 copy of the weights: the rule's back-projection is deferred
            weights = torch.empty((), dtype=projected.dtype, device=p.device).expand(shape)
        else:
            weights = self._working_copy(p)
        item = Matrix(weights.view(shape), stand_in, state, group, self._side(shape, group))
        item.projected = projected
        item.basis_ready = index in self._refreshed_early
        item.deferred = [] if in_blocks else None
        self._step_matrices([item])
        if in_blocks:
            self._back_project_in_blocks(p, item.deferred, group)
        else:
            self._end_update(p, weights, group)

    def _back_project_in_blocks(
        self, p: Tensor, deferred: list[tuple[Tensor | None, str, Tensor, float, float]], group: dict[str, Any]
    ) -> None:
        """``W ← β W + α project_back(D)`` for each deferred ``(Q, side, D, β, α)`` in turn, on a
        bf16/fp16 parameter a block of rows at a time (float32 work of ``linalg.CONVERT_VALUES``
        values: row ``i`` of ``Q D`` or ``D Qᵀ`` reads row ``i`` of ``Q`` or ``D``), each block
        rounded back as :meth:`_end_update` rounds the whole matrix."""
        flat = p.view(p.shape[0], -1)
        generator = None
        if group["bf16_stochastic_rounding"] and p.dtype == torch.bfloat16:
            state = self.state[p]
            generator = refresh_generator(state["seed"], state["step"], p.device, stream=ROUNDING_STREAM)
        for rows in linalg.convert_blocks(*flat.shape):
            block = flat[rows].float()
            for basis, side, direction, beta, alpha in deferred:
                if side == "left":  # Q D
                    block.addmm_(basis[rows], direction, beta=beta, alpha=alpha)
                elif side == "right":  # D Qᵀ
                    block.addmm_(direction[rows], basis.mT, beta=beta, alpha=alpha)
                else:
                    block.mul_(beta).add_(direction[rows], alpha=alpha)
            if generator is not None:
                stochastic_round_to_bf16(block, generator, out=flat[rows])
            else:
                flat[rows].copy_(block)

    def _refuse_unfinished_accumulation(self, action: str) -> None:
        """Raises ``RuntimeError`` when some parameter is inside a layer-wise accumulation."""
        if self._micro_batches:
            steps = self.layerwise_accumulation_steps
            pending = ", ".join(
                f"parameter {i}: {count} of {steps}" for i, count in sorted(self._micro_batches.items())
            )
            raise RuntimeError(
                f"{action} in the middle of a layer-wise gradient accumulation ({pending} backward passes): "
                f"with layerwise_accumulation_steps={steps}, call it only after every {steps} backward "
                "passes, and give every parameter a gradient in each of them"
            )

    def _finish_layerwise_step(self) -> None:
        """``step()`` in layer-wise mode with accumulation: checks that every parameter's
        accumulation is complete and that all parameters updated since the last ``step()`` were
        updated equally often. On failure, unfinished accumulations are discarded (gradients
        kept in ``.grad`` stay until ``zero_grad()``), so training can go on after the error."""
        updates = self._updates_since_step
        self._updates_since_step = {}
        try:
            self._refuse_unfinished_accumulation("step() was called")
        finally:
            self._micro_batches.clear()
            self._projected_sums.clear()
            self._refreshed_early.clear()
        if len(set(updates.values())) > 1:
            counts = ", ".join(f"parameter {i}: {n}" for i, n in sorted(updates.items()))
            raise RuntimeError(
                "parameters were updated a different number of times since the last step() "
                f"({counts}): their gradient hooks fired unequally often; with "
                f"layerwise_accumulation_steps={self.layerwise_accumulation_steps}, call step() "
                "after every that many backward passes, each reaching every parameter"
            )

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As ``torch.optim.Optimizer.zero_grad``; refused inside a layer-wise accumulation."""
        self._refuse_unfinished_accumulation("zero_grad() was called")
        super().zero_grad(set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """As ``torch.optim.Optimizer.state_dict``; refused inside a layer-wise accumulation
        (its partial sums are not part of the state)."""
        self._refuse_unfinished_accumulation("state_dict() was called")
        return super().state_dict()

    # ----------------------------------------------------------------- validation
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        self._validate_group(group)
        for p in group["params"]:
            if p.is_complex():
                raise ValueError(f"{type(self).__name__} does not support complex parameters")

    def _validate_group(self, group: dict[str, Any]) -> None:
        """One clear ``ValueError`` per bad hyperparameter, naming it."""
        self._validate_lr(group["lr"])
        betas = group["adamw_betas"]
        if len(betas) != 2 or not all(_is_number(b) and 0 <= b < 1 for b in betas):
            raise ValueError(f"adamw_betas must be two numbers in [0, 1), got {betas!r}")
        if not _is_number(group["adamw_eps"]) or group["adamw_eps"] < 0:
            raise ValueError(f"adamw_eps must be a finite number >= 0, got {group['adamw_eps']!r}")
        bits = group["adamw_state_bits"]
        if not isinstance(bits, int) or isinstance(bits, bool) or bits not in ADAMW_STATE_BITS:
            raise ValueError(f"adamw_state_bits must be one of {ADAMW_STATE_BITS}, got {group['adamw_state_bits']!r}")
        self._validate_common(group)

    @staticmethod
    def _validate_lr(lr: Any) -> None:
        if isinstance(lr, Tensor):
            raise ValueError("lr must be a Python float, not a Tensor")
        if not _is_number(lr) or lr < 0:
            raise ValueError(f"lr must be a finite number >= 0, got {lr!r}")

    def _validate_common(self, group: dict[str, Any]) -> None:
        """The checks every optimizer needs, whatever its rule for non-matrix parameters."""
        if not _is_number(group["weight_decay"]) or group["weight_decay"] < 0:
            raise ValueError(f"weight_decay must be a finite number >= 0, got {group['weight_decay']!r}")
        if group["nonfinite"] not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {group['nonfinite']!r}")
        if not isinstance(group["seed"], int) or isinstance(group["seed"], bool) or group["seed"] < 0:
            raise ValueError(f"seed must be an int >= 0, got {group['seed']!r}")
        if not isinstance(group["subspace"], bool):
            raise ValueError(f"subspace must be True or False, got {group['subspace']!r}")
        if not isinstance(group["bf16_stochastic_rounding"], bool):
            raise ValueError(
                f"bf16_stochastic_rounding must be True or False, got {group['bf16_stochastic_rounding']!r}"
            )

    @staticmethod
    def _check_positive_int(group: dict[str, Any], name: str) -> None:
        if not _is_positive_int(group[name]):
            raise ValueError(f"{name} must be an int >= 1, got {group[name]!r}")

    # ----------------------------------------------------------------------- step
    def _uses_matrix_rule(self, param: Tensor, group: dict[str, Any]) -> bool:
        return group["subspace"] and param.ndim >= 2

    def _step_sharding(self) -> StepSharding | None:
        """How this step is split over ranks: ``DTensor`` matrices (FSDP2, HSDP) take the registered
        sharding, else :attr:`sharding` (owner-sharded DDP); ``None``: every rank updates everything."""
        for group in self.param_groups:
            for p in group["params"]:
                if is_dtensor(p) and self._uses_matrix_rule(p, group):
                    if _dtensor_sharding is None:
                        raise RuntimeError("DTensor parameters need sumo_optim.distributed (import it)")
                    return _dtensor_sharding
        return self.sharding

    def _parameters_with_grad(self) -> list[tuple[Tensor, dict[str, Any], int]]:
        """(parameter, its group, its index over all groups) for each parameter with a gradient."""
        work, index = [], 0
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    work.append((p, group, index))
                index += 1
        return work

    def _finite_gradients(self, work: list[tuple[Tensor, dict[str, Any], int]]) -> list[bool]:
        """Rejects sparse and complex gradients; says which gradients are finite (one sync)."""
        self._check_gradients(work)
        return self._finite_flags(work, self._queue_finite_check(work, range(len(work))))

    def _check_gradients(self, work: list[tuple[Tensor, dict[str, Any], int]]) -> None:
        """Rejects sparse, complex and misshapen gradients."""
        for p, _, index in work:
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients (parameter {index})")
            if p.grad.is_complex():
                raise RuntimeError(f"{type(self).__name__} does not support complex gradients (parameter {index})")
            if p.grad.shape != p.shape:
                raise RuntimeError(
                    f"gradient of parameter {index} has shape {tuple(p.grad.shape)}, expected {tuple(p.shape)}"
                )

    def _queue_finite_check(
        self, work: list[tuple[Tensor, dict[str, Any], int]], positions: Iterable[int]
    ) -> list[tuple[list[int], Tensor]]:
        """Queues the finiteness check of the gradients at ``positions`` in ``work``, returning
        (positions, their flags) per device and dtype for :meth:`_finite_flags`."""
        batches: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        grads = {}
        for i in positions:
            grads[i] = local_tensor(work[i][0].grad)  # under FSDP2, this rank's shard
            if grads[i].numel():
                batches.setdefault((grads[i].device, grads[i].dtype), []).append(i)
        pending = []
        for batch in batches.values():
            # max |g| is NaN or Inf iff some entry is: one multi-tensor reduction, no temporaries.
            norms = torch._foreach_norm([grads[i] for i in batch], float("inf"))
            pending.append((batch, torch.stack(norms).isfinite()))
        return pending

    def _queue_projection_check(
        self, work: list[tuple[Tensor, dict[str, Any], int]], prepared: list[tuple[Tensor, Tensor, Matrix]]
    ) -> list[tuple[list[int], Tensor]]:
        """Projects the prepared matrices' gradients (:meth:`_project`) and queues their check in
        place of the full gradients' (see :meth:`step`): (positions in ``work``, flags) per stack."""
        return self._checks_in_work(work, prepared, self._project(self._uncounted_items(prepared)))

    def _uncounted_items(self, prepared: list[tuple[Tensor, Tensor, Matrix]]) -> list[Matrix]:
        """The prepared matrices, each with its state (the dict the step count returns later; not
        yet counted)."""
        for p, _, item in prepared:
            item.state = self.state[p]
        return [item for _, _, item in prepared]

    @staticmethod
    def _checks_in_work(
        work: Work, prepared: list[tuple[Tensor, Tensor, Matrix]], checks: list[tuple[list[int], Tensor]]
    ) -> list[tuple[list[int], Tensor]]:
        """Checks by positions in ``prepared`` as checks by positions in ``work``."""
        in_work = {id(p): i for i, (p, _, _) in enumerate(work)}
        return [([in_work[id(prepared[i][0])] for i in positions], flags) for positions, flags in checks]

    def _steps_ahead(
        self, prepared: list[tuple[Tensor, Tensor, Matrix]], pending: list[tuple[list[int], Tensor]]
    ) -> bool:
        """Whether :meth:`_step_ahead` can take this step (a step without refresh whose matrices are
        checked on their projections; subclasses that can say when)."""
        return False

    def _step_ahead(
        self, work: Work, prepared: list[tuple[Tensor, Tensor, Matrix]], pending: list[tuple[list[int], Tensor]]
    ) -> list[bool] | None:
        """The whole step queued before its check is read (one host synchronization), each state
        and weight changed on the device only if every gradient is finite (the checks of
        ``pending`` and of the projections). Returns None once stepped, else which gradients are
        finite, with nothing changed (a non-finite one with ``nonfinite="raise"`` raises)."""
        raise NotImplementedError

    def _finite_flags(
        self,
        work: list[tuple[Tensor, dict[str, Any], int]],
        pending: list[tuple[list[int], Tensor | list[bool]]],
        sharding: StepSharding | None = None,
    ) -> list[bool]:
        """Which gradients are finite (the host waits for the check here, unless the flags are
        read already: lists; agreed over ranks by ``sharding``); raises for a non-finite one in a
        group with ``nonfinite="raise"``."""
        finite = [True] * len(work)
        for positions, flags in pending:
            for i, ok in zip(positions, flags.tolist() if isinstance(flags, Tensor) else flags):
                finite[i] = ok
        if sharding is not None:
            finite = sharding.agree_on_finite(finite, work)
        for (p, group, index), ok in zip(work, finite):
            if not ok and group["nonfinite"] == "raise":
                raise ValueError(
                    f"non-finite gradient (NaN or Inf) in parameter {index} of shape {tuple(p.shape)}; "
                    "no weight was changed. Pass nonfinite='skip' to skip such matrices' steps instead."
                )
        return finite

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimization step for every parameter that has a gradient.

        Gradients are checked first (sparse, complex, wrong shape, NaN/Inf), so an error
        leaves every weight and state untouched.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.layerwise:
            if self.layerwise_accumulation_steps > 1:
                self._finish_layerwise_step()
            return loss
        work = self._parameters_with_grad()
        self._check_gradients(work)
        sharding = self._step_sharding()  # owner-sharded DDP, FSDP2 or HSDP
        # (sharded steps agree on the finite flags of all their work at once; they step their own
        # matrices in pieces in :meth:`_update_parameters`)
        pieces = self._pieces(work) if sharding is None else [work]
        if len(pieces) == 1:
            self._step_checked(pieces[0], sharding)
            return loss
        # Every gradient checked first, with one host synchronization for the whole step rather
        # than one per piece: a NaN in a later piece raises before any weight changes.
        flags = self._finite_flags(work, self._queue_finite_check(work, range(len(work))))
        self._step_checked(work, sharding, {id(p): ok for (p, _, _), ok in zip(work, flags)}, pieces)
        return loss

    def _pieces(self, work: Work) -> list[Work]:
        """``work`` in pieces whose matrices' float32 working copies (weights and gradient of a
        bf16/fp16 matrix, :meth:`_prepare_matrices`) take at most ``matrix_piece_bytes`` (or
        one matrix), stepped one after the other: those matrices ordered by shape, so that a
        piece's stacks of equal shapes stay large, the other parameters in the first piece. One
        piece when matrices step one at a time anyway, with ``matrix_piece_bytes=None``, or with
        ``cuda_graph=True`` (its graph needs every working copy at the same address on every step)."""
        limit = self.matrix_piece_bytes
        if not self.steps_matrices_together or self.cuda_graph is not None or limit is None:
            return [work]
        rest: Work = []
        copied: Work = []
        for p, group, index in work:
            needs_copies = p.element_size() < 4 and self._uses_matrix_rule(p, group)
            (copied if needs_copies else rest).append((p, group, index))
        if not copied:
            return [work]
        pieces = [rest]
        size = 0
        for p, group, index in sorted(copied, key=lambda entry: (tuple(entry[0].shape), str(entry[0].dtype))):
            copies = 2 * 4 * p.numel()
            if size and size + copies > limit:
                pieces.append([])
                size = 0
            pieces[-1].append((p, group, index))
            size += copies
        return pieces

    def _step_checked(
        self,
        work: Work,
        sharding: StepSharding | None,
        finite: dict[int, bool] | None = None,
        pieces: list[Work] | None = None,
    ) -> None:
        """The step of :meth:`step` for parameters whose gradients passed :meth:`_check_gradients`:
        NaN/Inf checks (a parameter with one skips its step; ``finite``: already checked, by
        parameter id) and the updates, in ``pieces`` (of :meth:`_pieces`) if given."""
        together = self.steps_matrices_together and sharding is None
        is_matrix = [self._uses_matrix_rule(p, group) for p, group, _ in work]
        # On a step where no matrix refreshes its basis, the matrices' projected gradients
        # (r×n, computed first anyway) are checked instead of the gradients (m×n): a NaN or Inf
        # in G reaches project(G) (:func:`~sumo_optim.stacks.project_checked`).
        early = (
            finite is None
            and together
            and any(is_matrix)
            and all(self._checks_projection(p, group) for (p, group, _), matrix in zip(work, is_matrix) if matrix)
        )
        # Working copies first: they take the same addresses on steps of either kind (a CUDA graph
        # of the step stays valid across them). Not when checked already: a step in pieces.
        prepared = self._prepare_matrices(work) if together and finite is None else None
        if finite is None:
            positions = [i for i, matrix in enumerate(is_matrix) if not (early and matrix)]
            pending = self._queue_finite_check(work, positions)
            if early and self._steps_ahead(prepared, pending):
                # The whole step queued before the check, nothing changed unless all is finite.
                flags = self._step_ahead(work, prepared, pending)
                if flags is None:
                    return
            else:
                if early:
                    pending.extend(self._queue_projection_check(work, prepared))
                flags = self._finite_flags(work, pending, sharding)
        else:
            flags = [finite[id(p)] for p, _, _ in work]
        ready = []
        for (p, group, index), ok in zip(work, flags):
            if ok:
                ready.append((p, group, index))
            else:
                state = self.state[p]
                state["skipped_steps"] = state.get("skipped_steps", 0) + 1
        if sharding is not None:
            sharding.step(self, ready)
        elif prepared is not None and len(ready) == len(work):
            self._update_parameters(ready, prepared)
        elif pieces is not None:
            stepped = {id(p) for p, _, _ in ready}
            pieces = [[entry for entry in piece if id(entry[0]) in stepped] for piece in pieces]
            self._update_pieces([piece for piece in pieces if piece])
        else:
            self._update_parameters(ready)

    def _prepare_matrices(
        self, work: list[tuple[Tensor, dict[str, Any], int]], weights: bool = True
    ) -> list[tuple[Tensor, Tensor, Matrix]]:
        """(parameter, its working copy, its :class:`Matrix`) for the parameters of ``work`` that
        follow the matrix rule, in order; the state is attached when the step is counted
        (:meth:`_count_steps`). ``weights=False``: the gradient's copy only, a meta tensor
        standing in for the weights (and their copy)."""
        prepared = []
        for p, group, _ in work:
            if self._uses_matrix_rule(p, group):
                grad = _as_matrix(self._working_copy(p.grad), p)
                copy = self._working_copy(p) if weights else torch.empty(grad.shape, dtype=grad.dtype, device="meta")
                item = Matrix(_as_matrix(copy, p), grad, {}, group, self._side(grad.shape, group))
                prepared.append((p, copy, item))
        return prepared

    def _count_steps(self, work: Work, prepared: list[tuple[Tensor, Tensor, Matrix]]) -> None:
        """In ``work``'s order: counts the step of each matrix (its state attached to its
        :class:`Matrix` of ``prepared``) and updates every other parameter."""
        items = iter(item for _, _, item in prepared)
        for p, group, index in work:
            if self._uses_matrix_rule(p, group):
                next(items).state = self._count_step(p, group, index)
            else:
                self._update_parameter(p, group, index)

    def _update_parameters(
        self,
        work: list[tuple[Tensor, dict[str, Any], int]],
        prepared: list[tuple[Tensor, Tensor, Matrix]] | None = None,
    ) -> None:
        """Updates parameters whose gradients have been checked: one at a time, or, with
        ``steps_matrices_together``, the matrices together in :meth:`_step_matrices` (their
        working copies then exist at once; ``prepared`` by :meth:`_prepare_matrices` for
        exactly ``work``, or made here, piece by piece: :meth:`_pieces`) and the rest one at a time."""
        if not self.steps_matrices_together:
            for p, group, index in work:
                self._update_parameter(p, group, index)
            return
        if prepared is None:
            self._update_pieces(self._pieces(work))
            return
        self._count_steps(work, prepared)
        self._step_matrices([item for _, _, item in prepared])
        for p, weights, item in prepared:
            self._end_update(p, weights, item.group)

    def _update_pieces(self, pieces: list[Work]) -> None:
        """Updates the pieces of :meth:`_pieces`: one after the other, each with its working copies,
        or, where :meth:`_steps_pieces_in_phases`, in three phases, so that the work a step does
        once whatever its size (short batched kernels, host synchronizations) is done once:

        1. per piece: float32 copies of the gradients, :meth:`_project_piece` (refreshes where
           due, the projections), then the copies go;
        2. all matrices at once: :meth:`_direct_all` (the rule's directions);
        3. per piece: float32 copies of the weights, :meth:`_back_project_piece`, the write-back.

        Results equal the whole step's bit for bit. The projections, then the directions, of all
        matrices exist at once (r/min(m, n) of the matrices' float32 bytes, each).
        """
        if not self._steps_pieces_in_phases(pieces):
            for piece in pieces:
                self._update_parameters(piece, self._prepare_matrices(piece))
            return
        phases = []  # per piece: its matrices (parameter, Matrix) and what _project_piece returned
        for piece in pieces:
            prepared = self._prepare_matrices(piece, weights=False)  # the weights' copies: phase 3
            self._count_steps(piece, prepared)
            items = [item for _, _, item in prepared]
            context = self._project_piece(items)
            for x in items:
                x.grad = x.weights  # (the meta stand-in) the gradient's copy goes
            phases.append(([(p, item) for p, _, item in prepared], context))
        matrices = [item for entries, _ in phases for _, item in entries]
        directed = self._direct_all(matrices)
        for item in matrices:
            item.projected = None  # (taken into the directions)
        for entries, context in phases:
            copies = [(p, self._working_copy(p), item) for p, item in entries]
            for p, weights, item in copies:
                item.weights = _as_matrix(weights, p)
            self._back_project_piece([item for _, item in entries], directed, context)
            for p, weights, item in copies:
                self._end_update(p, weights, item.group)
                item.weights = item.update = item.grad  # (the meta stand-in) the copies go

    def _steps_pieces_in_phases(self, pieces: list[Work]) -> bool:
        """Whether :meth:`_update_pieces` steps these pieces in phases (subclasses that define the
        three phase methods say when)."""
        return False

    def _project_piece(self, matrices: list[Matrix]) -> Any:
        raise NotImplementedError

    def _direct_all(self, matrices: list[Matrix]) -> Any:
        raise NotImplementedError

    def _back_project_piece(self, matrices: list[Matrix], directed: Any, context: Any) -> None:
        raise NotImplementedError

    def _update_parameter(self, p: Tensor, group: dict[str, Any], index: int) -> None:
        """Applies this step's rule to one parameter whose gradient has been checked."""
        if self._steps_in_chunks(p, group):
            self._update_vector_in_chunks(p, group, index)
            return
        weights, grad, state = self._begin_update(p, group, index)
        if self._uses_matrix_rule(p, group):
            self._matrix_step(weights.view(p.shape[0], -1), grad.reshape(p.shape[0], -1), state, group)
        else:
            self._vector_step(weights, grad, state, group)
        self._end_update(p, weights, group)

    def _steps_in_chunks(self, p: Tensor, group: dict[str, Any]) -> bool:
        return (
            self.vector_step_is_elementwise
            and p.numel() > VECTOR_CHUNK
            and not self._uses_matrix_rule(p, group)
            and not is_dtensor(p)
            and p.is_contiguous()
            and p.grad.is_contiguous()
        )

    def _update_vector_in_chunks(self, p: Tensor, group: dict[str, Any], index: int) -> None:
        """The vector rule on a large parameter (LLaMA-7B's embeddings and head: 131M values),
        :data:`VECTOR_CHUNK` elements at a time, so its float32 working copies, dequantized 8-bit
        moments and temporaries span one chunk (64 MiB each), not the whole tensor (512 MiB each).
        Elementwise, so equal bit for bit to the whole-tensor step when rounding to nearest;
        stochastic rounding draws chunk after chunk from the parameter's generator."""
        state = self._count_step(p, group, index)
        numel, flat_p, flat_grad = p.numel(), p.view(-1), p.grad.view(-1)
        generator = None
        if group["bf16_stochastic_rounding"] and p.dtype == torch.bfloat16:
            generator = refresh_generator(state["seed"], state["step"], p.device, stream=ROUNDING_STREAM)
        stored = [name for name in state if name.startswith("exp_avg")]  # none on the first step
        for start in range(0, numel, VECTOR_CHUNK):
            end = min(numel, start + VECTOR_CHUNK)
            chunk = {"step": state["step"], **{name: _chunk_of(name, state[name], start, end) for name in stored}}
            weights, grad = self._working_copy(flat_p[start:end]), self._working_copy(flat_grad[start:end])
            self._vector_step(weights, grad, chunk, group)
            for name, value in chunk.items():  # new or re-quantized moments into the whole tensors
                if name == "step":
                    continue
                if name not in state:
                    length = -(-numel // BLOCK_SIZE) if name.endswith("_absmax") else numel
                    state[name] = value.new_empty((length,))
                target = _chunk_of(name, state[name], start, end)
                if target.data_ptr() != value.data_ptr():
                    target.copy_(value.reshape(-1))
            if weights.data_ptr() != flat_p[start:end].data_ptr():
                if generator is not None:
                    stochastic_round_to_bf16(weights, generator, out=flat_p[start:end])
                else:
                    flat_p[start:end].copy_(weights)
        for name in [name for name in state if name.startswith("exp_avg")]:  # per-element: p's shape
            if not name.endswith("_absmax") and state[name].shape != p.shape:
                state[name] = state[name].view(p.shape)

    def _vector_step(self, weights: Tensor, grad: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        """The rule for everything that is not a low-rank matrix: AdamW."""
        self._vector_moments(state, grad, group)
        adamw_update(weights, grad, state, group["lr"], group["adamw_betas"], group["adamw_eps"], group["weight_decay"])
        self._store_vector_moments(state, group)

    @staticmethod
    def _vector_moments(state: dict[str, Any], grad: Tensor, group: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """AdamW's moments as ``state["exp_avg"]`` and ``state["exp_avg_sq"]`` in ``grad``'s dtype,
        to be updated in place: zero on the first step, dequantized when stored in 8 bits."""
        if is_dtensor(grad) and group["adamw_state_bits"] == 8:
            raise NotImplementedError("adamw_state_bits=8 does not support FSDP2 (DTensor) parameters")
        if "exp_avg_codes" in state:
            exp_avg = dequantize_blockwise(state.pop("exp_avg_codes"), state.pop("exp_avg_absmax"))
            root = dequantize_blockwise(state.pop("exp_avg_sq_codes"), state.pop("exp_avg_sq_absmax"))
            state["exp_avg"], state["exp_avg_sq"] = exp_avg.to(grad.dtype), root.square_().to(grad.dtype)
        elif "exp_avg" not in state:
            state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(grad), torch.zeros_like(grad)
        return state["exp_avg"], state["exp_avg_sq"]

    @staticmethod
    def _store_vector_moments(state: dict[str, Any], group: dict[str, Any]) -> None:
        """With ``adamw_state_bits=8``, replaces the float moments by block-wise 8-bit codes and
        float32 block absmaxes (:func:`~sumo_optim.quantization.quantize_blockwise`, blocks of 256):
        ``exp_avg`` signed and linear (int8), and ``exp_avg_sq`` as its square root ``√v``,
        unsigned and linear (uint8). ``√v`` spans half as many orders of magnitude as ``v``, and
        it is what Adam's denominator ``√v + ε`` reads, so the denominator's error is at most half
        a step of its block, ``max √v / 510``. A positive ``√v`` never gets code 0 (it gets 1):
        a denominator never collapses to ε while the first moment is not zero."""
        if group["adamw_state_bits"] == 8:
            SubspaceOptimizer._quantize_moments(state)

    @staticmethod
    def _quantize_moments(state: dict[str, Any]) -> None:
        """Replaces ``state``'s float ``exp_avg`` and ``exp_avg_sq`` by their 8-bit codes and block
        absmaxes, as :meth:`_store_vector_moments` describes; :meth:`_vector_moments` reads them back."""
        exp_avg, exp_avg_sq = state.pop("exp_avg"), state.pop("exp_avg_sq")
        state["exp_avg_codes"], state["exp_avg_absmax"] = quantize_blockwise(exp_avg, signed=True, check=False)
        root = exp_avg_sq.sqrt()
        codes, state["exp_avg_sq_absmax"] = quantize_blockwise(root, signed=False, check=False)
        state["exp_avg_sq_codes"] = torch.where((codes == 0) & (root > 0), 1, codes).to(torch.uint8)

    def _begin_update(self, p: Tensor, group: dict[str, Any], index: int) -> tuple[Tensor, Tensor, dict[str, Any]]:
        """Working copies of the weights and gradient, and the state with this step counted."""
        return self._working_copy(p), self._working_copy(p.grad), self._count_step(p, group, index)

    @staticmethod
    def _working_copy(tensor: Tensor) -> Tensor:
        """``tensor`` itself when already contiguous in the state dtype (≥ float32), else a copy."""
        if tensor.dtype in (torch.float32, torch.float64) and tensor.is_contiguous():
            return tensor
        working = tensor.to(torch.promote_types(tensor.dtype, torch.float32))
        return working if working.is_contiguous() else working.contiguous()

    def _count_step(self, p: Tensor, group: dict[str, Any], index: int) -> dict[str, Any]:
        state = self.state[p]
        if "step" not in state:  # first counted step (earlier ones may have been skipped)
            state["step"] = 0
            state["seed"] = group["seed"] * 1_000_003 + index
        state["step"] += 1
        return state

    def _end_update(self, p: Tensor, weights: Tensor, group: dict[str, Any]) -> None:
        """Writes the working copy back, rounding once to the parameter's dtype: to nearest, or
        stochastically for a bf16 parameter with ``bf16_stochastic_rounding``, drawing from a
        generator seeded by (seed, parameter index, step) so that resumed runs round alike."""
        if weights is p:
            return
        if group["bf16_stochastic_rounding"] and p.dtype == torch.bfloat16 and weights.dtype == torch.float32:
            state, local = self.state[p], local_tensor(weights)  # under FSDP2, this rank's shard
            generator = refresh_generator(state["seed"], state["step"], local.device, stream=ROUNDING_STREAM)
            target = local_tensor(p)
            if target.is_contiguous():  # straight into the parameter: no bf16 copy in between
                stochastic_round_to_bf16(local, generator, out=target)
            else:
                target.copy_(stochastic_round_to_bf16(local, generator))
        else:
            p.copy_(weights)

    def _matrix_step(self, weights: Tensor, grad: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        """Updates the 2-D ``weights`` in place from ``grad``; ``state["step"]`` counts this step."""
        if not self.steps_matrices_together:
            raise NotImplementedError
        self._step_matrices([Matrix(weights, grad, state, group, self._side(grad.shape, group))])

    def _step_matrices(self, matrices: list[Matrix]) -> None:
        """Updates several matrices in place (each like :meth:`_matrix_step`)."""
        raise NotImplementedError

    def _checks_projection(self, p: Tensor, group: dict[str, Any]) -> bool:
        """Whether the next step of matrix ``p`` can be checked on its projected gradient: its
        basis exists, it is not refreshed, and the rule reads the gradient only through
        :meth:`_project` (subclasses that project say when)."""
        return False

    def _project(self, matrices: list[Matrix]) -> list[tuple[list[int], Tensor]]:
        """Sets each matrix's ``projected`` to ``project(G)`` (:func:`~sumo_optim.stacks.project_checked`,
        replayed as its own CUDA graph); returns the finiteness flags (positions in ``matrices``)."""
        projected, checks = self._graphed(matrices, lambda: project_checked(matrices), self.projection_graph)
        for x, reduced in zip(matrices, projected):
            x.projected = reduced
        return checks

    def _project_unless_done(self, matrices: list[Matrix], refreshed: list[Matrix]) -> None:
        """Projects the gradients unless :meth:`step` did so before its check and no basis changed."""
        if refreshed or any(x.projected is None for x in matrices):
            self._project(matrices)

    def _graphed(
        self,
        matrices: list[Matrix],
        function: Callable[[], Any],
        graph: GraphedCall | None = None,
        tensors: Iterable[Tensor] = (),
    ) -> Any:
        """``function()``, which only queues kernels on the matrices' gradients, states and
        projections and on ``tensors``; replayed from a CUDA graph (``graph``, else the step's)
        with ``cuda_graph=True`` when all matrices are on one CUDA device."""
        devices = {x.grad.device for x in matrices}
        if self.cuda_graph is None or len(devices) != 1 or next(iter(devices)).type != "cuda":
            return function()
        # The memory the graph reads and writes (state shapes follow from the gradient's and the
        # group's), how it is split into stacks, and what else decides the kernels.
        key: list[Hashable] = [torch.backends.cuda.matmul.allow_tf32]
        for x in matrices:
            key.append((tensor_key(x.grad), x.side, id(x.group)))
            if x.projected is not None:
                key.append(tensor_key(x.projected))
            key.extend((value.data_ptr(), value.dtype) for value in x.state.values() if isinstance(value, Tensor))
        key.extend(tensor_key(tensor) for tensor in tensors)
        groups = {id(x.group): x.group for x in matrices}.values()
        key.extend((group["rank"], *(group[name] for name in self.graph_hyperparameters)) for group in groups)
        return (self.cuda_graph if graph is None else graph)(tuple(key), function)

    def _side(self, shape: tuple[int, int], group: dict[str, Any]) -> str:
        """Which side of an m×n matrix the group's basis lives on (:func:`~sumo_optim.subspace.choose_side`)."""
        return choose_side(shape, group["rank"])

    @staticmethod
    def _generator(state: dict[str, Any], device: torch.device) -> torch.Generator:
        return refresh_generator(state["seed"], state["step"], device)

    # -------------------------------------------------------------- state dicts
    def _expected_state_shapes(
        self, shape: tuple[int, int], group: dict[str, Any], state: dict[str, Any]
    ) -> dict[str, tuple[int, ...]]:
        """Shapes the matrix rule's state tensors must have for an m×n matrix (for checks)."""
        return {}

    def _expected_vector_state_shapes(
        self, shape: tuple[int, ...], group: dict[str, Any]
    ) -> dict[str, tuple[int, ...]]:
        """Shapes the state tensors of the rule for everything else (AdamW) must have, stored in
        float or in 8 bits (:meth:`_store_vector_moments`)."""
        blocks = (math.ceil(math.prod(shape) / BLOCK_SIZE),)
        return {
            "exp_avg": shape,
            "exp_avg_sq": shape,
            "exp_avg_codes": shape,
            "exp_avg_sq_codes": shape,
            "exp_avg_absmax": blocks,
            "exp_avg_sq_absmax": blocks,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a state dict, keeping each saved state tensor's dtype (float32 moments of a bf16
        parameter stay float32) and refusing states whose shapes do not fit the parameters, and
        any load in the middle of a layer-wise accumulation."""
        self._refuse_unfinished_accumulation("load_state_dict() was called")
        try:
            saved_state = state_dict["state"]
            saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        except (KeyError, TypeError) as error:
            raise ValueError(f"not an optimizer state dict: missing {error}") from error
        super().load_state_dict(state_dict)
        for group in self.param_groups:  # hyperparameters newer than the checkpoint: this optimizer's values
            for name, value in self.defaults.items():
                group.setdefault(name, value)
        params = [p for g in self.param_groups for p in g["params"]]
        groups = [g for g in self.param_groups for _ in g["params"]]
        for index, (p, group, key) in enumerate(zip(params, groups, saved_ids)):
            if key not in saved_state:
                continue
            state = self.state[p]
            for name, value in saved_state[key].items():
                if isinstance(value, Tensor):
                    state[name] = value.to(device=p.device, copy=True)
            self._check_loaded_state(index, p, group, state)

    def _check_loaded_state(self, index: int, p: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        if set(state) <= {"skipped_steps"}:  # every step so far was skipped: nothing to check
            return
        if not isinstance(state.get("step"), int) or state["step"] < 0:
            raise ValueError(f"state of parameter {index} has no valid 'step' counter")
        if self._uses_matrix_rule(p, group):
            expected = self._expected_state_shapes((p.shape[0], math.prod(p.shape[1:])), group, state)
        else:
            expected = self._expected_vector_state_shapes(tuple(p.shape), group)
        for name, shape in expected.items():
            value = state.get(name)
            if value is not None and tuple(value.shape) != shape:
                raise ValueError(
                    f"state '{name}' of parameter {index} has shape {tuple(value.shape)}, expected {shape}: "
                    "the checkpoint does not belong to this model or these hyperparameters"
                )
        quantized = {"exp_avg_codes": torch.int8, "exp_avg_sq_codes": torch.uint8}
        quantized.update(dict.fromkeys(("exp_avg_absmax", "exp_avg_sq_absmax"), torch.float32))
        present = [name for name in quantized if name in state]
        if present:
            for name, dtype in quantized.items():
                if name not in state or state[name].dtype != dtype:
                    raise ValueError(f"8-bit AdamW state '{name}' of parameter {index} is missing or not {dtype}")


def _as_matrix(tensor: Tensor, p: Tensor) -> Tensor:
    """``tensor`` (shaped as ``p``) as the matrix the rule works on: ``(p.shape[0], rest)``."""
    return tensor.view(p.shape[0], -1) if p.ndim > 2 else tensor


def _chunk_of(name: str, state_tensor: Tensor, start: int, end: int) -> Tensor:
    """The part of a per-element state (flattened), or of a per-block ``*_absmax``, that covers
    elements ``start:end`` (``start`` a multiple of :data:`VECTOR_CHUNK`, hence of the block)."""
    flat = state_tensor.view(-1)
    if name.endswith("_absmax"):
        return flat[start // BLOCK_SIZE : -(-end // BLOCK_SIZE)]
    return flat[start:end]


def _refuse_layerwise_under_data_parallel() -> None:
    """Layer-wise updates use each rank's local gradient, before DDP averages it: refused."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if torch.distributed.get_world_size() > 1:
            raise RuntimeError(
                "layer-wise mode (layerwise=True) updates each parameter on this rank's local "
                "gradient, before DDP's all-reduce, so ranks would diverge: it is single-process "
                "only. Use layerwise=False under torch.distributed with more than one rank."
            )


def _layerwise_hook(optimizer: weakref.ref[SubspaceOptimizer], number: int, index: int, p: Tensor) -> None:
    """Layer-wise mode's post-accumulate-grad hook: updates ``p`` in group ``number`` of the
    optimizer, if it still exists."""
    owner = optimizer()
    if owner is None:
        return
    _refuse_layerwise_under_data_parallel()  # two cheap calls unless a process group exists
    owner._layerwise_update(p, owner.param_groups[number], index)
