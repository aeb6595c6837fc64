# Self-installing targets: each creates .venv if missing, installs the project into it, then runs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: train test test-all bench install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(BIN)/xvlm fit --config configs/demo.yaml --ckpt_path last

# The tests run in two processes (pytest-xdist), each test file on one of them in its order; the Shapes backbone
# they share is built (or found in checkpoints/backbones/) first, so that no two processes build it at once.
BACKBONE := $(BIN)/python -c "from xvlm.shapes_pretraining import shapes_backbone_path; shapes_backbone_path('xvlm-tiny')"
PYTEST := $(BIN)/python -m pytest -q -n 2 --dist loadfile

test: $(STAMP)
	$(BIN)/lint-imports
	$(BACKBONE)
	$(PYTEST)

test-all: $(STAMP)
	$(BIN)/lint-imports
	$(BACKBONE)
	$(PYTEST) -m "slow or not slow"

# The speed and memory benchmark: prints its tables and writes them into docs/benchmarks.md (about 3 minutes on
# 2 CPU cores; on a GPU: python -m benchmarks --device cuda --model ViT-B-16). The per-method studies
# (benchmarks/bench_*.py, python -m benchmarks.explanations) have their commands on their pages.
bench: $(STAMP)
	$(BIN)/python -m benchmarks

clean:
	rm -rf $(VENV) outputs lightning_logs
