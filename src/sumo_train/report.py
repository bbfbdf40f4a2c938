"""Comparison tables and loss-curve plots from run directories."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: not a run directory")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def save_figure(figure: Any, out: Path) -> Path:
    """Writes a matplotlib figure to ``out`` (a PNG at 120 dpi, its folder made) and closes it."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=120)
    plt.close(figure)
    return out


def plot_runs(run_dirs: list[Path], out: Path, title: str = "", labels: list[str] | None = None) -> Path:
    """Training loss (left) and validation loss (right) against step, one line per run
    (labelled by ``labels`` or the run's optimizer); a star marks the final evaluation on the
    whole validation split. The y-axes show the last four fifths of the steps, where runs differ."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (train_axis, val_axis) = plt.subplots(1, 2, figsize=(11, 4.2))
    for index, run_dir in enumerate(run_dirs):
        metrics = read_metrics(run_dir)
        label = labels[index] if labels else json.loads((Path(run_dir) / "config.json").read_text())["optimizer"]
        train_points = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
        val_points = [(m["step"], m["val_loss"]) for m in metrics if "val_loss" in m and not m.get("final")]
        finals = [(m["step"], m["val_loss"]) for m in metrics if "val_loss" in m and m.get("final")]
        if train_points:
            train_axis.plot(*zip(*train_points), label=label, linewidth=1.2)
        if val_points:
            line = val_axis.plot(*zip(*val_points), marker="o", markersize=3, label=label)[0]
            if finals:  # the whole split: another set of windows than the curve's, so a mark of its own
                val_axis.plot(*zip(*finals), marker="*", markersize=9, linestyle="none", color=line.get_color())
    for axis in (train_axis, val_axis):  # zoom on the part after the first fifth, where the runs differ
        tails = [y for line in axis.get_lines() for x, y in line.get_xydata() if x >= 0.2 * axis.get_xlim()[1]]
        if tails:
            margin = 0.05 * (max(tails) - min(tails)) or 0.05
            axis.set_ylim(min(tails) - margin, max(tails) + margin)
    for axis, name in ((train_axis, "training loss"), (val_axis, "validation loss")):
        axis.set_xlabel("step")
        axis.set_ylabel(name)
        axis.grid(alpha=0.3)
        axis.legend()
    if title:
        figure.suptitle(title)
    return save_figure(figure, out)


def gap_points(run_dir: Path, reference: Path, key: str = "val_loss") -> list[tuple[int, float]]:
    """(step, the run's ``key`` − the reference's) at every step both evaluated periodically; the
    final whole-split evaluation is left out (other windows than the periodic ones)."""

    def periodic(path: Path) -> dict[int, float]:
        return {m["step"]: m[key] for m in read_metrics(path) if key in m and not m.get("final")}

    baseline = periodic(reference)
    return sorted((step, value - baseline[step]) for step, value in periodic(run_dir).items() if step in baseline)


def plot_gap(
    runs: list[tuple[str, Path, str]],
    reference: Path,
    out: Path,
    key: str = "val_loss",
    reference_label: str = "the reference",
    title: str = "",
) -> Path:
    """:func:`gap_points` of each (label, run directory, optimizer label) of ``runs`` against
    ``reference``, one line each in its optimizer's colour, dashed where the label is not the
    optimizer's own (another seed): on a loss, below zero is ahead of the reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7.5, 4.2))
    colors: dict[str, str] = {}
    for label, run_dir, optimizer in runs:
        points = gap_points(run_dir, reference, key)
        if not points:
            continue
        style = "-" if label == optimizer else "--"
        line = axis.plot(*zip(*points), linestyle=style, color=colors.get(optimizer), label=label)[0]
        colors.setdefault(optimizer, line.get_color())
    axis.axhline(0.0, color="black", linewidth=0.8)
    axis.set_xlabel("step")
    axis.set_ylabel(f"{key.replace('_', ' ')} − {reference_label}'s")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    if title:
        axis.set_title(title, fontsize=10)
    return save_figure(figure, out)


def plot_lr_sweep(
    points: dict[str, list[tuple[float, float]]], out: Path, title: str = "", metric: str = "val loss"
) -> Path:
    """The final ``metric`` against learning rate (log scale), one line per optimizer: where each
    method's best lr lies, and whether it sits at an edge of the grid tried."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.5, 4.2))
    for label, pairs in points.items():
        axis.plot(*zip(*sorted(pairs)), marker="o", label=label)
    axis.set_xscale("log")
    axis.set_xlabel("learning rate")
    axis.set_ylabel(metric)
    axis.grid(alpha=0.3, which="both")
    axis.legend(fontsize=8)
    if title:
        axis.set_title(title, fontsize=10)
    return save_figure(figure, out)


def comparison_table(summaries: list[dict[str, Any]]) -> str:
    """Markdown table of final metrics, wall time, peak memory and optimizer-state bytes. Peak memory
    is each run's own: CUDA's peak allocation, or on a CPU the process's resident memory sampled
    during that run (it includes what earlier runs of the process left allocated)."""
    accuracy = any("val_accuracy" in s for s in summaries)
    quality = "| val accuracy |" if accuracy else "| val loss | val ppl |"
    lines = [
        f"| optimizer | lr {quality} wall time | peak memory | optimizer state |",
        "|---|---:|" + ("---:|" if accuracy else "---:|---:|") + "---:|---:|---:|",
    ]
    for s in summaries:
        metric = f"{s['val_accuracy']:.4f} |" if accuracy else f"{s['val_loss']:.4f} | {s['val_ppl']:.2f} |"
        if s.get("peak_memory_bytes") is not None:
            memory = f"{s['peak_memory_bytes'] / 2**20:,.0f} MiB"
        elif s.get("run_peak_rss_bytes"):
            memory = f"{s['run_peak_rss_bytes'] / 2**20:,.0f} MiB RSS (this run, CPU)"
        else:
            memory = "n/a"
        state = f"{s['optimizer_state_bytes'] / 2**20:.2f} MiB"
        lr = f"{s['lr']:g}" if s.get("lr") is not None else "n/a"
        lines.append(f"| {s['optimizer']} | {lr} | {metric} {s['wall_s']:.1f} s | {memory} | {state} |")
    return "\n".join(lines)
