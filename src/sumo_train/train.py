"""The training loop: pre-train a LLaMA-style LM or fine-tune a sentence classifier with any optimizer.

Read top to bottom: build data, model and optimizer from a :class:`RunConfig`, optionally
resume from the run's last checkpoint, then step with a cosine schedule (linear warm-up over
the first ``warmup_fraction`` of steps, decaying to ``min_lr_ratio`` of the peak), gradient
clipping and, on a GPU, bf16 autocast. Metrics go to ``metrics.jsonl`` and TensorBoard.
For memory: ``dtype`` (bf16 weights), ``activation_checkpointing``, ``layerwise`` (the library
optimizer updates each parameter in its gradient hook, at its ``grad_accum``-th backward;
``step()`` only checks that, and nothing is clipped) and ``compile``; :meth:`RunConfig.validate`
refuses the combinations that cannot work.

Launched by ``torchrun --nproc-per-node N``, each rank takes its ``1/N`` of every batch and
rank 0 alone writes metrics. ``distributed`` picks how: ``ddp`` (DDP, the optimizer replicated:
every rank computes the same update; rank 0 writes the checkpoints), ``ddp-sharded`` (DDP, each
matrix updated by its owner rank, :func:`sumo_optim.distributed.shard_matrices`), ``fsdp2``
(``fully_shard`` on every transformer layer, then the whole model) or ``hsdp`` (the same on a
2-D ``("replicate", "shard")`` mesh: ``replicate`` replica groups, by default one per node,
each sharding the model over its ranks). In the last three no rank holds the whole optimizer
state, so every rank writes its part of each checkpoint through DCP; such a checkpoint
resumes under any of them, on any world size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import sumo_optim
from sumo_optim import distributed as sumo_dist

from . import data as data_lib
from .checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint, staging_dir
from .config import GALORE_FAMILY, RunConfig
from .models import build_llama


def _rss_bytes() -> int | None:
    """This process's resident memory now (psutil, else Linux's /proc/self/statm; None elsewhere)."""
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:
        try:
            return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            return None


class RunPeakRss:
    """The peak resident memory of the process *during* one run, sampled by a background thread
    every ``interval`` seconds (``ru_maxrss`` would be the peak of everything the process did,
    e.g. the earlier runs of ``sumo-train compare``). A sampled peak can miss a spike shorter
    than the interval."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.start, self.peak = interval, _rss_bytes(), _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, _rss_bytes())

    def begin(self) -> RunPeakRss:
        if self.start is not None:
            self._thread.start()
        return self

    def end(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cap_memory(device: torch.device, gib: float) -> None:
    """Lets CUDA's caching allocator hand this process at most ``gib`` GiB (an allocation beyond it
    raises ``torch.OutOfMemoryError``), so one large GPU can stand in for a smaller one. The CUDA
    context (a few hundred MiB) is outside the cap."""
    if device.type != "cuda":
        raise ValueError(f"gpu_memory_cap_gib={gib} needs a CUDA device, not {device.type!r}")
    device = device if device.index is not None else torch.device("cuda", torch.cuda.current_device())
    total = torch.cuda.get_device_properties(device).total_memory
    if gib * 2**30 > total:
        raise ValueError(f"gpu_memory_cap_gib={gib} exceeds the GPU's {total / 2**30:.1f} GiB")
    torch.cuda.set_per_process_memory_fraction(gib * 2**30 / total, device)


def join_torchrun(device: torch.device) -> tuple[int, int, torch.device]:
    """(rank, world size, device): joins torchrun's process group when it launched ``world size > 1``
    processes (NCCL on GPUs, each process on its ``LOCAL_RANK``'s GPU; gloo on CPUs)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def parallelize(task: Task, world_size: int, device: torch.device, config: RunConfig) -> None:
    """Makes ``task.train_model`` data-parallel: DDP, or FSDP2 applied torchtitan style to each
    transformer layer (LLaMA decoder / BERT encoder layers), then to the whole model, on a 1-D
    mesh (``fsdp2``) or a 2-D ``("replicate", "shard")`` one (``hsdp``, :func:`hsdp_replicas`)."""
    model = task.model
    if config.distributed not in ("fsdp2", "hsdp"):
        device_ids = [device.index] if device.type == "cuda" else None
        task.train_model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        return
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if config.distributed == "hsdp":
        replicate = hsdp_replicas(config, world_size)
        mesh = init_device_mesh(
            device.type, (replicate, world_size // replicate), mesh_dim_names=("replicate", "shard")
        )
    else:
        mesh = init_device_mesh(device.type, (world_size,))
    base = model.base_model
    for layer in base.layers if hasattr(base, "layers") else base.encoder.layer:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def hsdp_replicas(config: RunConfig, world_size: int) -> int:
    """HSDP's replica groups: ``config.replicate``, or one per node (torchrun's ``LOCAL_WORLD_SIZE``
    ranks each); it must divide the world size."""
    replicate = config.replicate or world_size // int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    if replicate < 1 or world_size % replicate:
        raise ValueError(f"replicate={replicate} must divide the world size ({world_size})")
    return replicate


def gradient_sync(task: Task, world_size: int, mode: str, last: bool) -> contextlib.AbstractContextManager:
    """Data-parallel gradients are reduced on a step's last micro-batch only: DDP's ``no_sync``
    (around forward and backward) or FSDP2's ``set_requires_gradient_sync`` before the others."""
    if world_size == 1:
        return contextlib.nullcontext()
    if mode in ("fsdp2", "hsdp"):
        task.model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()
    return contextlib.nullcontext() if last else task.train_model.no_sync()


def build_optimizers(config: RunConfig, model: nn.Module) -> list[torch.optim.Optimizer]:
    """The run's optimizer(s): low-rank ones over ``sumo_optim.param_groups`` (linear weights in
    the subspace, the rest AdamW at ``adamw_lr``); ``muon`` is ``torch.optim.Muon`` on the same
    matrices plus ``torch.optim.AdamW`` on the rest; ``adamw`` is ``torch.optim.AdamW``."""
    name, lr, decay = config.optimizer, config.resolved_lr(), config.weight_decay
    if name == "adamw":
        return [torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=decay, **config.optimizer_options)]
    groups = sumo_optim.param_groups(model, adamw_options={"lr": config.adamw_lr})
    if name == "muon":
        if not hasattr(torch.optim, "Muon"):
            raise ValueError(f"optimizer 'muon' needs torch.optim.Muon (PyTorch >= 2.9); this is {torch.__version__}")
        matrices = [p for g in groups if g["subspace"] for p in g["params"]]
        rest = [p for g in groups if not g["subspace"] for p in g["params"]]
        return [
            torch.optim.Muon(matrices, lr=lr, weight_decay=decay, **config.optimizer_options),
            torch.optim.AdamW(rest, lr=config.adamw_lr, weight_decay=decay),
        ]
    options: dict[str, Any] = {"rank": config.rank}
    if config.layerwise:  # each parameter updated in its gradient hook, at its grad_accum-th backward
        options.update(layerwise=True, layerwise_accumulation_steps=config.grad_accum)
        if config.layerwise_refresh != "sum":
            options["layerwise_refresh"] = config.layerwise_refresh
    if config.adamw_state_bits != 32 and name != "galore8bit":  # GaLoreAdamW8bit's are always 8-bit
        options["adamw_state_bits"] = config.adamw_state_bits
    if config.stochastic_rounding:
        options["bf16_stochastic_rounding"] = True
    if config.state_dtype != "float32":
        options["state_dtype"] = getattr(torch, config.state_dtype)
    if name in ("sumo", "sumo_paper"):
        options.update(update_freq=config.update_freq, scale=config.resolved_scale(), seed=config.seed)
    elif name in GALORE_FAMILY:
        options.update(update_proj_gap=config.update_freq, scale=config.resolved_scale(), seed=config.seed)
        if name == "golore":
            options["total_steps"] = config.steps
    elif name == "mofasgd":
        options.update(scale=config.resolved_scale())
    options.update(config.optimizer_options)
    return [sumo_optim.create(name, groups, lr=lr, weight_decay=decay, **options)]


def lr_factor(config: RunConfig):
    """Cosine schedule with linear warm-up, decaying to ``min_lr_ratio`` of the peak."""
    warmup = max(1, int(config.warmup_fraction * config.steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, config.steps - warmup))
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def optimizer_state_bytes(optimizers: list[torch.optim.Optimizer]) -> int:
    return sum(
        sumo_dist.local_tensor(v).numel() * v.element_size()
        for optimizer in optimizers
        for state in optimizer.state.values()
        for v in state.values()
        if isinstance(v, torch.Tensor)
    )


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recomputes each transformer layer's activations in backward (non-reentrant checkpoints):
    transformers >= 5's ``activation_checkpointing_enable``, else ``gradient_checkpointing_enable``."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


class Task:
    """What differs between pre-training and fine-tuning: data, model, loss, evaluation."""

    def __init__(self, config: RunConfig, device: torch.device, rank: int = 0, world_size: int = 1):
        self.config, self.device = config, device
        self.rank, self.world_size = rank, world_size
        if config.task == "pretrain":
            self.tokens = data_lib.prepare_tokens(config.corpus, config.cache_dir, config.vocab_size)
            dtype = getattr(torch, config.dtype)
            # bf16 weights are created on the training device (LLaMA-7B never exists on the host);
            # float32 ones on the CPU, so that a seed gives the same model on any device.
            with torch.device(device if dtype != torch.float32 else "cpu"):
                self.model = build_llama(config.preset, self.tokens.vocab_size, config.seq_len, dtype)
            self.tokens_per_batch = config.batch_size * config.seq_len
        else:
            from transformers import AutoTokenizer, BertForSequenceClassification

            directory = data_lib.minilm_directory()
            self.tokenizer = AutoTokenizer.from_pretrained(str(directory))
            # Train in float32 whatever dtype the weights are stored in (recent transformers keep a
            # half-precision checkpoint's dtype, and torch's AdamW then divides by eps = 0 in fp16).
            model = BertForSequenceClassification.from_pretrained(str(directory), num_labels=2)
            self.model = model.to(getattr(torch, config.dtype))
            self.train_examples, self.val_examples = data_lib.rotten_tomatoes()
            self.tokens_per_batch = config.batch_size * config.max_length
        self.model.to(device)
        if config.activation_checkpointing:
            enable_activation_checkpointing(self.model)
        self.train_model: nn.Module = self.model  # the DDP wrapper in data-parallel runs

    def _sentences(self, examples: list[tuple[str, int]]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        encoded = self.tokenizer(
            [text for text, _ in examples],
            padding=True,
            truncation=True,
            max_length=self.config.max_length,
            return_tensors="pt",
        )
        labels = torch.tensor([label for _, label in examples])
        return {k: v.to(self.device) for k, v in encoded.items()}, labels.to(self.device)

    def micro_batches(self, index: int) -> list[Any]:
        """This rank's ``grad_accum`` micro-batches of batch number ``index``. The batch depends only
        on seed and index, so neither the world size nor ``grad_accum`` changes what is trained on."""
        config = self.config
        if config.task == "pretrain":
            x, y = data_lib.token_batch(self.tokens.train, config.batch_size, config.seq_len, config.seed, index)
            x, y = x.chunk(self.world_size)[self.rank], y.chunk(self.world_size)[self.rank]
            return list(zip(x.chunk(config.grad_accum), y.chunk(config.grad_accum)))
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + index)
        picks = torch.randint(0, len(self.train_examples), (config.batch_size,), generator=generator)
        return [
            [self.train_examples[i] for i in part]
            for part in picks.chunk(self.world_size)[self.rank].chunk(config.grad_accum)
        ]

    def loss(self, micro_batch: Any) -> torch.Tensor:
        """Mean training loss of one micro-batch of :meth:`micro_batches`."""
        if self.config.task == "pretrain":
            x, y = micro_batch
            logits = self.train_model(input_ids=x.to(self.device), use_cache=False).logits
            return nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.to(self.device).flatten())
        inputs, labels = self._sentences(micro_batch)
        return nn.functional.cross_entropy(self.train_model(**inputs).logits.float(), labels)

    @torch.no_grad()
    def evaluate(self, full: bool = False) -> dict[str, float]:
        config = self.config
        limit = config.final_eval_batches if full and config.final_eval_batches else None
        if limit:
            full, config = False, dataclasses.replace(config, eval_batches=limit)
        # forwards of one micro-batch each (the memory of a training forward), over the same tokens
        config = dataclasses.replace(
            config,
            batch_size=config.batch_size // config.grad_accum,
            eval_batches=config.eval_batches * config.grad_accum,
        )
        self.model.eval()
        try:
            if config.task == "pretrain":
                losses = [
                    nn.functional.cross_entropy(
                        self.model(input_ids=x.to(self.device)).logits.flatten(0, 1).float(),
                        y.to(self.device).flatten(),
                    ).item()
                    for x, y in data_lib.validation_batches(
                        self.tokens.val, config.batch_size, config.seq_len, 10**9 if full else config.eval_batches
                    )
                ]
                loss = sum(losses) / len(losses)
                return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50))}
            examples = self.val_examples if full else self.val_examples[: config.eval_batches * config.batch_size]
            correct, total_loss = 0, 0.0
            for i in range(0, len(examples), config.batch_size):
                inputs, labels = self._sentences(examples[i : i + config.batch_size])
                logits = self.model(**inputs).logits.float()
                total_loss += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
                correct += (logits.argmax(-1) == labels).sum().item()
            return {"val_loss": total_loss / len(examples), "val_accuracy": correct / len(examples)}
        finally:
            self.model.train()


def train(config: RunConfig, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Runs (or resumes) one training run; returns its final metrics."""
    from torch.utils.tensorboard import SummaryWriter
    from tqdm.auto import tqdm

    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if config.layerwise and launched > 1:
        raise ValueError(
            f"layerwise=True with a distributed launch (WORLD_SIZE={launched}): layer-wise updates would use "
            "each rank's local gradient before the all-reduce; train on one process or set --layerwise false"
        )
    rank, world_size, device = join_torchrun(pick_device(config.device))
    if config.batch_size % (world_size * config.grad_accum):
        raise ValueError(
            f"batch_size ({config.batch_size}) must be a multiple of the world size ({world_size}) × grad_accum "
            f"({config.grad_accum})"
        )
    if config.gpu_memory_cap_gib:
        cap_memory(device, config.gpu_memory_cap_gib)
    main_process = rank == 0
    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    task = Task(config, device, rank, world_size)
    model = task.model
    sharded = world_size > 1 and config.distributed != "ddp"  # no rank holds the whole optimizer state
    if world_size > 1:
        parallelize(task, world_size, device, config)
    optimizers = build_optimizers(config, model)
    if world_size > 1 and config.distributed == "ddp-sharded":
        sumo_dist.shard_matrices(optimizers[0])
    if config.compile:  # evaluation runs the plain model
        task.train_model = torch.compile(task.train_model)
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, lr_factor(config)) for o in optimizers]
    record = config.to_dict()
    if main_process:
        (run_dir / "config.json").write_text(json.dumps(record, indent=2))

    start = 0
    metrics_path = run_dir / "metrics.jsonl"
    if resume:
        checkpoint = latest_checkpoint(run_dir)
        if checkpoint is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {run_dir}")
        weights, state = load_checkpoint(checkpoint, record)
        if weights is None:  # a DCP checkpoint: each rank reads its part
            sumo_dist.load_checkpoint(str(checkpoint), model, optimizers[0])
        elif sharded:
            raise CheckpointError(f"{checkpoint} was written with distributed='ddp'; resume it with that mode")
        else:
            model.load_state_dict(weights)
            for optimizer, saved in zip(optimizers, state["optimizers"], strict=True):
                optimizer.load_state_dict(saved)
        for scheduler, saved in zip(schedulers, state["schedulers"], strict=True):
            scheduler.load_state_dict(saved)
        torch.set_rng_state(state["rng"]["torch"])
        if device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        start = state["step"]
        if main_process and metrics_path.exists():  # keep the history up to the checkpoint, drop what came after
            kept = [line for line in metrics_path.read_text().splitlines() if json.loads(line)["step"] <= start]
            metrics_path.write_text("".join(line + "\n" for line in kept))
    elif main_process and metrics_path.exists():
        metrics_path.unlink()

    writer = SummaryWriter(str(run_dir / "tensorboard")) if main_process else None
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    peak_memory = 0  # on CUDA: the run's peak allocation, over the windows that logging resets

    def log(entry: dict[str, Any]) -> None:
        if not main_process:
            return
        with metrics_path.open("a") as file:
            file.write(json.dumps(entry) + "\n")
        for key, value in entry.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                writer.add_scalar(key, value, entry["step"])

    bar = tqdm(
        range(start, config.steps),
        initial=start,
        total=config.steps,
        disable=not progress or not main_process,
        desc=f"{config.task} {config.optimizer}",
        unit="step",
    )
    host_memory = RunPeakRss().begin()
    began, window_start, window_tokens = time.perf_counter(), time.perf_counter(), 0
    for step in bar:
        parts = task.micro_batches(step)
        loss = torch.zeros((), device=device)
        for i, part in enumerate(parts):
            with gradient_sync(task, world_size, config.distributed, last=i == len(parts) - 1):
                with autocast:
                    part_loss = task.loss(part) / len(parts)
                part_loss.backward()
            loss += part_loss.detach()
        if config.grad_clip and not config.layerwise:  # layer-wise: no gradients left to clip
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        for optimizer in optimizers:
            optimizer.step()  # layer-wise: already updated during backward; checks the accumulation ended
        for scheduler in schedulers:
            scheduler.step()
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        window_tokens += task.tokens_per_batch
        done = step + 1
        if done % config.log_every == 0 or done == config.steps:
            if world_size > 1:  # the whole batch's loss
                loss = loss.detach().clone()
                dist.all_reduce(loss)
                loss /= world_size
            elapsed = time.perf_counter() - window_start
            rate = window_tokens / max(elapsed, 1e-9)
            entry = {"step": done, "loss": loss.item(), "lr": schedulers[0].get_last_lr()[0], "tokens_per_s": rate}
            postfix = {"loss": f"{loss.item():.3f}", "tok_s": f"{rate:,.0f}"}
            if device.type == "cuda":  # the peak since the last log
                window_peak = torch.cuda.max_memory_allocated()
                peak_memory = max(peak_memory, window_peak)
                torch.cuda.reset_peak_memory_stats()
                entry["gpu_memory_gib"] = window_peak / 2**30
                postfix["mem"] = f"{window_peak / 2**30:.1f}GiB"
            log(entry)
            bar.set_postfix(postfix)
            window_start, window_tokens = time.perf_counter(), 0
        if done % config.eval_every == 0 or done == config.steps:  # the same validation windows every time
            log({"step": done, **task.evaluate(), "elapsed_s": time.perf_counter() - began})
            window_start = time.perf_counter()  # validation time is not training throughput
        if (config.checkpoint_every and done % config.checkpoint_every == 0) or done == config.steps:
            training_state = {
                "step": done,
                "optimizers": [] if sharded else [o.state_dict() for o in optimizers],
                "schedulers": [s.state_dict() for s in schedulers],
                "rng": {
                    "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else None,
                },
            }
            if sharded:  # every rank writes its part into the staging folder, rank 0 completes it
                staging = staging_dir(run_dir, done)
                if main_process:
                    shutil.rmtree(staging, ignore_errors=True)
                dist.barrier()
                sumo_dist.save_checkpoint(str(staging), model, optimizers[0])
            if main_process:  # otherwise the optimizer states are replicated: rank 0's are everyone's
                save_checkpoint(run_dir, done, None if sharded else model, training_state, record)
    # the whole validation split (or final_eval_batches of it): the run's result, marked "final"
    final = {"step": config.steps, **task.evaluate(full=True), "elapsed_s": time.perf_counter() - began}
    host_memory.end()
    log({**final, "final": True})
    if writer is not None:
        writer.close()
    summary = {
        **final,
        "optimizer": config.optimizer,
        "lr": config.resolved_lr(),
        "wall_s": time.perf_counter() - began,
        "peak_memory_bytes": max(peak_memory, torch.cuda.max_memory_allocated()) if device.type == "cuda" else None,
        "run_peak_rss_bytes": host_memory.peak,  # sampled during this run (the process's RSS)
        "run_rss_growth_bytes": None if host_memory.start is None else host_memory.peak - host_memory.start,
        "optimizer_state_bytes": optimizer_state_bytes(optimizers),
        "parameters": sum(p.numel() for p in model.parameters()),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "CPU",
        "world_size": world_size,
    }
    if main_process:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if world_size > 1:
        dist.barrier()  # no rank leaves (and may end the process group) while rank 0 still writes
    return summary
