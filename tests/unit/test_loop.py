"""The loop skeleton every training stage shares (train/loop.py), on a toy model with real checkpoints: a skipped
step still checkpoints on cadence (and a run whose last step is skipped ends with a checkpoint, not an IndexError),
repeated bad steps stop the run with one, a preemption signal finishes the step, checkpoints it and exits with
128 + signum, and the signal handlers are restored however the loop ends."""

import os
import signal
from dataclasses import dataclass

import pytest
import torch

from train.checkpoint import CheckpointManager
from train.loop import Loop, Preempted, TrainingError


@dataclass
class Cadence:
    steps: int = 6
    log_every: int = 1
    ckpt_every: int = 3
    max_bad_steps: int = 3


class Log:
    def __init__(self, path):
        self.rows = []
        self.metrics_path = path  # (never written here)
        self.resumed_at = None

    def log(self, row, step):
        self.rows.append((step, row))

    def resume_at(self, step):  # the tracker drops what was logged after the checkpoint (pipeline.tracking)
        self.resumed_at = step


def _setup(tmp_path, **cadence):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ckpts = CheckpointManager(tmp_path / "ckpts", keep_last=0)
    tracker = Log(tmp_path / "metrics.jsonl")
    loop = Loop("toy", Cadence(**cadence), ckpts, tracker, lambda step: ckpts.save(step, model, opt, {}, {}))
    return model, opt, ckpts, tracker, loop


def _train(loop, model, opt, bad_steps=(), on_step=None):
    x = torch.ones(2, 4)
    for step in loop.steps():
        loss = model(x).pow(2).mean() * (float("nan") if step in bad_steps else 1.0)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        vals, _ = loop.sync({"loss": loss}, gnorm)
        if on_step is not None:
            on_step(step)
        if loop.finite(step, vals, model, opt):
            opt.step()
            metrics = {"loss": vals["loss"]}
        else:
            metrics = None
        opt.zero_grad(set_to_none=True)
        loop.end_step(step, metrics)


def _steps(ckpts):
    return [int(p.name.split("_")[1]) for p in ckpts.checkpoints()]


def test_a_skipped_step_still_checkpoints_on_cadence(tmp_path):
    model, opt, ckpts, tracker, loop = _setup(tmp_path)
    _train(loop, model, opt, bad_steps={2})  # step 3 (0-based 2) is skipped and is a checkpoint step
    assert _steps(ckpts) == [3, 6]
    skipped = [row for _, row in tracker.rows if "skipped_step" in row]
    assert skipped == [{"skipped_step": 1, "bad_steps": 1, "bad_tensor": "loss"}]
    assert [s for s, row in tracker.rows if "loss" in row] == [1, 2, 4, 5, 6]


def test_a_skipped_last_step_ends_with_a_checkpoint(tmp_path):
    model, opt, ckpts, _, loop = _setup(tmp_path, steps=2, ckpt_every=10)
    _train(loop, model, opt, bad_steps={1})
    assert _steps(ckpts) == [2]


def test_repeated_bad_steps_stop_with_a_checkpoint_of_the_last_good_weights(tmp_path):
    model, opt, ckpts, _, loop = _setup(tmp_path, max_bad_steps=2)
    with pytest.raises(TrainingError, match=r"2 consecutive non-finite steps \(last at step 3.*first bad tensor: loss"):
        _train(loop, model, opt, bad_steps={1, 2})
    assert _steps(ckpts) == [2]  # saved at the step count of the last update


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_preemption_signal_finishes_the_step_checkpoints_it_and_exits(tmp_path, sig):
    model, opt, ckpts, tracker, loop = _setup(tmp_path, ckpt_every=100)
    before = signal.getsignal(sig)
    with pytest.raises(Preempted) as e:
        _train(loop, model, opt, on_step=lambda step: step == 1 and os.kill(os.getpid(), sig))
    assert e.value.code == 128 + sig
    assert _steps(ckpts) == [2]  # the step during which the signal arrived was finished and saved
    assert [s for s, row in tracker.rows if "loss" in row] == [1, 2]
    assert signal.getsignal(sig) is before
    # the resumed loop continues from that step and is not preempted again
    model2, opt2, ckpts2, _, loop2 = _setup(tmp_path, ckpt_every=100)
    assert loop2.resume("auto", model2, opt2)["step"] == 2 and loop2.start == 2
    assert loop2.tracker.resumed_at == 2
    _train(loop2, model2, opt2)
    assert _steps(ckpts2) == [2, 6]


def test_handlers_are_restored_when_the_loop_body_raises(tmp_path):
    model, opt, _, _, loop = _setup(tmp_path)
    before = signal.getsignal(signal.SIGTERM)

    def boom(step):
        assert signal.getsignal(signal.SIGTERM) is not before  # installed while the loop runs
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        _train(loop, model, opt, on_step=boom)
    assert signal.getsignal(signal.SIGTERM) is before


def test_sync_reads_the_host_once_per_step(tmp_path):
    from bench.host_syncs import SyncCounter

    _, _, _, _, loop = _setup(tmp_path)
    parts = {"loss": torch.tensor(2.0, device="cpu"), "ce": torch.tensor(1.5, device="cpu")}
    with SyncCounter() as counter:
        vals, load = loop.sync(parts, torch.tensor(0.5, device="cpu"), torch.ones(2, 3, device="cpu"))
    assert vals == {"loss": 2.0, "ce": 1.5, "grad_norm": 0.5} and load.shape == (2, 3)
    assert sum(counter.counts.values()) == 1, counter.counts
