"""GaLore with 8-bit Adam states: drop-in for galore-torch 1.0's ``GaLoreAdamW8bit``.

galore-torch runs bitsandbytes' block-wise 8-bit Adam on the projected gradient ``R``. This is
:class:`~sumo_optim.GaLoreAdamW` (same subspaces, refresh schedule, ``scale`` and weight decay
after the update) with bitsandbytes' Adam rule, whose ε is scaled by the bias correction,

    m ← β₁ m + (1 − β₁) R;   v ← β₂ v + (1 − β₂) R²
    N = m / (√v + ε √(1 − β₂ᵗ));   W ← (W − η √(1 − β₂ᵗ)/(1 − β₁ᵗ) · α · project_back(N)) (1 − ηλ)

(``W`` itself and ``R = G`` for parameters outside any subspace; the decay after the update,
as in bitsandbytes' CUDA kernels), and its moments stored between
steps as block-wise 8-bit codes (:mod:`sumo_optim.quantization`, blocks of 256 values) when
they have at least ``min_8bit_size`` elements: the reduced r×n moments of a matrix, the full
ones of any other parameter. Each step reads them back in float32, updates them and computes
``N`` in float32, then stores them again, so quantization error enters from the next step on,
as in bitsandbytes.

The codes differ from bitsandbytes': linear int8 for ``m`` and linear uint8 for ``√v``
(bitsandbytes: its non-linear "dynamic" code maps for ``m`` and ``v``), as in the library's
``adamw_state_bits=8`` (:meth:`~sumo_optim.base.SubspaceOptimizer._store_vector_moments`).
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from . import base
from .galore import GaLoreAdamW, galore_adam_update
from .quantization import BLOCK_SIZE
from .stacks import Matrix

__all__ = ["GaLoreAdamW8bit"]


class GaLoreAdamW8bit(GaLoreAdamW):
    """GaLore with block-wise 8-bit Adam states, argument-compatible with
    ``galore_torch.GaLoreAdamW8bit`` (change the import only; see the module docstring).

    Args:
        params: parameters or groups; a group with ``rank`` (and optionally ``update_proj_gap``,
            ``scale``, ``proj_type``, ``refresh``, ``min_8bit_size``) trains its matrices in a
            subspace, as in :class:`~sumo_optim.GaLoreAdamW`.
        lr, betas, eps, weight_decay: Adam's, with galore-torch's defaults for this class
            (``eps=1e-8``, ``weight_decay=1e-2``).
        min_8bit_size: moments with fewer elements stay float32 (bitsandbytes' rule; for a
            matrix in a subspace, the reduced moment's size counts). A group may set its own
            (bitsandbytes reads only the constructor's).
        amsgrad: only ``False``: galore-torch accepts ``True`` and ignores it; here it raises.
        optim_bits: ignored, as galore-torch ignores it (its states are always 8-bit).
        args: only ``None`` (bitsandbytes' override object is not read).
        percentile_clipping: only 100 (no clipping); lower values are not implemented.
        block_wise: only ``True`` (bitsandbytes' tensor-wise quantization is not implemented).
        is_paged: only ``False`` (no paged CUDA memory).
        rank, update_proj_gap, scale, proj_type, refresh, nonfinite, seed, layerwise,
            bf16_stochastic_rounding, layerwise_accumulation_steps, layerwise_refresh,
            matrix_piece_bytes: as in
            :class:`~sumo_optim.GaLoreAdamW` (no
            ``transport_moments`` or ``cuda_graph``: the states are re-coded every step).

    Like ``adamw_state_bits=8``, it refuses FSDP2 (DTensor) parameters outside any subspace.
    """

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        optim_bits: int = 32,
        args: Any = None,
        min_8bit_size: int = 4096,
        percentile_clipping: int = 100,
        block_wise: bool = True,
        is_paged: bool = False,
        *,
        rank: int | None = None,
        update_proj_gap: int = 200,
        scale: float = 1.0,
        proj_type: str = "std",
        refresh: str = "iterative",
        nonfinite: str = "raise",
        seed: int = 0,
        layerwise: bool = False,
        bf16_stochastic_rounding: bool = False,
        layerwise_accumulation_steps: int = 1,
        layerwise_refresh: str = "sum",
        matrix_piece_bytes: int | None = base.MATRIX_PIECE_BYTES,
    ) -> None:
        refused = {
            "amsgrad": (amsgrad, False),
            "args": (args, None),
            "percentile_clipping": (percentile_clipping, 100),
            "block_wise": (block_wise, True),
            "is_paged": (is_paged, False),
        }
        for name, (value, supported) in refused.items():
            if value is not supported and value != supported:
                raise ValueError(f"GaLoreAdamW8bit supports only {name}={supported!r}, got {value!r}")
        super().__init__(
            params,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            rank=rank,
            update_proj_gap=update_proj_gap,
            scale=scale,
            proj_type=proj_type,
            refresh=refresh,
            nonfinite=nonfinite,
            seed=seed,
            layerwise=layerwise,
            bf16_stochastic_rounding=bf16_stochastic_rounding,
            layerwise_accumulation_steps=layerwise_accumulation_steps,
            layerwise_refresh=layerwise_refresh,
            matrix_piece_bytes=matrix_piece_bytes,
            adamw_state_bits=8,
            min_8bit_size=min_8bit_size,
        )

    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
        size = group["min_8bit_size"]
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ValueError(f"min_8bit_size must be an int >= 0, got {size!r}")
        if group["transport_moments"]:
            raise ValueError("GaLoreAdamW8bit does not support transport_moments=True")
        if group["adamw_state_bits"] != 8 or not group["correct_bias"]:
            raise ValueError("GaLoreAdamW8bit needs adamw_state_bits=8 and correct_bias=True (use GaLoreAdamW)")

    def _expected_state_shapes(
        self, shape: tuple[int, int], group: dict[str, Any], state: dict[str, Any]
    ) -> dict[str, tuple[int, ...]]:
        shapes = super()._expected_state_shapes(shape, group, state)
        reduced = shapes["exp_avg"]
        blocks = (math.ceil(math.prod(reduced) / BLOCK_SIZE),)
        return {
            **shapes,
            "exp_avg_codes": reduced,
            "exp_avg_sq_codes": reduced,
            "exp_avg_absmax": blocks,
            "exp_avg_sq_absmax": blocks,
        }

    @staticmethod
    def _eps(group: dict[str, Any], step: int) -> float:
        """bitsandbytes' ε: scaled by √(1 − β₂ᵗ), so that it adds to the bias-corrected √v̂."""
        return group["adamw_eps"] * math.sqrt(1.0 - group["adamw_betas"][1] ** step)

    def _reduced_directions(self, members: list[Matrix], reduced: list[Tensor]) -> list[Tensor]:
        """Adam on each matrix's reduced gradient ``R`` (the module docstring's rule), one matrix
        at a time so that only one matrix's moments are float32 at once: ``N``, with the moments
        read back from 8 bits and stored again."""
        directions = []
        for x, grad in zip(members, reduced):
            exp_avg, exp_avg_sq = self._vector_moments(x.state, grad, x.group)
            beta1, beta2 = x.group["adamw_betas"]
            exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
            directions.append(exp_avg / exp_avg_sq.sqrt().add_(self._eps(x.group, x.state["step"])))
            if exp_avg.numel() >= x.group["min_8bit_size"]:
                self._quantize_moments(x.state)
        return directions

    def _steps_in_chunks(self, p: Tensor, group: dict[str, Any]) -> bool:
        """Chunked as in the other optimizers (LLaMA-7B's embeddings and head: a 512 MiB float32
        moment each, otherwise) only where every chunk, the last included, has at least
        ``min_8bit_size`` values: whether moments are 8-bit is decided per tensor stepped, and
        then each chunk decides as the whole parameter would."""
        last = p.numel() % base.VECTOR_CHUNK or base.VECTOR_CHUNK
        return min(base.VECTOR_CHUNK, last) >= group["min_8bit_size"] and super()._steps_in_chunks(p, group)

    def _vector_step(self, weights: Tensor, grad: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        moments = self._vector_moments(state, grad, group)
        galore_adam_update(weights, moments, grad, state["step"], group, eps=self._eps(group, state["step"]))
        if grad.numel() >= group["min_8bit_size"]:
            self._quantize_moments(state)
