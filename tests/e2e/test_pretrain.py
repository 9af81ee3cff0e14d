"""Pretraining end to end on a deterministic corpus: learning, kill -9 + resume, NaN faults, bad configs, golden."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.config import compose
from tests.e2e.conftest import clone_run

pytestmark = pytest.mark.slow

GOLDEN = Path(__file__).parent / "golden_pretrain_smoke.json"
TRAIN = ["train=smoke", "train.steps=10", "train.ckpt_every=3", "train.eval_every=5", "train.export_hf=false"]


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _pretrain_cmd(overrides):
    return [sys.executable, "-m", "train.pretrain", *overrides]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}


def test_learns_and_beats_the_unigram_baseline(data_run):
    from train.pretrain import run

    root, overrides = data_run
    clone_run(root, "learn")
    cfg = compose([*overrides, "run.name=learn", "train=smoke", "train.steps=30", "train.eval_every=30"])
    result = run(cfg)
    losses = _losses(root / "learn")
    assert losses[30] < losses[1] - 1.0, losses
    assert result["val_loss"] < result["unigram_val_loss"], result
    assert (root / "learn" / "pretrain" / "manifest.json").is_file()
    assert run(cfg)["skipped"] is True  # unchanged config and inputs: nothing to do


def test_sigkill_at_any_step_then_resume_reproduces_the_uninterrupted_trajectory(data_run):
    root, overrides = data_run
    for name in ("straight", "killed"):
        clone_run(root, name)
    base = [*overrides, *TRAIN]
    subprocess.run(_pretrain_cmd([*base, "run.name=straight"]), check=True, env=_env(), capture_output=True)
    metrics = root / "killed" / "pretrain" / "metrics.jsonl"
    proc = subprocess.Popen(_pretrain_cmd([*base, "run.name=killed"]), env=_env(), stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:  # kill between two checkpoints, mid-interval
        steps = [json.loads(x).get("step", 0) for x in metrics.read_text().splitlines()] if metrics.exists() else []
        if steps and max(steps) >= 5:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (root / "killed" / "pretrain" / "manifest.json").exists()
    r = subprocess.run(_pretrain_cmd([*base, "run.name=killed"]), env=_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout
    straight, killed = _losses(root / "straight"), _losses(root / "killed")
    assert sorted(killed) == list(range(1, 11))
    assert killed == straight, {s: (straight[s], killed[s]) for s in straight if straight[s] != killed.get(s)}


def test_nan_steps_are_skipped_then_stop_the_run_with_a_checkpoint(data_run):
    from train.pretrain import TrainingError, run

    root, overrides = data_run
    clone_run(root, "nan_skip")
    result = run(compose([*overrides, *TRAIN, "run.name=nan_skip", "train.inject_nan_at_step=2"]))
    assert result["bad_steps"] == 1
    clone_run(root, "nan_stop")
    cfg = compose([*overrides, *TRAIN, "run.name=nan_stop", "train.inject_nan_at_step=2", "train.max_bad_steps=1"])
    with pytest.raises(TrainingError, match=r"step 3.*first bad tensor: loss") as e:
        run(cfg)
    ckpt = Path(str(e.value).split("checkpoint of the last good weights at ")[1])
    assert (ckpt / "trainer_state.json").is_file()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.seq_len=4096", "exceeds model.max_position_embeddings"),  # two sections: checked when the stage starts
        ("train.micro_batch_size=3", "not divisible by micro_batch_size=3"),  # one section: when the config is composed
    ],
)
def test_impossible_config_fails_before_training(data_run, override, message):
    from train.pretrain import run

    root, overrides = data_run
    clone_run(root, f"bad_{abs(hash(override))}")
    with pytest.raises(ValueError, match=message):
        run(compose([*overrides, *TRAIN, f"run.name=bad_{abs(hash(override))}", override]))
    assert not (root / f"bad_{abs(hash(override))}" / "pretrain").exists(), "no work may start"


def test_golden_loss_curve(data_run):
    """A refactor must keep the first steps' losses (fp32, deterministic CPU) within a tight tolerance.
    Regenerate deliberately with REGEN_GOLDEN=1 after an intended numerical change, and say so in the commit."""
    from train.pretrain import run

    root, overrides = data_run
    clone_run(root, "golden")
    run(compose([*overrides, *TRAIN, "run.name=golden", "train.steps=6", "train.eval_every=6"]))
    losses = [_losses(root / "golden")[s] for s in range(1, 7)]
    if os.environ.get("REGEN_GOLDEN"):
        GOLDEN.write_text(json.dumps({"losses": losses}, indent=1) + "\n")
    golden = json.loads(GOLDEN.read_text())["losses"]
    for step, (got, want) in enumerate(zip(losses, golden), 1):
        assert abs(got - want) <= 2e-4 * abs(want), f"step {step}: loss {got} vs golden {want}"


def test_sigterm_finishes_the_step_saves_it_and_the_resumed_run_loses_nothing(data_run):
    """Preemption (train/loop.py): SIGTERM between two checkpoints (every 3 steps) makes the run finish its step,
    checkpoint exactly that step and exit with 143 (128 + SIGTERM) without a manifest; the relaunch resumes there and
    the whole trajectory equals the uninterrupted one."""
    root, overrides = data_run
    for name in ("straight_t", "preempted"):
        clone_run(root, name)
    base = [*overrides, *TRAIN]
    subprocess.run(_pretrain_cmd([*base, "run.name=straight_t"]), check=True, env=_env(), capture_output=True)
    metrics = root / "preempted" / "pretrain" / "metrics.jsonl"
    proc = subprocess.Popen(
        _pretrain_cmd([*base, "run.name=preempted"]), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while time.time() < deadline:
        steps = [json.loads(x).get("step", 0) for x in metrics.read_text().splitlines()] if metrics.exists() else []
        if steps and max(steps) >= 4:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGTERM)
    out = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    stage = root / "preempted" / "pretrain"
    last = max(_losses(root / "preempted"))
    assert 4 <= last < 10 and f"preempted (signal {int(signal.SIGTERM)})" in out, out[-3000:]
    ckpts = sorted(p.name for p in (stage / "checkpoints").glob("step_*"))
    assert ckpts[-1] == f"step_{last:06d}", (ckpts, last)  # the step it was working on, not the last multiple of 3
    assert not (stage / "manifest.json").exists()
    r = subprocess.run(_pretrain_cmd([*base, "run.name=preempted"]), env=_env(), capture_output=True, text=True)
    assert r.returncode == 0 and f"resumed from {stage / 'checkpoints' / ckpts[-1]} at step {last}" in r.stdout
    assert _losses(root / "preempted") == _losses(root / "straight_t")
