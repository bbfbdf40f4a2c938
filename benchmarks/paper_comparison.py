"""The SUMO paper's comparison at small scale: every optimizer, a small learning-rate sweep each,
the best run of each reported (docs/results.md is made from this script's output).

    python benchmarks/paper_comparison.py pretrain --preset 20m --rank 128 --parallel 6 --out docs/results/pretrain-20m
    python benchmarks/paper_comparison.py finetune --ranks 4,8 --steps 400 --parallel 6 --out docs/results/finetune
    python benchmarks/paper_comparison.py pretrain --smoke --out /tmp/smoke     # CPU, seconds: does it run end to end

Each run is one ``sumo-train`` process (several at once with ``--parallel``: on a GPU the small
models leave it mostly idle); a run whose ``summary.json`` exists is not run again, so the sweep
can be continued across sessions. ``--extend-edges`` adds one grid step past a best lr at an edge
of its finished sweep (again while the new point wins); ``--seeds 1`` reruns each finished
sweep's best lr (inside its grid) with seed 1 (``LABEL-lrLR-seed1``), after the sweeps. Writes
``results.md``/``results.json``, the best runs' loss curves (``loss_curves.png``), the final
metric against lr (``lr_sweep.png``) and, step by step, each best run's validation metric minus the
reference's (GaLore's; AdamW's in fine-tuning), other seeds dashed (``gap_to_reference.png``),
under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from tqdm.auto import tqdm  # noqa: E402

from sumo_train.data import prepare_tokens  # noqa: E402
from sumo_train.report import plot_gap, plot_lr_sweep, plot_runs, read_metrics  # noqa: E402

# Three learning rates per optimizer around each method's published setting.
PRETRAIN_GRID = {
    "adamw": (1e-3, 3e-3, 1e-2),
    "muon": (0.01, 0.02, 0.05),
    "galore": (0.005, 0.01, 0.02),
    "golore": (0.005, 0.01, 0.02),
    "mofasgd": (0.005, 0.02, 0.05),
    "sumo": (0.01, 0.02, 0.05),
    "sumo_paper": (5e-4, 1e-3, 2e-3),
    "sumo_rms": (2e-3, 4e-3, 8e-3),
}
# Labels that are one optimizer with other options: (optimizer, optimizer_options).
VARIANTS = {
    "sumo_paper": ("sumo_paper", {}),  # Algorithm 1 as printed: complement term, √max(m, n) scaling
    "sumo_rms": ("sumo", {"adjust_lr_fn": "match_rms_adamw"}),  # AdamW's update RMS at full rank
    "muon_rms": ("muon", {"adjust_lr_fn": "match_rms_adamw"}),
    # an ablation: GaLore with SUMO's transport of the first moment into each new basis
    "galore_transport": ("galore", {"transport_moments": True}),
    # GaLore's refresh by certified subspace iteration instead of galore-torch's full SVD
    "galore_iterative": ("galore", {"refresh": "iterative"}),
}
PRETRAIN_GRID["muon_rms"] = (2e-3, 4e-3, 8e-3)
PRETRAIN_GRID["galore_transport"] = PRETRAIN_GRID["galore_iterative"] = PRETRAIN_GRID["galore"]
FINETUNE_GRID = {"adamw": (2e-5, 5e-5, 1e-4), "galore": (1e-4, 3e-4, 1e-3), "sumo": (1e-3, 3e-3, 1e-2)}


def run_one(run_dir: Path, fields: dict[str, Any], task: str, deadline: float | None = None) -> dict[str, Any]:
    summary_path = run_dir / "summary.json"
    stopped = (deadline is not None and time.monotonic() > deadline) or (run_dir.parents[1] / "STOP").exists()
    if not summary_path.exists() and stopped:
        return {"run_dir": str(run_dir), "not_started": True, **fields}
    reused = summary_path.exists()
    if not reused:
        command = [sys.executable, "-m", "sumo_train.cli", task, "--no-progress", "--run-dir", str(run_dir)]
        for name, value in fields.items():
            value = json.dumps(value) if isinstance(value, dict) else str(value)
            command += [f"--{name.replace('_', '-')}", value]
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / "stdout.log", "w") as log:
            code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=_environment()).returncode
        if code != 0:
            return {"run_dir": str(run_dir), "failed": code, **fields}
    return {"run_dir": str(run_dir), "reused": reused, **fields, **json.loads(summary_path.read_text())}


def _environment() -> dict[str, str]:
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "2")
    return env


def first_reaching(run_dir: str, key: str, target: float, higher_is_better: bool) -> tuple[float | None, float | None]:
    """(step, elapsed seconds) at which ``key`` first gets as good as ``target``, interpolated
    linearly between the two validations around the crossing (validations are sparse). Reads
    the periodic validations only (the same windows each time), not the run's final evaluation
    on the whole split, which measures another set: ``target`` must come from the same windows
    (:func:`last_periodic`)."""
    sign = -1.0 if higher_is_better else 1.0  # compare as "lower is better"
    previous = None
    for entry in read_metrics(Path(run_dir)):
        if key not in entry or entry.get("final"):
            continue
        value = sign * entry[key]
        if value <= sign * target:
            if previous is None or previous[2] == value:
                return float(entry["step"]), entry.get("elapsed_s")
            step0, time0, value0 = previous
            t = (value0 - sign * target) / (value0 - value)
            step = step0 + t * (entry["step"] - step0)
            elapsed = entry.get("elapsed_s")
            if elapsed is not None and time0 is not None:
                elapsed = time0 + t * (elapsed - time0)
            return step, elapsed
        previous = (entry["step"], entry.get("elapsed_s"), value)
    return None, None


def last_periodic(run_dir: str, key: str) -> float | None:
    """The run's last periodic validation value of ``key`` (not its final whole-split evaluation)."""
    values = [e[key] for e in read_metrics(Path(run_dir)) if key in e and not e.get("final")]
    return values[-1] if values else None


def finished(run: dict[str, Any]) -> bool:
    """Whether a run has its summary: neither failed nor left unstarted (:func:`run_one`)."""
    return "failed" not in run and "not_started" not in run


def run_dir_name(label: str, fields: dict[str, Any], base_seed: int) -> str:
    """``LABEL-lrLR``, with ``-seedS`` for a run of another seed than the sweep's."""
    seed = "" if fields["seed"] == base_seed else f"-seed{fields['seed']}"
    return f"{label.replace(' ', '_')}-lr{fields['lr']:g}{seed}"


def best_runs(done: list[dict[str, Any]], key: str, higher_is_better: bool, seed: int) -> dict[str, dict[str, Any]]:
    """Each label's best finished run of seed ``seed`` (the sweep's), by ``key``."""
    best: dict[str, dict[str, Any]] = {}
    for r in done:
        if r["seed"] == seed and (r["label"] not in best or (r[key] > best[r["label"]][key]) == higher_is_better):
            best[r["label"]] = r
    return best


def edge_points(results: list[dict[str, Any]], key: str, higher_is_better: bool, seed: int) -> list[tuple[str, float]]:
    """(label, lr) one grid step past the best lr of each label whose sweep (seed ``seed``) has
    finished with its best at the smallest or largest lr tried (the step: the ratio of the two
    lrs at that end). Labels with a run unfinished, or fewer than two lrs, get none."""
    points = []
    for label in dict.fromkeys(r["label"] for r in results):
        runs = [r for r in results if r["label"] == label and r["seed"] == seed]
        if len(runs) < 2 or not all(map(finished, runs)):
            continue
        lrs = sorted(r["lr"] for r in runs)
        best = best_runs(runs, key, higher_is_better, seed)[label]["lr"]
        if best == lrs[0]:
            points.append((label, lrs[0] * lrs[0] / lrs[1]))
        elif best == lrs[-1]:
            points.append((label, lrs[-1] * lrs[-1] / lrs[-2]))
    return points


def seed_points(
    results: list[dict[str, Any]], key: str, higher_is_better: bool, seed: int, seeds: list[int]
) -> list[tuple[str, float, int]]:
    """(label, lr, seed) for each of ``seeds`` at each label's best lr, once its sweep has
    finished (every run of seed ``seed`` done) with the best inside the lrs tried."""
    points = []
    for label, best in best_runs([r for r in results if finished(r)], key, higher_is_better, seed).items():
        if edge_points([r for r in results if r["label"] == label], key, higher_is_better, seed):
            continue
        if any(r["label"] == label and r["seed"] == seed and not finished(r) for r in results):
            continue
        points += [(label, best["lr"], extra) for extra in seeds if extra != seed]
    return points


def plan(args: argparse.Namespace) -> list[tuple[str, str, dict[str, Any]]]:
    """(label, optimizer, run fields) for every run of the sweep."""
    common = {"seed": args.seed, "steps": args.steps, "preset": args.preset, "cache_dir": args.cache_dir}
    if args.task == "pretrain":
        common |= {
            "seq_len": args.seq_len,
            "batch_size": args.batch_size,
            "update_freq": args.update_freq,
            "eval_every": args.eval_every,
            "eval_batches": args.eval_batches,
            "vocab_size": args.vocab_size,
            "adamw_lr": args.adamw_lr or 3e-3,
            "corpus": args.corpus,
            "grad_accum": args.grad_accum,
            "final_eval_batches": args.final_eval_batches,
            "compile": args.compile,
        }
        grid = {name: PRETRAIN_GRID[name] for name in args.optimizers.split(",")}
        settings = []
        for label in grid:
            name, options = VARIANTS.get(label, (label, {}))
            extra = {"rank": args.rank} | ({"optimizer_options": options} if options else {})
            settings.append((label, name, extra))
    else:
        common = {
            "cache_dir": args.cache_dir,
            "seed": args.seed,
            "steps": args.steps,
            "batch_size": args.batch_size,
            "eval_every": args.eval_every,
            "eval_batches": args.eval_batches,
            "update_freq": args.update_freq,
            "adamw_lr": args.adamw_lr or 5e-5,
        }
        grid = dict(FINETUNE_GRID)
        settings = [("adamw (full)", "adamw", {})]
        settings += [
            (f"{name} r={rank}", name, {"rank": rank})
            for rank in map(int, args.ranks.split(","))
            for name in grid
            if name != "adamw"
        ]
    if args.smoke:
        common |= {
            "preset": "test",
            "steps": 6,
            "eval_every": 3,
            "eval_batches": 1,
            "batch_size": 4,
            "final_eval_batches": 2,
        }
        if args.task == "pretrain":
            common |= {"seq_len": 32, "vocab_size": 512, "rank": 8}
    for setting in args.lrs:  # NAME=LR[,LR...]: another grid, e.g. one more point past an edge
        name, _, values = setting.partition("=")
        if name not in grid or not values:
            raise SystemExit(f"--lrs {setting!r}: expected NAME=LR[,LR...] with NAME one of {', '.join(grid)}")
        grid[name] = tuple(sorted(float(v) for v in values.split(",")))
    runs = []
    for label, name, extra in settings:
        lrs = grid[label] if label in grid else grid[name]  # finetune labels: "sumo r=4"
        lrs = lrs[:1] if args.smoke else lrs
        for position, lr in enumerate(lrs):
            distance = abs(position - (len(lrs) - 1) / 2)  # the middle of each grid first, then outwards
            runs.append((distance, label, name, {**common, **extra, "optimizer": name, "lr": lr}))
    runs.sort(key=lambda run: run[0])  # stable: optimizers in the order given
    return [run[1:] for run in runs]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", choices=("pretrain", "finetune"))
    parser.add_argument("--preset", default="20m")
    parser.add_argument("--optimizers", default=",".join(PRETRAIN_GRID))
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--ranks", default="4,8", help="finetune: the low ranks to compare with full fine-tuning")
    parser.add_argument("--update-freq", type=int, default=200)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--eval-batches", type=int, default=10)
    parser.add_argument("--final-eval-batches", type=int, default=0, help="0: the whole validation split")
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (same global batch)")
    parser.add_argument(
        "--deadline-minutes",
        type=float,
        default=None,
        help="start no run after this many minutes (nor once a file OUT/STOP exists); runs under way finish",
    )
    parser.add_argument(
        "--adamw-lr", type=float, default=None, help="lr of the AdamW-trained non-matrix params (3e-3 / 5e-5)"
    )
    parser.add_argument("--compile", action="store_true", help="pretrain: torch.compile the training forward")
    parser.add_argument("--corpus", default="shakespeare")
    parser.add_argument("--cache-dir", default=".cache/sumo-train")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument(
        "--lrs",
        action="append",
        default=[],
        metavar="NAME=LR[,LR...]",
        help="another lr grid for NAME (repeatable)",
    )
    parser.add_argument(
        "--extend-edges",
        action="store_true",
        help="once a sweep has finished with its best lr at an edge, run one more grid step past it (repeated)",
    )
    parser.add_argument(
        "--seeds",
        default="",
        metavar="S[,S...]",
        help="once a sweep has finished with its best lr inside it, rerun that lr with each of these seeds",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny CPU version: one lr each, a few steps")
    parser.add_argument(
        "--report-only", action="store_true", help="start no run: the table and plot of the runs under --out"
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    runs = plan(args)
    if args.report_only:
        args.deadline_minutes = 0.0
    elif args.task == "pretrain":  # tokenize once, before the runs start side by side
        first = runs[0][2]
        prepare_tokens(first["corpus"], first["cache_dir"], first["vocab_size"])
    deadline = time.monotonic() + 60 * args.deadline_minutes if args.deadline_minutes is not None else None
    higher_is_better = args.task == "finetune"
    key = "val_accuracy" if higher_is_better else "val_loss"

    def execute(batch: list[tuple[str, str, dict[str, Any]]]) -> list[dict[str, Any]]:
        """The runs of ``batch`` (``--parallel`` at a time), a progress bar and a line per run."""
        with ThreadPoolExecutor(args.parallel) as pool, tqdm(total=len(batch), unit="run", disable=None) as bar:
            jobs = {
                pool.submit(
                    run_one, args.out / "runs" / run_dir_name(label, fields, args.seed), fields, args.task, deadline
                ): label
                for label, _, fields in batch
            }
            for job in as_completed(jobs):
                r = job.result()
                name = Path(r["run_dir"]).name
                if "failed" in r:
                    bar.write(f"{name}: failed (exit status {r['failed']}), see its stdout.log")
                elif "not_started" not in r:
                    done_before = " (done before)" if r["reused"] else ""
                    bar.write(f"{name}: {key} {r[key]:.4f}, {r['wall_s']:.0f} s{done_before}")
                bar.update()
            return [{"label": label, **job.result()} for job, label in jobs.items()]

    fields_of = {label: fields for label, _, fields in runs}
    names = {label: name for label, name, _ in runs}
    results = execute(runs)
    for _ in range(4 if args.extend_edges else 0):  # a winning edge: one more point past it, again if it wins
        points = edge_points(results, key, higher_is_better, args.seed)
        tried = {(r["label"], r["lr"]) for r in results}
        batch = [
            (label, names[label], {**fields_of[label], "lr": lr}) for label, lr in points if (label, lr) not in tried
        ]
        if not batch:
            break
        results += execute(batch)
    if args.seeds:
        points = seed_points(results, key, higher_is_better, args.seed, [int(x) for x in args.seeds.split(",")])
        results += execute(
            [(label, names[label], {**fields_of[label], "lr": lr, "seed": seed}) for label, lr, seed in points]
        )
    failed = [r for r in results if "failed" in r]
    for r in failed:
        print(f"failed ({r['failed']}): {r['run_dir']}, see its stdout.log", file=sys.stderr)
    waiting = [r for r in results if "not_started" in r]
    if waiting:
        then = "without --report-only to run them" if args.report_only else "again to continue"
        print(f"{len(waiting)} run(s) not started; run the same command {then}", file=sys.stderr)
    done = [r for r in results if finished(r)]
    if not done:
        return 1
    best = best_runs(done, key, higher_is_better, args.seed)
    others = {
        label: sorted((r for r in done if r["label"] == label and r["seed"] != args.seed), key=lambda r: r["seed"])
        for label in best
    }
    reference_label = "adamw (full)" if higher_is_better else "galore"
    reference = best.get(reference_label)
    with_seeds = any(others.values())
    lines = [
        "| optimizer | best lr (of the sweep) | "
        + ("val accuracy | val loss" if higher_is_better else "val loss | val ppl")
        + f" | steps to {reference_label}'s last validation (× its steps) | time to it"
        + (f" | other seeds at this lr: {key}, steps to it" if with_seeds else "")
        + " | wall | tokens/s | peak GPU memory | optimizer state |",
        "|---|---:|---:|---:|---:|---:|" + ("---:|" if with_seeds else "") + "---:|---:|---:|---:|",
    ]
    reference_steps = None
    if reference and (target := last_periodic(reference["run_dir"], key)) is not None:
        reference_steps = first_reaching(reference["run_dir"], key, target, higher_is_better)[0]
    for label, r in best.items():
        if higher_is_better:
            quality = f"{r['val_accuracy']:.4f} | {r['val_loss']:.4f}"
        else:
            quality = f"{r['val_loss']:.4f} | {r['val_ppl']:.2f}"
        target = last_periodic(reference["run_dir"], key) if reference else None
        step, seconds = (
            first_reaching(r["run_dir"], key, target, higher_is_better) if target is not None else (None, None)
        )
        if step is not None and seconds is not None:
            reach = f"{step:.0f} ({step / reference_steps:.2f}×) | {seconds:.0f} s"
        else:
            reach = "not reached | –"
        if with_seeds:
            seeds = []
            for other in others[label]:
                other_step = (
                    first_reaching(other["run_dir"], key, target, higher_is_better)[0] if target is not None else None
                )
                steps = f"{other_step:.0f}" if other_step is not None else "not reached"
                seeds.append(f"s{other['seed']}: {other[key]:.4f}, {steps}")
            reach += " | " + ("; ".join(seeds) or "–")
        memory = f"{r['peak_memory_bytes'] / 2**20:,.0f} MiB" if r.get("peak_memory_bytes") else "n/a (CPU)"
        tried = sorted(x["lr"] for x in done if x["label"] == label and x["seed"] == args.seed)
        edge = " (edge)" if len(tried) > 1 and r["lr"] in (tried[0], tried[-1]) else ""
        rates = [m["tokens_per_s"] for m in read_metrics(Path(r["run_dir"])) if "tokens_per_s" in m]
        rate = f"{statistics.median(rates):,.0f}" if rates else "–"
        lines.append(
            f"| {label} | {r['lr']:g}{edge} | {quality} | {reach} | {r['wall_s']:.0f} s | {rate} | {memory} | "
            f"{r['optimizer_state_bytes'] / 2**20:.2f} MiB |"
        )
    table = "\n".join(lines)
    table += (
        "\n\n(edge): the best lr is the smallest or largest tried; extend the grid with --extend-edges"
        " or --lrs NAME=LR,LR,..."
    )
    device = done[0]["device"]
    model = f"LLaMA {done[0]['preset']}" if args.task == "pretrain" else "MiniLM-L6 on Rotten Tomatoes"
    title = f"{args.task} {model}, {done[0]['steps']} steps, {device}"
    args.out.mkdir(parents=True, exist_ok=True)
    labels = list(best)
    plot = plot_runs(
        [Path(best[label]["run_dir"]) for label in labels],
        args.out / "loss_curves.png",
        title=title + " (best lr of each)",
        labels=labels,
    )
    sweep = {
        label: [(r["lr"], r[key]) for r in done if r["label"] == label and r["seed"] == args.seed] for label in labels
    }
    sweep_plot = plot_lr_sweep(sweep, args.out / "lr_sweep.png", title=title, metric=key.replace("_", " "))
    plots = [plot, sweep_plot]
    if reference:  # each best run (and its other seeds, dashed) against the reference's best, step by step
        gap_runs = [(label, Path(best[label]["run_dir"]), label) for label in labels]
        gap_runs += [
            (f"{label}, seed {o['seed']}", Path(o["run_dir"]), label) for label in labels for o in others[label]
        ]
        plots.append(
            plot_gap(
                gap_runs,
                Path(reference["run_dir"]),
                args.out / "gap_to_reference.png",
                key=key,
                reference_label=f"{reference_label} (lr {reference['lr']:g})",
                title=title + " (best lr of each)",
            )
        )
    all_runs = "\n".join(f"| {r['label']} | {r['lr']:g} | {r['seed']} | {r[key]:.4f} |" for r in done)
    (args.out / "results.md").write_text(
        f"{title}\n\n{table}\n\nEvery run of the sweep:\n\n| optimizer | lr | seed | {key} |\n"
        f"|---|---:|---:|---:|\n{all_runs}\n"
    )
    (args.out / "results.json").write_text(
        json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": results}, indent=2)
    )
    print(f"{title}\n\n{table}\n\nplots: {', '.join(map(str, plots))}\ntable: {args.out / 'results.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
