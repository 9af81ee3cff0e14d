"""What W&B costs a training step: pretraining (smoke scale) with W&B offline vs disabled, side by side in one run.

    python -m pipeline experiment=smoke pipeline.stages=[data]     # once: the smoke data stage, outputs/smoke/data
    python -m bench.wandb_overhead --run smoke                     # 3 repeats x (disabled, offline), 30 steps each
    python -m bench.wandb_overhead --run smoke --repeats 5 --steps 60

The two modes alternate in one process on the same data, seed and config (`train=smoke`, one log row per step), so
drift of a shared machine falls on both. Per run: the median training throughput over steps 2.. (a step's time
includes logging the previous step, so the W&B call is inside it), the median step time, and the stage's wall time
(W&B's init and finish included). A third measure times the tracker's `log` call alone on a pretraining-sized row.
Appends one row per run and mode to bench/results/wandb_overhead.csv; prints the ratio and the per-step overhead with
the spread over repeats.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import append_result

ROW = {"loss": 2.5, "ce_loss": 2.4, "mtp_loss": 2.6, "balance_loss": 0.01, "lr": 3e-4, "grad_norm": 0.9}
ROW |= {"tokens_per_s": 1e4, "mfu": 0.01, "mem_mb": 100.0, "tokens": 1024, "maxvio_batch": 0.5, "maxvio_cum": 0.4}
ROW |= {f"maxvio_batch/layer{i}": 0.5 for i in range(4)}


def pretrain_once(root: Path, data_run: str, data_root: str, mode: str, name: str, steps: int) -> dict:
    from pipeline.config import compose
    from train.pretrain import run as pretrain

    over = [
        f"run.root={root}",
        f"run.name={name}",
        f"wandb.mode={mode}",
        "train=smoke",
        f"train.steps={steps}",
        f"train.eval_every={steps}",
        f"train.ckpt_every={steps}",
        "train.export_hf=false",
    ]
    src = Path(data_root) / data_run / "data"
    (root / name).mkdir(parents=True, exist_ok=True)
    (root / name / "data").symlink_to(src.resolve(), target_is_directory=True)  # the same data, no copy
    t0 = time.perf_counter()
    result = pretrain(compose(over))
    wall = time.perf_counter() - t0
    rows = [json.loads(x) for x in (root / name / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    tok_s = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r and r["step"] > 1]
    tokens_per_step = rows[0]["tokens"] if rows else 0
    return {
        "tokens_per_s_median": statistics.median(tok_s),
        "step_ms_median": 1000 * tokens_per_step / statistics.median(tok_s),
        "stage_wall_s": round(wall, 3),
        "wandb_failures": result.get("wandb_failures", 0),
    }


def log_call_us(root: Path, mode: str, calls: int) -> float:
    """Microseconds per `Tracker.log` of a pretraining-sized row (metrics.jsonl and, offline, W&B)."""
    from pipeline.tracking import Tracker

    t = Tracker(root / f"log_{mode}", run_group="bench", stage="log", mode=mode)
    t0 = time.perf_counter()
    for step in range(1, calls + 1):
        t.log(ROW, step=step)
    per_call = (time.perf_counter() - t0) / calls * 1e6
    t.finish()
    return per_call


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default="smoke", help="run whose data stage to use (outputs/<run>/data)")
    ap.add_argument("--root", default="outputs")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--log-calls", type=int, default=2000)
    args = ap.parse_args(argv)
    if not (Path(args.root) / args.run / "data" / "manifest.json").is_file():
        make = f"python -m pipeline run.name={args.run} data=smoke pipeline.stages=[data]"
        raise SystemExit(f"no data stage at {args.root}/{args.run}/data: run `{make}` first")
    rows = []
    with tempfile.TemporaryDirectory(prefix="wandb_overhead-") as tmp:
        for rep in range(args.repeats):
            for mode in ("disabled", "offline"):
                res = pretrain_once(Path(tmp), args.run, args.root, mode, f"{mode}_{rep}", args.steps)
                res |= {"log_call_us": round(log_call_us(Path(tmp) / f"rep{rep}", mode, args.log_calls), 2)}
                row = {"mode": mode, "repeat": rep, "steps": args.steps, "data_run": args.run, **res}
                rows.append(row)
                append_result("wandb_overhead", row)
                print(json.dumps(row))
    by = {m: [r for r in rows if r["mode"] == m] for m in ("disabled", "offline")}
    ratio = [o["tokens_per_s_median"] / d["tokens_per_s_median"] for d, o in zip(by["disabled"], by["offline"])]
    extra_ms = [o["step_ms_median"] - d["step_ms_median"] for d, o in zip(by["disabled"], by["offline"])]
    extra_wall = [o["stage_wall_s"] - d["stage_wall_s"] for d, o in zip(by["disabled"], by["offline"])]
    print(
        f"tokens/s offline / disabled: median {statistics.median(ratio):.3f} (min {min(ratio):.3f}, max "
        f"{max(ratio):.3f}); step time +{statistics.median(extra_ms):.2f} ms (min {min(extra_ms):.2f}, max "
        f"{max(extra_ms):.2f}); stage wall +{statistics.median(extra_wall):.2f} s; log call "
        f"{statistics.median(r['log_call_us'] for r in by['offline']):.0f} us offline vs "
        f"{statistics.median(r['log_call_us'] for r in by['disabled']):.0f} us disabled"
    )
    return rows


if __name__ == "__main__":
    main()
