"""W&B really on (offline): every file inside the stage directory, what a run holds read back from W&B's own run
file, a failed call losing that call only, resume continuing one run id, system metrics by a setting, sweeps."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from pipeline.tracking import Tracker, list_runs
from pipeline.wandb_records import read_run, run_files
from tests.conftest import REPO


@pytest.fixture
def wandb_on(monkeypatch):
    """These tests are about W&B: whatever the environment says, let the config decide."""
    monkeypatch.delenv("WANDB_MODE", raising=False)


def _newest(stage_dir, run_id=None):
    return read_run(run_files(stage_dir, run_id)[-1])


def test_disabled_mode_still_writes_metrics_jsonl(tmp_path):
    t = Tracker(tmp_path, run_group="g", stage="s", mode="disabled")
    t.log({"loss": 2.0, "nan": float("nan")}, step=3)
    t.log_table("samples", ["prompt", "reward"], [["2+2", 1.0]], step=3)
    t.finish()
    row = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert row["step"] == 3 and row["loss"] == 2.0 and row["nan"] == "nan"
    assert json.loads((tmp_path / "samples.jsonl").read_text())["prompt"] == "2+2"
    assert not (tmp_path / "wandb").exists()


def test_non_zero_rank_writes_nothing(tmp_path):
    t = Tracker(tmp_path / "s", run_group="g", stage="s", mode="offline", enabled=False)
    t.log({"loss": 1.0}, step=1)
    t.finish()
    assert not (tmp_path / "s").exists()


def test_bad_mode_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="wandb.mode"):
        Tracker(tmp_path, run_group="g", stage="s", mode="offlin")


def test_offline_run_lives_in_stage_dir_holds_everything_and_nothing_goes_to_home(tmp_path):
    """Runs in a subprocess with HOME pointing at an empty directory that must stay empty."""
    home = tmp_path / "home"
    home.mkdir()
    stage_dir = tmp_path / "run" / "data"
    code = textwrap.dedent(f"""
        import os
        from pipeline.tracking import Tracker
        t = Tracker({str(stage_dir)!r}, run_group="run", stage="data", config={{"x": 1}}, mode="offline",
                    name="run/data", tags=["precision=fp8"])
        assert t.wandb_run is not None, "offline W&B did not start"
        for step in (1, 2, 3):
            t.log({{"loss": 1.0 / step, "expert_load": [[1, 2], [3, 4]]}}, step=step)
        t.log_table("samples", ["a", "b"], [["x", 1], ["y", 2]], step=3)
        t.log_heatmap("expert_load", [[1, 2], [3, 4]], step=3)
        t.log_curves()
        t.summary({{"final": 0.5}})
        p = {str(stage_dir / "metrics.jsonl")!r}
        t.log_artifact(p, name="run-data-metrics", type="dataset")
        t.finish()
        assert not [k for k in os.environ if k.startswith("WANDB_") and k != "WANDB_SERVICE"], "WANDB_* leaked"
    """)
    # matplotlib (the figures) keeps its font cache under $HOME unless told otherwise: that one is not W&B's
    env = {"HOME": str(home), "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "MPLCONFIGDIR": str(tmp_path / "mpl")}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert list(home.rglob("*")) == [], f"W&B wrote under $HOME: {list(home.rglob('*'))}"
    rec = json.loads((stage_dir / "wandb_run.json").read_text())
    assert (rec["name"], rec["group"], rec["job_type"], rec["mode"]) == ("run/data", "run", "data", "offline")
    assert list_runs(tmp_path) == [rec | {"stage_dir": str(stage_dir)}]
    c = _newest(stage_dir, rec["id"])
    assert (c.run_id, c.group, c.job_type, c.tags) == (rec["id"], "run", "data", ["precision=fp8"])
    assert c.history_steps == [1, 2, 3] and "loss" in c.history_keys and "expert_load" not in c.history_keys
    assert c.tables == {"samples": [3]}
    assert c.images == {"expert_load": [3], "curves": [3]}
    assert c.summary["final"] == 0.5 and c.exited and c.complete
    ((art),) = c.artifacts
    assert (art["name"], art["type"]) == ("run-data-metrics", "dataset")
    metrics = str(stage_dir / "metrics.jsonl")
    assert rec["produced"] == [{"name": art["name"], "type": "dataset", "digest": art["digest"], "path": metrics}]
    assert (stage_dir / "figures" / "expert_load" / "step_0000003.png").is_file()
    cmd = [sys.executable, "-m", "pipeline.tracking", str(tmp_path)]
    listing = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert "3 rows, 1 tables, 2 figures, 1 artifacts out" in listing.stdout, listing.stdout + listing.stderr


def test_a_failed_call_loses_that_call_only_and_is_counted_and_named(tmp_path, wandb_on, caplog):
    t = Tracker(tmp_path, run_group="g", stage="s", mode="offline")
    t.log({"loss": 1.0}, step=1)
    t.log_table("ragged", ["a", "b"], [[1, 2], [3]], step=1)  # W&B refuses a row of the wrong width
    t.log_figure("missing", tmp_path / "nope.png", step=1)  # no such file
    t.log_artifact(tmp_path / "gone", name="g-s-gone", type="dataset")  # no such path
    t.log_table("fine", ["a"], [[1]], step=2)
    t.log({"loss": 0.5}, step=2)
    t.finish()
    assert t.failures == {"log_table:ragged": 1, "log_figure:missing": 1, "log_artifact:g-s-gone": 1}
    assert "W&B log_table:ragged failed" in caplog.text
    c = _newest(tmp_path)
    assert c.history_steps == [1, 2] and c.tables == {"fine": [2]}  # everything after the failures arrived
    assert c.summary["wandb_failures"] == 3
    assert c.summary["wandb_failed_calls"] == ["log_artifact:g-s-gone", "log_figure:missing", "log_table:ragged"]
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["wandb_failure"] for r in rows if "wandb_failure" in r] == sorted(t.failures, key=list(t.failures).index)
    assert json.loads((tmp_path / "wandb_run.json").read_text())["failures"] == t.failures


def test_a_failed_init_leaves_metrics_jsonl(tmp_path, wandb_on, monkeypatch, caplog):
    import wandb

    def broken_init(*a, **k):
        raise RuntimeError("no network, no login")

    monkeypatch.setattr(wandb, "init", broken_init)
    t = Tracker(tmp_path, run_group="g", stage="s", mode="online")
    t.log({"loss": 1.0}, step=1)
    t.finish()
    assert "W&B init failed" in caplog.text and t.failures == {"init": 1}
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["loss"] == 1.0


def _wandb_env() -> dict:
    return {k: v for k, v in os.environ.items() if k.startswith("WANDB_") and k != "WANDB_SERVICE"}  # W&B's own


def test_two_stages_in_one_process_keep_their_files_and_the_environment_apart(tmp_path, wandb_on):
    before = _wandb_env()
    a = Tracker(tmp_path / "a", run_group="g", stage="a", mode="offline")
    b = Tracker(tmp_path / "b", run_group="g", stage="b", mode="offline")
    a.log({"x": 1}, step=1)
    b.log({"y": 2}, step=1)
    a.log_artifact(tmp_path / "a" / "metrics.jsonl", name="g-a-metrics", type="dataset")
    a.finish()
    b.finish()
    assert _wandb_env() == before
    assert _newest(tmp_path / "a").history_keys == {"x"} and _newest(tmp_path / "b").history_keys == {"y"}
    # a's artifact was prepared in a's W&B cache although b's run was opened after a's
    assert (tmp_path / "a" / "wandb" / ".cache" / "artifacts").is_dir()
    assert not (tmp_path / "b" / "wandb" / ".cache" / "artifacts").exists()


ATTEMPT = """
import sys, time
from pipeline.tracking import Tracker
stage_dir, run_id = sys.argv[1], sys.argv[2]
resume_at, first, last = map(int, sys.argv[3:6])
t = Tracker(stage_dir, run_group="g", stage="pretrain", mode="offline", run_id=run_id)
if resume_at >= 0:
    t.resume_at(resume_at)
for step in range(first, last + 1):
    t.log({"loss": 10.0 - step}, step=step)
    if step % 2 == 0:
        t.log_table("samples", ["text"], [[f"at {step}"]], step=step)
print("logged", flush=True)
if sys.argv[6] == "hang":
    time.sleep(120)
t.finish()
"""


def test_a_killed_and_resumed_stage_is_one_run_whose_newest_segment_holds_every_step_once(tmp_path, child_env):
    def attempt(*args):
        cmd = [sys.executable, "-c", textwrap.dedent(ATTEMPT), str(tmp_path), "run00001", *map(str, args)]
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, env=child_env)

    dead = attempt(-1, 1, 7, "hang")  # logs steps 1..7, then is killed; its checkpoint was at step 4
    assert dead.stdout.readline().strip() == b"logged"
    os.kill(dead.pid, signal.SIGKILL)
    dead.wait()
    resumed = attempt(4, 5, 9, "finish")  # resumes from step 4's checkpoint and logs 5..9 again
    assert resumed.wait(timeout=120) == 0
    segments = run_files(tmp_path)
    assert len(segments) == 2 and all(s.name.endswith("-run00001") for s in segments)  # one run id
    newest = read_run(segments[-1])
    assert newest.run_id == "run00001" and newest.history_steps == list(range(1, 10))
    assert newest.tables == {"samples": [2, 4, 6, 8]}
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 10))
    assert [json.loads(x)["step"] for x in (tmp_path / "samples.jsonl").read_text().splitlines()] == [2, 4, 6, 8]


def test_system_metrics_follow_the_setting(tmp_path, wandb_on):
    on = Tracker(tmp_path / "on", run_group="g", stage="s", system_metrics=True, system_metrics_interval_s=0.5)
    off = Tracker(tmp_path / "off", run_group="g", stage="s")  # default: on only where CUDA is present
    time.sleep(2.0)
    on.finish()
    off.finish()
    assert _newest(tmp_path / "on").system_metrics_rows > 0
    import torch

    assert (_newest(tmp_path / "off").system_metrics_rows > 0) == torch.cuda.is_available()


SWEEP_APP = """
import hydra
from pipeline.config import to_config
from pipeline.tracking import sweep_group, sweep_overrides

@hydra.main(version_base=None, config_path="{conf}", config_name="config")
def main(dcfg):
    cfg = to_config(dcfg)
    print("JOB", cfg.run.name, sweep_group(), sweep_overrides(), flush=True)

main()
"""


def test_a_multirun_shares_one_group_and_tags_each_member_with_its_overrides(tmp_path, child_env):
    app = tmp_path / "app.py"
    app.write_text(SWEEP_APP.format(conf=REPO / "conf"))
    cmd = [sys.executable, str(app), "--multirun", "precision=bf16,fp8", "train.steps=3", f"run.root={tmp_path}"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=child_env)
    assert r.returncode == 0, r.stderr[-2000:]
    jobs = [line.split(" ", 3) for line in r.stdout.splitlines() if line.startswith("JOB")]
    assert len(jobs) == 2 and jobs[0][2] == jobs[1][2] and jobs[0][2].startswith("sweep-")
    assert [j[3] for j in jobs] == ["['precision=bf16']", "['precision=fp8']"]
