# Entry points: `make demo`, `make test` (the whole suite) and `make test-fast` (every test not
# marked slow). All create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast install clean bench

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install "torch>=2.4" "torchvision>=0.19"
	$(BIN)/python -m pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m stages.demo

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadgroup -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" -n 2 --dist loadgroup -q

bench: $(STAMP)
	$(BIN)/python bench/evaluate.py
	$(BIN)/python bench/evaluate_cli.py
	$(BIN)/python bench/detect.py

clean:
	rm -rf $(VENV) .pytest_cache .snakemake
