"""`bench.seeds` at micro scale: the post-training chain rerun for two seeds from one pretrained checkpoint, every
seed's stages sharing that checkpoint, the data and the student base, and the mean / sd written by the script."""

import json

import pytest
import torch

import bench.common
from pipeline.config import compose
from tests.e2e.conftest import clone_run
from train.runtime import resolve_precision

pytestmark = pytest.mark.slow


def test_seeds_rerun_post_training_from_one_checkpoint(data_run, tmp_path, monkeypatch):
    from bench.seeds import main
    from train.pretrain import run as pretrain

    monkeypatch.setattr(bench.common, "RESULTS_DIR", tmp_path / "results")  # not the repository's bench/results
    root, overrides = data_run
    clone_run(root, "seedbase")
    pretrain(compose([*overrides, "run.name=seedbase", "train=smoke"]))
    summary = main(
        ["--run", str(root / "seedbase"), "--seeds", "0", "1", "--jobs", "2"]
        + ["--overrides", "experiment=smoke", "wandb.mode=disabled", "--overrides", "precision=auto"]  # as make does
    )
    ran = resolve_precision("auto", torch.device("cpu"))  # bf16 on a CPU with native bf16 matmuls, else fp32

    assert json.loads((root / "seedbase" / "seeds" / "summary.json").read_text()) == json.loads(json.dumps(summary))
    init = summary["pretrained_checkpoint"]
    for seed in (0, 1):
        run_dir = root / f"seedbase_seed{seed}"
        sft = json.loads((run_dir / "sft" / "manifest.json").read_text())
        assert sft["inputs"]["init"]["path"] == init and sft["config"]["run"]["seed"] == seed
        assert sft["reads"]["precision"] == "auto" and sft["metrics"]["precision"] == ran  # both --overrides apply
        for stage in ("rl", "distill", "eval"):
            assert json.loads((run_dir / stage / "manifest.json").read_text())["metrics"]["precision"] == ran, stage
        dist = json.loads((run_dir / "distill" / "manifest.json").read_text())
        assert dist["inputs"]["student_init"]["path"] == summary["student_base"]  # one base for every seed, hashed
        assert (run_dir / "eval" / "eval.json").is_file() and not (run_dir / "data").exists()
        assert "=== stage eval" in (root / f"seedbase_seed{seed}.log").read_text()  # side by side: one log each
    per_seed = {int(k): v for k, v in summary["per_seed"].items()}
    m = summary["metrics"]["rl_gain_points"]
    values = [per_seed[s]["rl_gain_points"] for s in (0, 1)]
    assert m["values"] == values and m["n"] == 2
    assert m["mean"] == pytest.approx(sum(values) / 2)
    assert m["sd"] == pytest.approx(abs(values[0] - values[1]) / 2**0.5)
    assert {"sft_heldout_greedy", "rl_heldout_greedy", "student_heldout_greedy", "rl_code_bpb"} <= set(
        summary["metrics"]
    )
    rows = (tmp_path / "results" / "seeds_summary.csv").read_text().splitlines()
    assert rows[0].startswith("date,machine,commit,run,metric,mean,sd,n") and len(rows) == 1 + len(summary["metrics"])
