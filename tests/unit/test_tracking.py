"""W&B offline: files inside the stage directory, nothing under $HOME, failures never stop a stage."""

import json
import subprocess
import sys
import textwrap

import pytest

from pipeline.tracking import Tracker


def test_disabled_mode_still_writes_metrics_jsonl(tmp_path):
    t = Tracker(tmp_path, run_group="g", stage="s", mode="disabled")
    t.log({"loss": 2.0, "nan": float("nan")}, step=3)
    t.log_table("samples", ["prompt", "reward"], [["2+2", 1.0]], step=3)
    t.finish()
    row = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert row["step"] == 3 and row["loss"] == 2.0 and row["nan"] == "nan"
    assert json.loads((tmp_path / "samples.jsonl").read_text())["prompt"] == "2+2"


def test_non_zero_rank_writes_nothing(tmp_path):
    t = Tracker(tmp_path / "s", run_group="g", stage="s", mode="offline", enabled=False)
    t.log({"loss": 1.0}, step=1)
    t.finish()
    assert not (tmp_path / "s").exists()


def test_bad_mode_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="wandb.mode"):
        Tracker(tmp_path, run_group="g", stage="s", mode="offlin")


def test_offline_run_lives_in_stage_dir_and_not_in_home(tmp_path):
    """Runs in a subprocess with HOME pointing at an empty directory that must stay empty."""
    home = tmp_path / "home"
    home.mkdir()
    stage_dir = tmp_path / "run" / "data"
    code = textwrap.dedent(f"""
        import os
        os.environ.pop("WANDB_MODE", None)
        from pipeline.tracking import Tracker
        t = Tracker({str(stage_dir)!r}, run_group="run", stage="data", config={{"x": 1}}, mode="offline",
                    name="run/data")
        assert t.wandb_run is not None, "offline W&B did not start"
        t.log({{"loss": 1.0}}, step=1)
        t.summary({{"final": 0.5}})
        t.log_table("samples", ["a"], [["b"]], step=1)
        p = {str(stage_dir / "metrics.jsonl")!r}
        t.log_artifact(p, name="run-metrics", type="metrics")
        t.finish()
    """)
    env = {"HOME": str(home), "PATH": "/usr/bin:/bin", "WANDB_MODE": "offline"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, cwd=".")
    assert r.returncode == 0, r.stderr[-2000:]
    runs = list((stage_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))
    assert list(home.rglob("*")) == [], f"W&B wrote under $HOME: {list(home.rglob('*'))}"
    # the run is described next to the stage, and listed by group
    from pipeline.tracking import list_runs

    rec = json.loads((stage_dir / "wandb_run.json").read_text())
    assert (rec["name"], rec["group"], rec["job_type"], rec["mode"]) == ("run/data", "run", "data", "offline")
    assert runs[0].name.endswith(rec["id"]) and list_runs(tmp_path) == [rec | {"stage_dir": str(stage_dir)}]


def test_wandb_failure_warns_and_the_stage_goes_on(tmp_path, monkeypatch, caplog):
    import wandb

    def broken_init(*a, **k):
        raise RuntimeError("no network, no login")

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setattr(wandb, "init", broken_init)
    t = Tracker(tmp_path, run_group="g", stage="s", mode="online")
    t.log({"loss": 1.0}, step=1)
    t.finish()
    assert "W&B init failed" in caplog.text
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["loss"] == 1.0
