"""SUMO: Subspace-Aware Moment-Orthogonalization (Refael et al., NeurIPS 2025, arXiv 2505.24749).

Algorithm 1, for a weight ``W ∈ R^{m×n}`` with gradient ``G`` (written for the left side,
``m ≤ n``; for ``m > n`` every product is mirrored onto the right side):

1. every ``K`` steps from the first, ``Q ← top-r left singular vectors of G``  (Block 1)
   and the moment is carried over, ``M ← (Q_newᵀ Q_old) M``                   (Block 1.1)
2. ``Ĝ = Qᵀ G``;  ``M ← μ M + Ĝ``                                              (Block 2)
3. ``O = U Vᵀ`` where ``M = U Σ Vᵀ`` is the exact thin SVD                      (Block 2)
4. optional norm-growth limiter: if ``‖O‖ / ‖O_prev‖ > γ``, ``O ← O γ ‖O_prev‖ / ‖O‖`` (Block 3)
5. ``W ← W − η (α f(m, n) Q O + β (G − Q Ĝ)) − η λ W``                         (Block 4)

``f`` is a learning-rate convention for orthogonalized steps (:mod:`sumo_optim.lr_adjust`),
1 by default. Algorithm 1 as printed has ``α = β = 1``; its text adds ``f = √max(m, n)``:
:data:`PAPER_RULE` and :meth:`SUMO.paper_rule` are that setting.

The optimizer state of a matrix is ``Q`` (m×r) and ``M`` (r×n): ``(m + n) r`` numbers
against AdamW's ``2mn``. Parameters that are not matrices get AdamW (see
:class:`~sumo_optim.base.SubspaceOptimizer`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .base import MATRIX_PIECE_BYTES, SubspaceOptimizer, Work, _is_number
from .cublas import device_scalars_available
from .linalg import (
    orthogonalize,
    orthogonalize_cholesky,
    orthogonalize_cholesky_unchecked,
    orthogonalize_newton_schulz,
)
from .lr_adjust import LR_ADJUSTMENTS, lr_adjustment
from .stacks import Matrix, finite_matrices, project_back_, project_stacks, stacks
from .subspace import choose_side, compute_bases, is_refresh_step, project, project_back, transport

__all__ = ["PAPER_RULE", "SUMO", "limit_norm_growth"]

REFRESH_METHODS = ("svd", "randomized")
STATE_DTYPES = (None, torch.float32, torch.bfloat16)
STORED_STATES = ("basis", "moment")  # what ``state_dtype`` applies to
ORTHOGONALIZATIONS = ("exact", "svd", "cholesky", "newton_schulz")
# Algorithm 1 as the paper defines it: Block 4's unscaled complement term and the text's
# √max(m, n) scaling of the orthogonalized step (arXiv 2505.24749, Sec. 4 and Algorithm 1).
PAPER_RULE: dict[str, Any] = {"complement_scale": 1.0, "adjust_lr_fn": "paper"}


def limit_norm_growth(update: Tensor, previous_norm: Tensor, growth_limit: float) -> tuple[Tensor, Tensor]:
    """Fira's norm-growth limiter (Chen et al. 2024, arXiv 2410.01623), SUMO's Block 3.

    If ``‖O_t‖_F > γ ‖O_{t−1}‖_F`` the update is rescaled to norm ``γ ‖O_{t−1}‖_F``. No limit on
    the first step (``previous_norm == 0``). Returns the update and its norm, without a
    host-device synchronization.
    """
    norm = torch.linalg.vector_norm(update)
    too_large = (previous_norm > 0) & (norm > growth_limit * previous_norm)
    factor = torch.where(too_large, growth_limit * previous_norm / norm, torch.ones_like(norm))
    return update * factor, norm * factor


class SUMO(SubspaceOptimizer):
    """SUMO: momentum in a low-rank gradient subspace, orthogonalized exactly by SVD.

    Args:
        params: parameters or param groups. In a group, matrices (2-D, or more dimensions
            viewed as ``(shape[0], -1)``) follow SUMO; everything else, and every parameter
            of a group with ``subspace=False``, follows AdamW. See
            :func:`sumo_optim.param_groups`.
        lr: step size η (also AdamW's learning rate for the non-matrix parameters of the group).
        rank: subspace rank r; ``rank ≥ min(m, n)`` uses the whole space (exact-SVD Muon).
        update_freq: subspace refresh period K, in steps (the first step refreshes).
        momentum: moment decay μ in ``M ← μ M + Ĝ``.
        scale: α, the scale of the orthogonalized step ``Q O`` (the paper's
            "projection back scale").
        weight_decay: decoupled weight decay λ (``W ← W − η λ W``), for AdamW params too.
        limiter: γ of the norm-growth limiter (the paper uses 1.1); ``None`` disables it.
        refresh: how Q is chosen: ``"randomized"`` (default, as in Algorithm 1: a randomized
            range finder with ``power_iterations`` and Rayleigh–Ritz, milliseconds per matrix
            on a GPU) or ``"svd"`` (the exact truncated SVD; 260 ms per 2048×5461 matrix on
            an H100, so a LLaMA-1B refresh takes ~40 s).
        complement_scale: β, weight of the gradient's orthogonal complement ``(I − QQᵀ) G``
            in the update. Algorithm 1's Block 4 uses 1; the default 0 takes the step in the
            subspace only (the project's spec, and GaLore-class methods).
        adjust_lr_fn: learning-rate convention ``f(m, n)`` of the orthogonalized step ``Q O``
            (not of the complement term): ``"none"`` (default, ``f = 1``), ``"original"``
            (Muon's ``√max(1, m/n)``), ``"match_rms_adamw"`` (``0.2 √max(m, n)``: AdamW's
            update RMS at full rank, so AdamW's learning rate carries over) or ``"paper"``
            (``√max(m, n)``). :mod:`sumo_optim.lr_adjust` gives the update RMS of each.
        orthogonalization: ``"exact"`` (default: ``U Vᵀ`` to float64 accuracy, by one SVD per
            matrix on CPU and by the batched Cholesky-QR2 + polar-iteration route of
            :func:`~sumo_optim.linalg.orthogonalize_cholesky` on GPUs; both give the same
            result), ``"svd"`` or ``"cholesky"`` to force one route, or ``"newton_schulz"``
            (Muon's 5-step approximation, the paper's ablation).
        adamw_betas, adamw_eps: AdamW's (β1, β2) and ε for the non-matrix parameters.
        nonfinite: ``"raise"`` (default) raises on a NaN/Inf gradient before any weight
            changes; ``"skip"`` skips that parameter's step and counts it in
            ``state["skipped_steps"]``. Between refreshes a matrix's check reads its projected
            gradient ``project(G)``, which is non-finite whenever ``G`` is (or the product
            overflowed).
        seed: seeds the randomized refresh; each matrix's draws depend only on
            (seed, its index, step), so resumed and data-parallel runs draw the same.
        layerwise: update each parameter in a post-accumulate-grad hook and free its gradient
            at once (see :class:`~sumo_optim.base.SubspaceOptimizer`).
        layerwise_accumulation_steps: N, with ``layerwise=True``: update at every N-th backward
            pass, on the sum of the N gradients; between refreshes a matrix keeps only
            ``Σ Qᵀ G_i`` (r×n), and on its first and refresh steps its full gradient
            (:meth:`~sumo_optim.base.SubspaceOptimizer._layerwise_update`). Call ``step()``
            after every N backward passes.
        cuda_graph: on CUDA, replay Blocks 2–4 of all matrices (projection and its finiteness
            check, orthogonalization, limiter, back-projection: several hundred kernels at
            LLaMA-1B) as one CUDA graph (see :class:`~sumo_optim.base.SubspaceOptimizer`); the
            back-projection reads its step size and decay from device memory
            (:mod:`sumo_optim.cublas`), so a learning-rate schedule needs no new capture. The
            graph keeps its working memory between steps (1.8 GiB at LLaMA-1B and 2.1 GiB at
            7B, r = 128: the float64 orthogonalization works on chunks of
            :data:`~sumo_optim.linalg.CHUNK_BYTES`).
        bf16_stochastic_rounding: round the float32 result into bfloat16 weights stochastically
            (unbiased, :func:`~sumo_optim.rounding.stochastic_round_to_bf16`) instead of to
            nearest, so updates below half a bf16 ulp still move the weights in expectation.
            The random bits come from (seed, parameter index, step): resumed runs are bit-exact.
            Other dtypes are unaffected.
        adamw_state_bits: 32 (default) or 8: store the AdamW parameters' ``exp_avg`` and
            ``exp_avg_sq`` block-wise quantized to 8 bits (blocks of 256 with a float32 absmax:
            ~4× smaller), dequantized to float32 for each step
            (:meth:`~sumo_optim.base.SubspaceOptimizer._store_vector_moments`). State keys are
            then ``exp_avg_codes``, ``exp_avg_absmax``, ``exp_avg_sq_codes`` and
            ``exp_avg_sq_absmax`` (of ``√exp_avg_sq``). Not for FSDP2 (DTensor) parameters.
        state_dtype: ``None`` (default: float32 for bf16/fp16 parameters, else their dtype) or
            ``torch.bfloat16``: store ``basis`` Q and ``moment`` M in bfloat16 (half their
            memory), computing each step in float32 on copies and rounding back to nearest at
            its end. Between refreshes the finiteness check then reads the full gradient, not
            ``project(G)``; not combined with ``cuda_graph=True``.
        matrix_piece_bytes: bf16/fp16 matrices are stepped with float32 working copies of
            their weights and gradient, about this many bytes of copies at a time (default
            :data:`~sumo_optim.base.MATRIX_PIECE_BYTES`, 1 GiB; results are the same bit for
            bit), stepped in phases so that they cost little time (:meth:`_direct_all`);
            ``None``: all at once, with 4× the matrices' bf16 bytes of transient memory (the
            README gives the measured trade-off). Ignored with
            ``cuda_graph=True``, which holds all of them.

    States (``self.state[p]``): ``basis`` Q, ``moment`` M, ``step``, ``seed``, and
    ``previous_norm`` with the limiter; float32 for bf16/fp16 parameters.
    """

    steps_matrices_together = True
    refreshes_from_first_micro_batch = True
    graph_hyperparameters = ("momentum", "limiter", "orthogonalization")

    def __init__(
        self,
        params: Any,
        lr: float = 0.02,
        rank: int = 128,
        update_freq: int = 200,
        momentum: float = 0.95,
        scale: float = 1.0,
        weight_decay: float = 0.0,
        limiter: float | None = None,
        refresh: str = "randomized",
        power_iterations: int = 2,
        complement_scale: float = 0.0,
        adjust_lr_fn: str = "none",
        orthogonalization: str = "exact",
        adamw_betas: tuple[float, float] = (0.9, 0.999),
        adamw_eps: float = 1e-8,
        nonfinite: str = "raise",
        seed: int = 0,
        layerwise: bool = False,
        cuda_graph: bool = False,
        bf16_stochastic_rounding: bool = False,
        adamw_state_bits: int = 32,
        state_dtype: torch.dtype | None = None,
        layerwise_accumulation_steps: int = 1,
        layerwise_refresh: str = "sum",
        matrix_piece_bytes: int | None = MATRIX_PIECE_BYTES,
    ) -> None:
        defaults = dict(
            lr=lr,
            rank=rank,
            update_freq=update_freq,
            momentum=momentum,
            scale=scale,
            weight_decay=weight_decay,
            limiter=limiter,
            refresh=refresh,
            power_iterations=power_iterations,
            complement_scale=complement_scale,
            adjust_lr_fn=adjust_lr_fn,
            orthogonalization=orthogonalization,
            adamw_betas=adamw_betas,
            adamw_eps=adamw_eps,
            nonfinite=nonfinite,
            seed=seed,
            bf16_stochastic_rounding=bf16_stochastic_rounding,
            adamw_state_bits=adamw_state_bits,
            state_dtype=state_dtype,
        )
        super().__init__(
            params,
            defaults,
            layerwise=layerwise,
            cuda_graph=cuda_graph,
            layerwise_accumulation_steps=layerwise_accumulation_steps,
            layerwise_refresh=layerwise_refresh,
            matrix_piece_bytes=matrix_piece_bytes,
        )
        self._step_inputs: dict[tuple[torch.device, str], Tensor] = {}  # (see _step_input)
        if cuda_graph and any(group["state_dtype"] is not None for group in self.param_groups):
            raise ValueError("state_dtype keeps float32 copies for each step; it does not combine with cuda_graph=True")

    @classmethod
    def paper_rule(cls, params: Any, **kwargs: Any) -> SUMO:
        """SUMO as the paper defines it (:data:`PAPER_RULE`): ``W ← W − η (√max(m, n) Q O + (I − QQᵀ) G) − η λ W``.

        ``kwargs`` are :class:`SUMO`'s other arguments; passing ``complement_scale`` or
        ``adjust_lr_fn`` too leaves the paper's rule and is refused.
        """
        clash = sorted(set(PAPER_RULE) & set(kwargs))
        if clash:
            raise ValueError(f"SUMO.paper_rule sets {', '.join(clash)} itself; use SUMO(...) to choose them")
        return cls(params, **PAPER_RULE, **kwargs)

    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
        self._check_positive_int(group, "rank")
        self._check_positive_int(group, "update_freq")
        if not _is_number(group["momentum"]) or not 0 <= group["momentum"] < 1:
            raise ValueError(f"momentum must be in [0, 1), got {group['momentum']!r}")
        if not _is_number(group["scale"]) or group["scale"] < 0:
            raise ValueError(f"scale must be a finite number >= 0, got {group['scale']!r}")
        if not _is_number(group["complement_scale"]) or group["complement_scale"] < 0:
            raise ValueError(f"complement_scale must be a finite number >= 0, got {group['complement_scale']!r}")
        if group["complement_scale"] and self.layerwise_refresh == "first":
            raise ValueError(
                "layerwise_refresh='first' reads only projections after the first micro-batch, but "
                f"complement_scale={group['complement_scale']} reads the whole gradient: use layerwise_refresh='sum'"
            )
        limiter = group["limiter"]
        if limiter is not None and (not _is_number(limiter) or limiter < 1):
            raise ValueError(f"limiter (γ) must be None or a number >= 1, got {limiter!r}")
        if group["adjust_lr_fn"] not in LR_ADJUSTMENTS:
            raise ValueError(f"adjust_lr_fn must be one of {LR_ADJUSTMENTS}, got {group['adjust_lr_fn']!r}")
        if group["refresh"] not in REFRESH_METHODS:
            raise ValueError(f"refresh must be one of {REFRESH_METHODS}, got {group['refresh']!r}")
        if group["orthogonalization"] not in ORTHOGONALIZATIONS:
            raise ValueError(
                f"orthogonalization must be one of {ORTHOGONALIZATIONS}, got {group['orthogonalization']!r}"
            )
        if group["state_dtype"] not in STATE_DTYPES:
            raise ValueError(f"state_dtype must be one of {STATE_DTYPES}, got {group['state_dtype']!r}")
        if not isinstance(group["power_iterations"], int) or group["power_iterations"] < 0:
            raise ValueError(f"power_iterations must be an int >= 0, got {group['power_iterations']!r}")

    def _expected_state_shapes(
        self, shape: tuple[int, int], group: dict[str, Any], state: dict[str, Any]
    ) -> dict[str, tuple[int, ...]]:
        m, n = shape
        rank = group["rank"]
        side = choose_side(shape, rank)
        if side == "left":
            return {"basis": (m, rank), "moment": (rank, n)}
        if side == "right":
            return {"basis": (n, rank), "moment": (m, rank)}
        return {"moment": (m, n)}

    def _step_matrices(self, matrices: list[Matrix]) -> None:
        """Algorithm 1 for matrices whose step is counted and whose gradients are checked.

        Block 1 batched per stack (refresh steps only), then :meth:`_queue_update` (Blocks 2–4),
        per device; the complement term of Block 4 where asked for; and the one host
        synchronization, once all the work is queued: it looks for moments the fast
        orthogonalization could not vouch for (rare).
        """
        stored = self._computing_copies(matrices)
        refreshed = [x for x in matrices if self._init_state(x)]
        self._refresh(refreshed)
        for members in stacks(matrices, lambda x: x.weights.device):  # (a gradient may be a meta stand-in)
            if refreshed:  # (projected anew, in the new bases)
                for x in members:
                    x.projected = None
            finite = self._step_input(members[0].weights.device, "finite", torch.bool, 1).fill_(True)
            _, flags, all_trusted, previous_norms = self._queue_update(members, finite)
            self._add_complement(members)
            _add_fallbacks(self._fallback_updates(members, flags, all_trusted, previous_norms))
        self._store_computing_copies(stored)

    def _steps_ahead(
        self, prepared: list[tuple[Tensor, Tensor, Matrix]], pending: list[tuple[list[int], Tensor]]
    ) -> bool:
        devices = {item.grad.device for _, _, item in prepared} | {flags.device for _, flags in pending}
        return len(devices) == 1 and device_scalars_available(next(iter(devices)))

    def _step_ahead(
        self, work: Work, prepared: list[tuple[Tensor, Tensor, Matrix]], pending: list[tuple[list[int], Tensor]]
    ) -> list[bool] | None:
        """:meth:`~sumo_optim.base.SubspaceOptimizer._step_ahead`: :meth:`_queue_update` with
        the projections' and ``pending``'s checks on the device, then one host read of all flags."""
        matrices = self._uncounted_items(prepared)
        finite = self._step_input(matrices[0].grad.device, "finite", torch.bool, 1)
        if pending:
            finite.copy_(torch.cat([checked for _, checked in pending]).all())
        else:
            finite.fill_(True)
        checks, flags, all_trusted, previous_norms = self._queue_update(matrices, finite)
        entries = pending + self._checks_in_work(work, prepared, checks)
        read = [checked.reshape(-1) for _, checked in entries]
        if all_trusted is not None:
            read.append(all_trusted.reshape(1))
        values = torch.cat(read).tolist()  # the step's one host synchronization
        if all_trusted is not None:
            all_trusted = values.pop()
        read_entries, start = [], 0
        for positions, _ in entries:
            read_entries.append((positions, values[start : start + len(positions)]))
            start += len(positions)
        finite = self._finite_flags(work, read_entries)
        if not all(finite):
            return finite
        self._count_steps(work, prepared)
        _add_fallbacks(self._fallback_updates(matrices, flags, all_trusted, previous_norms))
        for p, weights, item in prepared:
            self._end_update(p, weights, item.group)
        return None

    def _step_input(self, device: torch.device, name: str, dtype: torch.dtype, size: int) -> Tensor:
        """A tensor that :meth:`_queue_update` reads, kept at one address from step to step (a
        CUDA graph of it stays valid); made anew when its size changes."""
        key = (device, name)
        if key not in self._step_inputs or self._step_inputs[key].numel() != size:
            self._step_inputs[key] = torch.empty(size, dtype=dtype, device=device)
        return self._step_inputs[key]

    def _queue_update(
        self, matrices: list[Matrix], finite: Tensor
    ) -> tuple[list[tuple[list[int], Tensor]], list[Tensor | None], Tensor | None, list[Tensor | None]]:
        """Blocks 2–4 of matrices on one device, without a host synchronization and replayed as
        one CUDA graph with ``cuda_graph=True``: the projections (unless given: layer-wise
        accumulation) and their finiteness checks, the moments, the orthogonalization, the
        limiter and the back-projection ``W ← (1 − ηλ) W − η α f(m, n) Q O``, its β and α read
        from device memory (:func:`~sumo_optim.stacks.project_back_`), so that a new
        learning rate needs no new graph.

        Unless ``finite`` (a bool tensor of one element) and every projection are finite, no state
        or weight changes. Returns the projections' checks (positions in ``matrices``) and what
        :meth:`_fallback_updates` needs.
        """
        device = matrices[0].weights.device
        on_device = device_scalars_available(device)
        if self.cuda_graph is not None and device.type == "cuda" and not on_device:
            raise RuntimeError("cuda_graph=True needs PyTorch's cuBLAS library (sumo_optim.cublas), not found")
        back_stacks = _back_projection_stacks(matrices)
        values = torch.tensor([v for _, beta, alpha in back_stacks for v in (beta, alpha)], dtype=torch.float64)
        scalars = self._step_input(device, "scalars", torch.float64, values.numel())
        scalars.copy_(values.pin_memory() if device.type == "cuda" else values, non_blocking=True)

        def update() -> tuple:
            checks = []
            if any(x.projected is None for x in matrices):
                projected, buffers = project_stacks(matrices)
                for x, reduced in zip(matrices, projected):
                    x.projected = reduced
                checks = [(positions, finite_matrices(buffer)) for positions, buffer in buffers]
                ok = torch.cat([finite, *(flags for _, flags in checks)]).all()
                for _, buffer in buffers:  # (a NaN or Inf projection moves no moment)
                    buffer.masked_fill_(~ok, 0.0)
            else:
                ok = finite.all()
            updates, flags, all_trusted, previous_norms = self._directions(matrices, ok)
            position = {id(x): i for i, x in enumerate(matrices)}
            for i, (members, beta, alpha) in enumerate(back_stacks):
                directions = [updates[position[id(x)]] for x in members]
                if members[0].deferred is not None or not on_device:
                    project_back_(members, directions, beta, alpha)  # (checked before: ``finite`` holds)
                    continue
                dtype = members[0].weights.dtype
                beta_now = torch.where(ok, scalars[2 * i], 1.0).to(dtype)
                alpha_now = torch.where(ok, scalars[2 * i + 1], 0.0).to(dtype)
                project_back_(members, directions, beta_now, alpha_now)
            return checks, flags, all_trusted, previous_norms

        weights = [x.weights for x in matrices]
        return self._graphed(matrices, update, self.cuda_graph, [finite, scalars, *weights])

    @staticmethod
    def _add_complement(matrices: list[Matrix]) -> None:
        """Block 4's ``− η β (I − Q Qᵀ) G`` for matrices whose group has ``complement_scale``."""
        for x in matrices:
            group = x.group
            if group["complement_scale"] and x.side != "full":
                basis = x.state["basis"]
                complement = x.grad - project_back(project(x.grad, basis, x.side), basis, x.side)
                x.weights.add_(complement, alpha=-group["lr"] * group["complement_scale"])

    @staticmethod
    def _back_project(matrices: list[Matrix]) -> None:
        """Block 4 without the complement term, for matrices with their ``update``: one grouped
        product per stack (steps in pieces; groups with ``complement_scale`` are not)."""
        for members, beta, alpha in _back_projection_stacks(matrices):
            project_back_(members, [x.update for x in members], beta, alpha)

    # The phases of a step in pieces (:meth:`SubspaceOptimizer._update_pieces`): the float64 route
    # and its fallback check run once for all matrices, not once per piece (LLaMA-1B, bf16, H200:
    # 40.7 ms a step in pieces, 39.5 all at once; 62.2 piece by piece before, against 43.8 in phases,
    # ``benchmarks/results/step_1b_bf16_{pieces,whole,pieces_before}.md``).

    def _steps_pieces_in_phases(self, pieces: list[Work]) -> bool:
        # (``complement_scale`` reads G in Block 4: piece by piece then)
        return not any(group["complement_scale"] for piece in pieces for _, group, _ in piece)

    def _project_piece(self, matrices: list[Matrix]) -> Any:
        """Phase 1: Block 1 where due, the projections; returns the stored states (``state_dtype``)."""
        stored = self._computing_copies(matrices)
        self._refresh([x for x in matrices if self._init_state(x)])
        self._project(matrices)
        return stored

    def _direct_all(self, matrices: list[Matrix]) -> Any:
        """Phase 2: Blocks 2 and 3, then the one synchronization: the SVD updates of moments the
        fast route could not vouch for, by matrix id."""
        updates, flags, all_trusted, previous_norms = self._directions(matrices)
        for item, update in zip(matrices, updates):
            item.update = update
        return {
            id(item): update for item, update in self._fallback_updates(matrices, flags, all_trusted, previous_norms)
        }

    def _back_project_piece(self, matrices: list[Matrix], fallbacks: Any, stored: Any) -> None:
        """Phase 3: Block 4, the SVD updates added as in :meth:`_step_matrices`, the states stored."""
        self._back_project(matrices)
        _add_fallbacks([(item, fallbacks[id(item)]) for item in matrices if id(item) in fallbacks])
        self._store_computing_copies(stored)

    @staticmethod
    def _store_computing_copies(stored: list[tuple[Matrix, dict[str, Any]]]) -> None:
        """``state_dtype``: Q and M back into the stored states in their dtype, new states too."""
        for item, state in stored:
            for name, value in item.state.items():
                state[name] = value.to(item.group["state_dtype"]) if name in STORED_STATES else value

    def _refreshes_in_blocks(self, group: dict[str, Any]) -> bool:
        return group["refresh"] == "randomized"  # (linalg.randomized_top_singular_vectors)

    def _refresh_basis(self, item: Matrix) -> None:
        stored = self._computing_copies([item])
        if self._init_state(item):
            self._refresh([item])
        self._store_computing_copies(stored)

    @staticmethod
    def _computing_copies(matrices: list[Matrix]) -> list[tuple[Matrix, dict[str, Any]]]:
        """For matrices whose group stores Q and M in another dtype (``state_dtype``): gives each
        a state of its own for the step, with Q and M in the gradient's dtype, and returns the
        (matrix, stored state) pairs to write back."""
        stored = []
        for item in matrices:
            if item.group["state_dtype"] not in (None, item.grad.dtype):
                state, item.state = item.state, dict(item.state)
                for name in STORED_STATES:
                    if name in state:
                        item.state[name] = state[name].to(item.grad.dtype)
                stored.append((item, state))
        return stored

    def _directions(
        self, matrices: list[Matrix], ok: Tensor | None = None
    ) -> tuple[list[Tensor], list[Tensor | None], Tensor | None, list[Tensor | None]]:
        """Blocks 2 and 3: moments updated in place, their orthogonalized (and limited) updates;
        with ``ok`` (a 0-dim bool tensor), the moments and the limiter's norms only where it is
        True (the projections must then be finite).

        Returns the updates, the Cholesky route's flags and their conjunction (see
        :meth:`_orthogonalize`), and each limited matrix's norm before this step. Only kernels,
        on tensors that stay in place (the limiter's norm is written into its state tensor), so
        the whole of it can be captured in a CUDA graph.
        """
        for members in stacks(matrices, lambda x: (x.group["momentum"], x.state["moment"].dtype)):
            # M ← μ M + Qᵀ G  (right side: μ M + G Q), the projection made by _project
            moments, momentum = [x.state["moment"] for x in members], members[0].group["momentum"]
            if ok is not None:  # μ where ok, else 1 (the projections are zero then)
                like = moments[0]
                momentum = torch.where(ok, torch.full((), momentum, dtype=like.dtype, device=like.device), 1.0)
            torch._foreach_mul_(moments, momentum)
            torch._foreach_add_(moments, [x.projected for x in members])
        updates, flags, all_trusted = self._orthogonalize(
            [x.state["moment"] for x in matrices], [x.group for x in matrices]
        )
        previous_norms: list[Tensor | None] = [None] * len(matrices)
        for i, item in enumerate(matrices):
            if item.group["limiter"] is not None:  # Block 3
                state_norm = item.state["previous_norm"]
                previous_norms[i] = state_norm.clone()
                updates[i], norm = limit_norm_growth(updates[i], state_norm, item.group["limiter"])
                state_norm.copy_(norm if ok is None else torch.where(ok, norm, state_norm))
        return updates, flags, all_trusted, previous_norms

    def _checks_projection(self, p: Tensor, group: dict[str, Any]) -> bool:
        # With ``state_dtype``, Q's float32 copy exists only inside the step.
        return group["state_dtype"] is None and self._reads_only_projection(p, group)

    def _reads_only_projection(self, p: Tensor, group: dict[str, Any]) -> bool:
        state, shape = self.state.get(p, {}), (p.shape[0], math.prod(p.shape[1:]))
        if "moment" not in state or group["complement_scale"]:  # the complement reads G itself
            return False
        return self._side(shape, group) == "full" or not is_refresh_step(state["step"] + 1, group["update_freq"])

    def _init_state(self, item: Matrix) -> bool:
        """Creates the state on the first step; says whether this step refreshes the basis."""
        state, group, grad = item.state, item.group, item.grad
        if "moment" not in state:
            moment_shape = self._expected_state_shapes(grad.shape, group, state)["moment"]
            state["moment"] = torch.zeros(moment_shape, dtype=grad.dtype, device=grad.device)
            if group["limiter"] is not None:
                state["previous_norm"] = torch.zeros((), dtype=grad.dtype, device=grad.device)
        return item.side != "full" and not item.basis_ready and is_refresh_step(state["step"], group["update_freq"])

    def _refresh(self, matrices: list[Matrix]) -> None:
        """Blocks 1 and 1.1 for matrices at a refresh step: new Q (batched per stack), M transported."""
        for members in stacks(matrices, lambda x: (id(x.group), x.side, x.grad.shape, x.grad.dtype, x.grad.device)):
            group, side = members[0].group, members[0].side
            randomized = group["refresh"] == "randomized"
            bases = compute_bases(
                [x.grad if x.source is None else x.source for x in members],
                group["rank"],
                side,
                method=group["refresh"],
                generators=[self._generator(x.state, x.grad.device) if randomized else None for x in members],
                power_iterations=group["power_iterations"],
            )
            for x, new_basis in zip(members, bases):
                if "basis" in x.state:  # in place: a captured CUDA graph keeps reading these tensors
                    x.state["moment"].copy_(transport(x.state["moment"], x.state["basis"], new_basis, side))
                    x.state["basis"].copy_(new_basis)
                else:
                    x.state["basis"] = new_basis

    @staticmethod
    def _orthogonalize(
        moments: list[Tensor], groups: list[dict[str, Any]]
    ) -> tuple[list[Tensor], list[Tensor | None], Tensor | None]:
        """Block 2's ``O = U Vᵀ`` of every moment: one batched call per stack of equal shapes, and
        the exact GPU route (Cholesky) for all stacks at once, without a host synchronization.

        Returns the updates, per moment the Cholesky route's flag (``None`` for other routes;
        where False the update is zero and :meth:`_fallback_updates` must supply it), and
        whether every flag is True (``None`` if there are none).
        """
        batches: dict[tuple, list[int]] = {}  # positions of the moments stacked together
        for i, (moment, group) in enumerate(zip(moments, groups)):
            method = _orthogonalizer(group, moment.device)
            batches.setdefault((method, moment.shape, moment.dtype, moment.device), []).append(i)
        stacked = {key: torch.stack([moments[i] for i in members]) for key, members in batches.items()}
        cholesky = [key for key in batches if key[0] is orthogonalize_cholesky]
        results, trusted = orthogonalize_cholesky_unchecked([stacked[key] for key in cholesky])
        results, trusted = dict(zip(cholesky, results)), dict(zip(cholesky, trusted))
        updates: list[Tensor | None] = [None] * len(moments)
        flags: list[Tensor | None] = [None] * len(moments)
        for key, members in batches.items():
            result = results[key] if key in results else key[0](stacked[key])
            for i, update in zip(members, result.unbind()):
                updates[i] = update
            if key in trusted:
                for i, flag in zip(members, trusted[key].unbind()):
                    flags[i] = flag
        all_trusted = torch.cat(list(trusted.values())).all() if trusted else None
        return updates, flags, all_trusted

    @staticmethod
    def _fallback_updates(
        matrices: list[Matrix], flags: list[Tensor | None], all_trusted: Tensor | bool | None, previous_norms: list
    ) -> list[tuple[Matrix, Tensor]]:
        """A host read of ``all_trusted`` (none when :meth:`_step_ahead` read it already): matrices
        whose moment the Cholesky route could not vouch for (rank-deficient, too ill-conditioned,
        non-finite) got a zero update; returns their exact SVD one
        (:func:`~sumo_optim.linalg.orthogonalize`, the same rank rule), through the limiter from
        its previous norm, to be added to the already decayed weights."""
        if all_trusted is None or bool(all_trusted):
            return []
        fallbacks = []
        for item, flag, previous_norm in zip(matrices, flags, previous_norms):
            if flag is None or bool(flag):
                continue
            update = orthogonalize(item.state["moment"])
            if item.group["limiter"] is not None:
                update, norm = limit_norm_growth(update, previous_norm, item.group["limiter"])
                item.state["previous_norm"].copy_(norm)
            fallbacks.append((item, update))
        return fallbacks


def _add_fallbacks(fallbacks: list[tuple[Matrix, Tensor]]) -> None:
    """Adds each (matrix, SVD update) of :meth:`SUMO._fallback_updates` to its already
    back-projected (and decayed) weights: ``W ← W − η α f(m, n) Q O``."""
    for item, update in fallbacks:
        project_back_([item], [update], 1.0, _orthogonal_step_alpha(item.group, item.weights.shape))


def _back_projection_stacks(matrices: list[Matrix]) -> list[tuple[list[Matrix], float, float]]:
    """Block 4's stacks, ``W ← β W + α Q O`` for each: (members, β = 1 − ηλ, α = −η α f(m, n))."""
    result = []
    for members in stacks(matrices, lambda x: (id(x.group), x.side, x.weights.shape, x.weights.stride())):
        group = members[0].group
        result.append(
            (members, 1 - group["lr"] * group["weight_decay"], _orthogonal_step_alpha(group, members[0].weights.shape))
        )
    return result


def _orthogonal_step_alpha(group: dict[str, Any], shape: torch.Size) -> float:
    """``−η α f(m, n)``, the coefficient of ``Q O`` in Block 4 for a matrix of ``shape``."""
    return -group["lr"] * group["scale"] * lr_adjustment(shape, group["adjust_lr_fn"])


def _orthogonalizer(group: dict[str, Any], device: torch.device):
    """The orthogonalization a group asks for; ``"exact"`` takes the batched Cholesky path on GPUs."""
    method = group["orthogonalization"]
    if method == "exact":
        method = "svd" if device.type == "cpu" else "cholesky"
    return {"svd": orthogonalize, "cholesky": orthogonalize_cholesky, "newton_schulz": orthogonalize_newton_schulz}[
        method
    ]
