"""Building any optimizer of the library (and PyTorch's references) by name."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

from .adafactor import GaLoreAdafactor
from .galore import GaLoreAdamW
from .galore8bit import GaLoreAdamW8bit
from .golore import GoLore
from .mofasgd import MoFaSGD
from .sumo import SUMO

__all__ = ["available", "create", "register"]

_REGISTRY: dict[str, Callable[..., torch.optim.Optimizer]] = {}


def register(name: str, factory: Callable[..., torch.optim.Optimizer]) -> None:
    """Makes ``create(name, params, **kwargs)`` call ``factory(params, **kwargs)``."""
    _REGISTRY[name.lower()] = factory


def available() -> list[str]:
    """The names :func:`create` accepts."""
    return sorted(_REGISTRY)


def create(name: str, params: Any, **kwargs: Any) -> torch.optim.Optimizer:
    """``create("sumo", sumo_optim.param_groups(model), lr=0.02, rank=64)``.

    Unknown names and keyword arguments the optimizer does not take raise a ``ValueError``
    that lists the valid ones.
    """
    factory = _REGISTRY.get(name.lower())
    if factory is None:
        raise ValueError(f"unknown optimizer {name!r}; choose one of: {', '.join(available())}")
    accepted = inspect.signature(factory).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
        unknown = sorted(set(kwargs) - set(accepted))
        if unknown:
            valid = ", ".join(k for k in accepted if k != "params")
            raise ValueError(f"{name} does not take {', '.join(unknown)}; its arguments are: {valid}")
    return factory(params, **kwargs)


register("sumo", SUMO)
register("sumo_paper", SUMO.paper_rule)
register("galore", GaLoreAdamW)
register("galore8bit", GaLoreAdamW8bit)
register("galore_adafactor", GaLoreAdafactor)
register("golore", GoLore)
register("mofasgd", MoFaSGD)
register("adamw", torch.optim.AdamW)
