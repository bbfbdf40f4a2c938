"""Peak GPU memory of a real training step of a LLaMA preset, broken down as in GaLore's Figure 1.

For each preset, micro-batch size and optimizer row (:data:`ROWS`: AdamW (torch's, and the
library's with 8-bit moments), GaLoreAdamW and SUMO,
normal and layer-wise, and the 7B recipes: layer-wise accumulation over two micro-batches with
refreshes from the first, GaLoreAdamW8bit / SUMO with 8-bit AdamW moments and bf16 Q and M), a
fresh process builds the model with bf16 weights (activation checkpointing on unless
``--no-activation-checkpointing``), trains ``--steps`` steps on random tokens (micro-batch
``--batch``, a list measuring each size, sequence ``--seq-len``, bf16 autocast) and measures the last:

* weights: the bytes of the parameters;
* gradients: the bytes of the ``.grad`` tensors once backward is done, where all of them exist
  (0 in layer-wise mode: each gradient is freed in its hook, right after its update);
* optimizer state: the bytes of the optimizer's state tensors;
* activations & transients: CUDA's peak allocation during the step minus the three above.

``--cap-gib 16`` limits the process to 16 GiB (``torch.cuda.set_per_process_memory_fraction``):
a configuration that needs more fails with an out-of-memory error, reported as "over cap".
Each configuration runs in its own process, so one OOM leaves the others clean.

    python benchmarks/memory.py --presets 1b,7b --cap-gib 16
    python benchmarks/memory.py --presets 7b --optimizers sumo-recipe,galore8bit-recipe --batch 1,8,16,32 --cap-gib 24
    python benchmarks/memory.py --device cpu --presets test   # smoke mode: no peak, tensor sizes only

Writes ``memory_<presets>.md`` / ``.json`` and ``.png`` (stacked bars) after every row, so a
sweep stopped by a time limit keeps what it measured, under benchmarks/results/ (or
``--out STEM``). torch's AdamW keeps its moments in the parameters' dtype (bf16 here); the
library's optimizers keep float32 states for bf16 weights.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parents[1]

# The one-GPU 7B recipe's optimizer settings (README): layer-wise updates accumulated over two
# micro-batches here, refresh bases from the first, 8-bit AdamW moments for the rest.
RECIPE = {"layerwise": True, "layerwise_accumulation_steps": 2, "layerwise_refresh": "first"}
# row name: (label, registry name of the optimizer, its options); "adamw" is torch's AdamW, and
# "adamw8bit" puts every parameter in SUMO's AdamW part (its AdamW, exactly torch's, with moments in 8 bits)
ROWS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "adamw": ("AdamW (torch, bf16 states)", "adamw", {}),
    "adamw8bit": ("AdamW, 8-bit moments", "sumo", {"adamw_state_bits": 8}),
    # GaLore's rows refresh with the randomized range finder: the exact SVD of LLaMA-7B's 224
    # matrices takes minutes, and the measured (last) step is not a refresh step, so the method
    # changes only how long the first step takes, not the bytes measured
    "galore": ("GaLoreAdamW", "galore", {"refresh": "randomized"}),
    "galore-layerwise": ("GaLoreAdamW layer-wise", "galore", {"layerwise": True, "refresh": "randomized"}),
    "galore8bit-recipe": ("GaLoreAdamW8bit, 7B recipe", "galore8bit", {**RECIPE, "refresh": "randomized"}),
    "sumo": ("SUMO", "sumo", {}),
    "sumo-layerwise": ("SUMO layer-wise", "sumo", {"layerwise": True}),
    "sumo-recipe": (
        "SUMO, 7B recipe",
        "sumo",
        {**RECIPE, "adamw_state_bits": 8, "state_dtype": torch.bfloat16},
    ),
}
PARTS = ("weights", "gradients", "state", "activations")


def tensor_bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def measure(preset: str, row: str, options: dict[str, Any]) -> dict[str, Any]:
    """One configuration in this process: the byte counts of the last of ``steps`` steps."""
    import sumo_optim
    from sumo_train.models import build_llama
    from sumo_train.train import cap_memory, enable_activation_checkpointing

    device = torch.device(options["device"])
    cuda = device.type == "cuda"
    if cuda and options["cap_gib"]:
        cap_memory(device, options["cap_gib"])
    torch.manual_seed(0)
    vocab, seq_len, batch = options["vocab_size"], options["seq_len"], options["batch"]
    with torch.device(device):
        model = build_llama(preset, vocab, seq_len, torch.bfloat16)
    if options["activation_checkpointing"]:
        enable_activation_checkpointing(model)
    model.train()
    _, name, settings = ROWS[row]
    if name == "adamw":
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    else:
        if row == "adamw8bit":
            groups = [{"params": list(model.parameters()), "subspace": False}]
        else:
            groups = sumo_optim.param_groups(model, rank=options["rank"])
        optimizer = sumo_optim.create(name, groups, lr=1e-3, **settings)
    micro_batches = settings.get("layerwise_accumulation_steps", 1)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda)
    result: dict[str, Any] = {}
    for _ in range(options["steps"]):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        began = time.perf_counter()
        for _ in range(micro_batches):
            tokens = torch.randint(0, vocab, (batch, seq_len + 1), device=device)
            with autocast:
                logits = model(input_ids=tokens[:, :-1], use_cache=False).logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
            del logits
            (loss / micro_batches).backward()
        gradients = tensor_bytes(p.grad for p in model.parameters())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        result = {
            "weights": tensor_bytes(model.parameters()),
            "gradients": gradients,
            "state": tensor_bytes(v for s in optimizer.state.values() for v in s.values()),
            "peak": torch.cuda.max_memory_allocated(device) if cuda else None,
            "step_s": time.perf_counter() - began,
        }
    known = result["weights"] + result["gradients"] + result["state"]
    result["activations"] = result["peak"] - known if result["peak"] is not None else None
    return {
        "status": "ok",
        **result,
        "parameters": sum(p.numel() for p in model.parameters()),
        "loss": loss.item(),
    }


def run_isolated(preset: str, row: str, options: dict[str, Any]) -> dict[str, Any]:
    """:func:`measure` in a fresh Python process; an out-of-memory error there is "over cap"."""
    command = [sys.executable, __file__, "--worker", json.dumps({"preset": preset, "row": row, **options})]
    paths = [str(ROOT / "src"), os.environ.get("PYTHONPATH")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, paths))}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = done.stdout.strip().splitlines()
    if done.returncode == 0 and lines:
        return json.loads(lines[-1])
    error = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
    return {"status": "failed", "error": error[0]}


def worker(spec: str) -> None:
    options = json.loads(spec)
    preset, row = options.pop("preset"), options.pop("row")
    try:
        result = measure(preset, row, options)
    except torch.OutOfMemoryError as error:
        result = {"status": "over cap", "error": str(error).splitlines()[0]}
    print(json.dumps(result))


def table(rows: list[dict[str, Any]], cap_gib: float | None) -> str:
    largest = max((r.get(part) or 0 for r in rows for part in (*PARTS, "peak")), default=0)
    unit, scale = ("GiB", 2**30) if largest >= 2**30 else ("MiB", 2**20)

    def size(value: int | None) -> str:
        return "n/a" if value is None else f"{value / scale:.2f}"

    lines = [
        f"| preset | micro-batch | optimizer | weights {unit} | gradients {unit} | optimizer state {unit} "
        f"| activations & transients {unit} | peak {unit} | status |",
        "|---|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if r["status"] != "ok":
            status = f"over cap ({cap_gib:g} GiB)" if r["status"] == "over cap" else f"failed: {r['error']}"
            lines.append(f"| {r['preset']} | {r['batch']} | {r['label']} | | | | | | {status} |")
            continue
        parts = " | ".join(size(r[part]) for part in PARTS)
        lines.append(f"| {r['preset']} | {r['batch']} | {r['label']} | {parts} | {size(r['peak'])} | ok |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # horizontal bars, first row on top: long labels stay readable for any number of rows
    figure, axis = plt.subplots(figsize=(9, 1.2 + 0.4 * len(rows)))
    labels = [f"{r['preset']} ×{r['batch']}  {r['label']}" for r in rows]
    positions = range(len(rows) - 1, -1, -1)
    lefts = [0.0] * len(rows)
    for part in PARTS:
        widths = [(r.get(part) or 0) / 2**30 for r in rows]
        axis.barh(positions, widths, left=lefts, label="activations & transients" if part == "activations" else part)
        lefts = [left + width for left, width in zip(lefts, widths)]
    for y, r in zip(positions, rows):
        note = r["status"] if r["status"] != "ok" else f"{(r.get('peak') or 0) / 2**30:.1f}"
        axis.text(lefts[len(rows) - 1 - y], y, f" {note}", va="center", fontsize=7)
    axis.set_yticks(list(positions), labels, fontsize=7)
    axis.set_xlabel("GiB")
    axis.set_title(title, fontsize=8)
    axis.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def save(stem: Path, title: str, rows: list[dict[str, Any]], meta: dict[str, Any], cap_gib: float | None) -> str:
    """Writes the table (``stem.md``) and the rows with ``meta`` (``stem.json``); returns the table."""
    markdown = f"{title}\n\n{table(rows, cap_gib)}\n"
    if meta["device"] == "CPU":
        markdown += "\nCPU smoke mode: no CUDA memory statistics, so activations and peak are n/a.\n"
    stem.with_suffix(".md").write_text(markdown)
    stem.with_suffix(".json").write_text(json.dumps({**meta, "rows": rows}, indent=2))
    return markdown


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="1b,7b")
    parser.add_argument("--optimizers", default=",".join(ROWS), help=f"rows, of: {', '.join(ROWS)}")
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument(
        "--batch", default="1", help="sequences per micro-batch; a list (1,16,32) measures each: the largest that fits"
    )
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--steps", type=int, default=3, help="steps per configuration; the last is measured")
    parser.add_argument("--cap-gib", type=float, default=None, help="per-process GPU memory limit")
    parser.add_argument("--no-activation-checkpointing", action="store_true")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, default=None, help="file stem; default results/memory_<presets>")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker)
        return 0
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    if not names:
        parser.error(f"--optimizers names no row; choose from {', '.join(ROWS)}")
    unknown = sorted(set(names) - set(ROWS))
    if unknown:
        parser.error(f"unknown optimizer row(s) {', '.join(unknown)}; choose from {', '.join(ROWS)}")
    try:
        batches = [int(b) for b in args.batch.split(",")]
    except ValueError:
        parser.error(f"--batch takes integers separated by commas, got {args.batch!r}")
    if not batches or min(batches) < 1:
        parser.error(f"--batch sizes must be >= 1, got {args.batch!r}")
    options = {
        "device": args.device,
        "rank": args.rank,
        "seq_len": args.seq_len,
        "vocab_size": args.vocab_size,
        "steps": args.steps,
        "cap_gib": args.cap_gib,
        "activation_checkpointing": not args.no_activation_checkpointing,
    }
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") and torch.cuda.is_available() else "CPU"
    title = (
        f"peak memory of one training step: seq {args.seq_len}, micro-batch {args.batch}, bf16 weights, "
        f"rank {args.rank}, activation checkpointing {'off' if args.no_activation_checkpointing else 'on'}, {device}"
        + (f", cap {args.cap_gib:g} GiB" if args.cap_gib else "")
    )
    config = {**options, "batches": batches, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    stem = args.out or RESULTS / f"memory_{'-'.join(presets)}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for preset in presets:
        for batch in batches:
            for name in names:
                result = run_isolated(preset, name, {**options, "batch": batch})
                rows.append({"preset": preset, "batch": batch, "optimizer": name, "label": ROWS[name][0], **result})
                peak = f", peak {result['peak'] / 2**30:.2f} GiB" if result.get("peak") else ""
                print(f"{preset} micro-batch {batch} {name}: {result['status']}{peak}", flush=True)
                # after every row, so a sweep stopped by a time limit keeps what it measured
                markdown = save(stem, title, rows, {"config": config, "device": device}, args.cap_gib)
                plot(rows, stem.with_suffix(".png"), title)
    print(f"\n{markdown}\nwritten: {stem}.md, .json and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
