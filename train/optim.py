"""AdamW with FP32 master weights and optional BF16 moments, and the learning-rate schedules.

DeepSeek-V3 (section 3.3) keeps AdamW's first and second moments in BF16 to save memory, with no observable loss
of quality, while the master weights and gradients stay in FP32. `torch.optim.AdamW` stores its moments in the
parameter's dtype, so this file carries a small foreach AdamW whose moment dtype is a choice.

Schedules (`lr_at(step)`):
- "wsd": linear warmup, constant, then cosine decay to `min_lr_ratio * lr` — the shape of DeepSeek-V3's schedule
  (2K warmup steps, constant for most of training, cosine decay at the end).
- "cosine": linear warmup then cosine decay over the whole run.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from train.config import OptimConfig


class AdamW(torch.optim.Optimizer):
    """Decoupled-weight-decay Adam (Loshchilov & Hutter) with a configurable moment dtype."""

    def __init__(
        self,
        params,
        lr: float,
        betas=(0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        moment_dtype: torch.dtype = torch.float32,
    ):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.moment_dtype = moment_dtype

    @torch.no_grad()
    def step(self, closure=None):
        assert closure is None
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            beta1, beta2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in params:
                st = self.state[p]
                if not st:
                    st["step"] = torch.tensor(0.0)
                    st["exp_avg"] = torch.zeros_like(p, dtype=self.moment_dtype)
                    st["exp_avg_sq"] = torch.zeros_like(p, dtype=self.moment_dtype)
            for p in params:
                st = self.state[p]
                st["step"] += 1
                t = st["step"].item()
                g = p.grad.float()
                # moments are updated in FP32 and stored in moment_dtype (a no-op copy-free path for FP32)
                m = st["exp_avg"].float().lerp_(g, 1 - beta1)
                v = st["exp_avg_sq"].float().mul_(beta2).addcmul_(g, g, value=1 - beta2)
                if self.moment_dtype != torch.float32:
                    st["exp_avg"].copy_(m)
                    st["exp_avg_sq"].copy_(v)
                if wd:
                    p.mul_(1 - lr * wd)
                step_size = lr / (1 - beta1**t)
                denom = (v / (1 - beta2**t)).sqrt_().add_(eps)
                p.addcdiv_(m, denom, value=-step_size)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: no decay for norms, biases, embeddings-as-1D, router biases."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and "embed" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> AdamW:
    if any(p.dtype != torch.float32 for p in model.parameters()):
        raise ValueError("master weights must be FP32; low precision is applied by autocast / the FP8 kernels")
    return AdamW(
        param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        moment_dtype=torch.bfloat16 if cfg.bf16_moments else torch.float32,
    )


def lr_at(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total_steps`."""
    if cfg.schedule not in ("wsd", "cosine"):
        raise ValueError(f"optim.schedule must be 'wsd' or 'cosine', got {cfg.schedule!r}")
    lo = cfg.lr * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    start = cfg.warmup_steps if cfg.schedule == "cosine" else max(cfg.warmup_steps, int(cfg.decay_start * total_steps))
    if step < start:
        return cfg.lr
    progress = min(1.0, (step - start) / max(1, total_steps - 1 - start))
    return lo + 0.5 * (cfg.lr - lo) * (1 + math.cos(math.pi * progress))
