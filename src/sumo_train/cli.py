"""``sumo-train``: pre-train, fine-tune, compare optimizers, redraw plots.

    sumo-train pretrain --preset tiny --optimizer sumo --steps 300
    sumo-train finetune --optimizer galore --rank 8 --steps 200
    sumo-train compare --optimizers sumo,galore,adamw --preset tiny --steps 300
    sumo-train plot runs/compare/sumo runs/compare/adamw --out curves.png
    sumo-train corpus --corpus python-code --vocab-size 32000   # build the token cache once

Every field of the run configuration is an option (``--lr``, ``--rank``, ``--seq-len`` …) and
can also come from ``--config run.yaml`` (or .toml/.json); the command line wins.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from .config import FIELDS, load_config
from .report import comparison_table, plot_runs


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML, TOML or JSON file with run fields")
    for name in FIELDS:
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _overrides(args: argparse.Namespace) -> dict:
    return {name: getattr(args, name) for name in FIELDS if getattr(args, name) is not None}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded at run time
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    parser = argparse.ArgumentParser(prog="sumo-train", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    fields_help = "run fields: " + ", ".join(f"--{n.replace('_', '-')}" for n in FIELDS)
    for name in ("pretrain", "finetune"):
        sub = commands.add_parser(name, help=f"{name} one model", epilog=fields_help)
        _add_config_options(sub)
        sub.add_argument("--resume", action="store_true", help="continue from the run directory's last checkpoint")
    compare = commands.add_parser(
        "compare", help="train one model per optimizer, same data and seed", epilog=fields_help
    )
    _add_config_options(compare)
    compare.add_argument(
        "--optimizers",
        default="sumo,galore,adamw",
        help="comma-separated names, each optionally with its own learning rate: sumo,galore,adamw@3e-3",
    )
    corpus = commands.add_parser(
        "corpus", help="build (or map) the token cache of --corpus and print its meta.json", epilog=fields_help
    )
    _add_config_options(corpus)
    plot = commands.add_parser("plot", help="redraw loss curves from run directories")
    plot.add_argument("runs", nargs="+", type=Path)
    plot.add_argument("--out", type=Path, default=Path("loss_curves.png"))
    args = parser.parse_args(argv)

    from .checkpoint import CheckpointError
    from .train import train

    try:
        if args.command == "plot":
            print(plot_runs(args.runs, args.out))
            return 0
        overrides = _overrides(args)
        if args.command == "corpus":
            from . import data

            config = load_config(args.config, overrides)
            tokens = data.prepare_tokens(
                config.corpus, config.cache_dir, config.vocab_size, progress=not args.no_progress
            )
            print(corpus_summary(tokens.meta, tokens.tokenizer_path.parent))
            return 0
        if args.command in ("pretrain", "finetune"):
            config = load_config(args.config, {**overrides, "task": args.command})
            summary = train(config, resume=args.resume, progress=not args.no_progress)
            print(json.dumps(summary, indent=2))
            return 0
        base = load_config(args.config, overrides)
        if base.run_dir == FIELDS["run_dir"].default:  # neither the file nor the command line chose one
            base = dataclasses.replace(base, run_dir="runs/compare")
        root = Path(base.run_dir)
        summaries, run_dirs = [], []
        entries = parse_optimizer_list(args.optimizers)
        if base.lr is not None and len(entries) > 1:
            print("note: --lr applies to every optimizer of the comparison without its own @lr", file=sys.stderr)
        for name, lr in entries:
            config = dataclasses.replace(base, optimizer=name, lr=lr or base.lr, run_dir=str(root / name))
            summaries.append(train(config.validate(), progress=not args.no_progress))
            run_dirs.append(Path(config.run_dir))
        table = comparison_table(summaries)
        metric = "val accuracy" if base.task == "finetune" else "val loss"
        title = f"{base.task} {base.preset}, {base.steps} steps, {summaries[0]['device']}"
        plot_path = plot_runs(run_dirs, root / "loss_curves.png", title=title)
        (root / "comparison.md").write_text(f"{title}\n\n{table}\n")
        (root / "comparison.json").write_text(json.dumps({"config": base.to_dict(), "runs": summaries}, indent=2))
        print(f"\n{title} ({metric} on the full validation split)\n\n{table}\n")
        print(f"plot: {plot_path}\ntable: {root / 'comparison.md'}")
        return 0
    except (ValueError, FileNotFoundError, CheckpointError) as error:
        print(f"sumo-train: error: {error}", file=sys.stderr)
        return 2
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():  # a torchrun launch (see train.join_torchrun)
            dist.destroy_process_group()


def corpus_summary(meta: dict, directory: Path) -> str:
    """A token cache's meta.json as text: totals, then one row per distribution (python-code)."""
    tokens = meta["tokens"]
    lines = [
        f"{meta['source']}: {tokens['train']:,} train + {tokens['val']:,} val tokens, "
        f"{meta['documents']:,} documents, vocabulary {meta['vocab_size']}, built in {meta.get('build_seconds')} s",
        f"cache: {directory}",
    ]
    if "distributions" in meta:
        lines += ["", f"{'distribution':<24} {'version':<14} {'files':>7} {'MB':>8}"]
        for name, row in meta["distributions"].items():
            lines.append(f"{name:<24} {row['version']:<14} {row['files']:>7} {row['bytes'] / 1e6:>8.1f}")
        lines.append(f"{'total':<39} {meta['documents']:>7} {meta['bytes'] / 1e6:>8.1f}")
        skipped = ", ".join(f"{count} {kind}" for kind, count in meta["skipped"].items() if count)
        lines.append(f"skipped files: {skipped or 'none'}; tokens per byte {sum(tokens.values()) / meta['bytes']:.3f}")
        if meta["missing"]:
            lines.append(f"not installed: {', '.join(meta['missing'])}")
    return "\n".join(lines)


def parse_optimizer_list(text: str) -> list[tuple[str, float | None]]:
    """``"sumo,adamw@3e-3"`` → ``[("sumo", None), ("adamw", 0.003)]`` (None: the config's lr)."""
    entries = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, lr = item.partition("@")
        try:
            entries.append((name.strip(), float(lr) if lr else None))
        except ValueError:
            raise ValueError(f"--optimizers: {item!r} is not NAME or NAME@LR") from None
    if not entries:
        raise ValueError("--optimizers names no optimizer")
    return entries


if __name__ == "__main__":
    sys.exit(main())
