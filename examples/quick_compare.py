"""A one-minute real comparison on CPU: SUMO vs AdamW on a character-level language model.

The text is real English prose that every Python install carries: the docstrings of the
standard library (PSF license). A small MLP language model (Bengio et al. 2003 style) reads
32 characters and predicts the next one; each optimizer trains the same model from the same
initialization on the same batches, and the script prints both loss curves as a table.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time

import torch
from torch import nn

from sumo_optim import SUMO, param_groups

CONTEXT = 32


def stdlib_docstrings(limit_chars: int = 2_000_000) -> str:
    """Concatenated docstrings of standard-library modules, classes and functions."""
    import inspect

    pieces, total = [], 0
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in {"antigravity", "this", "idlelib", "tkinter", "turtle", "distutils"}:
            continue
        try:
            module = importlib.import_module(name)
        except Exception:
            continue
        for obj in [module, *vars(module).values()]:
            doc = inspect.getdoc(obj) if callable(obj) or obj is module else None
            if doc and len(doc) > 200:
                pieces.append(doc)
                total += len(doc)
        if total > limit_chars:
            break
    return "\n\n".join(dict.fromkeys(pieces))


class CharMLP(nn.Module):
    def __init__(self, vocab: int, width: int = 64, hidden: int = 512):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.layers = nn.Sequential(
            nn.Linear(CONTEXT * width, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.LayerNorm(hidden)
        )
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.embed(x).flatten(1)))


def batches(data: torch.Tensor, steps: int, batch: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - CONTEXT - 1, (batch,), generator=g)
        window = torch.stack([data[s : s + CONTEXT + 1] for s in starts.tolist()])
        yield window[:, :-1], window[:, -1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=700, help="training steps per optimizer")
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    text = stdlib_docstrings()
    vocab = sorted(set(text))
    data = torch.tensor([vocab.index(c) for c in text[: len(text)]], dtype=torch.long)
    split = int(0.95 * len(data))
    train_data, val_data = data[:split], data[split:]
    print(f"corpus: {len(text):,} characters of standard-library docstrings, {len(vocab)} symbols")

    def make(name: str):
        torch.manual_seed(0)
        model = CharMLP(len(vocab))
        if name == "SUMO":
            optimizer = SUMO(param_groups(model, rank=32, update_freq=100, adamw_options={"lr": 3e-3}), lr=0.02)
        else:
            optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        return model, optimizer

    val_x, val_y = next(batches(val_data, 1, 2048, seed=123))
    curves = {}
    for name in ("AdamW", "SUMO"):
        model, optimizer = make(name)
        start, curve = time.perf_counter(), []
        for step, (x, y) in enumerate(batches(train_data, args.steps, args.batch, seed=1), start=1):
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            elapsed = time.perf_counter() - start
            if step % 50 == 0 or step == args.steps:
                with torch.no_grad():
                    val = nn.functional.cross_entropy(model(val_x), val_y).item()
                curve.append((step, elapsed, loss.item(), val))
        curves[name] = curve
        print(f"{name}: {curve[-1][0]} steps in {curve[-1][1]:.1f} s, final validation loss {curve[-1][3]:.3f}")

    print("\nvalidation loss (nats/char) by step")
    print(f"| step | {' | '.join(curves)} |")
    print("|---:|" + "---:|" * len(curves))
    for points in zip(*curves.values()):
        print(f"| {points[0][0]} | {' | '.join(f'{p[3]:.3f}' for p in points)} |")


if __name__ == "__main__":
    main()
