"""Splitting a model's parameters into the low-rank group and the AdamW group."""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase
from typing import Any

from torch import nn

__all__ = ["DEFAULT_EXCLUDE", "param_groups"]

# Output heads are trained with AdamW by default, as in GaLore, Muon and the SUMO paper.
DEFAULT_EXCLUDE = ("lm_head", "*.lm_head", "classifier", "*.classifier", "score", "*.score", "head", "*.head")


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatchcase(name, pattern) for pattern in patterns)


def param_groups(
    model: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
    adamw_options: dict[str, Any] | None = None,
    **subspace_options: Any,
) -> list[dict[str, Any]]:
    """The usual split of ``model``'s trainable parameters for a low-rank optimizer.

    The weights of ``nn.Linear`` modules go to a group with ``subspace=True`` (and
    ``subspace_options``, e.g. ``rank=128``); everything else (embeddings, norms, biases,
    output heads, and any weight shared with an embedding) goes to a group with
    ``subspace=False`` trained by AdamW (with ``adamw_options``, e.g. ``lr=3e-4``).

    ``include`` / ``exclude`` are ``fnmatch`` patterns on module names (as in
    ``model.named_modules()``): with ``include``, only matching linear layers are low-rank;
    a linear layer matching ``exclude`` is not. Groups left empty are dropped.
    """
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    low_rank_ids = set()
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or not module.weight.requires_grad:
            continue
        if include is not None and not _matches(name, include):
            continue
        if _matches(name, exclude) or id(module.weight) in embedding_weights:
            continue
        low_rank_ids.add(id(module.weight))
    low_rank, rest = [], []
    for p in model.parameters():  # deduplicates tied weights, keeps the model's order
        if p.requires_grad:
            (low_rank if id(p) in low_rank_ids else rest).append(p)
    groups = [
        {"params": low_rank, "subspace": True, **subspace_options},
        {"params": rest, "subspace": False, **(adamw_options or {})},
    ]
    return [g for g in groups if g["params"]]
