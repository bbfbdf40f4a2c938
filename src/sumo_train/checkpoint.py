"""Checkpoints that are written atomically, verified on load and resume bit-exactly.

A checkpoint is a folder ``step-000123/`` holding ``model.safetensors`` (weights),
``training.pt`` (optimizer and scheduler states, step, RNG states) and ``manifest.json``
(SHA-256 of both files plus the run's identity: task, preset, optimizer, vocabulary). It is
written under a temporary name and renamed into place, so a crash never leaves a half-written
checkpoint that looks complete. Loading refuses a folder whose hashes or identity do not match.

In the sharded modes (``distributed: ddp-sharded | fsdp2``) no rank holds the whole optimizer
state: every rank writes its part of model and optimizer with ``torch.distributed.checkpoint``
(:func:`sumo_optim.distributed.save_checkpoint`) into the same kind of folder, next to
``training.pt`` (scheduler states, step, RNG) and the manifest, which then hashes every file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

IDENTITY_FIELDS = ("task", "preset", "optimizer", "vocab_size", "seq_len", "corpus")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or belongs to a different run."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def staging_dir(run_dir: Path, step: int) -> Path:
    return run_dir / f".step-{step:07d}.tmp"


def save_checkpoint(
    run_dir: Path, step: int, model: torch.nn.Module | None, training_state: dict[str, Any], config: dict[str, Any]
) -> Path:
    """Writes ``training_state`` (and, given a ``model``, its weights in safetensors) into the
    staging folder, hashes everything there and renames it into place. With ``model=None`` the
    staging folder already holds the weights (a DCP checkpoint written by every rank)."""
    from safetensors.torch import save_file

    final = run_dir / f"step-{step:07d}"
    staging = staging_dir(run_dir, step)
    if model is not None:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(weights, str(staging / "model.safetensors"))
    torch.save(training_state, staging / "training.pt")
    names = sorted(file.name for file in staging.iterdir())
    manifest = {
        "step": step,
        "format": "safetensors" if model is not None else "dcp",
        "identity": {k: config.get(k) for k in IDENTITY_FIELDS},
        "sha256": {name: _sha256(staging / name) for name in names},
    }
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=2))
    for name in [*names, "manifest.json"]:
        with (staging / name).open("rb") as file:
            os.fsync(file.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted(run_dir.glob("step-*"))
    return found[-1] if found else None


def load_checkpoint(path: Path, config: dict[str, Any]) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any]]:
    """Verified (weights, training state) of a checkpoint folder; weights ``None`` for a DCP
    checkpoint (load them with :func:`sumo_optim.distributed.load_checkpoint`)."""
    from safetensors.torch import load_file

    manifest_path = path / "manifest.json"
    if not manifest_path.exists():
        raise CheckpointError(f"{path} is not a checkpoint (no manifest.json)")
    try:
        manifest = json.loads(manifest_path.read_text())
        expected_hashes = manifest["sha256"]
        identity = manifest["identity"]
    except (json.JSONDecodeError, KeyError) as error:
        raise CheckpointError(f"{manifest_path} is corrupt: {error}") from error
    for name, expected in expected_hashes.items():
        file = path / name
        if not file.exists() or _sha256(file) != expected:
            raise CheckpointError(f"{file} is missing or corrupt (SHA-256 differs from the manifest)")
    mismatched = {k: (identity.get(k), config.get(k)) for k in IDENTITY_FIELDS if identity.get(k) != config.get(k)}
    if mismatched:
        details = ", ".join(f"{k}: checkpoint {a!r} vs run {b!r}" for k, (a, b) in mismatched.items())
        raise CheckpointError(f"{path} belongs to a different run ({details})")
    training_state = torch.load(path / "training.pt", weights_only=False)
    if manifest.get("format") == "dcp":
        return None, training_state
    return load_file(str(path / "model.safetensors")), training_state
