"""Cold-start SFT: the pretrained model learns the reasoning format from chain-of-thought traces.

    python -m train.sft                                   # CPU default: tiny model, 500 steps of 32 traces
    python -m train.sft sft.steps=300 sft.optim.lr=5e-4
    python -m train.sft experiment=smoke                  # micro scale, seconds
    make sft RUN=<run>

Reads `outputs/<run>/data/` (tokenizer, the reasoning train/test splits) and the newest checkpoint of
`outputs/<run>/pretrain/`; writes `outputs/<run>/sft/`: checkpoints/ (DCP, resumable), hf/, metrics.jsonl,
samples.jsonl, manifest.json and the W&B run.

DeepSeek-R1 (section 2.3.1) starts RL from a model fine-tuned on a few thousand long chain-of-thought examples
("cold start"), so that RL begins from readable, well-formatted reasoning instead of R1-Zero's unstable start.
Here each train row is one exchange rendered with the chat template (train/chat.py):

    <bos><｜User｜>{prompt}<｜Assistant｜><think>{cot}</think><answer>{answer}</answer><｜end▁of▁sentence｜>

where, by default, half the train rows answer directly, `<think></think><answer>...</answer>` (data.reasoning
`cot_fraction`: the cold start shows both behaviours and GRPO learns which one pays; train/grpo.py says what that
measured). The loss is the model's own (next-token CE + MTP + balance) on the response tokens only: prompt
positions get the ignore index -100, so the model is never trained to produce the question. Examples are
right-padded: causal attention means a padded position never influences a real one, and pad targets are ignored.

One optimizer step = `batch_size` examples drawn without replacement from a per-epoch permutation, split into
micro-batches; the gradient norm is clipped; non-finite steps are skipped and counted (as in pretraining); the
MoE bias update of DeepSeek-V3's auxiliary-loss-free balancing continues. At the end, held-out accuracy (greedy,
the same grader as RL: train/grpo.py `evaluate_accuracy`) is measured and recorded in the manifest.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, replace
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig
from torch import Tensor
from tqdm import tqdm

from data.tokenizer import load_tokenizer
from model.config import ModelConfig
from model.moe import update_expert_bias
from model.transformer import IGNORE_INDEX
from pipeline.config import Config, stage_dir, to_config
from pipeline.seed import seed_everything
from pipeline.stage import StageRun
from train.chat import encode_chat, eos_id
from train.checkpoint import CheckpointManager, read_model_config
from train.grpo import evaluate_accuracy, newest_checkpoint
from train.optim import build_optimizer, lr_at
from train.post_config import SFTConfig
from train.runtime import autocast, build_model, device_for, dist_info


class TrainingError(RuntimeError):
    """A run that cannot go on (too many bad steps); a checkpoint was written before raising."""


def encode_rows(tokenizer, rows: list[dict], max_len: int) -> tuple[list[tuple[list[int], list[int]]], int]:
    """(ids, loss_mask) of each row's prompt and completion; rows longer than max_len are dropped and counted."""
    out, dropped = [], 0
    for r in rows:
        ids, mask = encode_chat(tokenizer, r["prompt"], r["completion"])
        if len(ids) > max_len:
            dropped += 1
            continue
        out.append((ids, mask))
    return out, dropped


def make_batch(examples: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-padded inputs [B, T] and targets [B, T]: targets[t] = ids[t+1] where that token is in the loss mask,
    else IGNORE_INDEX (prompt tokens and padding)."""
    T = max(len(ids) for ids, _ in examples) - 1
    x = torch.full((len(examples), T), pad_id, dtype=torch.long)
    y = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
    for b, (ids, mask) in enumerate(examples):
        ids_t = torch.tensor(ids, dtype=torch.long)
        keep = torch.tensor(mask[1:], dtype=torch.bool)
        x[b, : len(ids) - 1] = ids_t[:-1]
        y[b, : len(ids) - 1] = torch.where(keep, ids_t[1:], IGNORE_INDEX)
    return x, y


def batch_indices(n: int, batch: int, step: int, seed: int) -> list[int]:
    """Example indices of step `step`: consecutive slices of per-epoch permutations (resumable by step alone)."""
    out, pos = [], step * batch
    while len(out) < batch:
        epoch, off = divmod(pos, n)
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        take = min(batch - len(out), n - off)
        out += perm[off : off + take].tolist()
        pos += take
    return out


def check_config(s: SFTConfig, world_size: int, max_pos: int) -> None:
    if s.steps <= 0:
        raise ValueError(f"sft.steps must be positive, got {s.steps}")
    if s.batch_size % (s.micro_batch_size * world_size):
        raise ValueError(
            f"sft.batch_size={s.batch_size} is not divisible by sft.micro_batch_size="
            f"{s.micro_batch_size} x {world_size} ranks"
        )
    if s.max_len > max_pos:
        raise ValueError(f"sft.max_len={s.max_len} exceeds model.max_position_embeddings={max_pos}")


def train(cfg: Config, stage: StageRun, paths: dict[str, Path]) -> dict:
    from datasets import load_from_disk

    from train.pretrain import first_nonfinite

    s = cfg.sft
    info = dist_info()
    device = device_for(info)
    seed_everything(cfg.run.seed, cfg.run.deterministic)
    tok = load_tokenizer(paths["tokenizer"])
    vocab = tok.get_vocab_size(with_added_tokens=True)
    if "init" in paths:
        mcfg = ModelConfig(**read_model_config(paths["init"]))
    else:
        mcfg = replace(cfg.model, vocab_size=vocab)
    if mcfg.vocab_size < vocab:
        raise ValueError(f"the checkpoint's vocab_size {mcfg.vocab_size} is smaller than the tokenizer's {vocab}")
    check_config(s, info.world_size, mcfg.max_position_embeddings)
    model = build_model(mcfg, cfg.precision, cfg.kernels.backend, device)
    if "init" in paths:
        CheckpointManager(paths["init"].parent, keep_last=0).load(paths["init"], model, restore_rng=False)
    opt = build_optimizer(model, s.optim)
    ckpts = CheckpointManager(stage.dir / "checkpoints", keep_last=s.keep_last)
    tracker = stage.tracker

    ds = load_from_disk(str(paths["reasoning"]))
    rows = ds["train"].to_list()[: s.n_train or None]
    examples, too_long = encode_rows(tok, rows, s.max_len)
    if not examples:
        raise ValueError(f"no train example fits sft.max_len={s.max_len} (of {len(rows)} rows)")
    test_rows = ds["test"].to_list()[: s.eval_n]
    eos = eos_id(tok)

    start_step, bad_total = 0, 0
    resumed = None
    if s.resume == "auto":
        resumed = ckpts.load_latest_valid(model, opt)
    elif s.resume != "none":
        resumed = (Path(s.resume), ckpts.load(Path(s.resume), model, opt))
    if resumed is not None:
        path, state = resumed
        start_step, bad_total = state["step"], state.get("bad_steps", 0)
        tracker.resume_at(start_step)
        print(f"resumed from {path} at step {start_step}")

    def save(step: int) -> Path:
        return ckpts.save(step, model, opt, {"bad_steps": bad_total}, asdict(mcfg))

    moe_layers = list(model.moe_layers())
    accum = s.batch_size // (s.micro_batch_size * info.world_size)
    metrics: dict = {}
    bad_run = 0
    model.train()
    bar = tqdm(range(start_step, s.steps), initial=start_step, total=s.steps, desc="sft", disable=not info.is_main)
    t_last = time.perf_counter()
    for step in bar:
        lr = lr_at(step, s.steps, s.optim)
        for g in opt.param_groups:
            g["lr"] = lr
        idx = batch_indices(len(examples), s.batch_size, step, cfg.run.seed)
        sums = {"loss": 0.0, "ce": 0.0, "mtp": 0.0}
        n_tok = 0
        load = None
        for a in range(accum):
            x, y = make_batch([examples[i] for i in idx[a * s.micro_batch_size : (a + 1) * s.micro_batch_size]], eos)
            with autocast(cfg.precision, device):
                out = model(x.to(device), y.to(device))
            (out.loss / accum).backward()
            sums["loss"] += float(out.loss.detach()) / accum
            sums["ce"] += float(out.ce_loss.detach()) / accum
            sums["mtp"] += float(out.mtp_loss.detach()) / accum if out.mtp_loss is not None else 0.0
            n_tok += int((y != IGNORE_INDEX).sum())
            if moe_layers:
                l_LE = out.expert_load_LE.detach().float()[: len(moe_layers)]
                load = l_LE if load is None else load + l_LE
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), s.optim.grad_clip or float("inf"))
        culprit = "loss" if not math.isfinite(sums["loss"]) else first_nonfinite(model)
        if culprit is not None or not torch.isfinite(gnorm):
            opt.zero_grad(set_to_none=True)
            bad_run += 1
            bad_total += 1
            tracker.log(
                {"skipped_step": 1, "bad_steps": bad_total, "bad_tensor": culprit or "grad_norm"}, step=step + 1
            )
            if bad_run >= s.max_bad_steps:
                path = save(step)
                raise TrainingError(
                    f"stopping: {bad_run} consecutive non-finite steps (step {step + 1}, first bad "
                    f"tensor: {culprit or 'grad_norm'}); checkpoint at {path}"
                )
            continue
        bad_run = 0
        opt.step()
        opt.zero_grad(set_to_none=True)
        if load is not None and mcfg.moe_balance == "aux_free":
            for layer, l_E in zip(moe_layers, load):
                update_expert_bias(layer, l_E, mcfg.bias_update_speed)
        now = time.perf_counter()
        dt, t_last = now - t_last, now
        metrics = {
            "loss": sums["loss"],
            "ce_loss": sums["ce"],
            "mtp_loss": sums["mtp"],
            "lr": lr,
            "grad_norm": float(gnorm),
            "response_tokens_per_s": n_tok / dt,
            "too_long": too_long,
            "bad_steps": bad_total,
        }
        last = step + 1 == s.steps
        if (step + 1) % s.log_every == 0 or last:
            tracker.log(metrics, step=step + 1)
        if s.table_every and test_rows and ((step + 1) % s.table_every == 0 or last):
            ev = evaluate_accuracy(
                model, tok, test_rows[: s.table_rows], max_new_tokens=s.eval_max_new_tokens, precision=cfg.precision
            )
            table = [[step + 1, p, c, sc] for p, c, sc in ev["samples"]]
            tracker.log_table("samples", ["step", "prompt", "completion", "correct"], table, step=step + 1)
            model.train()
        bar.set_postfix(loss=f"{sums['ce']:.3f}", eta=f"{(s.steps - step - 1) * dt / 60:.1f}m")
        if (step + 1) % s.ckpt_every == 0 or last:
            save(step + 1)

    final = ckpts.checkpoints()[-1]
    result = {k: metrics[k] for k in ("loss", "ce_loss") if k in metrics}
    result |= {"steps": s.steps, "bad_steps": bad_total, "too_long": too_long, "checkpoint": str(final)}
    if test_rows and info.is_main:
        ev = evaluate_accuracy(model, tok, test_rows, max_new_tokens=s.eval_max_new_tokens, precision=cfg.precision)
        result |= {
            "eval_accuracy": ev["accuracy"],
            "eval_format_rate": ev["format_rate"],
            "eval_think_rate": ev["think_rate"],
            "eval_response_len": ev["response_len"],
        }
        tracker.log({k: v for k, v in result.items() if k.startswith("eval_")}, step=s.steps)
    if s.export_hf and info.is_main:
        from model.hf import export_hf

        export_hf(model, stage.dir / "hf", tokenizer_path=paths["tokenizer"])
    return result


def run(cfg: Config) -> dict:
    from data.prepare import stage_outputs

    data = stage_outputs(stage_dir(cfg, "data"))
    paths = {"tokenizer": data["tokenizer"], "reasoning": data["reasoning"]}
    if cfg.sft.init == "auto":
        paths["init"] = newest_checkpoint(stage_dir(cfg, "pretrain") / "checkpoints")
    elif cfg.sft.init != "scratch":
        paths["init"] = Path(cfg.sft.init)
    info = dist_info()
    stage = StageRun(cfg, "sft", inputs=paths, rank=info.rank, resume=cfg.sft.resume)
    return stage.run_checkpointed(lambda st: train(cfg, st, paths))


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(dcfg: DictConfig) -> None:
    print(json.dumps(run(to_config(dcfg)), indent=2, default=str))


if __name__ == "__main__":
    main()
