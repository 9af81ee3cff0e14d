"""The report on a synthetic run directory: every section drawn from files built here, and nothing but lines saying
what is missing when the files are not there."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from eval.report import loss_curves, main, series, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def manifest(stage: str, wall: float, precision: str = "bf16") -> dict:
    return {
        "stage": stage,
        "config": {"precision": precision},
        "code": {"sha": "abc1234def", "dirty": False},
        "wall_time_s": wall,
        "finished_at": "2026-11-25T00:00:00Z",
        "host": {"python": "3.11.7", "platform": "Linux-x86_64", "cpus": 2},
    }


def make_run(root: Path, name: str, precision: str = "bf16", loss0: float = 6.0) -> Path:
    run = root / name
    for stage, wall in (("data", 3.5), ("pretrain", 120.0), ("sft", 40.0), ("rl", 80.0), ("eval", 30.0)):
        (run / stage).mkdir(parents=True)
        (run / stage / "manifest.json").write_text(json.dumps(manifest(stage, wall, precision)))
    write_jsonl(
        run / "pretrain" / "metrics.jsonl",
        [
            {"step": s, "loss": loss0 - 0.1 * s, **({"val_loss": loss0 - 0.09 * s} if s % 5 == 0 else {})}
            for s in range(1, 21)
        ],
    )
    write_jsonl(run / "sft" / "metrics.jsonl", [{"step": s, "loss": 2.0 / s} for s in range(1, 6)])
    write_jsonl(
        run / "rl" / "metrics.jsonl",
        [{"step": s, "reward_mean": 0.1 * s, "accuracy": 0.05 * s, "response_len": 40 + s} for s in range(1, 11)],
    )
    np.save(run / "pretrain" / "expert_load.npy", np.array([[10.0, 10.0, 10.0, 10.0], [40.0, 0.0, 0.0, 0.0]]))
    eval_json = {
        label: {
            "bpb": {
                "val/bpb": bpb,
                "code/bpb": 2 * bpb,
                "val/mix": "mixed",
                "seconds": 1.0,
                "ci": {"val/bpb": [bpb - 0.125, bpb + 0.125]},
                "floor": {"val/bpb": {"uniform": 12.0, "unigram": 6.5}},
            },
            "reasoning": {
                "pass@1": acc,
                "gsm8k/skipped": "no data",
                "ci": {"pass@1": [acc / 2, 1.0]},
                "floor": {"pass@1": {"empty": 0.0, "copy_prompt": 0.0625}},
            },
            "moe": {"maxvio": 0.5, "expert_load": [[1, 2]]},
            "checkpoint": {"path": f"{label}/step_1"},
            "generation": {"prompts": 3},
        }
        for label, bpb, acc in (("rl", 1.25, 0.75), ("pretrain", 1.5, 0.125), ("sft", 1.375, 0.5))
    }
    (run / "eval" / "eval.json").write_text(json.dumps(eval_json))
    summary = {
        "seeds": [0, 1, 2],
        "command": "python -m bench.seeds --run r --seeds 0 1 2",
        "metrics": {
            "rl_gain_points": {"mean": 10.5, "sd": 2.5, "n": 3, "ci_low": 4.3, "ci_high": 16.7, "values": [8, 10.5, 13]}
        },
    }
    (run / "seeds").mkdir()
    (run / "seeds" / "summary.json").write_text(json.dumps(summary))
    (run / "pipeline.json").write_text(json.dumps({"stages": {"pretrain": {"wall_s": 121.0, "peak_rss_mb": 900.5}}}))
    return run


@pytest.fixture
def fp8_csv(tmp_path) -> Path:
    path = tmp_path / "fp8_accumulation.csv"
    lines = ["date,commit,machine,dist,acc_bits,group,M,N,K,trials,mode,max_rel_err,norm_rel_err"]
    for k in (128, 1024, 4096):
        for mode, err in (("limited", 1e-4 * k), ("promoted", 5e-4), ("fp32", 1e-7)):
            lines.append(f"2026-11-25T00:00:00,abc,vm,normal,14,4,64,64,{k},2,{mode},{err},{err / 2}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_report_of_a_complete_run(tmp_path, fp8_csv):
    run = make_run(tmp_path, "bf16run")
    other = make_run(tmp_path, "fp8run", precision="fp8", loss0=6.2)
    out = write_report(run, compare=other, wandb_mode="disabled", fp8_csv=fp8_csv)
    text = out.read_text()
    assert out == run / "report.md"
    for name in ("loss_curves", "precision_compare", "rl_curves", "expert_load", "fp8_accumulation"):
        png = run / "report" / f"{name}.png"
        assert png.read_bytes()[:8] == PNG_MAGIC, name
        assert f"](report/{name}.png)" in text
    assert "missing" not in text
    # environment: code version, packages, hardware, wall time per stage (pipeline.json's peak memory too)
    assert "abc1234def" in text and "torch " in text and "2 CPUs" in text
    assert "| pretrain | 120 | 900.5 |" in text and "| rl | 80 |" in text
    # the metric table: checkpoints in pipeline order, every scalar metric, lists and timings left out
    assert "| metric | floor | pretrain | sft | rl |" in text
    assert (
        "| bpb/val/bpb | uniform 12; unigram 6.5 | 1.5 [1.375, 1.625] | 1.375 [1.25, 1.5] | 1.25 [1.125, 1.375] |"
        in text
    )
    assert (
        "| reasoning/pass@1 | empty 0; copy_prompt 0.0625 | 0.125 [0.0625, 1] | 0.5 [0.25, 1] | 0.75 [0.375, 1] |"
        in text
    )
    assert "| reasoning/gsm8k/skipped | - | no data | no data | no data |" in text
    assert "end-of-sequence targets are excluded" in text  # the report says what bits per byte count
    # post-training's effect on code, against the pretrained base
    assert "against pretrain's 3: sft 2.75 (0.92x, within 10%); rl 2.5 (0.83x, within 10%)" in text
    # seeds: mean +- sd (N), the t interval, every seed's value
    assert "| rl_gain_points | 10.5 +- 2.5 (3) | [4.3, 16.7] | 8, 10.5, 13 |" in text
    assert "expert_load" not in text.split("## Evaluation")[1].split("## Loss")[0]
    assert "seconds" not in text
    assert "bf16run (bf16) against fp8run (fp8)" in text
    assert "MaxVio over the whole run, per MoE layer: 0.000, 3.000" in text


def test_report_of_an_empty_run_says_what_is_missing(tmp_path):
    run = tmp_path / "empty"
    run.mkdir()
    out = write_report(run, compare=tmp_path / "nowhere", wandb_mode="disabled", fp8_csv=tmp_path / "none.csv")
    text = out.read_text()
    for what in (
        "seeds/summary.json",
        "eval.json",
        "pretrain/metrics.jsonl",
        "rl/metrics.jsonl",
        "expert_load.npy",
        "none.csv",
        "pipeline.json",
    ):
        assert what in text, what
    assert "![" not in text  # no figure without data
    with pytest.raises(FileNotFoundError):
        write_report(tmp_path / "does-not-exist", wandb_mode="disabled")


def test_malformed_inputs_cost_only_their_section(tmp_path, fp8_csv):
    run = make_run(tmp_path, "r")
    (run / "eval" / "eval.json").write_text("{not json")
    np.save(run / "pretrain" / "expert_load.npy", np.zeros(3))
    write_jsonl(run / "rl" / "metrics.jsonl", [{"step": 1, "loss": 1.0}])  # no reward logged
    (run / "sft" / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')  # killed mid-write
    text = write_report(run, wandb_mode="disabled", fp8_csv=fp8_csv).read_text()
    assert "missing: " in text and "eval.json" in text and "holds no per-layer load" in text
    assert (run / "report" / "loss_curves.png").is_file() and (run / "report" / "fp8_accumulation.png").is_file()


def test_series_keeps_the_last_value_of_a_re_logged_step():
    rows = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}, {"step": 2, "loss": 1.5}, {"step": 3, "lr": 1}]
    assert series(rows, "loss") == ([1, 2], [3.0, 1.5])


def test_train_curve_is_the_cross_entropy_when_logged():
    """`loss` carries the MTP and balance terms; the validation figure is CE alone, so the train curve is too."""
    rows = [{"step": 1, "loss": 9.0, "ce_loss": 7.0}, {"step": 2, "loss": 8.0, "ce_loss": 6.0, "val_loss": 6.5}]
    assert loss_curves(rows) == {"train": ([1, 2], [7.0, 6.0]), "val_loss": ([2], [6.5])}
    assert loss_curves([{"step": 1, "loss": 2.0}])["train"] == ([1], [2.0])


def test_command_line(tmp_path, fp8_csv, capsys):
    run = make_run(tmp_path, "cli")
    main([f"run={run}", "--wandb", "disabled", "--fp8-csv", str(fp8_csv)])
    assert (run / "report.md").is_file() and str(run / "report.md") in capsys.readouterr().out
