# DeepSeek-V3 / R1 training system, end to end. `make help` lists the targets.
SHELL := /bin/bash
PY    ?= .venv/bin/python
VENV  := .venv/.installed
RUN   ?= default
ARGS  ?=
NPROC ?= 4
# the model stages' precision: auto = bf16 where the device multiplies bf16 natively (a CPU with AVX512-BF16 or
# AMX, a bf16 GPU), fp32 elsewhere (bench/cpu_autocast.py; `python -m ...` alone defaults to fp32)
PRECISION ?= auto
PARALLEL ?= hsdp_ep
export WANDB_SILENT := true
# OpenMP threads that spin while waiting make torch's CPU kernels 10-50x slower as soon as another process competes
# for the cores (measured: 25 s vs 0.6 s per tiny-model step on 2 busy cores); passive waiting costs nothing here
export OMP_WAIT_POLICY ?= PASSIVE
export TOKENIZERS_PARALLELISM := false

.DEFAULT_GOAL := help
.PHONY: help setup test test-fast lint format data pretrain sft rl distill eval report pretrain-dist sweep \
	wandb-sync fp8-study bench readme pipeline seeds lm-eval clean gpu-check

help:  ## show this help
	@grep -hE '^[a-zA-Z0-9_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}'

$(VENV): pyproject.toml
	python3 -m venv .venv
	.venv/bin/pip install -q --upgrade pip
	.venv/bin/pip install -q -e ".[dev]"
	touch $(VENV)

setup: $(VENV)  ## create .venv and install everything (nothing is downloaded at run time afterwards)

# one torch thread per process in tests: distributed and end-to-end tests run several processes on 2 cores.
# TEST_WORKERS pytest-xdist workers (one per core of the 2-core CI machine); worksteal keeps both busy until the end
TEST_WORKERS ?= 2
test: $(VENV)  ## run the whole test suite (what CI runs)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal

test-fast: $(VENV)  ## the suite without the slow and distributed tests
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal -m "not slow and not dist"

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
	$(PY) -m train.pretrain run.name=$(RUN) precision=$(PRECISION) $(ARGS)

sft: $(VENV)  ## cold-start SFT on the chain-of-thought traces (needs `make pretrain`)
	$(PY) -m train.sft run.name=$(RUN) precision=$(PRECISION) $(ARGS)

rl: $(VENV)  ## GRPO on rule-based rewards from the SFT checkpoint
	$(PY) -m train.grpo run.name=$(RUN) precision=$(PRECISION) $(ARGS)

distill: $(VENV)  ## teacher traces with rejection sampling -> dense student
	$(PY) -m distill.run run.name=$(RUN) precision=$(PRECISION) $(ARGS)

eval: $(VENV)  ## every checkpoint of the run: BPB, FIM, HumanEval, reasoning, MoE load -> eval.json
	$(PY) -m eval.run run.name=$(RUN) precision=$(PRECISION) $(ARGS)

report: $(VENV)  ## report.md + PNG plots into the run directory (RUN: a name under outputs/ or a path)
	$(PY) -m eval.report run=$(if $(findstring /,$(RUN)),$(RUN),outputs/$(RUN)) $(ARGS)

# train.batch_size (16) is global; micro-batches of 4 give the pipeline presets (PARALLEL=pp, pp_fsdp) the 4 and 2
# micro-batches per step their schedules need, and each of 4 data-parallel ranks one micro-batch
pretrain-dist: $(VENV)  ## pretraining on NPROC local processes with a conf/parallel preset (gloo on CPU, nccl on GPU)
	OMP_NUM_THREADS=1 $(PY) -m torch.distributed.run --standalone --nproc_per_node=$(NPROC) -m train.pretrain \
		parallel=$(PARALLEL) run.name=$(RUN) train.micro_batch_size=4 $(ARGS)

sweep: $(VENV)  ## Hydra multirun: precision x balancing, one W&B group, data stage shared with RUN
	$(PY) -m train.pretrain --multirun precision=bf16,fp8 model.moe_balance=aux_free,aux_loss \
		'run.name=sweep_$${precision}_$${model.moe_balance}' run.data_from=$(RUN) wandb.group=sweep \
		train.steps=100 $(ARGS)

wandb-sync: $(VENV)  ## upload the offline W&B runs of outputs/ and replay their lineage (needs network, `wandb login`)
	$(PY) -m pipeline.wandb_sync outputs

fp8-study: $(VENV)  ## FP8 studies: accumulation precision vs K; FP8 vs BF16 pretraining of the tiny model
	$(PY) -m bench.fp8_accumulation
	$(PY) -m bench.fp8_vs_bf16 --run $(RUN)

bench: $(VENV)  ## the side-by-side benchmarks (CPU); results append to bench/results/*.csv
	$(PY) -m bench.data_throughput
	$(PY) -m bench.tokenizer_sample
	$(PY) -m bench.model_vs_hf
	$(PY) -m bench.cpu_autocast
	$(PY) -m bench.cpu_threads
	$(PY) -m bench.balance --run $(RUN)
	$(PY) -m bench.eplb_imbalance
	$(PY) -m bench.fp8_accumulation
	$(PY) -m bench.readme

readme: $(VENV)  ## rewrite the README's measured table from bench/results/*.csv (make test checks it)
	$(PY) -m bench.readme

gpu-check: $(VENV)  ## on a GPU machine: gpu tests, 100-step bf16/fp8 pretraining of `small`, syncs, NCCL layouts
	$(PY) -m bench.gpu_check $(ARGS)

pipeline: $(VENV)  ## every stage in order into outputs/$(RUN)/, resumable
	$(PY) -m pipeline run.name=$(RUN) precision=$(PRECISION) $(ARGS)

SEEDS ?= 0 1 2
seeds: $(VENV)  ## sft -> rl -> distill -> eval from RUN's pretrained checkpoint for each of SEEDS -> mean +- sd
	$(PY) -m bench.seeds --run outputs/$(RUN) --seeds $(SEEDS) --overrides precision=$(PRECISION) $(ARGS)

lm-eval: $(VENV)  ## lm-evaluation-harness on every HF export of RUN, beside our harness -> outputs/RUN/lm_eval/
	$(PY) -m eval.lm_eval_run --run $(if $(findstring /,$(RUN)),$(RUN),outputs/$(RUN)) $(ARGS)
