"""Exponential moving average of the parameters, for an early estimate of the model after learning-rate decay.

DeepSeek-V3 keeps an EMA of the weights in CPU memory, updated asynchronously after each step, and evaluates it to
judge the model before the decay phase. Here the shadow copy is FP32 in host memory (each rank's shard of a
sharded parameter), updated under `no_grad` with one foreach lerp every `every` steps, and swapped into the model
only for evaluation.

On a GPU the update does not stop the training loop: the parameters are copied into pinned host buffers on the
training stream without blocking (`non_blocking`), and a background thread waits for that copy and lerps the
shadow; the next update (or `wait()`, which evaluation and checkpoints call) first joins the previous one. On the
CPU the update is the plain lerp, in place.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor


def _local(t: Tensor) -> Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class EMA:
    def __init__(self, model: nn.Module, decay: float, every: int = 1) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {decay}")
        self.decay, self.every = decay, max(1, every)
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        params = dict(model.named_parameters())
        self.shadow = {n: params[n].detach().to("cpu", torch.float32, copy=True) for n in self.names}
        self._staging: list[Tensor] | None = None  # pinned host copies of the parameters (GPU only)
        self._pool: ThreadPoolExecutor | None = None
        self._pending: Future | None = None

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        if step % self.every:
            return
        # one update every `every` steps approximates `every` updates of decay d by one of decay d**every
        weight = 1.0 - self.decay**self.every
        params = dict(model.named_parameters())
        src = [_local(params[n].detach()) for n in self.names]
        dst = [_local(self.shadow[n]) for n in self.names]
        if not src or src[0].device.type != "cuda":
            torch._foreach_lerp_(dst, [s.to("cpu", torch.float32) for s in src], weight)
            return
        self.wait()
        if self._staging is None:
            self._staging = [torch.empty(s.shape, dtype=torch.float32, pin_memory=True) for s in src]
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ema")
        for buf, s in zip(self._staging, src):
            buf.copy_(s, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()

        def lerp() -> None:
            copied.synchronize()  # waits for the copy only, on this thread
            torch._foreach_lerp_(dst, self._staging, weight)

        self._pending = self._pool.submit(lerp)

    def wait(self) -> None:
        """Join an update in flight (the shadow is then current)."""
        if self._pending is not None:
            self._pending.result()
            self._pending = None

    def shadow_for_checkpoint(self) -> dict[str, Tensor]:
        self.wait()
        return self.shadow

    @contextlib.contextmanager
    @torch.no_grad()
    def swapped_in(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily load the EMA weights into `model` (for validation), restoring the live weights after."""
        self.wait()
        params = dict(model.named_parameters())
        backup = {n: params[n].detach().clone() for n in self.names}
        for n in self.names:
            params[n].copy_(self.shadow[n])
        try:
            yield model
        finally:
            for n in self.names:
                params[n].copy_(backup[n])
