"""One record of everything a run depends on: defaults, a YAML/TOML file, then command-line values."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .models import PRESETS

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

# Per-optimizer learning rates that work at small scale (GaLore's LLaMA scripts: lr 0.01, scale
# 0.25 for GaLore; Muon-style spectral steps take ~0.02; AdamW 1e-3 for the small presets).
# SUMO's paper rule scales its step by √max(m, n) (≈ 23–37 at 60M), hence its smaller rate.
DEFAULT_LR = {
    "sumo": 0.02,
    "sumo_paper": 1e-3,
    "galore": 0.01,
    "galore8bit": 0.01,
    "golore": 0.01,
    "mofasgd": 0.02,
    "adamw": 1e-3,
    "muon": 0.02,
}

DISTRIBUTED_MODES = ("ddp", "ddp-sharded", "fsdp2", "hsdp")
DTYPES = ("float32", "bfloat16")
TORCH_OPTIMIZERS = ("adamw", "muon")  # torch.optim's: no layer-wise mode, bf16 states on bf16 weights
GALORE_FAMILY = ("galore", "galore8bit", "golore")  # GaLore's scale 0.25 and update_proj_gap


@dataclass
class RunConfig:
    task: str = "pretrain"  # pretrain | finetune
    optimizer: str = "sumo"
    lr: float | None = None  # None: DEFAULT_LR[optimizer]
    adamw_lr: float = 1e-3  # embeddings, norms, head (the AdamW group of low-rank optimizers)
    weight_decay: float = 0.0
    rank: int = 128
    update_freq: int = 200  # K (SUMO) / update_proj_gap (GaLore family)
    scale: float | None = None  # None: 0.25 for the GaLore family, 1 otherwise
    optimizer_options: dict[str, Any] = field(default_factory=dict)  # anything else the optimizer takes
    preset: str = "tiny"
    corpus: str = "shakespeare"
    vocab_size: int = 8192
    seq_len: int = 256
    batch_size: int = 32  # sequences per optimizer step (all ranks and micro-batches together)
    grad_accum: int = 1  # micro-batches per step: each forward sees batch_size / (world size · grad_accum)
    steps: int = 1000
    warmup_fraction: float = 0.1
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 20
    final_eval_batches: int = 0  # 0: the whole validation split at the end
    log_every: int = 10
    checkpoint_every: int = 0  # 0: only at the end
    seed: int = 0
    device: str = "auto"
    distributed: str = "ddp"  # under torchrun: ddp (replicated optimizer) | ddp-sharded | fsdp2 | hsdp
    replicate: int = 0  # hsdp: replica groups (each shards the model over world size / replicate); 0: one per node
    cache_dir: str = ".cache/sumo-train"
    run_dir: str = "runs/run"
    max_length: int = 64  # finetune: tokens per sentence
    dtype: str = "float32"  # the weights' storage dtype: float32 | bfloat16 (the library keeps float32 states)
    activation_checkpointing: bool = False  # recompute each layer's activations in backward
    layerwise: bool = False  # update each parameter in its gradient hook during its grad_accum-th backward
    compile: bool = False  # torch.compile the training forward
    # Optimizer state (library optimizers): 8-bit AdamW moments, SUMO's Q and M in bf16, and what
    # a layer-wise refresh step with --grad-accum reads (the summed gradient, or the first micro-batch's).
    adamw_state_bits: int = 32  # 32 | 8
    state_dtype: str = "float32"  # float32 | bfloat16 (SUMO)
    layerwise_refresh: str = "sum"  # sum | first (SUMO, GaLore, GaLore 8-bit, GoLore)
    stochastic_rounding: bool = False  # bf16 weights: round each update stochastically (library optimizers)
    gpu_memory_cap_gib: float = 0.0  # > 0: cap this process's CUDA allocations (to try a smaller GPU's budget)

    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR.get(self.optimizer, 1e-3)

    def resolved_scale(self) -> float:
        if self.scale is not None:
            return self.scale
        return 0.25 if self.optimizer in GALORE_FAMILY else 1.0

    def validate(self) -> RunConfig:
        errors = []
        if self.task not in ("pretrain", "finetune"):
            errors.append(f"task must be 'pretrain' or 'finetune', got {self.task!r}")
        if self.preset not in PRESETS:
            errors.append(f"preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        for name in (
            "rank",
            "update_freq",
            "seq_len",
            "batch_size",
            "grad_accum",
            "steps",
            "eval_every",
            "eval_batches",
            "log_every",
            "vocab_size",
            "max_length",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                errors.append(f"{name} must be an int >= 1, got {value!r}")
        for name in ("warmup_fraction", "min_lr_ratio"):
            if not 0 <= getattr(self, name) <= 1:
                errors.append(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
        if self.distributed not in DISTRIBUTED_MODES:
            errors.append(f"distributed must be one of {', '.join(DISTRIBUTED_MODES)}, got {self.distributed!r}")
        if not isinstance(self.replicate, int) or isinstance(self.replicate, bool) or self.replicate < 0:
            errors.append(f"replicate must be an int >= 0, got {self.replicate!r}")
        elif self.replicate and self.distributed != "hsdp":
            errors.append(f"replicate={self.replicate} needs distributed='hsdp', got {self.distributed!r}")
        if self.distributed != "ddp" and self.optimizer in ("adamw", "muon"):
            errors.append(f"distributed={self.distributed!r} needs a low-rank optimizer, not {self.optimizer!r}")
        if isinstance(self.grad_accum, int) and self.grad_accum >= 1 and self.batch_size % self.grad_accum:
            errors.append(f"batch_size ({self.batch_size}) must be a multiple of grad_accum ({self.grad_accum})")
        if self.lr is not None and not self.lr > 0:
            errors.append(f"lr must be > 0, got {self.lr!r}")
        if self.grad_clip < 0 or self.weight_decay < 0:
            errors.append("grad_clip and weight_decay must be >= 0")
        if not isinstance(self.gpu_memory_cap_gib, (int, float)) or not self.gpu_memory_cap_gib >= 0:
            errors.append(f"gpu_memory_cap_gib must be a number >= 0, got {self.gpu_memory_cap_gib!r}")
        if self.adamw_state_bits not in (32, 8):
            errors.append(f"adamw_state_bits must be 32 or 8, got {self.adamw_state_bits!r}")
        if self.state_dtype not in DTYPES:
            errors.append(f"state_dtype must be one of {', '.join(DTYPES)}, got {self.state_dtype!r}")
        if self.layerwise_refresh not in ("sum", "first"):
            errors.append(f"layerwise_refresh must be 'sum' or 'first', got {self.layerwise_refresh!r}")
        if self.dtype not in DTYPES:
            errors.append(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        for name in ("activation_checkpointing", "layerwise", "compile", "stochastic_rounding"):
            if not isinstance(getattr(self, name), bool):
                errors.append(f"{name} must be true or false, got {getattr(self, name)!r}")
        errors += self._incompatible()
        if errors:
            raise ValueError("bad run configuration: " + "; ".join(errors))
        return self

    def _incompatible(self) -> list[str]:
        """Combinations of settings that cannot work, each message naming both settings."""
        errors = []
        if self.layerwise:
            if self.optimizer in TORCH_OPTIMIZERS:
                errors.append(
                    f"layerwise=True needs an optimizer of the library; optimizer={self.optimizer!r} "
                    "(torch.optim) has no layer-wise mode"
                )
            if self.grad_clip > 0:
                errors.append(
                    f"layerwise=True never holds the whole model's gradient, so grad_clip={self.grad_clip:g} "
                    "cannot clip its norm: set --grad-clip 0"
                )
        if self.adamw_state_bits == 8 and self.optimizer in TORCH_OPTIMIZERS:
            errors.append(f"adamw_state_bits=8 needs an optimizer of the library, not optimizer={self.optimizer!r}")
        if self.stochastic_rounding is True and (self.dtype != "bfloat16" or self.optimizer in TORCH_OPTIMIZERS):
            errors.append(
                f"stochastic_rounding=True rounds bfloat16 weights in an optimizer of the library; got "
                f"dtype={self.dtype!r}, optimizer={self.optimizer!r}"
            )
        if self.state_dtype == "bfloat16" and self.optimizer not in ("sumo", "sumo_paper"):
            errors.append(f"state_dtype='bfloat16' is SUMO's (Q and M); optimizer={self.optimizer!r} has none")
        if self.layerwise_refresh == "first":
            if not self.layerwise:
                errors.append("layerwise_refresh='first' chooses what a layer-wise refresh reads: set --layerwise true")
            if self.optimizer not in ("sumo", *GALORE_FAMILY):
                errors.append(
                    f"layerwise_refresh='first' with optimizer={self.optimizer!r}: only sumo, galore, galore8bit "
                    "and golore read nothing but projections after a refresh"
                )
        if self.dtype == "bfloat16" and self.optimizer in TORCH_OPTIMIZERS:
            errors.append(
                f"dtype='bfloat16' with optimizer={self.optimizer!r}: torch.optim keeps bfloat16 states "
                "for bfloat16 weights; use dtype float32 or an optimizer of the library (float32 states)"
            )
        return errors

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}


def _coerce(name: str, value: Any) -> Any:
    """Typed value for a field from a string (command line) or a parsed file value."""
    kind = FIELDS[name].type
    if not isinstance(value, str) or kind == "str":
        return value
    if name == "optimizer_options":
        return json.loads(value)
    if value.lower() in ("none", "null") and "None" in kind:
        return None
    if kind == "bool":
        lowered = value.strip().lower()
        if lowered not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"{name} must be true or false, got {value!r}")
        return lowered in ("true", "1", "yes")
    if kind.startswith("int"):
        return int(value)
    if kind.startswith("float"):
        return float(value)
    return value


def load_config(path: str | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Defaults ← file (``.yaml``/``.yml``/``.toml``/``.json``) ← overrides; unknown keys are named."""
    values: dict[str, Any] = {}
    if path:
        text = Path(path).read_text()
        if path.endswith(".toml"):
            values = tomllib.loads(text)
        elif path.endswith((".yaml", ".yml")):
            import yaml

            values = yaml.safe_load(text) or {}
        else:
            values = json.loads(text)
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a mapping of field names to values")
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown configuration field(s): {', '.join(unknown)}; valid: {', '.join(FIELDS)}")
    try:
        return RunConfig(**{k: _coerce(k, v) for k, v in values.items()}).validate()
    except (TypeError, ValueError) as error:
        raise ValueError(str(error)) from error
