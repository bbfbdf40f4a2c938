"""``python-code`` and ``source-code``: pre-training corpora of source code, from installed distributions.

No text package on PyPI is large enough for a convergence study (>= 100M tokens), but the
source code of the scientific Python stack is: the ``.py`` files of :data:`CODE_DISTRIBUTIONS`
come to roughly 400-600 MB where all of them are installed, and Python code takes about 0.26
tokens per byte with a 32k BPE vocabulary (measured on 163 MB), so 100-150M tokens. A code
language model is a standard optimizer workload. ``sumo-train corpus --corpus python-code
--vocab-size 32000`` builds the cache once (about 3.3 s per 10 MB on 2 CPU cores) and prints
the per-distribution table, e.g. before a sweep of parallel runs.

* ``--corpus python-code``: every ``.py`` file of the distributions of :data:`CODE_DISTRIBUTIONS`
  installed in the running interpreter (``importlib.metadata``: a distribution's ``RECORD``);
  those not installed are skipped and listed in ``meta.json`` under ``missing``.
* ``--corpus python-code:DIR``: every distribution installed in ``DIR``, e.g. a folder made by
  ``pip install --no-deps --target DIR pkg==ver ...`` (pinned versions: a reproducible corpus).
* ``--corpus source-code`` (or ``source-code:DIR``): every distribution installed (not only the
  list, this project excepted), and besides ``.py`` the other source files they ship
  (:data:`SOURCE_SUFFIXES`: Cython, C, C++, CUDA sources and headers, stubs): a mixed-language
  code corpus for when the Python files alone are too few tokens. On the GPU image of
  2026-12 the listed ``.py`` files came to 296 MB, 80M tokens: short of 100M.

A document is one file, named ``<distribution>/<path inside site-packages>``; documents are
sorted by name, files with the same bytes as an earlier one are dropped, and so are files over
:data:`MAX_FILE_BYTES` (generated tables), empty ones and ones that are not UTF-8; ``meta.json``
counts each. The train/validation split is by document (a hash of the name, as for every
source). The BPE tokenizer learns from every k-th train document up to a budget of characters
(100M by default), and the files are encoded in batches appended to ``train.bin``/``val.bin``.

The contents depend on the installed versions: ``meta.json`` records each distribution's
version, files and bytes, and the cache key is made of the names and versions (reinstalling the
same version with other files is not noticed: delete the cache folder). The text is each
package's own source under its own license (BSD, MIT, Apache-2.0 and the like for the list
below); it is read from the local installation to train models and is not redistributed.

Caveat: a split by file does not separate near-duplicates. Projects copy code between files
(transformers' "Copied from" model code, vendored modules), so close variants of one function
can sit on both sides of the split, and validation loss is somewhat optimistic in absolute
terms; this matters less when optimizers are compared on one split.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from . import data

# corpus name -> (the distributions read, None for every installed one; the file suffixes read)
SOURCES: dict[str, tuple[tuple[str, ...] | None, tuple[str, ...]]] = {}
PYTHON_SUFFIXES = (".py",)
SOURCE_SUFFIXES = (".py", ".pyi", ".pyx", ".pxd", ".c", ".h", ".cc", ".cpp", ".hpp", ".cu", ".cuh")
CODE_DISTRIBUTIONS = (
    "transformers",
    "torch",
    "jax",
    "sympy",
    "scipy",
    "pandas",
    "scikit-learn",
    "statsmodels",
    "numba",
    "matplotlib",
    "networkx",
    "scikit-image",
    "cupy-cuda13x",
    "torch-geometric",
    "botorch",
    "gpytorch",
    "pytorch-lightning",
    "lightning",
    "onnx",
    "onnxscript",
    "flax",
    "optax",
    "numpyro",
    "xarray",
    "timm",
    "torchmetrics",
    "accelerate",
    "peft",
    "sentence-transformers",
    "huggingface-hub",
    "pyarrow",
    "tensorboard",
    "triton",
    "setuptools",
    "pip",
)
SOURCES["python-code"] = (CODE_DISTRIBUTIONS, PYTHON_SUFFIXES)
SOURCES["source-code"] = (None, SOURCE_SUFFIXES)
PROJECT = "sumo-optim"  # never part of a corpus: the code under study
MAX_FILE_BYTES = 1_000_000
FORMAT = 1  # part of the cache key: bump when the document rules change


@dataclass
class CodeFiles:
    """The files of a code source (``python-code``, ``source-code``), before reading."""

    files: list[tuple[str, str, Path]]  # (document name, distribution, path), sorted by name
    versions: dict[str, str]  # distribution -> version, of those found
    missing: list[str]  # distributions of the list that are not installed
    directory: str | None  # DIR of ``python-code:DIR``
    name: str = "python-code"  # the source without its DIR


def is_code_source(source: str) -> bool:
    """Whether ``source`` names a code corpus of this module (``python-code[:DIR]``, ``source-code[:DIR]``)."""
    return source.partition(":")[0] in SOURCES


def canonical_name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def code_files(source: str = "python-code") -> CodeFiles:
    """Lists the files of ``source`` (``python-code``, ``source-code``, either with ``:DIR``) without
    reading them."""
    prefix, _, directory = source.partition(":")
    if prefix not in SOURCES:
        raise ValueError(f"not a code source: {source!r}; choose one of {', '.join(SOURCES)} (optionally :DIR)")
    listed, suffixes = SOURCES[prefix]
    found: dict[str, importlib.metadata.Distribution] = {}
    missing: list[str] = []
    if directory:
        if not Path(directory).is_dir():
            raise FileNotFoundError(f"corpus {source!r}: {directory} is not a folder")
        for dist in importlib.metadata.distributions(path=[directory]):
            if dist.metadata["Name"]:
                found.setdefault(canonical_name(dist.metadata["Name"]), dist)
        found = dict(sorted(found.items()))
    elif listed is None:
        for dist in importlib.metadata.distributions():
            if dist.metadata["Name"] and canonical_name(dist.metadata["Name"]) != PROJECT:
                found.setdefault(canonical_name(dist.metadata["Name"]), dist)
        found = dict(sorted(found.items()))
    else:
        for name in listed:
            try:
                found[name] = importlib.metadata.distribution(name)
            except importlib.metadata.PackageNotFoundError:
                missing.append(name)
    if not found:
        where = directory or "this Python environment"
        raise FileNotFoundError(
            f"corpus {source!r}: no distribution found in {where} "
            f"(python-code reads installed packages, e.g. {', '.join(CODE_DISTRIBUTIONS[:4])})"
        )
    files = [
        (f"{name}/{path.as_posix()}", name, Path(dist.locate_file(path)))
        for name, dist in found.items()
        for path in dist.files or ()
        if path.suffix in suffixes and ".." not in path.parts
    ]
    versions = {name: dist.version for name, dist in found.items()}
    return CodeFiles(sorted(files), versions, missing, directory or None, prefix)


def read_code_documents(listing: CodeFiles, progress: bool = False) -> tuple[list[tuple[str, str]], dict]:
    """(name, text) documents of ``listing`` and the ``meta.json`` fields that describe them."""
    from tqdm.auto import tqdm

    documents: list[tuple[str, str]] = []
    seen: set[bytes] = set()
    skipped: Counter[str] = Counter()
    table = {name: {"version": version, "files": 0, "bytes": 0} for name, version in listing.versions.items()}
    for name, dist, path in tqdm(listing.files, desc="reading", unit="file", disable=not progress):
        try:
            if path.stat().st_size > MAX_FILE_BYTES:
                skipped["oversize"] += 1
                continue
            raw = path.read_bytes()
        except OSError:  # listed in RECORD, gone from disk
            skipped["unreadable"] += 1
            continue
        if not raw.strip():
            skipped["empty"] += 1
            continue
        digest = hashlib.sha256(raw).digest()
        if digest in seen:
            skipped["duplicates"] += 1
            continue
        seen.add(digest)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            skipped["undecodable"] += 1
            continue
        documents.append((name, text))
        table[dist]["files"] += 1
        table[dist]["bytes"] += len(raw)
    meta = {
        "source": listing.name + (f":{listing.directory}" if listing.directory else ""),
        "documents": len(documents),
        "bytes": sum(row["bytes"] for row in table.values()),
        "skipped": {kind: skipped[kind] for kind in ("duplicates", "oversize", "empty", "undecodable", "unreadable")},
        "max_file_bytes": MAX_FILE_BYTES,
        "distributions": table,
        "missing": listing.missing,
    }
    return documents, meta


def prepare_code_tokens(
    source: str,
    cache_dir: str | Path,
    vocab_size: int,
    val_percent: float = 5.0,
    tokenizer_budget: int = data.TOKENIZER_BUDGET,
    progress: bool | None = None,
) -> data.TokenData:
    """:func:`sumo_train.data.prepare_tokens` for ``python-code`` sources (it dispatches here)."""
    import tokenizers

    progress = sys.stderr.isatty() if progress is None else progress
    listing = code_files(source)
    directory = str(Path(listing.directory).resolve()) if listing.directory else None
    identity = {
        "format": FORMAT,
        "directory": directory,
        "versions": listing.versions,
        "max_file_bytes": MAX_FILE_BYTES,
        "tokenizer_budget": tokenizer_budget,
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    key = Path(cache_dir) / f"{listing.name}-v{vocab_size}-val{val_percent:g}-{digest[:12]}"
    if not (key / "meta.json").exists():

        def load() -> tuple[list[tuple[str, str]], dict]:
            documents, meta = read_code_documents(listing, progress)
            extra = {"val_percent": val_percent, "tokenizer_budget": tokenizer_budget}
            return documents, {**meta, **extra, "tokenizers": tokenizers.__version__, "key": digest}

        data.build_token_cache(key, load, vocab_size, val_percent, tokenizer_budget, progress)
    return data.map_tokens(key, source)
