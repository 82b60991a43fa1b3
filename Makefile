# fundus_lab: the README's two commands are `make reproduce` and `make test`.
# Both create .venv on first use and install everything into it.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
PRESET ?= default
ARGS   ?=
ARCH   := $(shell uname -m)

# torch/torchvision pairs that install from this machine family's local wheel cache
ifeq ($(ARCH),aarch64)
TORCH_PINS := torch==2.9.1 torchvision==0.24.1
else
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
endif

.PHONY: install reproduce test test-fast test-unit test-notebooks test-browser browser-deps bench clean \
	record-seeds record-equal-flops record-extended

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

## main job: every notebook on the embedded synthetic benchmark, through papermill
reproduce: install
	$(VENV)/bin/fundus-lab reproduce --preset $(PRESET) $(ARGS)

## tests: unit + integration, the notebooks under nbval at the smoke preset, the browser test
test: install
	$(MAKE) test-unit
	$(MAKE) test-notebooks
	$(MAKE) test-browser

## the quick loop while editing: everything but the end-to-end (slow) and browser tests, under 5 minutes
## on 2 cores (a test over ~20 s is marked slow; --durations shows the ones creeping up)
test-fast: install
	OMP_NUM_THREADS=2 $(VENV)/bin/pytest -q --durations=10 -m "not slow and not browser" tests

test-unit: install
	OMP_NUM_THREADS=2 $(VENV)/bin/pytest -q -m "not browser" tests

test-notebooks: install
	rm -rf runs/nbval && mkdir -p runs/nbval
	for nb in notebooks/[0-9]*.ipynb; do \
	  $(VENV)/bin/papermill --prepare-only -p preset smoke -p run_dir $(CURDIR)/runs/nbval/run -p data_root $(CURDIR)/data/synth-smoke -p train_if_missing True "$$nb" "runs/nbval/$$(basename $$nb)" || exit 1; \
	done
	OMP_NUM_THREADS=2 $(VENV)/bin/pytest -q --nbval-lax -p no:cacheprovider runs/nbval

browser-deps:
	bash .ci/install_browser.sh

test-browser: install browser-deps
	FUNDUS_LAB_REQUIRE_BROWSER=1 $(VENV)/bin/pytest -q -m browser -p no:cacheprovider tests/browser

## the recorded comparisons of issue 21 (hours on a 2-core CPU: run them in the background, see
## results/README.md): Table 1 + pairs table + run record of runs/<name>/ copied to results/<name>/
EXTENDED_METHODS := clip,coca,eva,ours,ours-flip,mae,flair,vilref,visionclip,ours-no-mim,ours-no-caption,ours-no-xattn

record-seeds: install
	$(VENV)/bin/fundus-lab reproduce --preset default --name default-seeds --notebooks 07 'eval.pretrain_seeds=[0,1,2]'
	mkdir -p results/default-seeds && cp runs/default-seeds/results/* results/default-seeds/

record-equal-flops: install
	$(VENV)/bin/fundus-lab reproduce --preset default --name default-equal-flops --notebooks 07 train.budget=flops
	mkdir -p results/default-equal-flops && cp runs/default-equal-flops/results/* results/default-equal-flops/

record-extended: install
	$(VENV)/bin/fundus-lab reproduce --preset default --name default-extended --notebooks 07 --methods $(EXTENDED_METHODS)
	mkdir -p results/default-extended && cp runs/default-extended/results/* results/default-extended/

bench: install
	$(PY) benchmarks/synth_speed.py
	$(PY) benchmarks/train_throughput.py

clean:
	rm -rf runs/nbval .pytest_cache
