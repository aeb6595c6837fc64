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

test: $(STAMP)
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

test-all: $(STAMP)
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q -m "slow or not slow"

# Speed benchmarks, then the explainers x methods benchmark in its quick form (the full run writes
# docs/explanations.md; its command is on that page).
bench: $(STAMP)
	for f in benchmarks/bench_*.py; do $(BIN)/python $$f || exit 1; done
	$(BIN)/python -m benchmarks.explanations --quick --out outputs/explanations_quick.md

clean:
	rm -rf $(VENV) outputs lightning_logs
