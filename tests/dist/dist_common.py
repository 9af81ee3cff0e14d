"""Shared by the distributed tests of the pretraining loop (test_hsdp.py, test_elastic.py) and their workers.

A micro DeepseekV3 (hidden 64, 2 layers: one dense, one MoE with 8 routed experts, plus an MTP module with an MoE
layer) trained by the real loop, `train.pretrain.run`, on a data stage built from the e2e tests' deterministic
corpus. Every layout must follow the single-process trajectory within fp32 tolerance:

    losses and gradient norms per step:   rtol 1e-5 (the reduction order differs: per-rank sums, then all-reduce)
    parameters / AdamW moments at the end: atol 1e-5, rtol 1e-4 (a few AdamW steps amplify 1e-7 gradient
                                           differences where the second moment is tiny)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]

MICRO_MODEL = [
    "model.hidden_size=64",
    "model.intermediate_size=128",
    "model.moe_intermediate_size=32",
    "model.num_hidden_layers=2",
    "model.first_k_dense_replace=1",
    "model.n_routed_experts=8",
    "model.n_group=2",
    "model.topk_group=1",
    "model.num_experts_per_tok=2",
    "model.q_lora_rank=32",
    "model.kv_lora_rank=16",
    "model.qk_nope_head_dim=16",
    "model.qk_rope_head_dim=8",
    "model.v_head_dim=16",
    "model.num_attention_heads=2",
    "model.num_key_value_heads=2",
    "model.num_nextn_predict_layers=1",
]
# 8 sequences per step: 4 micro-batches of 2 on one rank, 2 on each of 2 ranks, 1 on each of 4 ranks.
# decay_start=1.0: the learning rate after warm-up does not depend on train.steps, so a run cut into pieces of
# different lengths (the elastic test) follows the same schedule as one uninterrupted run.
MICRO_TRAIN = [
    "train=smoke",
    "train.batch_size=8",
    "train.micro_batch_size=2",
    "train.seq_len=32",
    "train.eval_every=2",
    "train.eval_batches=1",
    "train.ckpt_every=2",
    "train.keep_last=0",
    "train.export_hf=false",
    "train.optim.warmup_steps=2",
    "train.optim.decay_start=1.0",
    "wandb.mode=disabled",
]

# name -> the overrides of a layout on 4 ranks. The bf16 run uses FSDP's MixedPrecisionPolicy (bf16 compute
# copies, fp32 gradient reduction and master weights) and is compared with the fp32 reference loosely.
LAYOUTS_4 = {
    "ddp4": {"dp_replicate": 4, "dp_shard": 1, "ep": 1},
    "fsdp4": {"dp_replicate": 1, "dp_shard": 4, "ep": 1},
    "hsdp2x2": {"dp_replicate": 2, "dp_shard": 2, "ep": 1},
    "fsdp4_ep2": {"dp_replicate": 1, "dp_shard": 4, "ep": 2},
    "hsdp2x2_ep2": {"dp_replicate": 2, "dp_shard": 2, "ep": 2},
    "hsdp2x2_ep2_bf16": {"dp_replicate": 2, "dp_shard": 2, "ep": 2, "precision": "bf16"},
    # built on the meta device, each rank materializing its shards (train/meta_init.py): against a meta-initialized
    # single process (the draw differs from building on the device, the trajectory must not differ by layout)
    "hsdp2x2_ep2_meta": {"dp_replicate": 2, "dp_shard": 2, "ep": 2, "train.meta_init": "true"},
}


# The pipeline layouts (tests/dist/test_pp_loop.py) train the micro model with 4 decoder layers (DualPipeV on 2
# ranks cuts 4 stages); MTP stays on (dualpipev keeps it) except where the layout turns it off (1F1B, PP x FSDP).
PP_MODEL = ["model.num_hidden_layers=4"]
NO_MTP = {"model.num_nextn_predict_layers": 0}
LAYOUTS_PP_2 = {
    "pp2_1f1b": {"pp": 2, "dp_replicate": 1, "dp_shard": 1, "pp_schedule": "1f1b", **NO_MTP},
    "pp2_dualpipev_mtp": {"pp": 2, "dp_replicate": 1, "dp_shard": 1, "pp_schedule": "dualpipev"},
    # resume: steps 1-2 under 1F1B (rank 0 holds layers 0-1), steps 3-4 under DualPipeV (rank 0 holds 0 and 3); the
    # run is extended (train.steps 2 -> 4), so the second piece names the checkpoint it continues
    "pp2_1f1b_bf16": {"pp": 2, "dp_replicate": 1, "dp_shard": 1, "pp_schedule": "1f1b", **NO_MTP, "precision": "bf16"},
    "pp2_resume_a": {
        "pp": 2,
        "dp_replicate": 1,
        "dp_shard": 1,
        "pp_schedule": "1f1b",
        **NO_MTP,
        "train.steps": 2,
        "run.name": "pp2_resume",
    },
    "pp2_resume_b": {
        "pp": 2,
        "dp_replicate": 1,
        "dp_shard": 1,
        "pp_schedule": "dualpipev",
        **NO_MTP,
        "run.name": "pp2_resume",
        "train.resume": "{root}/pp2_resume/pretrain/checkpoints/step_000002",
    },
}
LAYOUTS_PP_4 = {
    "pp2_fsdp2": {"pp": 2, "dp_replicate": 1, "dp_shard": 2, "pp_schedule": "1f1b", **NO_MTP},
    # bf16 parameters under FSDP's MixedPrecisionPolicy: the hidden state between stages is bf16
    "pp2_fsdp2_bf16": {"pp": 2, "dp_replicate": 1, "dp_shard": 2, "pp_schedule": "1f1b", **NO_MTP, "precision": "bf16"},
    "pp2_fsdp2_meta": {
        "pp": 2,
        "dp_replicate": 1,
        "dp_shard": 2,
        "pp_schedule": "1f1b",
        **NO_MTP,
        "train.meta_init": "true",
    },
    "pp2_fsdp2_dualpipev": {
        "pp": 2,
        "dp_replicate": 1,
        "dp_shard": 2,
        "pp_schedule": "dualpipev",
        **NO_MTP,
        "train.micro_batch_size": 1,
    },
}
LAYOUTS = {**LAYOUTS_4, **LAYOUTS_PP_2, **LAYOUTS_PP_4}


def layout_overrides(layout: dict) -> list[str]:
    """Hydra overrides: `precision` and dotted keys as they are, the rest under `parallel.`."""
    return [f"{k}={v}" if k == "precision" or "." in k else f"parallel.{k}={v}" for k, v in layout.items()]


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}


def prepare_data(root: Path) -> list[str]:
    """Build the data stage once into root/base; return the overrides that reproduce it (run.root included)."""
    from data.prepare import run as prepare
    from pipeline.config import compose
    from tests.e2e.conftest import data_overrides
    from tests.e2e.corpus import write_corpus

    corpus = write_corpus(root / "corpus.jsonl")
    overrides = [f"run.root={root}", "wandb.mode=disabled", *data_overrides(corpus)]
    prepare(compose([*overrides, "run.name=base"]))
    return overrides


def clone_run(root: Path, name: str) -> None:
    shutil.copytree(root / "base" / "data", root / name / "data")


def torchrun(
    nproc: int, args: list[str], timeout: int = 240, debug_detail: bool = False
) -> subprocess.CompletedProcess:
    """`args` under torchrun on `nproc` local processes; `debug_detail`: TORCH_DISTRIBUTED_DEBUG=DETAIL (the
    pipelining schedules then check every tensor against the buffers declared between stages)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    environ = {**env(), "TORCH_DISTRIBUTED_DEBUG": "DETAIL"} if debug_detail else env()
    proc = subprocess.run(cmd, env=environ, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, f"torchrun {' '.join(args)} failed (rc={proc.returncode}):\n{proc.stderr[-6000:]}"
    return proc


def metrics(run_dir: Path) -> dict[int, dict]:
    """Logged rows of a run's pretrain stage by step (the last row of a step wins)."""
    rows = [json.loads(x) for x in (run_dir / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "loss" in r}


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """A checkpoint read back in ONE process into a plain model: (parameters and buffers, AdamW moments by
    parameter name, trainer_state). DCP reshards whatever layout wrote it."""
    from model.config import ModelConfig
    from model.transformer import DeepseekV3
    from train.checkpoint import CheckpointManager, read_model_config
    from train.config import OptimConfig
    from train.optim import build_optimizer

    model = DeepseekV3(ModelConfig(**read_model_config(path)))
    opt = build_optimizer(model, OptimConfig())
    for p in model.parameters():  # materialize the AdamW state so that DCP has tensors to load into
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    state = CheckpointManager(path.parent).load(path, model, opt, restore_rng=False)
    names = {id(p): n for n, p in model.named_parameters()}
    moments = {}
    for p, s in opt.state.items():
        for k, v in s.items():
            if torch.is_tensor(v) and v.ndim > 0:
                moments[f"{names[id(p)]}.{k}"] = v.float()
    params = {n: t.detach().float().clone() for n, t in model.state_dict().items()}  # + the routers' biases
    return params, moments, state


def compare_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], atol: float, rtol: float) -> list:
    """Names that differ, each with its max and mean absolute error (empty when all are close)."""
    assert got.keys() == want.keys(), sorted(set(got) ^ set(want))
    bad = []
    for k in want:
        if not torch.allclose(got[k], want[k], atol=atol, rtol=rtol):
            err = (got[k] - want[k]).abs()
            bad.append(f"{k}: max abs err {err.max():.3e}, mean {err.mean():.3e}")
    return bad


def compare_params(got: dict, want: dict, moments: dict, atol: float, rtol: float, eps: float = 1e-8) -> list:
    """`compare_tensors` for parameters after AdamW steps, held to atol/rtol except on the entries whose second
    moment is below eps^2 (no gradient, or only rounding noise: 1e-9 beside 1e-4 in the same row, e.g. rare token
    rows): there update = lr * m / (sqrt(v) + eps) passes the noise's relative error (a different summation order of
    the same gradients, e.g. FSDP's reduce-scatter) straight into the weight. Those entries get 10 x atol; a layout
    bug moves the gradient-driven entries, which keep the strict bound."""
    bad = compare_tensors(
        {k: v for k, v in got.items() if f"{k}.exp_avg_sq" not in moments},
        {k: v for k, v in want.items() if f"{k}.exp_avg_sq" not in moments},
        atol,
        rtol,
    )
    for k, v_want in want.items():
        v_sq = moments.get(f"{k}.exp_avg_sq")
        if v_sq is None:
            continue
        noise = v_sq.sqrt() < eps
        err = (got[k] - v_want).abs()
        over = err > atol + rtol * v_want.abs()
        if not got[k].isfinite().all() or (over & ~noise).any() or (err[noise] > 10 * atol).any():
            bad.append(f"{k}: max abs err {err.max():.3e}, mean {err.mean():.3e}, noise-gradient entries {noise.sum()}")
    return bad


def compare_steps(got: dict[int, dict], want: dict[int, dict], keys=("loss", "grad_norm"), rtol=1e-5) -> list:
    """Per-step scalars that differ from the reference beyond rtol."""
    assert sorted(got) == sorted(want), (sorted(got), sorted(want))
    bad = []
    for step in want:
        for k in keys:
            g, w = got[step][k], want[step][k]
            if abs(g - w) > rtol * abs(w):
                bad.append(f"step {step} {k}: {g!r} vs reference {w!r} (rel err {abs(g - w) / abs(w):.2e})")
    return bad
