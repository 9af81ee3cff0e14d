"""The student: a small dense model trained on the teacher's accepted traces, optionally on its logits too.

Sequence-level distillation (what DeepSeek-R1 does for its Qwen and Llama students, section 2.4) is plain SFT on
the teacher's rejection-sampled outputs: the loss is next-token cross-entropy on the response tokens (prompt
positions masked with -100), batches built exactly as cold-start SFT builds them (`train.sft.encode_rows`,
`make_batch`, `batch_indices`).

Logit distillation (Hinton et al. 2015), a switch here (`kd_mode`), adds the teacher's whole next-token
distribution at every response position, softened by a temperature T:

    KD = T^2 * mean over response positions of KL( softmax(z_teacher / T) || softmax(z_student / T) )
    loss = (1 - kd_weight) * CE + kd_weight * KD

The forward KL (teacher first) is mean-seeking: the student is pushed to put mass everywhere the teacher does.
T > 1 reveals the teacher's ranking of the wrong tokens ("dark knowledge"); the T^2 factor keeps the gradient's
scale independent of T (the gradient of the softened KL shrinks as 1/T^2). Two sources of teacher logits:

- `online`: the teacher (kept in memory, frozen) runs a forward on each micro-batch; exact, costs a teacher forward.
- `topk`:   the top-k logits cached with the traces (distill/traces.py); the teacher distribution is renormalised
            over its top k tokens, the student's log-probabilities are its full softmax at those tokens. With
            k = V this equals the full loss exactly; with small k it keeps the mass that matters at a fraction of
            the storage.

The student needs the teacher's vocabulary (same tokenizer), nothing else: any depth, width, dense or MoE.
Held-out accuracy (greedy, the RL grader: `train.grpo.evaluate_accuracy`) is measured every `eval_every` steps.

Legend: B sequences, T positions, V vocabulary, N response positions of a micro-batch, K cached top-k entries.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from distill.config import DistillConfig
from model.transformer import IGNORE_INDEX
from train.chat import encode_chat, eos_id
from train.checkpoint import CheckpointManager
from train.grpo import evaluate_accuracy
from train.optim import build_optimizer, lr_at
from train.runtime import autocast
from train.sft import batch_indices, make_batch

# ------------------------------------------------------------------------------------------------ the KD losses


def kd_loss_full(student_NV: Tensor, teacher_NV: Tensor, temperature: float) -> Tensor:
    """T^2 * mean_n KL(softmax(teacher/T) || softmax(student/T)) over N positions (fp32)."""
    T = temperature
    logp_t = F.log_softmax(teacher_NV.float() / T, dim=-1)
    logq_s = F.log_softmax(student_NV.float() / T, dim=-1)
    kl_N = (logp_t.exp() * (logp_t - logq_s)).sum(-1)
    return T * T * kl_N.mean()


def kd_loss_topk(student_NV: Tensor, topk_ids_NK: Tensor, topk_logits_NK: Tensor, temperature: float) -> Tensor:
    """As `kd_loss_full`, with the teacher known only at its top-k tokens: its distribution is renormalised over
    them, the student's log-probabilities are taken from its full softmax. Equal to the full loss when K = V."""
    T = temperature
    logp_t = F.log_softmax(topk_logits_NK.float() / T, dim=-1)
    logq_s = F.log_softmax(student_NV.float() / T, dim=-1).gather(-1, topk_ids_NK.long())
    kl_N = (logp_t.exp() * (logp_t - logq_s)).sum(-1)
    return T * T * kl_N.mean()


# ------------------------------------------------------------------------------------------------ data


def encode_traces(tokenizer, traces: list[dict], max_len: int, with_topk: bool) -> tuple[list[tuple], int]:
    """(ids, loss_mask[, topk_ids, topk_logits]) of every trace of at most max_len tokens; returns the examples
    and how many traces were dropped for length."""
    out, dropped = [], 0
    for r in traces:
        ids, mask = encode_chat(tokenizer, r["prompt"], r["completion"])
        if len(ids) > max_len:
            dropped += 1
            continue
        if with_topk:
            n_resp = sum(mask[1:])
            if len(r["topk_ids"]) != n_resp:
                raise ValueError(
                    f"trace {r['id']}: {len(r['topk_ids'])} cached top-k rows for {n_resp} response "
                    "tokens (the trace set was cached with another tokenizer)"
                )
            out.append((ids, mask, r["topk_ids"], r["topk_logits"]))
        else:
            out.append((ids, mask))
    return out, dropped


def micro_batch(examples: list[tuple], pad_id: int) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Inputs [B, T], targets [B, T] (train.sft.make_batch) and, for cached examples, top-k ids/logits [N, K] of the
    response positions in the same row-major order as `targets != IGNORE_INDEX`."""
    x, y = make_batch([e[:2] for e in examples], pad_id)
    if len(examples[0]) == 2:
        return x, y, None, None
    ids_NK = torch.tensor([row for e in examples for row in e[2]], dtype=torch.long)
    logits_NK = torch.tensor([row for e in examples for row in e[3]], dtype=torch.float32)
    assert ids_NK.shape[0] == int((y != IGNORE_INDEX).sum()), "cached top-k rows must match response positions"
    return x, y, ids_NK, logits_NK


# ------------------------------------------------------------------------------------------------ the loop


def train_student(
    student: torch.nn.Module,
    tokenizer,
    traces: list[dict],
    test_rows: list[dict],
    d: DistillConfig,
    *,
    ckpt_dir: Path,
    model_config: dict,
    tracker=None,
    teacher: torch.nn.Module | None = None,
    precision: str = "fp32",
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """SFT (+ optional logit KD) of `student` on `traces`; resumable from `ckpt_dir` (`d.resume`).

    Returns the final metrics (loss, ce_loss, kd_loss, eval_accuracy ...) and the newest checkpoint's path.
    """
    from train.pretrain import first_nonfinite

    d.validate()
    if d.kd_mode == "online" and teacher is None:
        raise ValueError("distill.kd_mode=online needs the teacher model")
    device = next(student.parameters()).device
    V = student.config.vocab_size
    if teacher is not None and teacher.config.vocab_size != V:
        raise ValueError(f"logit distillation needs one vocabulary: teacher {teacher.config.vocab_size}, student {V}")
    examples, too_long = encode_traces(tokenizer, traces, d.max_len, with_topk=d.kd_mode == "topk")
    if not examples:
        raise ValueError(f"no trace fits distill.max_len={d.max_len} (of {len(traces)} traces)")
    pad = eos_id(tokenizer)
    opt = build_optimizer(student, d.optim)
    ckpts = CheckpointManager(ckpt_dir, keep_last=d.keep_last)
    log = tracker.log if tracker is not None else (lambda *a, **k: None)

    start_step, bad_total = 0, 0
    resumed = None
    if d.resume == "auto":
        resumed = ckpts.load_latest_valid(student, opt)
    elif d.resume != "none":
        resumed = (Path(d.resume), ckpts.load(Path(d.resume), student, opt))
    if resumed is not None:
        path, state = resumed
        start_step, bad_total = state["step"], state.get("bad_steps", 0)
        if tracker is not None:
            tracker.resume_at(start_step)
        print(f"resumed the student from {path} at step {start_step}")

    def save(step: int) -> Path:
        return ckpts.save(step, student, opt, {"bad_steps": bad_total}, model_config)

    def evaluate() -> dict:
        ev = evaluate_accuracy(student, tokenizer, test_rows, max_new_tokens=d.eval_max_new_tokens, precision=precision)
        student.train()
        return {
            "eval_accuracy": ev["accuracy"],
            "eval_format_rate": ev["format_rate"],
            "eval_response_len": ev["response_len"],
        }

    accum = d.batch_size // d.micro_batch_size
    seen_tokens = 0  # real (unpadded) input positions forwarded and backpropagated in this process, for compute counts
    metrics: dict = {}
    bad_run = 0
    student.train()
    if teacher is not None:
        teacher.eval().requires_grad_(False)
    bar = tqdm(range(start_step, d.steps), initial=start_step, total=d.steps, desc="distill", disable=not progress)
    t_last = time.perf_counter()
    for step in bar:
        lr = lr_at(step, d.steps, d.optim)
        for g in opt.param_groups:
            g["lr"] = lr
        idx = batch_indices(len(examples), d.batch_size, step, seed)
        sums = {"loss": 0.0, "ce_loss": 0.0, "kd_loss": 0.0}
        n_tok = 0  # response tokens (the loss's targets)
        for a in range(accum):
            mb = [examples[i] for i in idx[a * d.micro_batch_size : (a + 1) * d.micro_batch_size]]
            x, y, topk_ids, topk_logits = micro_batch(mb, pad)
            seen_tokens += sum(len(e[0]) - 1 for e in mb)
            x, y = x.to(device), y.to(device)
            with autocast(precision, device):
                out = student(x, y)
            loss = out.loss
            if d.kd_mode != "none":
                resp_BT = y != IGNORE_INDEX
                s_NV = out.logits_BTV[resp_BT]
                if d.kd_mode == "online":
                    with torch.no_grad(), autocast(precision, device):
                        t_NV = teacher(x).logits_BTV[resp_BT]
                    kd = kd_loss_full(s_NV, t_NV, d.kd_temperature)
                else:
                    kd = kd_loss_topk(s_NV, topk_ids.to(device), topk_logits.to(device), d.kd_temperature)
                loss = (1.0 - d.kd_weight) * out.loss + d.kd_weight * kd
                sums["kd_loss"] += float(kd.detach()) / accum
            (loss / accum).backward()
            sums["loss"] += float(loss.detach()) / accum
            sums["ce_loss"] += float(out.ce_loss.detach()) / accum
            n_tok += int((y != IGNORE_INDEX).sum())
        gnorm = torch.nn.utils.clip_grad_norm_(student.parameters(), d.optim.grad_clip or float("inf"))
        culprit = "loss" if not math.isfinite(sums["loss"]) else first_nonfinite(student)
        if culprit is not None or not torch.isfinite(gnorm):
            opt.zero_grad(set_to_none=True)
            bad_run += 1
            bad_total += 1
            log({"skipped_step": 1, "bad_steps": bad_total, "bad_tensor": culprit or "grad_norm"}, step=step + 1)
            if bad_run >= d.max_bad_steps:
                path = save(step)
                raise RuntimeError(
                    f"stopping: {bad_run} consecutive non-finite steps (step {step + 1}, first bad "
                    f"tensor: {culprit or 'grad_norm'}); checkpoint at {path}"
                )
            continue
        bad_run = 0
        opt.step()
        opt.zero_grad(set_to_none=True)
        now = time.perf_counter()
        dt, t_last = now - t_last, now
        metrics = {
            **sums,
            "lr": lr,
            "grad_norm": float(gnorm),
            "response_tokens_per_s": n_tok / dt,
            "too_long": too_long,
            "bad_steps": bad_total,
        }
        if d.kd_mode == "none":
            metrics.pop("kd_loss")
        last = step + 1 == d.steps
        if test_rows and ((d.eval_every and (step + 1) % d.eval_every == 0) or last):
            metrics |= evaluate()
        if (step + 1) % d.log_every == 0 or last or "eval_accuracy" in metrics:
            log(metrics, step=step + 1)
        bar.set_postfix(loss=f"{sums['loss']:.3f}", eta=f"{(d.steps - step - 1) * dt / 60:.1f}m")
        if (step + 1) % d.ckpt_every == 0 or last:
            save(step + 1)

    if not metrics and test_rows:  # resumed from the final checkpoint: nothing trained, still report the accuracy
        metrics = evaluate()
    result = {k: v for k, v in metrics.items() if k in ("loss", "ce_loss", "kd_loss") or k.startswith("eval_")}
    final = ckpts.checkpoints()[-1]
    return result | {
        "steps": d.steps,
        "bad_steps": bad_total,
        "too_long": too_long,
        "n_examples": len(examples),
        "trained_tokens": seen_tokens,
        "checkpoint": str(final),
    }
