"""Preemption under torchrun: SIGTERM to ONE worker (rank 1) of a 2-rank FSDP run; both ranks finish the same step
(the flag travels with the step's all-reduce, train/loop.py), write one checkpoint of it together and exit; the
relaunch resumes there and the trajectory equals an uninterrupted single-process run of the same micro model
(rtol 1e-5, as in test_elastic.py). Two torchrun launches and one in-process run: about 40 s on 2 cores."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.dist.dist_common import MICRO_MODEL, MICRO_TRAIN, REPO, clone_run, compare_steps, env, metrics, prepare_data

pytestmark = pytest.mark.dist

STEPS = ["train.steps=8", "train.ckpt_every=100", "train.eval_every=100"]  # checkpoints only at the end
LAYOUT = ["parallel.dp_replicate=1", "parallel.dp_shard=2"]


def _worker_of_rank(agent_pid: int, rank: int, timeout: float = 120) -> int:
    """The pid of the torchrun worker whose RANK is `rank` (a child of the agent)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        children = Path(f"/proc/{agent_pid}/task/{agent_pid}/children").read_text().split()
        for pid in children:
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in environ:
                return int(pid)
        time.sleep(0.1)
    raise TimeoutError(f"no worker of rank {rank} under torchrun pid {agent_pid}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from pipeline.config import compose
    from train.pretrain import run

    root = tmp_path_factory.mktemp("preemption")
    base = [*prepare_data(root), *MICRO_MODEL, *MICRO_TRAIN, *STEPS]
    clone_run(root, "straight")
    clone_run(root, "preempted")
    run(compose([*base, "run.name=straight"]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "train.pretrain"]
    cmd += [*base, *LAYOUT, "run.name=preempted"]
    rows = root / "preempted" / "pretrain" / "metrics.jsonl"
    agent = subprocess.Popen(cmd, env=env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    rank1 = _worker_of_rank(agent.pid, 1)
    deadline = time.time() + 240
    while time.time() < deadline and not (rows.exists() and len(rows.read_text().splitlines()) >= 2):
        time.sleep(0.05)
    os.kill(rank1, signal.SIGTERM)  # rank 0 is not signalled
    first = agent.communicate(timeout=240)[0]
    ckpts = sorted((root / "preempted" / "pretrain" / "checkpoints").glob("step_*"))
    saved = [(c.name, (c / ".metadata").is_file(), sorted(p.name for p in c.glob("rng_rank*.json"))) for c in ckpts]
    resumed = subprocess.run(cmd, env=env(), cwd=REPO, capture_output=True, text=True, timeout=240)
    return root, (first, agent.returncode, saved), resumed


def test_both_ranks_stop_after_the_same_step_with_one_checkpoint(runs):
    root, (first, returncode, saved), _ = runs
    assert returncode != 0, "a preempted run must not look finished"
    assert first.count("preempted (signal 15)") == 1, first[-4000:]  # printed by rank 0, for both
    assert len(saved) == 1, saved  # one checkpoint (cadence: only at the end), of the step both ranks agreed on
    name, complete, rng_files = saved[0]
    assert complete and rng_files == ["rng_rank0.json", "rng_rank1.json"], saved
    assert name != "step_000008" and f"checkpoints/{name}" in first, (name, first[-3000:])
    assert not re.search(r"\[rank\d\]: Traceback", first), first[-4000:]  # torchrun's own report follows, not theirs
    assert re.search(r"exitcode: 143", first), first[-4000:]


def test_the_relaunch_resumes_and_follows_the_uninterrupted_trajectory(runs):
    root, _, resumed = runs
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resumed from" in resumed.stdout
    want, got = metrics(root / "straight"), metrics(root / "preempted")
    bad = compare_steps(got, want, keys=("loss", "ce_loss", "grad_norm"))
    assert not bad, "\n".join(bad)
