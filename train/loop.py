"""What every training stage's loop shares: resume, step accounting, non-finite steps, checkpoints, logging,
progress and preemption. Pretraining, SFT, GRPO and the distilled student each write their own loop body (the
forward, the loss, the update) between `Loop`'s calls, top to bottom:

    loop = Loop("sft", s, ckpts, tracker, save, is_main=info.is_main)
    loop.resume(s.resume, model, opt)                      # newest valid checkpoint (or a named one, or none)
    for step in loop.steps():                              # a progress bar; SIGTERM/SIGUSR1 handled meanwhile
        lr = loop.set_lr(opt, step, s.optim)
        ...forward/backward of the stage's loss: 0-dim device tensors in `parts`...
        gnorm = clip_grad_norm_(...)
        vals = loop.sync(parts, gnorm)                     # ONE host read per step (+ the ranks' agreement)
        if loop.finite(step, vals, model, opt):            # skip (and count) a NaN/Inf step, stop after too many
            opt.step()
            metrics = {..., "step_s": loop.step_time()}
        opt.zero_grad(set_to_none=True)
        loop.end_step(step, metrics, postfix)              # log / checkpoint on cadence; exit if preempted

Host syncs: a GPU runs ahead of Python until the host reads a device value. `sync` stacks the step's scalars
(the loss parts, the gradient norm, this rank's preemption flag) and reads them in one `.tolist()`, after `reduce`
has all-reduced them (one collective) so every rank decides on the same numbers; the per-tensor search for the
first non-finite gradient runs only on a step that is already known to be non-finite.

Non-finite steps: skipped (gradients dropped), logged as `skipped_step` with the first bad tensor, counted in
`bad_steps`; `max_bad_steps` in a row stop the run with a checkpoint of the last good weights (`TrainingError`).
A skipped step still ends like any other: its checkpoint is written on cadence.

Preemption (Megatron-LM's exit-signal handler): SLURM sends SIGTERM (or the `--signal` of the job, commonly
SIGUSR1) before it kills a job, torchrun forwards SIGTERM to its workers. While `steps()` runs, both only set a
flag; the step in progress finishes, the flag travels with the step's scalars (summed over ranks by `reduce`, so
every torchrun rank stops after the same step even when only one received the signal), a checkpoint of that step
is written, and the process exits by `Preempted` (a SystemExit with code 128 + signal number, as a process killed
by the signal would report; no traceback, the W&B run is closed, no manifest is written, so the next launch
resumes from that checkpoint with `resume=auto` and loses no step).
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from train.checkpoint import CheckpointManager
from train.config import OptimConfig
from train.optim import lr_at

log = logging.getLogger(__name__)
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

# reduce_(flat, n_mean): all-reduce a 1-D float device tensor in place over the ranks that must agree; its first
# n_mean entries become the data-parallel mean, the rest the sum
Reduce = Callable[[Tensor, int], None]


class TrainingError(RuntimeError):
    """A run that cannot go on (too many bad steps); a checkpoint was written before raising."""


class Preempted(SystemExit):
    """Raised after the checkpoint of the step during which a preemption signal arrived (exit code 128 + signum)."""


def first_nonfinite(model: nn.Module) -> str | None:
    """The name of the first parameter whose gradient holds a NaN/Inf (this rank's shard: no collective). One host
    read per parameter: call it only once a step is known to be non-finite."""
    for name, p in model.named_parameters():
        g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
        if g is not None and not torch.isfinite(g).all():
            return name
    return None


class Loop:
    """The skeleton of one training stage's loop (see the module docstring); `cfg` is the stage's section (it has
    `steps`, `log_every`, `ckpt_every`, `max_bad_steps`), `save(step)` writes a checkpoint and returns its path."""

    def __init__(
        self,
        name: str,
        cfg: Any,
        ckpts: CheckpointManager,
        tracker,
        save: Callable[[int], Path],
        *,
        is_main: bool = True,
        reduce: Reduce | None = None,
    ) -> None:
        self.name, self.cfg, self.ckpts, self.tracker, self.save = name, cfg, ckpts, tracker, save
        self.is_main, self.reduce = is_main, reduce
        self.start, self.bad_run, self.bad_total = 0, 0, 0
        self.signum: int | None = None  # the preemption signal this process received
        self.stop_signum: int | None = None  # set when the ranks agreed to stop after this step
        self.bar: tqdm | None = None
        self._t_last = time.perf_counter()
        self.dt = 0.0  # seconds of the last step

    # ---------------------------------------------------------------------------------------------- resume
    def resume(self, setting: str, model: nn.Module, opt, ema: dict | None = None) -> dict:
        """`setting`: "auto" (newest valid checkpoint of this stage, if any) | "none" | a checkpoint path. Loads
        model, optimizer (and EMA) in place; returns the checkpoint's trainer state ({} when starting fresh)."""
        if setting == "none":
            return {}
        if setting == "auto":
            found = self.ckpts.load_latest_valid(model, opt, ema)
        else:
            found = (Path(setting), self.ckpts.load(Path(setting), model, opt, ema))
        if found is None:
            return {}
        path, state = found
        self.start, self.bad_total = state["step"], state.get("bad_steps", 0)
        if self.tracker is not None:  # rows logged after the checkpoint go; the W&B run continues from here
            self.tracker.resume_at(self.start)
        log.info("%s: resumed from %s at step %d", self.name, path, self.start)
        return state

    # ---------------------------------------------------------------------------------------------- steps
    def steps(self) -> Iterator[int]:
        """Steps `start..cfg.steps-1` under a progress bar, with the preemption handler installed meanwhile."""
        previous = self._install_handlers()
        steps = range(self.start, self.cfg.steps)
        self.bar = tqdm(steps, initial=self.start, total=self.cfg.steps, desc=self.name, disable=not self.is_main)
        self._t_last = time.perf_counter()
        try:
            yield from self.bar
            self.ckpts.wait()  # an asynchronous save of the last step is finished before the caller reads it
        finally:
            self.bar.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _install_handlers(self) -> dict:
        if threading.current_thread() is not threading.main_thread():
            return {}  # signal handlers can only be set from the main thread (e.g. not in a notebook worker)

        def handler(signum, frame) -> None:
            self.signum = signum
            log.warning("%s: received signal %d; stopping after this step with a checkpoint", self.name, signum)

        return {sig: signal.signal(sig, handler) for sig in PREEMPTION_SIGNALS}

    def set_lr(self, opt: torch.optim.Optimizer, step: int, optim: OptimConfig) -> float:
        """The schedule's learning rate for `step`, set on every parameter group."""
        lr = lr_at(step, self.cfg.steps, optim)
        for g in opt.param_groups:
            g["lr"] = lr
        return lr

    # ---------------------------------------------------------------------------------------------- one step
    def sync(self, parts: dict[str, Tensor], grad_norm: Tensor | None, extra: Tensor | None = None):
        """The step's scalars on the host, after `reduce` (data-parallel mean of `parts`, sum of `extra` and of the
        preemption flags). One collective and one host read. Returns (floats by name, reduced `extra`)."""
        names = list(parts)
        device = next(iter(parts.values())).device
        flag = torch.tensor([float(self.signum or 0)], dtype=torch.float64, device=device)
        flat = torch.cat([torch.stack([parts[k].detach().double().reshape(()) for k in names]), flag])
        if extra is not None:
            flat = torch.cat([flat, extra.detach().double().flatten()])
        if self.reduce is not None:
            self.reduce(flat, len(names))
        head = flat[: len(names) + 1]
        if grad_norm is not None:
            head = torch.cat([head, grad_norm.detach().double().reshape(1).to(device)])
        host = head.tolist()
        vals = dict(zip(names, host[: len(names)]))
        if grad_norm is not None:
            vals["grad_norm"] = host[-1]
        if host[len(names)] > 0:  # some rank was signalled: all stop after this step (the first signal's number)
            self.stop_signum = self.signum or int(signal.SIGTERM)
        reduced = flat[len(names) + 1 :].view_as(extra).to(extra.dtype) if extra is not None else None
        return vals, reduced

    def finite(self, step: int, vals: dict[str, float], model: nn.Module, opt, loss_key: str = "loss") -> bool:
        """Whether the step's loss and gradient norm are finite. If not: gradients dropped, the skip logged with the
        first bad tensor, and after `max_bad_steps` in a row a checkpoint and `TrainingError`."""
        loss_ok, gnorm_ok = math.isfinite(vals[loss_key]), math.isfinite(vals.get("grad_norm", 0.0))
        if loss_ok and gnorm_ok:
            return self.record(step, None, opt)
        return self.record(step, "loss" if not loss_ok else first_nonfinite(model) or "grad_norm", opt)

    def record(self, step: int, culprit: str | None, opt) -> bool:
        """Account for a step that was finite (`culprit=None`) or not (the first bad tensor's name); see `finite`."""
        if culprit is None:
            self.bad_run = 0
            return True
        opt.zero_grad(set_to_none=True)
        self.bad_run += 1
        self.bad_total += 1
        if self.tracker is not None:
            self.tracker.log({"skipped_step": 1, "bad_steps": self.bad_total, "bad_tensor": culprit}, step=step + 1)
        if self.bad_run >= self.cfg.max_bad_steps:
            path = self.save(step)
            self.ckpts.wait()
            raise TrainingError(
                f"stopping: {self.bad_run} consecutive non-finite steps (last at step {step + 1}, first bad tensor:"
                f" {culprit}); checkpoint of the last good weights at {path}"
            )
        return False

    def log_due(self, step: int) -> bool:
        return (step + 1) % self.cfg.log_every == 0 or step + 1 == self.cfg.steps

    def step_time(self) -> float:
        """Seconds since the previous call (or since the loop started): the wall time of the step just done."""
        now = time.perf_counter()
        self.dt, self._t_last = now - self._t_last, now
        return self.dt

    def end_step(self, step: int, metrics: dict | None, postfix: dict | None = None, force_log: bool = False) -> None:
        """Log `metrics` when due (or `force_log`), update the progress bar, checkpoint on cadence, at the last step
        and when the ranks agreed to stop; then exit if preempted. `metrics=None`: a skipped step (nothing to log)."""
        last = step + 1 == self.cfg.steps
        if self.reduce is None and self.signum is not None:  # one process: nobody else to agree with
            self.stop_signum = self.signum
        if metrics is not None and self.tracker is not None and (force_log or self.log_due(step)):
            self.tracker.log(metrics, step=step + 1)
        if self.bar is not None and postfix:
            eta = (self.cfg.steps - step - 1) * self.dt
            self.bar.set_postfix({**postfix, "eta": f"{eta / 60:.1f}m"})
        if (step + 1) % self.cfg.ckpt_every == 0 or last or self.stop_signum is not None:
            path = self.save(step + 1)
            if self.stop_signum is not None and not last:
                self.ckpts.wait()
                if self.is_main:
                    log.info("%s: preempted (signal %d); checkpoint at %s", self.name, self.stop_signum, path)
                raise Preempted(128 + self.stop_signum)
