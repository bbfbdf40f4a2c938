"""sumo-optim: memory-efficient low-rank optimizers for training large language models."""

from . import distributed  # registers the FSDP2/HSDP sharding
from .adafactor import GaLoreAdafactor
from .base import SubspaceOptimizer
from .galore import GaLoreAdamW
from .galore8bit import GaLoreAdamW8bit
from .golore import GoLore
from .grouping import param_groups
from .linalg import orthogonalize, orthogonalize_newton_schulz, random_orthonormal, top_singular_vectors
from .lr_adjust import LR_ADJUSTMENTS, lr_adjustment
from .mofasgd import MoFaSGD
from .registry import available, create, register
from .sumo import PAPER_RULE, SUMO

__all__ = [
    "LR_ADJUSTMENTS",
    "PAPER_RULE",
    "SUMO",
    "GaLoreAdafactor",
    "GaLoreAdamW",
    "GaLoreAdamW8bit",
    "GoLore",
    "MoFaSGD",
    "SubspaceOptimizer",
    "available",
    "create",
    "distributed",
    "lr_adjustment",
    "orthogonalize",
    "orthogonalize_newton_schulz",
    "param_groups",
    "random_orthonormal",
    "register",
    "top_singular_vectors",
]

__version__ = "0.1.0"
