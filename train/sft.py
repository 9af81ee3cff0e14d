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
`cot_fraction`: the cold start shows both behaviours and GRPO learns which one pays; bench/rl_gain.py measures
which). The loss is the model's own (next-token CE + MTP + balance) on the response tokens only: prompt
positions get the ignore index -100, so the model is never trained to produce the question. Examples are
right-padded: causal attention means a padded position never influences a real one, and pad targets are ignored.

One optimizer step = `batch_size` examples drawn without replacement from a per-epoch permutation, split into
micro-batches; the gradient norm is clipped; non-finite steps are skipped and counted (as in pretraining); the
MoE bias update of DeepSeek-V3's auxiliary-loss-free balancing continues. With `sft.lm_mix` > 0 (the default; 0
turns it off) every step also takes the pretraining loss on `sft.lm_batch_size` windows of the data stage's packed
train shards, weighted by lm_mix (train/lm_mix.py, InstructGPT's PPO-ptx), so SFT on reasoning traces does not
overwrite the code model (bench/code_retention.py); its next-token CE is logged as `lm_loss`, and the shards then
are one of the stage's hashed inputs.
At the end, held-out accuracy (greedy, the same grader as RL: train/policy.py `evaluate_accuracy`) is measured
and recorded in the manifest. The loop's skeleton (resume, non-finite steps, checkpoints, logging, preemption) is
train/loop.py's.

One process: several ranks are refused (each would train on its own copy with no gradient exchange).
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import hydra
import torch
from datasets import load_from_disk
from omegaconf import DictConfig

from data.outputs import stage_outputs
from data.tokenizer import load_tokenizer
from model.config import ModelConfig
from model.hf import export_hf
from model.moe import update_expert_bias
from model.transformer import IGNORE_INDEX
from pipeline.config import Config, stage_dir, to_config
from pipeline.seed import seed_everything
from pipeline.stage import StageRun
from train.chat import batch_indices, encode_rows, eos_id, make_batch
from train.checkpoint import CheckpointManager, read_model_config
from train.lm_mix import LMMix
from train.loop import Loop, TrainingError
from train.optim import build_optimizer
from train.parallel.parallelize import world_size_from_env
from train.policy import evaluate_accuracy, newest_checkpoint
from train.runtime import autocast, build_model, device_for, dist_info, require_one_process, resolve_precision

__all__ = ["TrainingError", "batch_indices", "make_batch", "run"]


def train(cfg: Config, stage: StageRun, paths: dict[str, Path]) -> dict:
    s = cfg.sft
    info = dist_info()
    device = device_for(info)
    cfg = replace(cfg, precision=resolve_precision(cfg.precision, device))
    seed_everything(cfg.run.seed, cfg.run.deterministic)
    tok = load_tokenizer(paths["tokenizer"])
    vocab = tok.get_vocab_size(with_added_tokens=True)
    mcfg = ModelConfig(**read_model_config(paths["init"])) if "init" in paths else replace(cfg.model, vocab_size=vocab)
    if mcfg.vocab_size < vocab:
        raise ValueError(f"the checkpoint's vocab_size {mcfg.vocab_size} is smaller than the tokenizer's {vocab}")
    if s.max_len > mcfg.max_position_embeddings:
        raise ValueError(
            f"sft.max_len={s.max_len} exceeds model.max_position_embeddings={mcfg.max_position_embeddings}"
        )
    model = build_model(mcfg, cfg.precision, cfg.kernels.backend, device, cfg.kernels.scale_formats())
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

    def save(step: int) -> Path:
        return ckpts.save(step, model, opt, {"bad_steps": loop.bad_total}, asdict(mcfg))

    loop = Loop("sft", s, ckpts, tracker, save, is_main=info.is_main)
    loop.resume(s.resume, model, opt)
    moe_layers = list(model.moe_layers())
    lm = LMMix.build(paths["lm_shards"], s.lm_mix, s.lm_batch_size, model, cfg.run.seed) if s.lm_mix > 0 else None
    micro = min(s.micro_batch_size, s.batch_size)
    accum = s.batch_size // micro
    metrics: dict = {}
    model.train()
    for step in loop.steps():
        lr = loop.set_lr(opt, step, s.optim)
        idx = batch_indices(len(examples), s.batch_size, step, cfg.run.seed)
        sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, ce, mtp: means over the micro-batches
        load_LE = torch.zeros(len(moe_layers), mcfg.n_routed_experts, device=device)
        n_tok = 0
        for a in range(accum):
            x, y = make_batch([examples[i] for i in idx[a * micro : (a + 1) * micro]], eos)
            with autocast(cfg.precision, device):
                out = model(x.to(device), y.to(device))
            (out.loss / accum).backward()
            mtp = out.mtp_loss if out.mtp_loss is not None else out.loss.new_zeros(())
            sums += torch.stack([out.loss.detach(), out.ce_loss.detach(), mtp.detach()]).double() / accum
            n_tok += int((y != IGNORE_INDEX).sum())  # a host tensor: no device read
            if moe_layers:
                load_LE += out.expert_load_LE.detach().float()[: len(moe_layers)]
        parts = dict(zip(("loss", "ce", "mtp"), sums.unbind()))
        if lm is not None:  # the pretraining-LM term (train/lm_mix.py); its routed tokens count in the bias update
            parts["lm_loss"], lm_load_LE = lm.backward(model, step, cfg.precision)
            if moe_layers:
                load_LE += lm_load_LE[: len(moe_layers)]
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), s.optim.grad_clip or float("inf"), foreach=True)
        vals, _ = loop.sync(parts, gnorm)
        if not loop.finite(step, vals, model, opt):
            loop.end_step(step, None)
            continue
        opt.step()
        opt.zero_grad(set_to_none=True)
        if moe_layers and mcfg.moe_balance == "aux_free":
            for layer, load_E in zip(moe_layers, load_LE):
                update_expert_bias(layer, load_E, mcfg.bias_update_speed)
        metrics = {
            "loss": vals["loss"],
            "ce_loss": vals["ce"],
            "mtp_loss": vals["mtp"],
            "lr": lr,
            "grad_norm": vals["grad_norm"],
            "response_tokens_per_s": n_tok / loop.step_time(),
            "too_long": too_long,
            "bad_steps": loop.bad_total,
        } | ({"lm_loss": vals["lm_loss"]} if lm is not None else {})
        if s.table_every and test_rows and ((step + 1) % s.table_every == 0 or step + 1 == s.steps):
            ev = evaluate_accuracy(
                model, tok, test_rows[: s.table_rows], max_new_tokens=s.eval_max_new_tokens, precision=cfg.precision
            )
            table = [[step + 1, p, c, sc] for p, c, sc in ev["samples"]]
            tracker.log_table("samples", ["step", "prompt", "completion", "correct"], table, step=step + 1)
            model.train()
        loop.end_step(step, metrics, {"loss": f"{vals['ce']:.3f}"})

    final = ckpts.checkpoints()[-1]
    result = {k: metrics[k] for k in ("loss", "ce_loss", "lm_loss") if k in metrics}
    result |= {"steps": s.steps, "bad_steps": loop.bad_total, "too_long": too_long, "checkpoint": str(final)}
    result["precision"] = cfg.precision
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
        export_hf(model, stage.dir / "hf", tokenizer_path=paths["tokenizer"])
    return result


def run(cfg: Config) -> dict:
    require_one_process("train.sft", world_size_from_env())
    data = stage_outputs(stage_dir(cfg, "data"))
    paths = {"tokenizer": data["tokenizer"], "reasoning": data["reasoning"]}
    if cfg.sft.init == "auto":
        paths["init"] = newest_checkpoint(stage_dir(cfg, "pretrain") / "checkpoints")
    elif cfg.sft.init != "scratch":
        paths["init"] = Path(cfg.sft.init)
    if cfg.sft.lm_mix > 0:  # the pretraining shards are an input (hashed, in the work key) only when they are read
        paths["lm_shards"] = data["train"]
    info = dist_info()
    stage = StageRun(cfg, "sft", inputs=paths, rank=info.rank, resume=cfg.sft.resume)
    return stage.run_checkpointed(lambda st: train(cfg, st, paths))


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(dcfg: DictConfig) -> None:
    print(json.dumps(run(to_config(dcfg)), indent=2, default=str))


if __name__ == "__main__":
    main()
