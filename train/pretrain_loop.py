"""The pretraining loop, as a library: the pretrain stage (train/pretrain.py) runs it on the run's model, the
distillation stage's student base (distill/student_base.py) on the student preset.

One optimizer step: `batch_size` sequences split into micro-batches of `micro_batch_size` (gradient accumulation),
loss = next-token CE + mtp_loss_weight * MTP loss + alpha * balance loss; the gradient norm is clipped; a step whose
loss or gradient is NaN/Inf is skipped and counted (train/loop.py); then AdamW, the auxiliary-loss-free bias update
of every MoE layer from that step's expert loads, and the EMA. Validation (loss and bits per byte, live and EMA
weights) every `eval_every` steps. The layout (one process, DDP/FSDP/HSDP/EP, pipeline) is picked once, up front
(train/steps.py); the loop below is the same for all of them.

Resume: `train.resume=auto` loads the newest valid checkpoint (model, optimizer, EMA, loader position, RNG), so a
run killed at any step continues on exactly the trajectory it would have followed.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from data.loader import PackedDataset, ShardLoader
from data.tokenizer import load_tokenizer
from kernels.fp8_linear import fp8_stats
from pipeline.config import Config
from pipeline.seed import seed_everything
from pipeline.stage import StageRun
from train.checkpoint import CheckpointManager
from train.ema import EMA
from train.heldout import fixed_batches, token_byte_lengths
from train.loop import Loop
from train.metrics import flops_per_token, max_violation, mfu, peak_memory_mb, unigram_loss
from train.optim import build_optimizer
from train.parallel.mesh import ParallelMeshes
from train.runtime import device_for, dist_info, resolve_precision
from train.steps import build_layout


def check_config(cfg: Config, dp: int, pp: int = 1) -> Config:
    """The rules between sections and the number of processes (each section's own are checked when the config is
    composed); returns the config with the micro-batch resolved for `dp` data-parallel ranks (a batch smaller than
    micro_batch_size x dp gives each rank one micro-batch of batch_size / dp sequences)."""
    t, m, par = cfg.train, cfg.model, cfg.parallel
    if t.seq_len > m.max_position_embeddings:
        raise ValueError(f"train.seq_len={t.seq_len} exceeds model.max_position_embeddings={m.max_position_embeddings}")
    if t.batch_size % dp:
        raise ValueError(
            f"train.batch_size={t.batch_size} is not divisible by the {dp} data-parallel ranks: set train.batch_size"
            f" to a multiple of {dp} (e.g. {dp * max(1, round(t.batch_size / dp))})"
        )
    micro = min(t.micro_batch_size, t.batch_size // dp)
    if (t.batch_size // dp) % micro:
        raise ValueError(
            f"train.batch_size={t.batch_size} is not divisible by train.micro_batch_size={t.micro_batch_size}"
            f" x {dp} data-parallel ranks: set train.micro_batch_size to a divisor of {t.batch_size // dp}"
        )
    cfg = replace(cfg, train=replace(t, micro_batch_size=micro))
    if pp > 1:
        accum = t.batch_size // (micro * dp)
        if par.pp_microbatches != -1 and accum % par.pp_microbatches:
            raise ValueError(
                f"parallel.pp_microbatches={par.pp_microbatches} must divide the {accum} micro-batches of a step"
                f" (train.batch_size / (train.micro_batch_size x {dp} data-parallel ranks))"
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
    return cfg


def train(cfg: Config, stage: StageRun, data: dict[str, Path], meshes: ParallelMeshes | None = None) -> dict:
    """The loop. Parallelism (when configured: `meshes` from `init_parallel` under torchrun) is applied from
    outside (train/steps.py); every rank builds the same model from the same seed before it is sharded."""
    info = dist_info()
    device = device_for(info)
    tok = load_tokenizer(data["tokenizer"])
    mcfg = replace(cfg.model, vocab_size=tok.get_vocab_size(with_added_tokens=True))
    dp_size = meshes.dp.size() if meshes is not None else 1
    pp = meshes.pp.size() if meshes is not None else 1
    precision = resolve_precision(cfg.precision, device)
    cfg = check_config(replace(cfg, model=mcfg, precision=precision), dp_size, pp)
    t = cfg.train
    seed_everything(cfg.run.seed, cfg.run.deterministic)
    accum = t.batch_size // (t.micro_batch_size * dp_size)
    layout = build_layout(cfg, mcfg, meshes, accum, device)
    trained = layout.trained  # exactly the parameters this rank updates and checkpoints
    opt = build_optimizer(trained, t.optim)
    ema = EMA(trained, t.ema_decay, t.ema_every) if t.ema_decay > 0 else None
    train_ds, val_ds = PackedDataset(data["train"], t.seq_len), PackedDataset(data["val"], t.seq_len)
    loader = ShardLoader(train_ds, t.micro_batch_size, layout.dp.rank, layout.dp.size, seed=cfg.run.seed)
    val_batches = fixed_batches(val_ds, t.micro_batch_size, t.eval_batches)
    byte_len = token_byte_lengths(tok)
    ckpts = CheckpointManager(stage.dir / "checkpoints", keep_last=t.keep_last, async_save=t.async_checkpoint)
    tracker = stage.tracker
    model_cfg_json = asdict(mcfg)

    def save(step: int) -> Path:
        state = {"loader": loader.state_dict(), "bad_steps": loop.bad_total}
        return ckpts.save(step, trained, opt, state, model_cfg_json, ema.shadow_for_checkpoint() if ema else None)

    loop = Loop("pretrain", t, ckpts, tracker, save, is_main=info.is_main, reduce=layout.reduce_)
    state = loop.resume(t.resume, trained, opt, ema.shadow if ema else None)
    if state:
        loader.load_state_dict(state["loader"])

    n_moe = len(layout.moe_layers)
    cum_load_LE = torch.zeros(n_moe, mcfg.n_routed_experts, device=device)
    fpt = flops_per_token(layout.model, mcfg, t.seq_len)
    tokens_per_step = t.batch_size * t.seq_len
    metrics: dict = {}
    batches = iter(loader)
    for step in loop.steps():
        lr = loop.set_lr(opt, step, t.optim)
        parts, load_LE = layout.forward_backward(batches, poison=step == t.inject_nan_at_step)
        gnorm = layout.clip_grad_norm_(t.optim.grad_clip or float("inf"))
        vals, load_LE = loop.sync(parts, gnorm, load_LE)
        if not loop.finite(step, vals, trained, opt):
            loop.end_step(step, None)
            continue
        opt.step()
        opt.zero_grad(set_to_none=True)
        if n_moe and mcfg.moe_balance == "aux_free":
            layout.update_expert_bias(load_LE, mcfg.bias_update_speed)
        if ema is not None:
            ema.update(trained, step + 1)
        cum_load_LE += load_LE

        tok_s = tokens_per_step / loop.step_time()
        metrics = {
            "loss": vals["loss"],
            "ce_loss": vals["ce"],
            "mtp_loss": vals["mtp"],
            "balance_loss": vals["balance"],
            "lr": lr,
            "grad_norm": vals["grad_norm"],
            "tokens_per_s": tok_s,
            "flops_per_token": fpt,
            "mfu": mfu(tok_s, fpt, t.peak_tflops),
            "mem_mb": peak_memory_mb(),
            "tokens": (step + 1) * tokens_per_step,
        }
        evaluating = (step + 1) % t.eval_every == 0 or step + 1 == t.steps
        if n_moe and (loop.log_due(step) or evaluating):  # the loads reach the host only when logged
            metrics |= expert_metrics(load_LE, cum_load_LE)
        if cfg.precision == "fp8" and loop.log_due(step):
            metrics |= {f"fp8/{k}": v for k, v in fp8_stats(layout.model).items()}
        if evaluating:
            metrics |= validation_metrics(layout, ema, val_batches, byte_len)
            if n_moe:
                metrics["expert_load"] = load_LE.tolist()
                stage.tracker.log_heatmap("expert_load", load_LE, step=step + 1)
                metrics["expert_bias"] = layout.expert_bias().tolist()
        loop.end_step(step, metrics, {"loss": f"{vals['loss']:.3f}", "tok_s": f"{tok_s:.0f}"}, force_log=evaluating)

    if ema is not None:
        ema.wait()
    ckpts.wait()
    final = ckpts.checkpoints()[-1]
    if info.is_main:
        np.save(stage.dir / "expert_load.npy", cum_load_LE.cpu().numpy())
    # unigram baseline on the same tokenizer and data: what a model that ignores context achieves
    train_sample = train_ds.tokens(0, min(train_ds.n_tokens, 4_000_000))
    uni = unigram_loss(train_sample, np.concatenate([y.flatten().numpy() for _, y in val_batches]), mcfg.vocab_size)
    result = {k: metrics[k] for k in ("loss", "val_loss", "val_bpb", "val_loss_ema", "val_bpb_ema") if k in metrics}
    result |= {"unigram_val_loss": uni, "steps": t.steps, "bad_steps": loop.bad_total, "checkpoint": str(final)}
    result["precision"] = cfg.precision
    if t.export_hf:
        layout.export(mcfg, cfg, stage.dir / "hf", data["tokenizer"])
    return result


def expert_metrics(load_LE: torch.Tensor, cum_load_LE: torch.Tensor) -> dict:
    """MaxVio of the step's and the cumulative expert loads, averaged over MoE layers and per layer (one host read)."""
    step_LE, cum_LE = torch.stack([load_LE, cum_load_LE]).cpu().unbind()
    vio = [max_violation(l_E) for l_E in step_LE]
    cvio = [max_violation(l_E) for l_E in cum_LE]
    out = {"maxvio_batch": float(np.mean(vio)), "maxvio_cum": float(np.mean(cvio))}
    return out | {f"maxvio_batch/layer{i}": v for i, v in enumerate(vio)}


def validation_metrics(layout, ema: EMA | None, val_batches, byte_len) -> dict:
    """Loss and bits per byte on the fixed validation batches, with the live weights and (if any) the EMA's."""
    val = layout.evaluate(val_batches, byte_len)
    out = {"val_loss": val["loss"], "val_bpb": val["bpb"]}
    if ema is not None:
        with ema.swapped_in(layout.trained):
            ev = layout.evaluate(val_batches, byte_len)
        out |= {"val_loss_ema": ev["loss"], "val_bpb_ema": ev["bpb"]}
    return out
