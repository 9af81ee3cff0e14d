"""`python -m pipeline experiment=smoke`: the whole chain at micro scale, then a re-run that skips every stage."""

import json
import os
import subprocess
import sys

import pytest

from pipeline.__main__ import STAGES

pytestmark = pytest.mark.slow


def _pipeline(root, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    cmd = [sys.executable, "-m", "pipeline", "experiment=smoke", f"run.root={root}", *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)


def test_smoke_pipeline_runs_every_stage_then_resumes_as_a_no_op(tmp_path):
    r = _pipeline(tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run_dir = tmp_path / "smoke"
    record = json.loads((run_dir / "pipeline.json").read_text())
    for stage in STAGES:
        manifest = json.loads((run_dir / stage / "manifest.json").read_text())
        assert manifest["stage"] == stage and manifest["code"]["sha"]
        assert record["stages"][stage]["returncode"] == 0 and not record["stages"][stage]["skipped"]
        assert record["stages"][stage]["peak_rss_mb"] > 0
        assert list((run_dir / stage / "wandb").glob("offline-run-*")), f"{stage}: no offline W&B run"
    # every upstream output that a stage consumed is the one the upstream manifest recorded
    pre = json.loads((run_dir / "pretrain" / "manifest.json").read_text())
    data = json.loads((run_dir / "data" / "manifest.json").read_text())
    assert pre["inputs"]["train_shards"]["sha256"] == data["outputs"]["train"]["sha256"]
    # the distilled student starts from its own pretrained base, a stage of its own with a manifest and a W&B run
    base = json.loads((run_dir / "student_base" / "manifest.json").read_text())
    dist = json.loads((run_dir / "distill" / "manifest.json").read_text())
    assert (
        base["config"]["model"]["n_routed_experts"] == 0
        and base["inputs"]["train_shards"] == pre["inputs"]["train_shards"]
    )
    assert dist["inputs"]["student_base"]["sha256"] == base["outputs"]["checkpoint"]["sha256"]
    assert list((run_dir / "student_base" / "wandb").glob("offline-run-*"))

    mtimes = {s: (run_dir / s / "manifest.json").stat().st_mtime for s in STAGES}
    again = _pipeline(tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    record = json.loads((run_dir / "pipeline.json").read_text())
    for stage in STAGES:
        assert "skipped_at" in record["stages"][stage], f"{stage} ran again although nothing changed"
        assert (run_dir / stage / "manifest.json").stat().st_mtime == mtimes[stage]
