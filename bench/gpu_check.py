"""`make gpu-check`: what a GPU machine must show, in one script (< 10 minutes on one H100-class GPU).

    python -m bench.gpu_check                    # everything below; rows to bench/results/gpu_check.csv
    python -m bench.gpu_check --skip-tests --steps 50

1. The `gpu`-marked tests (`pytest -m gpu`): kernels on the device, the loop on CUDA, NCCL layouts when >= 2 GPUs.
2. A data stage (the default corpus) into outputs/gpu_check/, then 100 steps of pretraining of the `small` preset on
   one GPU in bf16 and in fp8 (DeepSeek-V3's recipe through the Triton kernels): tokens/s (median over the steps
   after the first 10), MFU against the GPU's dense bf16 peak, peak memory, the final and validation losses.
3. Host syncs per step of the loop on the GPU, counted by CUDA itself: `torch.cuda.set_sync_debug_mode("warn")`
   makes every synchronizing call warn; the count over S2 steps minus the count over S1 steps, per step (the
   tiny preset; the CPU proxy of the same count is bench/host_syncs.py).
4. What fits of the distributed loop on the GPUs present (NCCL, device-mapped with gloo): with 2 or more GPUs,
   20 steps of `small` under FSDP, FSDP + EP and PP x FSDP (4 GPUs), tokens/s and MFU per layout; with one GPU,
   nothing (NCCL needs one GPU per rank) and the row says so.

Every figure is a row of bench/results/gpu_check.csv (machine, commit, date); nothing is asserted here but the
runs' own success. Peak TFLOPS by device name (dense bf16): H100/H200 989, A100 312, L40S 362; else --peak-tflops.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

from bench.common import append_result

REPO = Path(__file__).resolve().parents[1]
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0}
RUN = "gpu_check"
SMALL = ["model=small", "train.seq_len=1024", "train.log_every=1"]


def peak_tflops(override: float | None) -> float:
    if override:
        return override
    name = torch.cuda.get_device_name()
    for key, value in PEAK_TFLOPS.items():
        if key in name:
            return value
    raise SystemExit(f"unknown GPU {name!r}: pass --peak-tflops (its dense bf16 peak) for MFU")


def sh(cmd: list[str], timeout: int, env: dict | None = None) -> subprocess.CompletedProcess:
    print("$", " ".join(cmd), flush=True)
    full_env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(cmd, cwd=REPO, env=full_env, timeout=timeout, capture_output=True, text=True)


def rows(run: str, stage: str = "pretrain") -> list[dict]:
    path = REPO / "outputs" / run / stage / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summarize(run: str) -> dict:
    logged = [r for r in rows(run) if "tokens_per_s" in r]
    timed = logged[10:] or logged
    last = logged[-1]
    val = [r for r in rows(run) if "val_loss" in r]
    return {
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
        "mfu": statistics.median(r["mfu"] for r in timed),
        "peak_mem_mb": max(r["mem_mb"] for r in logged),
        "final_loss": last["loss"],
        "val_loss": val[-1]["val_loss"] if val else None,
        "steps": last["step"],
    }


def gpu_tests() -> dict:
    proc = sh([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider"], timeout=240)
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    print(proc.stdout[-3000:], proc.stderr[-2000:], sep="\n")
    return {"check": "gpu tests", "ok": proc.returncode in (0, 5), "detail": tail}  # 5: none collected


def single_gpu(precision: str, steps: int, peak: float, overrides: list[str]) -> dict:
    run = f"{RUN}_{precision}"
    args = [f"run.name={run}", f"run.data_from={RUN}", f"precision={precision}", f"train.steps={steps}"]
    args += ["train.batch_size=32", "train.micro_batch_size=16"]
    args += [f"train.eval_every={steps}", f"train.ckpt_every={steps}", f"train.peak_tflops={peak}", "train.resume=none"]
    proc = sh([sys.executable, "-m", "train.pretrain", *SMALL, *args, *overrides], timeout=300)
    if proc.returncode != 0:
        return {"check": f"small {precision} 1 GPU", "ok": False, "detail": proc.stderr[-1500:]}
    return {"check": f"small {precision} 1 GPU", "ok": True, "precision": precision, **summarize(run)}


def host_syncs(s1: int, s2: int) -> dict:
    """Synchronizing CUDA calls per step of the tiny preset's loop, from CUDA's own sync debug mode."""
    from pipeline.config import compose
    from train.pretrain import run

    counts = []
    for steps in (s1, s2):
        cfg = compose(
            [f"run.name={RUN}_syncs_{steps}", f"run.data_from={RUN}", "train=smoke", f"train.steps={steps}"]
            + [f"train.eval_every={steps}", f"train.ckpt_every={steps}", "train.resume=none", "wandb.mode=disabled"]
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                run(cfg)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts.append(sum("synchroniz" in str(w.message) for w in caught))
    per_step = (counts[1] - counts[0]) / (s2 - s1)
    return {"check": "host syncs per step (tiny, CUDA sync debug mode)", "ok": True, "syncs_per_step": per_step}


def distributed(n_gpus: int, peak: float, steps: int) -> list[dict]:
    if n_gpus < 2:
        return [{"check": "distributed loop", "ok": True, "detail": "1 GPU: NCCL needs a GPU per rank; not run"}]
    layouts = {"fsdp": ["parallel=fsdp"], "fsdp_ep": ["parallel=ep"]}
    if n_gpus >= 4:
        layouts["pp_fsdp"] = ["parallel=pp_fsdp", "model.num_nextn_predict_layers=0"]
    out = []
    for name, layout in layouts.items():
        nproc = 4 if name == "pp_fsdp" else min(n_gpus, 8)
        run = f"{RUN}_{name}"
        args = [f"run.name={run}", f"run.data_from={RUN}", "precision=bf16", f"train.steps={steps}"]
        args += [f"train.eval_every={steps}", f"train.ckpt_every={steps}", f"train.peak_tflops={peak}"]
        args += ["train.resume=none", "train.batch_size=64", "train.micro_batch_size=8"]
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        proc = sh([*launcher, "-m", "train.pretrain", *SMALL, *args, *layout], timeout=300)
        check = f"small bf16 {name} x{nproc} GPUs (NCCL)"
        if proc.returncode != 0:
            out.append({"check": check, "ok": False, "detail": proc.stderr[-1500:]})
        else:
            out.append({"check": check, "ok": True, "nproc": nproc, **summarize(run)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=100, help="single-GPU pretraining steps per precision")
    ap.add_argument("--dist-steps", type=int, default=20)
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--skip-tests", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench.gpu_check needs CUDA (torch.cuda.is_available() is False)")
    t0 = time.time()
    peak = peak_tflops(args.peak_tflops)
    device = f"{torch.cuda.get_device_name()} x{torch.cuda.device_count()}"
    results = [] if args.skip_tests else [gpu_tests()]
    data = sh([sys.executable, "-m", "data.prepare", f"run.name={RUN}"], timeout=300)
    if data.returncode != 0:
        raise SystemExit(f"data stage failed:\n{data.stderr[-3000:]}")
    results += [single_gpu(p, args.steps, peak, []) for p in ("bf16", "fp8")]
    results.append(host_syncs(5, 15))
    results += distributed(torch.cuda.device_count(), peak, args.dist_steps)
    for r in results:
        append_result("gpu_check", {"device": device, "peak_tflops": peak, **r})
        print(json.dumps(r, default=str), flush=True)
    print(f"gpu-check: {sum(r['ok'] for r in results)}/{len(results)} ok in {time.time() - t0:.0f} s")
    if not all(r["ok"] for r in results):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
