"""The training loop on CUDA (skipped without a GPU; run by `make gpu-check`): bf16 and fp8 steps on one GPU, and
with two GPUs the NCCL process group (device-mapped with gloo) under FSDP + EP against one GPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.config import compose
from tests.e2e.conftest import clone_run

pytestmark = [pytest.mark.gpu, pytest.mark.slow]
TRAIN = ["train=smoke", "train.steps=6", "train.eval_every=6", "train.ckpt_every=6", "train.export_hf=false"]


def _rows(run_dir: Path) -> dict[int, dict]:
    lines = (run_dir / "pretrain" / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if "loss" in r}


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_the_loop_trains_on_one_gpu(data_run, precision):
    from train.pretrain import run

    root, overrides = data_run
    clone_run(root, f"gpu_{precision}")
    result = run(compose([*overrides, *TRAIN, f"run.name=gpu_{precision}", f"precision={precision}"]))
    rows = _rows(root / f"gpu_{precision}")
    assert sorted(rows) == list(range(1, 7)) and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows.values())
    assert rows[6]["loss"] < rows[1]["loss"] and result["val_loss"] < result["unigram_val_loss"] + 2
    assert rows[6]["mem_mb"] > 0  # torch.cuda.max_memory_allocated


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs one GPU per rank")
def test_nccl_fsdp_ep_follows_one_gpu(data_run):
    from train.pretrain import run

    root, overrides = data_run
    for name in ("gpu_single", "gpu_nccl"):
        clone_run(root, name)
    run(compose([*overrides, *TRAIN, "run.name=gpu_single"]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "train.pretrain"]
    cmd += [*overrides, *TRAIN, "run.name=gpu_nccl", "parallel.dp_shard=2", "parallel.ep=2"]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    want, got = _rows(root / "gpu_single"), _rows(root / "gpu_nccl")
    for step in want:  # fp32 on CUDA: reductions in another order, TF32 off by default for matmuls
        assert abs(got[step]["loss"] - want[step]["loss"]) <= 1e-3 * abs(want[step]["loss"]), (step, got, want)
