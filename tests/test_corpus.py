"""The python-code corpus on a fake ``pip install --target`` folder: documents, skips, split, cache."""

import importlib.metadata
import json
from pathlib import Path

import pytest

pytest.importorskip("tokenizers")
pytest.importorskip("tqdm")

from sumo_train import corpus as corpus_lib
from sumo_train import data as data_lib
from sumo_train.cli import main as cli

VAL_PERCENT = 25.0


def module_text(package: str, index: int) -> str:
    """A small distinct module: every document has its own marker, so none is inside another."""
    return (
        f'"""Module {index} of {package}: marker {package}_{index}_end."""\n\n'
        f"def function_{package}_{index}(value: int) -> int:\n"
        f"    return value * {index} + {len(package)}\n"
    )


def write_distribution(root: Path, name: str, version: str, files: dict[str, bytes]) -> None:
    info = root / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "RECORD").write_text("".join(f"{path},,\n" for path in [*files, f"{info.name}/METADATA"]))
    for path, content in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(content)


@pytest.fixture
def target(tmp_path) -> Path:
    """Two distributions; alpha/shared.py == beta/copy.py, one oversize, one bad UTF-8, one empty."""
    root = tmp_path / "target"
    shared = module_text("shared", 0).encode()
    alpha = {f"alpha/mod{i}.py": module_text("alpha", i).encode() for i in range(12)}
    alpha |= {
        "alpha/shared.py": shared,
        "alpha/table.py": b"X = [" + b"0, " * 400_000 + b"]\n",  # 1.2 MB: a generated table
        "alpha/latin1.py": "# caf\xe9\n".encode("latin-1"),
        "alpha/__init__.py": b"",
        "alpha/notes.txt": b"not python",
    }
    beta = {f"beta/sub/mod{i}.py": module_text("beta", i).encode() for i in range(12)}
    beta |= {"beta/copy.py": shared}
    write_distribution(root, "alpha", "1.0", alpha)
    write_distribution(root, "Beta_Pkg", "2.3", beta)
    return root


def test_documents_are_the_py_files_less_duplicates_oversize_and_bad_ones(target):
    listing = corpus_lib.code_files(f"python-code:{target}")
    assert listing.versions == {"alpha": "1.0", "beta-pkg": "2.3"} and listing.missing == []
    names = [name for name, _, _ in listing.files]
    assert names == sorted(names) and len(names) == 12 + 4 + 13  # the .txt file and METADATA are not listed
    assert "alpha/alpha/mod3.py" in names and "beta-pkg/beta/sub/mod0.py" in names

    documents, meta = corpus_lib.read_code_documents(listing)
    kept = [name for name, _ in documents]
    assert "alpha/alpha/shared.py" in kept and "beta-pkg/beta/copy.py" not in kept  # first by name wins
    assert not {"alpha/alpha/table.py", "alpha/alpha/latin1.py", "alpha/alpha/__init__.py"} & set(kept)
    assert meta["skipped"] == {"duplicates": 1, "oversize": 1, "empty": 1, "undecodable": 1, "unreadable": 0}
    assert meta["documents"] == len(documents) == 13 + 12
    assert meta["distributions"]["alpha"]["files"] == 13 and meta["distributions"]["beta-pkg"]["files"] == 12
    assert meta["bytes"] == sum(len(text.encode()) for _, text in documents)
    assert dict(documents)["alpha/alpha/mod3.py"] == module_text("alpha", 3)
    assert data_lib.load_documents(f"python-code:{target}") == documents


def test_token_files_decode_back_split_by_document_and_are_cached(target, tmp_path, monkeypatch):
    from tokenizers import Tokenizer

    source = f"python-code:{target}"
    tokens = data_lib.prepare_tokens(source, tmp_path / "cache", 300, VAL_PERCENT, progress=False)
    meta = json.loads((tokens.tokenizer_path.parent / "meta.json").read_text())
    assert meta == tokens.meta
    assert meta["distributions"]["beta-pkg"]["version"] == "2.3" and meta["skipped"]["duplicates"] == 1
    assert meta["tokens"] == {"train": len(tokens.train), "val": len(tokens.val)} and meta["vocab_size"] == 300
    assert meta["val_percent"] == VAL_PERCENT and meta["build_seconds"] >= 0 and meta["documents"] == 25

    tokenizer = Tokenizer.from_file(str(tokens.tokenizer_path))
    train_text = tokenizer.decode(tokens.train.tolist())
    val_text = tokenizer.decode(tokens.val.tolist())
    documents = data_lib.load_documents(source)
    sides = {data_lib.is_validation(name, VAL_PERCENT) for name, _ in documents}
    assert sides == {True, False}  # the fixture has documents on both sides
    for name, text in documents:  # each document whole on its own side, absent from the other
        inside, outside = (
            (val_text, train_text) if data_lib.is_validation(name, VAL_PERCENT) else (train_text, val_text)
        )
        assert text in inside and text not in outside, name

    train_bin = tokens.tokenizer_path.parent / "train.bin"
    mtime = train_bin.stat().st_mtime_ns
    monkeypatch.setattr(data_lib, "build_token_cache", lambda *a, **k: pytest.fail("rebuilt a cached corpus"))
    again = data_lib.prepare_tokens(source, tmp_path / "cache", 300, VAL_PERCENT, progress=False)
    assert again.tokenizer_path == tokens.tokenizer_path and train_bin.stat().st_mtime_ns == mtime
    assert list(again.train[:50]) == list(tokens.train[:50])

    # another installed version is another corpus
    metadata = next(target.glob("alpha-*.dist-info")) / "METADATA"
    metadata.write_text(metadata.read_text().replace("Version: 1.0", "Version: 1.1"))
    with pytest.raises(pytest.fail.Exception, match="rebuilt"):
        data_lib.prepare_tokens(source, tmp_path / "cache", 300, VAL_PERCENT, progress=False)


def test_cli_corpus_prints_the_distribution_table(target, tmp_path, capsys):
    args = ["corpus", "--corpus", f"python-code:{target}", "--vocab-size", "300", "--cache-dir", str(tmp_path)]
    assert cli([*args, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "25 documents" in out and "beta-pkg" in out and "2.3" in out and "1 duplicates" in out


def test_no_distribution_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no distribution found"):
        corpus_lib.code_files(f"python-code:{tmp_path}")
    with pytest.raises(FileNotFoundError, match="not a folder"):
        corpus_lib.code_files(f"python-code:{tmp_path / 'absent'}")


def test_installed_distributions_are_listed_without_reading():
    listing = corpus_lib.code_files("python-code")
    installed = [name for name in corpus_lib.CODE_DISTRIBUTIONS if name not in listing.missing]
    assert set(installed) == set(listing.versions) and {"torch", "pip"} & set(installed)
    for name in installed:
        assert listing.versions[name] == importlib.metadata.version(name)
    assert {name.split("/")[0] for name, _, _ in listing.files} <= set(installed)
    assert any(name.startswith(("torch/torch/", "pip/pip/")) for name, _, _ in listing.files)
    assert all(path.suffix == ".py" for _, _, path in listing.files[:200])
    assert all(path.is_file() for _, _, path in listing.files[:: max(1, len(listing.files) // 50)])


def test_source_code_adds_native_sources_and_every_installed_distribution(target):
    """source-code reads C/C++/CUDA/Cython files beside the .py ones; without DIR it takes every
    installed distribution except this project."""
    write_distribution(
        target,
        "gamma",
        "0.1",
        {"gamma/kernel.cu": b"__global__ void k() {}\n", "gamma/api.h": b"int f(void);\n", "gamma/g.py": b"x = 1\n"},
    )
    python_only = {name for name, _, _ in corpus_lib.code_files(f"python-code:{target}").files}
    mixed = corpus_lib.code_files(f"source-code:{target}")
    assert {name for name, _, _ in mixed.files} - python_only == {"gamma/gamma/kernel.cu", "gamma/gamma/api.h"}
    assert mixed.name == "source-code" and "gamma" in mixed.versions
    documents = data_lib.load_documents(f"source-code:{target}")
    assert ("gamma/gamma/api.h", "int f(void);\n") in documents
    everything = corpus_lib.code_files("source-code")
    installed = {corpus_lib.canonical_name(d.metadata["Name"]) for d in importlib.metadata.distributions()}
    assert set(everything.versions) == installed - {"sumo-optim"}
    assert not any(name.startswith("sumo-optim/") for name, _, _ in everything.files)
    with pytest.raises(ValueError, match="source-code"):
        corpus_lib.code_files("c-code")
