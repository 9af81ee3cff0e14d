# DeepSeek-V3 / R1 training system, end to end. `make help` lists the targets.
SHELL := /bin/bash
PY    ?= .venv/bin/python
VENV  := .venv/.installed
RUN   ?= default
ARGS  ?=
NPROC ?= 4
PARALLEL ?= hsdp_ep
export WANDB_SILENT := true
export TOKENIZERS_PARALLELISM := false

.DEFAULT_GOAL := help
.PHONY: help setup test test-fast lint format data pretrain pipeline clean

help:  ## show this help
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}'

$(VENV): pyproject.toml
	python3 -m venv .venv
	.venv/bin/pip install -q --upgrade pip
	.venv/bin/pip install -q -e ".[dev]"
	touch $(VENV)

setup: $(VENV)  ## create .venv and install everything (nothing is downloaded at run time afterwards)

# one torch thread per process in tests: distributed and end-to-end tests run several processes on 2 cores
test: $(VENV)  ## run the whole test suite (what CI runs)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q

test-fast: $(VENV)  ## the suite without the slow and distributed tests
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m "not slow and not dist"

lint: $(VENV)  ## ruff check + format check
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

format: $(VENV)  ## ruff fix + format
	.venv/bin/ruff check --fix .
	.venv/bin/ruff format .

data: $(VENV)  ## data stage: corpus -> filters -> dedup -> BPE -> FIM -> packed shards + reasoning sets
	$(PY) -m data.prepare run.name=$(RUN) $(ARGS)

clean:  ## delete outputs/ (runs, checkpoints, W&B files)
	rm -rf outputs multirun

pretrain: $(VENV)  ## pretraining stage: the tiny MoE on the packed shards (needs `make data`)
	$(PY) -m train.pretrain run.name=$(RUN) $(ARGS)

pipeline: $(VENV)  ## every stage in order into outputs/$(RUN)/, resumable
	$(PY) -m pipeline run.name=$(RUN) $(ARGS)
