# Everything a fresh clone needs. `make demo` and `make test` create .venv on first use.
PYTHON ?= python3
# The CPU build of PyTorch that these machines carry; override e.g. TORCH_SPEC="torch>=2.4".
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint orthogonalization-errors clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev,train]"
	# galore-torch 1.0 is the tests' oracle; --no-deps skips bitsandbytes, which its AdamW does not use
	$(BIN)/pip install -q --no-deps galore-torch==1.0
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/quick_compare.py

test: $(STAMP)
	$(BIN)/python -m ruff check src tests benchmarks examples
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/python -m ruff check src tests benchmarks examples
	$(BIN)/python -m ruff format --check src tests benchmarks examples

orthogonalization-errors: $(STAMP)
	$(BIN)/python benchmarks/orthogonalization_error.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .ruff_cache
