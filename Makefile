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

# Speed benchmarks, then the explainers x methods benchmark in its quick form (the full run writes
# docs/explanations.md; its command is on that page).
bench: $(STAMP)
	for f in benchmarks/bench_*.py; do $(BIN)/python $$f || exit 1; done
	$(BIN)/python -m benchmarks.explanations --quick --out outputs/explanations_quick.md

clean:
	rm -rf $(VENV) outputs lightning_logs
