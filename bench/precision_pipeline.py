"""The whole pipeline in fp32 and under bf16 autocast, side by side on one machine: stage wall times and final metrics.

    .venv/bin/python -m bench.precision_pipeline --prefix outputs/p1202            # runs both, then compares
    .venv/bin/python -m bench.precision_pipeline --prefix outputs/p1202 --no-launch  # compare two finished runs

`<prefix>_fp32` and `<prefix>_bf16` are two `python -m pipeline` runs, identical but for `precision=`, started
together with `OMP_NUM_THREADS=1` each: on a 2-core machine each gets one core, so both see the same machine
for the whole run (the tiny model's stages gain little from a second thread). Each run's output goes to
`<run>.log`. One row per precision goes to bench/results/pipeline_precision.csv: the pipeline's wall seconds per
stage (pipeline.json), the precision each stage recorded, and the final metrics a user reads (pretraining val bpb,
SFT / GRPO / student held-out accuracy, the eval stage's HumanEval, reasoning pass@1 and code bpb of the RL
checkpoint), with the CPU's bf16 flags. Single-seed metrics: compare them with the seeds bench's spread
(bench/seeds.py), not with each other's third digit. `make` runs the stages with `precision=auto`
(train.runtime.resolve_precision): bf16 on a CPU with native bf16 matmuls, which is where this comparison says so.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from bench.common import append_result
from bench.pipeline_stages import STAGES
from train.runtime import cpu_flags

PRECISIONS = ("fp32", "bf16")
EVAL_KEYS = ("rl/humaneval/pass@1", "rl/reasoning/pass@1", "rl/bpb/code/bpb", "pretrain/bpb/code/bpb")


def launch(runs: dict[str, Path], extra: list[str]) -> None:
    """Both pipelines at once, one core each; fails naming the run whose pipeline failed."""
    procs = {}
    for precision, run in runs.items():
        cmd = [sys.executable, "-m", "pipeline", f"run.root={run.parent}", f"run.name={run.name}"]
        cmd += [f"precision={precision}", *extra]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        run.parent.mkdir(parents=True, exist_ok=True)
        log = run.parent / f"{run.name}.log"
        with open(log, "w") as out:  # the child keeps its own copy of the descriptor
            procs[precision] = (subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT), log)
    for precision, (proc, log) in procs.items():
        if proc.wait():
            raise SystemExit(f"{runs[precision]}: the pipeline failed (rc {proc.returncode}), see {log}")


def manifest(run: Path, stage: str) -> dict:
    path = run / stage / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def summarize(precision: str, run: Path) -> dict:
    record = json.loads((run / "pipeline.json").read_text())["stages"]
    manifests = {s: manifest(run, s) for s in ("pretrain", "sft", "rl", "distill", "eval")}
    pre, sft, rl, dist, ev = (m.get("metrics", {}) for m in manifests.values())
    row = {"run": run.name, "precision": precision}
    row |= {f"{s}_wall_s": record.get(s, {}).get("wall_s", "") for s in STAGES}
    row["total_wall_s"] = round(sum(record[s]["wall_s"] for s in STAGES if s in record), 1)
    # what the stage ran (its metrics, where it resolved precision=auto), else what it was configured to run
    ran = {
        s: m.get("metrics", {}).get("precision") or m.get("config", {}).get("precision") for s, m in manifests.items()
    }
    row["stage_precisions"] = " ".join(f"{s}:{p}" for s, p in ran.items() if p)
    row |= {
        "pretrain_val_bpb": pre.get("val_bpb"),
        "sft_eval_accuracy": sft.get("eval_accuracy"),
        "rl_eval_accuracy": rl.get("eval_accuracy"),
        "student_eval_accuracy": dist.get("eval_accuracy"),
    }
    row |= {k.replace("/", "_").replace("@", "_at_"): ev.get(k) for k in EVAL_KEYS}
    row["cpu_flags"] = " ".join(cpu_flags())
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prefix", type=Path, required=True, help="runs <prefix>_fp32 and <prefix>_bf16")
    ap.add_argument("--no-launch", action="store_true", help="compare two finished runs")
    ap.add_argument("--note", default="", help="what else the machine ran meanwhile (kept in every row)")
    ap.add_argument("--no-csv", action="store_true")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for both runs (e.g. experiment=smoke)")
    args = ap.parse_args(argv)
    runs = {p: args.prefix.parent / f"{args.prefix.name}_{p}" for p in PRECISIONS}
    if not args.no_launch:
        launch(runs, args.overrides)
    rows = []
    for precision, run in runs.items():
        row = summarize(precision, run) | {"note": args.note}
        rows.append(row)
        print(json.dumps(row))
        if not args.no_csv:
            append_result("pipeline_precision", row)
    return rows


if __name__ == "__main__":
    main()
