"""`bench.code_retention` at micro scale: one SFT -> GRPO chain per LM-term weight from one pretrained checkpoint,
the weight reaching both stages (and the shards their inputs only when it is > 0), one CSV row per weight."""

import csv
import json

import pytest

import bench.common
from pipeline.config import compose
from tests.e2e.conftest import clone_run

pytestmark = pytest.mark.slow


def test_code_retention_runs_one_chain_per_weight(data_run, tmp_path, monkeypatch):
    from bench.code_retention import main
    from train.pretrain import run as pretrain

    monkeypatch.setattr(bench.common, "RESULTS_DIR", tmp_path / "results")  # not the repository's bench/results
    root, overrides = data_run
    clone_run(root, "ptxbase")
    pretrain(compose([*overrides, "run.name=ptxbase", "train=smoke"]))
    over = ["experiment=smoke", "wandb.mode=disabled", "sft.export_hf=false", "rl.export_hf=false"]
    rows = main(["--run", str(root / "ptxbase"), "--lm-mix", "0", "0.5", "--jobs", "2", "--overrides", *over])

    assert [r["lm_mix_sft"] for r in rows] == [0.0, 0.5] and [r["lm_mix_rl"] for r in rows] == [0.0, 0.5]
    for row, name in zip(rows, ("ptxbase_ptx0", "ptxbase_ptx0p5")):
        for stage in ("sft", "rl"):
            m = json.loads((root / name / stage / "manifest.json").read_text())
            assert ("lm_shards" in m["inputs"]) == (row["lm_mix_sft"] > 0), (name, stage)
        assert row["pretrain_code_bpb"] == rows[0]["pretrain_code_bpb"]  # one base checkpoint for every chain
        for stage in ("pretrain", "sft", "rl"):
            assert row[f"{stage}_code_bpb_ci_low"] <= row[f"{stage}_code_bpb"] <= row[f"{stage}_code_bpb_ci_high"]
        assert row["rl_code_bpb_over_pretrain"] == pytest.approx(row["rl_code_bpb"] / row["pretrain_code_bpb"], 1e-3)
        assert 0 <= row["sft_heldout_greedy"] <= 1 and 0 <= row["rl_heldout_greedy"] <= 1
    assert rows[0]["sft_lm_loss"] == "" and rows[1]["sft_lm_loss"] > 0
    with open(tmp_path / "results" / "code_retention.csv") as f:
        assert len(list(csv.DictReader(f))) == 2
