"""A real `train.pretrain` with W&B offline: a second launch while it runs is refused naming its pid; after a
kill -9 the relaunch resumes from the checkpoint and continues the same W&B run, whose newest segment holds every
step once, with the values of metrics.jsonl."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from pipeline.wandb_records import read_run, run_files
from tests.e2e.conftest import clone_run

pytestmark = pytest.mark.slow

TRAIN = ["train=smoke", "train.steps=10", "train.ckpt_every=3", "train.eval_every=5", "train.export_hf=false"]


def _steps_logged(metrics) -> list[int]:
    if not metrics.exists():
        return []
    return [json.loads(x)["step"] for x in metrics.read_text().splitlines() if '"loss"' in x]


def test_concurrent_launch_refused_then_kill_9_and_resume_continue_one_wandb_run(data_run, child_env):
    root, overrides = data_run
    clone_run(root, "wb_resume")
    cmd = [sys.executable, "-m", "train.pretrain", *overrides, *TRAIN, "run.name=wb_resume", "wandb.mode=offline"]
    env = {k: v for k, v in child_env.items() if k != "WANDB_MODE"}
    stage_dir = root / "wb_resume" / "pretrain"
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and max(_steps_logged(stage_dir / "metrics.jsonl"), default=0) < 5:
            assert first.poll() is None, "the first launch ended early"
            time.sleep(0.05)
        os.kill(first.pid, signal.SIGSTOP)  # frozen mid-run between two checkpoints, still holding its lock
        second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert second.returncode != 0
        assert f"stage 'pretrain' of run 'wb_resume' is already running (pid {first.pid} " in second.stderr
        assert "FileNotFoundError" not in second.stderr
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
    run_id = json.loads((stage_dir / "in_progress.json").read_text())["wandb_id"]
    third = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "resumed from" in third.stdout and f"continuing W&B run {run_id}" in third.stdout

    segments = run_files(stage_dir)
    assert len(segments) == 2 and all(s.name.endswith(f"-{run_id}") for s in segments)  # one run id
    newest = read_run(segments[-1])
    assert newest.run_id == run_id and newest.exited
    assert newest.history_steps == list(range(1, 11))  # every step once
    logged = [json.loads(x) for x in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in logged if "loss" in r}
    assert sorted(losses) == list(range(1, 11)) and len(losses) == len([r for r in logged if "loss" in r])
    assert {r["step"]: r["loss"] for r in newest.history} == pytest.approx(losses, rel=1e-12)
    assert newest.images["expert_load"] == [5, 10]  # the heatmap of the killed attempt's step 5, logged again
    assert json.loads((stage_dir / "manifest.json").read_text())["wandb_run"] == run_id
