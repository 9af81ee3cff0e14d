"""Pretraining: the DeepSeekMoE model learns next-token (and multi-token) prediction from the packed shards.

    python -m train.pretrain                                   # CPU default: the tiny MoE
    python -m train.pretrain model=small precision=fp8 train.steps=2000
    python -m train.pretrain precision=bf16 train.resume=none run.name=bf16_baseline
    make pretrain RUN=<run>
    torchrun --standalone --nproc_per_node=4 -m train.pretrain parallel=hsdp_ep train.micro_batch_size=4
    make pretrain-dist NPROC=4 PARALLEL=fsdp                                       # presets: conf/parallel/*.yaml
    make pretrain-dist NPROC=2 PARALLEL=pp                                         # DualPipeV, 2 pp ranks, MTP on
    make pretrain-dist NPROC=4 PARALLEL=pp_fsdp ARGS="model.num_nextn_predict_layers=0"   # 1F1B x FSDP2
    # GPU recipes are experiment files (conf/experiment/), each naming its launch command:
    torchrun --standalone --nproc_per_node=8 -m train.pretrain experiment=gpu_node_small
    # two nodes of 8 GPUs (run on each node; rendezvous at the first node):
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=<node0>:29500 --rdzv_id=<job> \
        -m train.pretrain experiment=gpu_2node_small

Under torchrun (WORLD_SIZE > 1) the process group (gloo on CPU, nccl on CUDA) and the device mesh of `parallel`
are set up by train/parallel/parallelize.py, which applies EP and FSDP2/HSDP to the model built here; the loader
reads by data-parallel rank, expert loads and logged scalars are reduced over data-parallel ranks (every rank makes
the same bias update), rank 0 logs, and DCP checkpoints reshard, so a run saved on N ranks resumes on M.
`train.batch_size` is global: it must divide by the data-parallel ranks, and each rank's share by
micro_batch_size (a share smaller than micro_batch_size is one micro-batch); `check_config` says what to set.
Every tensor a collective sees lives on the training device (NCCL carries CUDA tensors only), and the hot path reads
the device once per step (train/loop.py); on SIGTERM/SIGUSR1 the run finishes its step, saves it and exits.

Pipeline parallelism (`parallel.pp > 1`, train/parallel/pipeline_parallel.py): each rank builds the whole model
from the seed, keeps the stages it holds (`parallel.pp_schedule`: 1f1b, one stage per rank; dualpipev, two per
rank in a V) and, with data parallelism beside it, FSDP2-shards them over its pp coordinate's dp ranks. One
optimizer step = `batch_size / (micro_batch_size x dp)` micro-batches through the schedule (in rounds of
`parallel.pp_microbatches`); the schedule leaves the gradients summed and the loop divides once. The optimizer,
EMA, gradient clipping and checkpoints run on the rank's `rank_view` (its parameters under their full-model
names: every rank saves its own, and a PP checkpoint resumes under any layout). The loss parts, held by the last
stage (pp rank 0 under dualpipev), and the per-stage expert loads are summed over all ranks in one all-reduce, so
every rank logs and decides a NaN skip on the same numbers; the gradient norm is reduced over the pp group and
(by FSDP) the dp shards; each pp rank updates the router biases of its own layers. Validation runs forward only
(1F1B: `schedule.eval`; DualPipeV: `forward_only`, since its `eval` fails in torch 2.13); the HF export gathers
every rank's parts on rank 0. MTP under PP needs dualpipev and no data parallelism; PP x EP is refused.

Reads `outputs/<run>/data/` (token shards, tokenizer) and writes `outputs/<run>/pretrain/`: checkpoints/
(DCP, resumable, last N kept), hf/ (Hugging Face export of the final weights), metrics.jsonl, expert_load.npy,
manifest.json and the W&B run.

The loop itself (one optimizer step, validation, resume) is train/pretrain_loop.py, shared with the
distillation stage's student base; this module is the stage: the process group, the run directory, the CLI.
"""

from __future__ import annotations

import json
import os

import hydra
import torch
from omegaconf import DictConfig

from data.outputs import stage_outputs
from pipeline.config import Config, stage_dir, to_config
from pipeline.stage import StageRun
from train.loop import TrainingError
from train.parallel.mesh import ParallelMeshes, validate_layout
from train.parallel.parallelize import init_parallel, world_size_from_env
from train.pretrain_loop import check_config, train
from train.runtime import dist_info

__all__ = ["TrainingError", "check_launch", "run"]


def check_launch(cfg: Config, world_size: int) -> Config:
    """Everything that can be checked before any work on `world_size` processes: the layout, then the rules between
    sections (`check_config`); returns the config as it will run (micro-batch resolved)."""
    par = validate_layout(cfg.parallel, world_size, cfg.model.n_routed_experts)
    return check_config(cfg, world_size // par.pp, par.pp)


def run(cfg: Config) -> dict:
    """One pretraining stage. Under torchrun (WORLD_SIZE > 1) the process group and the mesh of `cfg.parallel`
    are set up here, and torn down at the end."""
    check_launch(cfg, world_size_from_env())
    data = stage_outputs(stage_dir(cfg, "data"))
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    owns_group = not torch.distributed.is_initialized()  # a caller's process group is left to the caller
    meshes = init_parallel(cfg.parallel, torch.device(device_type), cfg.model.n_routed_experts)
    try:
        return _run(cfg, data, meshes)
    finally:
        if meshes is not None and owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _run(cfg: Config, data: dict, meshes: ParallelMeshes | None) -> dict:
    info = dist_info()
    inputs = {"train_shards": data["train"], "val_shards": data["val"], "tokenizer": data["tokenizer"]}
    stage = StageRun(cfg, "pretrain", inputs=inputs, rank=info.rank, resume=cfg.train.resume, layout=("parallel",))
    return stage.run_checkpointed(lambda st: train(cfg, st, data, meshes))


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(dcfg: DictConfig) -> None:
    result = run(to_config(dcfg))
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 reports
        print(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
