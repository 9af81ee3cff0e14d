"""The student: a small dense model trained on the teacher's accepted traces, optionally on its logits too.

Sequence-level distillation (what DeepSeek-R1 does for its Qwen and Llama students, section 2.4) is plain SFT on
the teacher's rejection-sampled outputs: the loss is next-token cross-entropy on the response tokens (prompt
positions masked with -100), batches built exactly as cold-start SFT builds them (`train.chat.make_batch`,
`batch_indices`).

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
Held-out accuracy (greedy, the RL grader: `train.policy.evaluate_accuracy`) is measured every `eval_every` steps.
The loop's skeleton (resume, non-finite steps, checkpoints, logging, preemption) is train/loop.py's.

Legend: B sequences, T positions, V vocabulary, N response positions of a micro-batch, K cached top-k entries.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.config import DistillConfig
from model.transformer import IGNORE_INDEX
from train.chat import batch_indices, encode_chat, eos_id, make_batch
from train.checkpoint import CheckpointManager
from train.loop import Loop
from train.optim import build_optimizer
from train.policy import evaluate_accuracy
from train.runtime import autocast

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
    """Inputs [B, T], targets [B, T] (train.chat.make_batch) and, for cached examples, top-k ids/logits [N, K] of the
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

    def save(step: int) -> Path:
        return ckpts.save(step, student, opt, {"bad_steps": loop.bad_total}, model_config)

    def evaluate() -> dict:
        ev = evaluate_accuracy(student, tokenizer, test_rows, max_new_tokens=d.eval_max_new_tokens, precision=precision)
        student.train()
        return {
            "eval_accuracy": ev["accuracy"],
            "eval_format_rate": ev["format_rate"],
            "eval_response_len": ev["response_len"],
        }

    loop = Loop("distill", d, ckpts, tracker, save, is_main=progress)
    loop.resume(d.resume, student, opt)
    micro = min(d.micro_batch_size, d.batch_size)
    accum = d.batch_size // micro
    seen_tokens = 0  # real (unpadded) input positions forwarded and backpropagated in this process, for compute counts
    metrics: dict = {}
    student.train()
    if teacher is not None:
        teacher.eval().requires_grad_(False)
    for step in loop.steps():
        lr = loop.set_lr(opt, step, d.optim)
        idx = batch_indices(len(examples), d.batch_size, step, seed)
        sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, ce_loss, kd_loss
        n_tok = 0  # response tokens (the loss's targets)
        for a in range(accum):
            mb = [examples[i] for i in idx[a * micro : (a + 1) * micro]]
            x, y, topk_ids, topk_logits = micro_batch(mb, pad)
            seen_tokens += sum(len(e[0]) - 1 for e in mb)
            n_tok += int((y != IGNORE_INDEX).sum())  # a host tensor: no device read
            x, y = x.to(device), y.to(device)
            with autocast(precision, device):
                out = student(x, y)
            loss, kd = out.loss, out.loss.new_zeros(())
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
            (loss / accum).backward()
            sums += torch.stack([loss.detach(), out.ce_loss.detach(), kd.detach()]).double() / accum
        gnorm = torch.nn.utils.clip_grad_norm_(student.parameters(), d.optim.grad_clip or float("inf"), foreach=True)
        vals, _ = loop.sync(dict(zip(("loss", "ce_loss", "kd_loss"), sums.unbind())), gnorm)
        if not loop.finite(step, vals, student, opt):
            loop.end_step(step, None)
            continue
        opt.step()
        opt.zero_grad(set_to_none=True)
        metrics = {
            **{k: vals[k] for k in ("loss", "ce_loss", "kd_loss") if k != "kd_loss" or d.kd_mode != "none"},
            "lr": lr,
            "grad_norm": vals["grad_norm"],
            "response_tokens_per_s": n_tok / loop.step_time(),
            "too_long": too_long,
            "bad_steps": loop.bad_total,
        }
        last = step + 1 == d.steps
        if test_rows and ((d.eval_every and (step + 1) % d.eval_every == 0) or last):
            metrics |= evaluate()
        loop.end_step(step, metrics, {"loss": f"{vals['loss']:.3f}"}, force_log="eval_accuracy" in metrics)

    if not metrics and test_rows:  # resumed from the final checkpoint: nothing trained, still report the accuracy
        metrics = evaluate()
    result = {k: v for k, v in metrics.items() if k in ("loss", "ce_loss", "kd_loss") or k.startswith("eval_")}
    final = ckpts.checkpoints()[-1]
    return result | {
        "steps": d.steps,
        "bad_steps": loop.bad_total,
        "too_long": too_long,
        "n_examples": len(examples),
        "trained_tokens": seen_tokens,
        "checkpoint": str(final),
    }
