# The two commands of the README:
#   make demo   set up .venv and run the whole workflow on the embedded demo cohort
#   make test   set up .venv with the test tools and run the test suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
export PATH := $(BIN):$(PATH)

.PHONY: demo test lint bench dvc-repro clean

$(VENV)/.installed: pyproject.toml envs/requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r envs/requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed envs/requirements-test.txt
	$(BIN)/python -m pip install --quiet -r envs/requirements-test.txt
	touch $@

$(VENV)/.installed-bench: $(VENV)/.installed envs/requirements-bench.txt
	$(BIN)/python -m pip install --quiet -r envs/requirements-bench.txt
	touch $@

demo: $(VENV)/.installed
	$(BIN)/snakemake --cores all

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest

lint: $(VENV)/.installed-test
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/snakefmt --check Snakefile workflow/rules
	$(BIN)/snakemake --lint

# every benchmark, each printing its JSON line last (several minutes; torchstain for stain/tiling)
bench: $(VENV)/.installed-bench
	for script in benchmarks/*.py; do $(BIN)/python $$script | tail -n 1; done

dvc-repro: $(VENV)/.installed
	$(BIN)/dvc repro

clean:
	rm -rf results logs .snakemake
