# The two commands of the README:
#   make demo   set up .venv and run the whole workflow on the embedded demo cohort
#   make test   set up .venv with the test tools and run the test suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
export PATH := $(BIN):$(PATH)

.PHONY: demo test browser lint bench gpu-check dvc-repro dvc-pull clean

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

test: $(VENV)/.installed-test browser
	$(BIN)/python -m pytest

# Headless Chromium for the test that opens the report as a user would (playwright drives the
# system browser; its own download is not used). Installed with apt where this runs as root (CI
# does); otherwise the test skips, saying why, unless MGI_REQUIRE_BROWSER=1 (.ci/run sets it).
BROWSERS := chromium-headless-shell chromium chromium-browser google-chrome
browser:
	@for b in $(BROWSERS); do command -v $$b >/dev/null && exit 0; done; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -q --no-install-recommends chromium-headless-shell \
	  || { apt-get update -q && apt-get install -y -q --no-install-recommends chromium-headless-shell; } \
	  || echo "make browser: apt-get could not install chromium-headless-shell" >&2; \
	else \
	  echo "make browser: no Chromium found and not root: the report's browser test will skip" \
	    "(install Debian's chromium-headless-shell, or set MGI_BROWSER to a Chromium binary)" >&2; \
	fi

lint: $(VENV)/.installed-test
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/snakefmt --check Snakefile workflow/rules
	$(BIN)/snakemake --lint

# every benchmark, each printing its JSON line last (several minutes; torchstain for stain/tiling)
bench: $(VENV)/.installed-bench
	for script in benchmarks/*.py; do $(BIN)/python $$script | tail -n 1; done

# The model code on a GPU, in one JSON file (results/gpu-check.json): the selective scan against
# its reference at 16,384 steps, pre-training steps of the demo model and of a TCGA-sized one
# (ViT-B/16, 2,048 genes, batch 128, bf16), a fine-tuning step; pydoc mgi.gpu_check says what
# each measures. Under 8 minutes on one H200. For a GPU lent for a few minutes, with no network:
# copy the checkout there and run `make gpu-check` in it; nothing is installed. It runs .venv's
# python where .venv exists, else python3 with PYTHONPATH=src, which needs torch, timm, numpy and
# pandas (MONAI too for the fine-tuning check, else that check is reported unavailable; MONAI is
# pure Python: carry `pip download --no-deps monai` and `pip install --no-deps` it there). Bring
# back the JSON: it is rewritten after every check, so a run cut short keeps what it measured.
# Exit status 1: a check failed or was unavailable ("failed", "unavailable" in the JSON); 2: no
# CUDA. A dry run anywhere, under a minute: make gpu-check GPU_CHECK_ARGS="--small --device cpu"
GPU_CHECK_ARGS ?=
gpu-check:
	PYTHONPATH=src$${PYTHONPATH:+:$$PYTHONPATH} \
	  $(if $(wildcard $(BIN)/python),$(BIN)/python,python3) \
	  -m mgi.gpu_check --out results/gpu-check.json $(GPU_CHECK_ARGS)

dvc-repro: $(VENV)/.installed
	$(BIN)/dvc repro

# Results from the DVC remote, current for Snakemake too (README: "Sharing results with a DVC
# remote"). dvc pull writes files in no particular order, so Snakemake's mtime trigger would find
# inputs newer than their outputs and rerun the work (in a fresh clone it is the only trigger that
# fires: params, input and code have no metadata to compare with). Once `dvc status` confirms the
# files are those dvc.lock records for this config and code, `snakemake --touch` sets their mtimes
# in DAG order and records Snakemake's metadata; nothing is computed.
dvc-pull: $(VENV)/.installed
	$(BIN)/dvc pull
	@$(BIN)/dvc status --quiet || { $(BIN)/dvc status; \
	  echo "dvc-pull: these results are not this config's and code's; run make dvc-repro" >&2; exit 1; }
	$(BIN)/snakemake --touch --cores 1 --quiet

clean:
	rm -rf results logs .snakemake
