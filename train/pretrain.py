"""Pretraining: the DeepSeekMoE model learns next-token (and multi-token) prediction from the packed shards.

    python -m train.pretrain                                   # CPU default: tiny MoE, ~10 minutes on 2 cores
    python -m train.pretrain model=small precision=fp8 train.steps=2000
    python -m train.pretrain precision=bf16 train.resume=none run.name=bf16_baseline
    make pretrain RUN=<run>
    torchrun --standalone --nproc_per_node=4 -m train.pretrain parallel=hsdp_ep train.micro_batch_size=4
    make pretrain-dist NPROC=4 PARALLEL=fsdp ARGS="train.micro_batch_size=4"      # presets: conf/parallel/*.yaml
    make pretrain-dist NPROC=2 PARALLEL=pp                                         # DualPipeV, 2 pp ranks, MTP on
    make pretrain-dist NPROC=4 PARALLEL=pp_fsdp ARGS="model.num_nextn_predict_layers=0"   # 1F1B x FSDP2
    # two nodes of 8 GPUs (run on each node; rendezvous at the first node):
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=<node0>:29500 --rdzv_id=<job> \
        -m train.pretrain parallel=hsdp_ep model=small precision=bf16

Under torchrun (WORLD_SIZE > 1) the process group (gloo on CPU, nccl on CUDA) and the device mesh of `parallel`
are set up by train/parallel/parallelize.py, which applies EP and FSDP2/HSDP to the model built here; the loader
reads by data-parallel rank, expert loads and logged scalars are reduced over data-parallel ranks (every rank makes
the same bias update), rank 0 logs, and DCP checkpoints reshard, so a run saved on N ranks resumes on M.
`train.batch_size` is global: it must divide by micro_batch_size x data-parallel ranks.

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

One optimizer step: `batch_size` sequences split into micro-batches of `micro_batch_size` (gradient accumulation),
loss = next-token CE + mtp_loss_weight * MTP loss + alpha * balance loss; the gradient norm is clipped; a step whose
loss or gradient is NaN/Inf is skipped and counted (`max_bad_steps` in a row stop the run with a checkpoint and the
step and tensor named); then AdamW, the auxiliary-loss-free bias update of every MoE layer from that step's expert
loads, and the EMA. Validation (loss and bits per byte, live and EMA weights) every `eval_every` steps.
Resume: `train.resume=auto` loads the newest valid checkpoint (model, optimizer, EMA, loader position, RNG), so a
run killed at any step continues on exactly the trajectory it would have followed.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, replace
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from data.loader import PackedDataset, ShardLoader
from data.prepare import stage_outputs
from data.tokenizer import load_tokenizer
from model.moe import update_expert_bias
from pipeline.config import Config, stage_dir, to_config
from pipeline.seed import seed_everything
from pipeline.stage import StageRun
from train.checkpoint import CheckpointManager
from train.ema import EMA
from train.metrics import bits_per_byte, flops_per_token, max_violation, mfu, peak_memory_mb, unigram_loss
from train.optim import build_optimizer, lr_at
from train.parallel.mesh import ParallelMeshes
from train.parallel.parallelize import clip_grad_norm_, init_parallel, parallelize, parallelize_pipeline
from train.parallel.pipeline_parallel import (
    Pipeline,
    forward_only,
    gather_full_state_dict,
    moe_layer_ids,
    rank_view,
)
from train.runtime import autocast, build_model, device_for, dist_info


class TrainingError(RuntimeError):
    """A run that cannot go on (too many bad steps); a checkpoint was written before raising."""


def token_byte_lengths(tokenizer) -> np.ndarray:
    """UTF-8 bytes each token stands for. Byte-level BPE maps one byte to one symbol, so the token string's length
    is its byte count; special tokens stand for no text and count 0."""
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    special = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
    lengths = np.zeros(max(vocab.values()) + 1, dtype=np.int64)
    for tok, i in vocab.items():
        lengths[i] = 0 if tok in special else len(tok)
    return lengths


def check_config(cfg: Config, world_size: int, pp: int = 1) -> None:
    t, m, par = cfg.train, cfg.model, cfg.parallel
    if t.seq_len > m.max_position_embeddings:
        raise ValueError(f"train.seq_len={t.seq_len} exceeds model.max_position_embeddings={m.max_position_embeddings}")
    if t.batch_size % (t.micro_batch_size * world_size):
        raise ValueError(
            f"train.batch_size={t.batch_size} is not divisible by train.micro_batch_size={t.micro_batch_size}"
            f" x {world_size} data-parallel ranks"
        )
    if t.steps <= 0:
        raise ValueError(f"train.steps must be positive, got {t.steps}")
    if pp > 1:
        accum = t.batch_size // (t.micro_batch_size * world_size)
        if par.pp_microbatches != -1 and accum % par.pp_microbatches:
            raise ValueError(
                f"parallel.pp_microbatches={par.pp_microbatches} must divide the {accum} micro-batches of a step"
                f" (train.batch_size / (train.micro_batch_size x {world_size} data-parallel ranks))"
            )
        n_micro = accum if par.pp_microbatches == -1 else par.pp_microbatches
        if par.pp_schedule == "dualpipev" and n_micro < 2 * pp:
            raise ValueError(
                f"parallel.pp_schedule=dualpipev needs at least 2 x parallel.pp = {2 * pp} micro-batches per round, got"
                f" {n_micro} (raise train.batch_size or parallel.pp_microbatches, or lower train.micro_batch_size)"
            )
        stages = pp * (2 if par.pp_schedule == "dualpipev" else 1)
        if m.num_hidden_layers < stages:
            raise ValueError(
                f"model.num_hidden_layers={m.num_hidden_layers} cannot be cut into {stages} pipeline stages"
                f" (parallel.pp={pp}, parallel.pp_schedule={par.pp_schedule})"
            )


@torch.no_grad()
def evaluate(model, batches, precision, device, byte_len: np.ndarray) -> dict:
    """Mean next-token CE (the MTP head is not an evaluation target) and bits per byte over fixed batches."""
    model.eval()
    total, n_tok, n_bytes = 0.0, 0, 0
    for x, y in batches:
        with autocast(precision, device):
            out = model(x.to(device), y.to(device))
        k = int((y >= 0).sum())
        total += float(out.ce_loss) * k
        n_tok += k
        n_bytes += int(byte_len[y[y >= 0].numpy()].sum())
    model.train()
    loss = total / max(1, n_tok)
    return {"loss": loss, "bpb": bits_per_byte(loss, n_tok, n_bytes)}


@torch.no_grad()
def evaluate_pipeline(pipe: Pipeline, view, batches, precision, device, byte_len: np.ndarray, pp_group) -> dict:
    """`evaluate` under PP, forward only. 1F1B: the schedule's `eval`, M micro-batches per round, the last round
    padded with all-ignored targets (CE 0 over 0 tokens). DualPipeV (whose `eval` fails in torch 2.13):
    `forward_only`, one micro-batch after another through the stages. The last stage's token-weighted CE sum is
    summed over the pipeline group, so every rank returns the same numbers."""
    view.eval()
    pipe.loss.records.clear()
    if pipe.kind == "1f1b":
        M = pipe.n_microbatches
        pad = (-len(batches)) % M
        padded = list(batches) + [(torch.zeros_like(batches[0][0]), torch.full_like(batches[0][1], -100))] * pad
        for i in range(0, len(padded), M):
            x = torch.cat([b[0] for b in padded[i : i + M]]).to(device)
            y = torch.cat([b[1] for b in padded[i : i + M]]).to(device)
            with autocast(precision, device):
                pipe.schedule.eval(x, target=y, losses=[])
    else:
        for x, y in batches:
            with autocast(precision, device):
                forward_only(pipe, x.to(device), y.to(device))
        for st in pipe.stages:  # an FSDP root keeps its parameters gathered after a forward with no backward
            if isinstance(st, FSDPModule):
                st.reshard()
    total = torch.tensor([sum(float(r["ce"] * r["tokens"]) for r in pipe.loss.records)], dtype=torch.float64)
    pipe.loss.records.clear()
    torch.distributed.all_reduce(total, group=pp_group)
    view.train()
    ys = torch.cat([y for _, y in batches])
    n_tok = int((ys >= 0).sum())
    n_bytes = int(byte_len[ys[ys >= 0].numpy()].sum())
    loss = float(total) / max(1, n_tok)
    return {"loss": loss, "bpb": bits_per_byte(loss, n_tok, n_bytes)}


def fixed_batches(ds: PackedDataset, batch_size: int, n_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first sequences of a split, in order: the same validation batches at every evaluation."""
    n = min(len(ds), batch_size * n_batches)
    if n == 0:
        raise ValueError(f"validation split {ds.dir} holds no sequence of length {ds.seq_len}")
    rows = torch.from_numpy(np.stack([ds[i] for i in range(n)]))
    return [(b[:, :-1].contiguous(), b[:, 1:].contiguous()) for b in rows.split(batch_size)]


def first_nonfinite(model) -> str | None:
    for name, p in model.named_parameters():
        g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad  # this rank's shard: no collective
        if g is not None and not torch.isfinite(g).all():
            return name
    return None


def pipeline_step(
    pipe: Pipeline, it, accum: int, poison: bool, precision: str, device, moe_row: dict[int, int], n_exp: int
) -> tuple[dict, torch.Tensor]:
    """Forward and backward of one optimizer step under PP: `accum` micro-batches in rounds of the schedule's M;
    gradients (left summed over micro-batches by the schedule) are divided by `accum` once. Returns this rank's
    loss parts (mean over the step's micro-batches; zeros off the last stage) and expert loads (rows of the
    layers it holds; zeros elsewhere)."""
    M = pipe.n_microbatches
    pipe.loss.poison = poison
    for _ in range(accum // M):
        xs, ys = zip(*(next(it) for _ in range(M)))
        with autocast(precision, device):
            pipe.schedule.step(torch.cat(xs).to(device), target=torch.cat(ys).to(device), losses=[])
    pipe.loss.poison = False
    for p in {id(p): p for st in pipe.stages for p in st.parameters()}.values():  # the embedding may be in two
        if p.grad is not None:
            p.grad.div_(accum)
    sums = {k: sum(float(r[k]) for r in pipe.loss.records) / accum for k in ("loss", "ce", "mtp", "balance")}
    pipe.loss.records.clear()
    load = torch.zeros(len(moe_row), n_exp)
    for st in pipe.stages:
        for i, load_E in st.expert_loads.items():
            load[moe_row[i]] += load_E.cpu()
        st.expert_loads.clear()
    return sums, load


def pipeline_reduce(sums: dict, load: torch.Tensor, dp_size: int) -> tuple[dict, torch.Tensor]:
    """One all-reduce over every rank: the loss parts (held by the last stage's ranks only, so the world sum over
    dp_size is their data-parallel mean) and the expert loads (each layer's rows come from the ranks holding it).
    Every rank then logs and decides (NaN skip) on the same numbers."""
    keys = list(sums)
    flat = torch.cat([torch.tensor([sums[k] for k in keys], dtype=torch.float64), load.double().flatten()])
    torch.distributed.all_reduce(flat)
    out = {k: float(v) / dp_size for k, v in zip(keys, flat[: len(keys)].tolist())}
    return out, flat[len(keys) :].float().view_as(load)


def train(cfg: Config, stage: StageRun, data: dict[str, Path], meshes: ParallelMeshes | None = None) -> dict:
    """The loop. Parallelism (when configured: `meshes` from `init_parallel` under torchrun) is applied from
    outside by train.parallel; every rank builds the same model from the same seed before it is sharded."""
    info = dist_info()
    device = device_for(info)
    t = cfg.train
    tok = load_tokenizer(data["tokenizer"])
    mcfg = replace(cfg.model, vocab_size=tok.get_vocab_size(with_added_tokens=True))
    dp_size = meshes.dp.size() if meshes is not None else 1
    pp = meshes.pp.size() if meshes is not None else 1
    check_config(replace(cfg, model=mcfg), dp_size, pp)
    seed_everything(cfg.run.seed, cfg.run.deterministic)
    model = build_model(mcfg, cfg.precision, cfg.kernels.backend, device, cfg.kernels.pow2_scale)
    accum = t.batch_size // (t.micro_batch_size * dp_size)
    mixed = cfg.precision in ("bf16", "fp8")
    pipe, pp_group = None, None
    if pp > 1:  # this rank's stages; `trained` holds exactly the parameters this rank updates and checkpoints
        n_micro = accum if cfg.parallel.pp_microbatches == -1 else cfg.parallel.pp_microbatches
        shape = (t.micro_batch_size, t.seq_len)
        pipe, dp = parallelize_pipeline(model, meshes, cfg.parallel, n_micro, shape, device, mixed_precision=mixed)
        trained, pp_group = rank_view(model, pipe.stages), meshes.pp.get_group()
    else:
        dp = parallelize(model, meshes, cfg.parallel, mixed_precision=mixed)
        trained = model
    opt = build_optimizer(trained, t.optim)
    ema = EMA(trained, t.ema_decay, t.ema_every) if t.ema_decay > 0 else None
    train_ds = PackedDataset(data["train"], t.seq_len)
    val_ds = PackedDataset(data["val"], t.seq_len)
    loader = ShardLoader(train_ds, t.micro_batch_size, dp.rank, dp.size, seed=cfg.run.seed)
    val_batches = fixed_batches(val_ds, t.micro_batch_size, t.eval_batches)
    byte_len = token_byte_lengths(tok)
    ckpts = CheckpointManager(stage.dir / "checkpoints", keep_last=t.keep_last)
    tracker = stage.tracker

    start_step, bad_total = 0, 0
    resumed = None
    if t.resume == "auto":
        resumed = ckpts.load_latest_valid(trained, opt, ema.shadow if ema else None)
    elif t.resume != "none":
        resumed = (Path(t.resume), ckpts.load(Path(t.resume), trained, opt, ema.shadow if ema else None))
    if resumed is not None:
        path, state = resumed
        start_step, bad_total = state["step"], state.get("bad_steps", 0)
        loader.load_state_dict(state["loader"])
        tracker.resume_at(start_step)
        print(f"resumed from {path} at step {start_step}")

    moe_layers = list(model.moe_layers())
    n_moe, n_exp = len(moe_layers), mcfg.n_routed_experts
    moe_row = {layer_id: row for row, layer_id in enumerate(moe_layer_ids(model))}  # layer index -> load row
    held = set(moe_row) if pipe is None else {i for st in pipe.stages for i in moe_row if st.holds(i)}
    cum_load = torch.zeros(n_moe, n_exp)
    fpt = flops_per_token(model, mcfg, t.seq_len)
    tokens_per_step = t.batch_size * t.seq_len
    model_cfg_json = asdict(mcfg)
    metrics: dict = {}
    bad_run = 0
    it = iter(loader)

    def validate() -> dict:
        if pipe is None:
            return evaluate(model, val_batches, cfg.precision, device, byte_len)
        return evaluate_pipeline(pipe, trained, val_batches, cfg.precision, device, byte_len, pp_group)

    def save(step: int) -> Path:
        state = {"loader": loader.state_dict(), "bad_steps": bad_total}
        return ckpts.save(step, trained, opt, state, model_cfg_json, ema.shadow if ema else None)

    bar = tqdm(range(start_step, t.steps), initial=start_step, total=t.steps, desc="pretrain", disable=not info.is_main)
    t_last = time.perf_counter()
    for step in bar:
        lr = lr_at(step, t.steps, t.optim)
        for g in opt.param_groups:
            g["lr"] = lr
        sums = {"loss": 0.0, "ce": 0.0, "mtp": 0.0, "balance": 0.0}
        load = torch.zeros(n_moe, n_exp)
        if pipe is not None:
            poison = step == t.inject_nan_at_step
            sums, load = pipeline_step(pipe, it, accum, poison, cfg.precision, device, moe_row, n_exp)
            sums, load = pipeline_reduce(sums, load, dp.size)
        else:
            for _ in range(accum):
                x, y = next(it)
                with autocast(cfg.precision, device):
                    out = model(x.to(device), y.to(device))
                loss = out.loss
                if step == t.inject_nan_at_step:
                    loss = loss * float("nan")
                (loss / accum).backward()
                sums["loss"] += float(loss.detach()) / accum
                sums["ce"] += float(out.ce_loss.detach()) / accum
                for key, part in (("mtp", out.mtp_loss), ("balance", out.balance_loss)):
                    if part is not None:  # None: the model has no MTP module / no MoE layer
                        sums[key] += float(part.detach()) / accum
                if n_moe:
                    load += out.expert_load_LE.detach().float().cpu()
            if dp.size > 1:  # every rank logs and decides on the data-parallel mean; one bias update for all
                sums = dp.mean_scalars(sums)
                load = dp.all_reduce_sum(load)
        if meshes is None:
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.optim.grad_clip or float("inf"))
        else:  # DTensor gradients on several meshes (dense, experts); under PP summed over the stages' ranks
            gnorm = clip_grad_norm_(trained.parameters(), t.optim.grad_clip or float("inf"), pp_group)
        culprit = "loss" if not math.isfinite(sums["loss"]) else first_nonfinite(trained)
        if culprit is not None or not torch.isfinite(gnorm):
            opt.zero_grad(set_to_none=True)
            bad_run += 1
            bad_total += 1
            bad = {"skipped_step": 1, "bad_steps": bad_total, "bad_tensor": culprit or "grad_norm"}
            tracker.log(bad, step=step + 1)
            if bad_run >= t.max_bad_steps:
                path = save(step)
                raise TrainingError(
                    f"stopping: {bad_run} consecutive non-finite steps (last at step {step + 1}, first bad tensor:"
                    f" {culprit or 'grad_norm'}); checkpoint of the last good weights at {path}"
                )
            continue
        bad_run = 0
        opt.step()
        opt.zero_grad(set_to_none=True)
        if n_moe and mcfg.moe_balance == "aux_free":  # under PP each rank updates the layers it holds
            for layer, layer_id, l_E in zip(moe_layers, moe_row, load):
                if layer_id in held:
                    update_expert_bias(layer, l_E.to(device), mcfg.bias_update_speed)
        if ema is not None:
            ema.update(trained, step + 1)
        cum_load += load

        now = time.perf_counter()
        dt, t_last = now - t_last, now
        tok_s = tokens_per_step / dt
        metrics = {
            "loss": sums["loss"],
            "ce_loss": sums["ce"],
            "mtp_loss": sums["mtp"],
            "balance_loss": sums["balance"],
            "lr": lr,
            "grad_norm": float(gnorm),
            "tokens_per_s": tok_s,
            "flops_per_token": fpt,
            "mfu": mfu(tok_s, fpt, t.peak_tflops),
            "mem_mb": peak_memory_mb(),
            "tokens": (step + 1) * tokens_per_step,
        }
        if n_moe:
            vio = [max_violation(l_E) for l_E in load]
            cvio = [max_violation(l_E) for l_E in cum_load]
            metrics |= {"maxvio_batch": float(np.mean(vio)), "maxvio_cum": float(np.mean(cvio))}
            metrics |= {f"maxvio_batch/layer{i}": v for i, v in enumerate(vio)}
        if cfg.precision == "fp8":
            from kernels.fp8_linear import fp8_stats

            metrics |= {f"fp8/{k}": v for k, v in fp8_stats(model).items()}
        last = step + 1 == t.steps
        if (step + 1) % t.eval_every == 0 or last:
            val = validate()
            metrics |= {"val_loss": val["loss"], "val_bpb": val["bpb"]}
            if ema is not None:
                with ema.swapped_in(trained):
                    ev = validate()
                metrics |= {"val_loss_ema": ev["loss"], "val_bpb_ema": ev["bpb"]}
            if n_moe:
                bias = torch.stack([m.gate.e_score_correction_bias.detach().float().cpu() for m in moe_layers])
                if pp_group is not None:  # each pp rank's copy is current for the layers it holds
                    bias *= torch.tensor([float(i in held) for i in moe_row])[:, None]
                    torch.distributed.all_reduce(bias, group=pp_group)
                metrics["expert_load"] = load.tolist()
                tracker.log_heatmap("expert_load", load, step=step + 1)
                metrics["expert_bias"] = bias.tolist()
        if (step + 1) % t.log_every == 0 or "val_loss" in metrics:
            tracker.log(metrics, step=step + 1)
        eta = (t.steps - step - 1) * dt
        bar.set_postfix(loss=f"{sums['loss']:.3f}", tok_s=f"{tok_s:.0f}", eta=f"{eta / 60:.1f}m")
        if (step + 1) % t.ckpt_every == 0 or last:
            save(step + 1)

    final = ckpts.checkpoints()[-1]
    if info.is_main:
        np.save(stage.dir / "expert_load.npy", cum_load.numpy())
    # unigram baseline on the same tokenizer and data: what a model that ignores context achieves
    train_sample = train_ds.tokens(0, min(train_ds.n_tokens, 4_000_000))
    uni = unigram_loss(train_sample, np.concatenate([y.flatten().numpy() for _, y in val_batches]), mcfg.vocab_size)
    result = {k: metrics[k] for k in ("loss", "val_loss", "val_bpb", "val_loss_ema", "val_bpb_ema") if k in metrics}
    result |= {"unigram_val_loss": uni, "steps": t.steps, "bad_steps": bad_total, "checkpoint": str(final)}
    if t.export_hf:
        if pipe is not None:
            export_final(trained, mcfg, cfg, True, stage.dir / "hf", data["tokenizer"], pipeline=dp.size > 1)
        else:
            export_final(model, mcfg, cfg, meshes is not None, stage.dir / "hf", data["tokenizer"])
    return result


def export_final(
    model, mcfg, cfg: Config, sharded: bool, out_dir: Path, tokenizer_path: Path, pipeline: bool | None = None
) -> None:
    """HF export on rank 0; a sharded model is first gathered (every rank takes part) into a plain CPU copy.
    Under PP (`pipeline` not None: whether the stages are FSDP-sharded too) `model` is this rank's `rank_view`;
    the ranks' parts are gathered on rank 0."""
    from model.hf import export_hf

    if pipeline is not None:
        full = gather_full_state_dict(model, sharded=pipeline)
        if full is None:
            return
        model = build_model(mcfg, cfg.precision, cfg.kernels.backend, torch.device("cpu"))
        model.load_state_dict(full)
    elif sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not dist_info().is_main:
            return
        model = build_model(mcfg, cfg.precision, cfg.kernels.backend, torch.device("cpu"))
        model.load_state_dict(full)
    if dist_info().is_main:
        export_hf(model, out_dir, tokenizer_path=tokenizer_path)


def run(cfg: Config) -> dict:
    """One pretraining stage. Under torchrun (WORLD_SIZE > 1) the process group and the mesh of `cfg.parallel`
    are set up here, and torn down at the end."""
    data = stage_outputs(stage_dir(cfg, "data"))
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    owns_group = not torch.distributed.is_initialized()  # a caller's process group is left to the caller
    meshes = init_parallel(cfg.parallel, torch.device(device_type), cfg.model.n_routed_experts)
    try:
        return _run(cfg, data, meshes)
    finally:
        if meshes is not None and owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _run(cfg: Config, data: dict[str, Path], meshes: ParallelMeshes | None) -> dict:
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
