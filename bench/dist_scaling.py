"""Data/expert-parallel scaling on CPU: tokens/s for 1, 2 and 4 gloo processes per layout, and the bytes the MoE
all-to-all moves per step against the count predicted from the routing.

    python -m bench.dist_scaling                         # every layout at 1, 2, 4 processes (~3-5 min on 2 cores)
    python -m bench.dist_scaling --layouts fsdp fsdp_ep --steps 6
    torchrun --standalone --nproc_per_node=4 -m bench.dist_scaling --worker fsdp_ep --out /tmp/r.json   # one cell

Each cell trains the `tiny` model preset (conf/model/tiny.yaml, 16 experts, MTP on) for `--steps` optimizer steps
on random tokens with a fixed GLOBAL batch (`--batch` sequences of `--seq` tokens, split over the data-parallel
ranks), through the pretraining loop's own hot path: the step function train/steps.py picks for the layout, the
gradient clipping, the loop's one reduction and host read per step (train/loop.py), AdamW and the router-bias
update (no logging, evaluation or checkpoints); the first step is a warm-up and not timed.
tokens/s = global tokens per step / mean step time.

All-to-all bytes: every ``all_to_all_single`` is counted (bytes a rank sends to OTHER ranks, summed over ranks).
The prediction comes from the routing: a token is sent once to each other EP rank that holds one of its experts
(deduplicated, train/parallel/expert_parallel.py); with S such rows per MoE layer and micro-batch (summed over
ranks), R ranks per EP group, D hidden, K experts per token, fp32 payloads:

    bytes = 16 * R * (R - 1) * groups              the per-rank row and assignment counts (2 x int64)
          + 2 * S * (4 * D + 4 * 2K)               dispatch rows + their metadata, forward and backward (gradients)
          + 2 * S * 4 * D                          combine, forward and backward

Pipeline layouts (``pp_*``): the same global batch, split per data-parallel rank into 4 pipeline micro-batches
(the loop's `Pipelined` step), with MTP OFF (``num_nextn_predict_layers=0``: 1F1B and PP x
FSDP refuse it), so they do a little less work per token than the other rows (the ``mtp_layers`` column says which).

Honesty notes: 2 cores run 4 processes at once, so CPU "scaling" here shows overheads (communication, sharding,
Python), not speed-ups; the rows record the load average at the start of the run because the machine may be shared.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from bench.common import append_result
from model.config import ModelConfig
from pipeline.config import Config
from train.config import OptimConfig, TrainConfig
from train.loop import Loop
from train.optim import build_optimizer
from train.parallel.config import ParallelConfig
from train.parallel.expert_parallel import ExpertParallelMoE
from train.parallel.parallelize import init_parallel
from train.steps import build_layout

REPO = Path(__file__).resolve().parents[1]
# name -> ParallelConfig fields; dp_shard/dp_replicate -1 fill the world size
LAYOUTS = {
    "ddp": {"dp_replicate": -1, "dp_shard": 1},
    "fsdp": {"dp_replicate": 1, "dp_shard": -1},
    "hsdp": {"dp_replicate": 2, "dp_shard": -1},
    "fsdp_ep": {"dp_replicate": 1, "dp_shard": -1, "ep": -1},  # ep = every shard rank
    "hsdp_ep": {"dp_replicate": 2, "dp_shard": -1, "ep": 2},
    "pp_1f1b": {"pp": 2, "dp_replicate": 1, "dp_shard": -1, "pp_schedule": "1f1b"},
    "pp_dualpipev": {"pp": 2, "dp_replicate": 1, "dp_shard": -1, "pp_schedule": "dualpipev"},
    "pp_fsdp": {"pp": 2, "dp_replicate": 1, "dp_shard": -1, "pp_schedule": "1f1b"},  # pp2 x dp_shard2 on 4
}
NPROCS = {
    "ddp": (1, 2, 4),
    "fsdp": (2, 4),
    "hsdp": (4,),
    "fsdp_ep": (2, 4),
    "hsdp_ep": (4,),
    "pp_1f1b": (2,),
    "pp_dualpipev": (2,),
    "pp_fsdp": (4,),
}
PP_MICROBATCHES = 4  # pipeline micro-batches per step and data-parallel rank (DualPipeV on 2 ranks needs >= 4)


def tiny_config() -> ModelConfig:
    return ModelConfig(**OmegaConf.to_container(OmegaConf.load(REPO / "conf/model/tiny.yaml")))


def layout_config(name: str, world: int) -> ParallelConfig:
    fields = dict(LAYOUTS[name])
    if fields.get("ep") == -1:
        fields["ep"] = world
    return ParallelConfig(**fields).resolved(world)


class A2ACounter:
    """Counts the bytes of every all_to_all_single this rank sends to other ranks (wraps torch's function)."""

    def __init__(self) -> None:
        self.bytes = 0
        self._orig = dist.all_to_all_single

    def __enter__(self) -> A2ACounter:
        def counted(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
            me = dist.get_rank(group)
            n = dist.get_world_size(group)
            splits = input_split_sizes or [input.shape[0] // n] * n
            row_bytes = input[0].numel() * input.element_size() if input.shape[0] else 0
            if input.dim() == 1:
                row_bytes = input.element_size()
            self.bytes += sum(s for r, s in enumerate(splits) if r != me) * row_bytes
            return self._orig(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)

        dist.all_to_all_single = counted
        return self

    def __exit__(self, *exc) -> None:
        dist.all_to_all_single = self._orig


def step_config(name: str, world: int, seq: int, batch: int):
    """The pipeline config of one cell: the tiny preset and `name`'s layout; one micro-batch per data-parallel rank
    (pipelines: PP_MICROBATCHES per rank), MTP off under PP (1F1B and PP x FSDP refuse it)."""
    pcfg = layout_config(name, world) if world > 1 else ParallelConfig(dp_shard=1)
    dp = world // pcfg.pp
    if batch % dp:
        raise ValueError(f"--batch {batch} is not divisible by {dp} data-parallel ranks")
    micro = batch // dp // (PP_MICROBATCHES if pcfg.pp > 1 else 1)
    if micro < 1 or (pcfg.pp > 1 and (batch // dp) % PP_MICROBATCHES):
        raise ValueError(f"--batch {batch}: {batch // dp} sequences per pipeline do not split into {PP_MICROBATCHES}")
    mcfg = replace(tiny_config(), num_nextn_predict_layers=0) if pcfg.pp > 1 else tiny_config()
    train = replace(TrainConfig(), batch_size=batch, micro_batch_size=micro, seq_len=seq, optim=OptimConfig())
    return replace(Config(), model=mcfg, parallel=pcfg, train=train), micro


def worker(name: str, out: Path, steps: int, seq: int, batch: int) -> None:
    """The pretraining loop's hot path under one layout: the step function train/steps.py picks, gradient clipping,
    the loop's one reduction and host read per step (train/loop.py), AdamW and the router-bias update; no logging,
    evaluation or checkpoints."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(1)
    cfg, micro = step_config(name, world, seq, batch)
    mcfg, pcfg = cfg.model, cfg.parallel
    meshes = init_parallel(pcfg, torch.device("cpu"), mcfg.n_routed_experts)
    torch.manual_seed(0)
    accum = batch // (micro * (world // pcfg.pp))
    layout = build_layout(cfg, mcfg, meshes, accum, torch.device("cpu"))
    model, dp = layout.model, layout.dp
    opt = build_optimizer(layout.trained, cfg.train.optim)
    loop = Loop("bench", cfg.train, None, None, None, reduce=layout.reduce_)

    predicted_rows = [0]  # S: rows this rank sends to other ranks, from the routing the gates chose
    for m in model.modules():
        if isinstance(m, ExpertParallelMoE):

            def hook(gate, args, output, m=m) -> None:
                dest_NK = output[0] // m.n_local
                seen_RN = torch.zeros(m.ep, dest_NK.shape[0], dtype=torch.bool)
                seen_RN[dest_NK, torch.arange(dest_NK.shape[0])[:, None]] = True
                seen_RN[m.ep_rank] = False
                predicted_rows[0] += int(seen_RN.sum())

            m.gate.register_forward_hook(hook)
    ep_layers = sum(isinstance(m, ExpertParallelMoE) for m in model.modules())

    gen = torch.Generator().manual_seed(1 + dp.rank)

    def batches():
        while True:
            tokens = torch.randint(0, mcfg.vocab_size, (micro, seq + 1), generator=gen)
            yield tokens[:, :-1], tokens[:, 1:]

    it = batches()
    times = []
    with A2ACounter() as counter:
        for step in range(steps + 1):
            if step == 1:  # the warm-up step is neither timed nor counted
                counter.bytes, predicted_rows[0] = 0, 0
            if world > 1:
                dist.barrier()
            t0 = time.perf_counter()
            parts, load_LE = layout.forward_backward(it, poison=False)
            gnorm = layout.clip_grad_norm_(1.0)
            vals, load_LE = loop.sync(parts, gnorm, load_LE)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if load_LE.numel():
                layout.update_expert_bias(load_LE, mcfg.bias_update_speed)
            if world > 1:
                dist.barrier()
            if step > 0:
                times.append(time.perf_counter() - t0)

    totals = torch.tensor([counter.bytes, predicted_rows[0]], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(totals)
    measured, rows = totals.tolist()
    ep = meshes.ep.size() if meshes is not None else 1
    D, K = mcfg.hidden_size, mcfg.num_experts_per_tok
    calls = ep_layers * steps  # MoE layer forwards per rank (one micro-batch per step per rank)
    predicted = (16 * ep * (ep - 1) * (world // ep) * calls if ep > 1 else 0) + rows * (2 * (4 * D + 8 * K) + 8 * D)
    result = {
        "layout": name if world > 1 else "single",
        "nproc": world,
        "dp_replicate": pcfg.dp_replicate,
        "dp_shard": pcfg.dp_shard,
        "ep": ep,
        "pp": pcfg.pp,
        "pp_schedule": pcfg.pp_schedule if pcfg.pp > 1 else "",
        "mtp_layers": mcfg.num_nextn_predict_layers,
        "global_batch": batch,
        "seq_len": seq,
        "step_s": sum(times) / len(times),
        "tokens_per_s": batch * seq * len(times) / sum(times),
        "a2a_bytes_per_step": measured / steps,
        "a2a_bytes_predicted": predicted / steps,
        "a2a_rows_per_step": rows / steps,
    }
    if dp.rank == 0 and (meshes is None or dist.get_rank() == 0):
        out.write_text(json.dumps(result))
    if world > 1:
        dist.destroy_process_group()


def launch(name: str, nproc: int, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        cell = [
            "--worker",
            name,
            "--out",
            str(out),
            "--steps",
            str(args.steps),
            "--seq",
            str(args.seq),
            "--batch",
            str(args.batch),
        ]
        if nproc == 1:
            cmd = [sys.executable, "-m", "bench.dist_scaling", *cell]
        else:
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc_per_node={nproc}",
                "-m",
                "bench.dist_scaling",
                *cell,
            ]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        env.pop("WORLD_SIZE", None)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
        if proc.returncode != 0:
            raise RuntimeError(f"{name} x{nproc} failed:\n{proc.stderr[-4000:]}")
        return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    ap.add_argument("--steps", type=int, default=4, help="timed optimizer steps (plus one warm-up)")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8, help="global sequences per step")
    ap.add_argument("--worker", choices=list(LAYOUTS), help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.out, args.steps, args.seq, args.batch)
        return
    load = os.getloadavg()[0]
    cells = [("ddp", 1)] + [(n, p) for n in args.layouts for p in NPROCS[n] if p > 1]
    base = None
    head = f"{'layout':>12} {'nproc':>5} {'tok/s':>8} {'vs 1':>5} {'a2a MB/step':>11} {'predicted':>9}"
    print(f"{head}  (load average {load:.1f})")
    for name, nproc in cells:
        r = launch(name, nproc, args)
        base = base or r["tokens_per_s"]
        r["speedup_vs_1proc"] = r["tokens_per_s"] / base
        r["load_avg_1min"] = load
        r["note"] = f"CPU gloo, {os.cpu_count()} cores shared by {nproc} procs; machine load avg {load:.1f} at start"
        append_result("dist_scaling", r)
        print(
            f"{r['layout']:>12} {nproc:>5} {r['tokens_per_s']:>8.0f} {r['speedup_vs_1proc']:>5.2f} "
            f"{r['a2a_bytes_per_step'] / 1e6:>11.3f} {r['a2a_bytes_predicted'] / 1e6:>9.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
