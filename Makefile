# distill: two commands for a new user (see README): `make demo` and `make test`.
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
RECIPE ?= recipes/tiny.yaml

.PHONY: setup bench-env demo test test-fast lint docs figures lock clean

setup:  ## create .venv and .venv-quant (idempotent; fast when up to date)
	@bash packaging/setup.sh all

bench-env:  ## create .venv-bench (TRL, for bench/train_step.py only; idempotent)
	@bash packaging/setup-bench.sh

demo: setup  ## prepare the corpus, pretrain (or reuse) the embedded teacher, summarise
	$(BIN)/distill run $(RECIPE)

lint: setup
	$(BIN)/ruff check .

# NOTE: no --quiet: mkdocs 1.6.1 then drops the warnings before --strict counts them and exits 0.
docs: setup  ## build the documentation site into site/ (git-ignored); a broken link or anchor fails
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

figures: setup  ## rewrite the generated figures and module map in README.md and docs/ from bench/results/
	$(BIN)/python bench/figures.py

# pytest-xdist: JOBS workers, each module whole on one worker, those with the most slow tests first
JOBS ?= 2
PARALLEL = -n $(JOBS) --dist loadscope --no-loadscope-reorder

test: setup lint docs  ## lint, the docs build, then the whole test suite (slow end-to-end tests included)
	$(BIN)/python -m pytest -q $(PARALLEL) --durations=25

test-fast: setup
	$(BIN)/python -m pytest -q $(PARALLEL) -m "not slow"

lock:  ## regenerate the pins from the current environments
	@{ head -3 packaging/constraints-cpu.txt; $(BIN)/python -m pip freeze --exclude-editable | grep -v -E '^vllm(==| @)'; \
	   grep -E '^torch(vision|audio|codec)==' packaging/constraints-cpu.txt; } > packaging/constraints-cpu.txt.new
	@mv packaging/constraints-cpu.txt.new packaging/constraints-cpu.txt
	@{ head -1 packaging/constraints-quant.txt; .venv-quant/bin/python -m pip freeze; } > packaging/constraints-quant.txt.new
	@mv packaging/constraints-quant.txt.new packaging/constraints-quant.txt

clean:
	rm -rf $(VENV) .venv-quant .pytest_cache .ruff_cache site
