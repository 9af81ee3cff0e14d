"""Exponential moving average of the parameters, for an early estimate of the model after learning-rate decay.

DeepSeek-V3 keeps an EMA of the weights in CPU memory, updated asynchronously after each step, and evaluates it to
judge the model before the decay phase. Here the shadow copy is FP32 on CPU, updated under `no_grad` with one
foreach lerp every `every` steps (no autograd, no allocation on the hot path), and swapped into the model only for
evaluation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float, every: int = 1) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {decay}")
        self.decay, self.every = decay, max(1, every)
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        params = dict(model.named_parameters())
        self.shadow = {n: params[n].detach().to("cpu", torch.float32, copy=True) for n in self.names}

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        if step % self.every:
            return
        params = dict(model.named_parameters())
        # one update every `every` steps approximates `every` updates of decay d by one of decay d**every
        weight = 1.0 - self.decay**self.every
        src = [params[n].detach().to("cpu", torch.float32) for n in self.names]
        torch._foreach_lerp_([self.shadow[n] for n in self.names], src, weight)

    @contextlib.contextmanager
    @torch.no_grad()
    def swapped_in(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily load the EMA weights into `model` (for validation), restoring the live weights after."""
        params = dict(model.named_parameters())
        backup = {n: params[n].detach().clone() for n in self.names}
        for n in self.names:
            params[n].copy_(self.shadow[n])
        try:
            yield model
        finally:
            for n in self.names:
                params[n].copy_(backup[n])
