"""FP8 against BF16 pretraining of the tiny model: same seed, same data, same steps.

    python -m bench.fp8_vs_bf16 --run default --steps 200      # needs outputs/<run>/data (make data RUN=...)
    make fp8-study RUN=default

Both runs read the data stage of `--run` (run.data_from) and write `outputs/<run>_fp8study_{bf16,fp8}/pretrain/`.
For every logged step it computes the relative difference (fp8 - bf16) / bf16 of the training loss, and at the
evaluation steps of the validation loss. DeepSeek-V3 reports the relative loss error of its FP8 training staying
below 0.25% against BF16; this script reports ours (final step and the mean over the last 20% of steps) and
appends it to bench/results/fp8_vs_bf16.csv. The per-step curves go to outputs/<run>_fp8study_curve.csv for the report.
On a CPU the FP8 path runs the PyTorch reference of the kernels (same quantization numerics as the Triton kernels;
`kernels.backend=triton` with TRITON_INTERPRET=1 runs the kernels themselves, much slower).

Like for like. Both runs train under BF16 autocast; the FP8 layers write their outputs in the autocast dtype, BF16,
as the BF16 run's `nn.Linear` does and as DeepSeek-V3's FP8 GEMMs do (`kernels.fp8_linear.compute_dtype`). Rows
measured before that change (no `fp8_outputs` column) compared FP8 layers with FP32 outputs against BF16 ones.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from bench.common import append_result


def _metrics(stage_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]


def main(argv: list[str] | None = None) -> dict:
    from pipeline.config import compose
    from train.pretrain import run as pretrain

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default="default", help="run whose data stage to use")
    ap.add_argument("--root", default="outputs")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--overrides", nargs="*", default=[])
    args = ap.parse_args(argv)
    if not (Path(args.root) / args.run / "data" / "manifest.json").is_file():
        raise SystemExit(f"no finished data stage in {args.root}/{args.run}: run `make data RUN={args.run}` first")
    runs = {}
    for precision in ("bf16", "fp8"):
        name = f"{args.run}_fp8study_{precision}"
        cfg = compose(
            [
                f"run.root={args.root}",
                f"run.name={name}",
                f"run.data_from={args.run}",
                f"precision={precision}",
                f"train.steps={args.steps}",
                "train.export_hf=false",
                f"train.eval_every={max(1, args.steps // 4)}",
                *args.overrides,
            ]
        )
        pretrain(cfg)
        runs[precision] = {r["step"]: r for r in _metrics(Path(args.root) / name / "pretrain") if "loss" in r}
    steps = sorted(set(runs["bf16"]) & set(runs["fp8"]))
    curve = []
    for s in steps:
        b, f = runs["bf16"][s], runs["fp8"][s]
        row = {
            "step": s,
            "loss_bf16": b["loss"],
            "loss_fp8": f["loss"],
            "rel_diff": (f["loss"] - b["loss"]) / b["loss"],
        }
        if "val_loss" in b and "val_loss" in f:
            row |= {
                "val_bf16": b["val_loss"],
                "val_fp8": f["val_loss"],
                "val_rel_diff": (f["val_loss"] - b["val_loss"]) / b["val_loss"],
            }
        curve.append(row)
    curve_path = Path(args.root) / f"{args.run}_fp8study_curve.csv"
    with open(curve_path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=sorted({k for r in curve for k in r}, key=lambda k: (k != "step", k)))
        w.writeheader()
        w.writerows(curve)
    tail = curve[int(0.8 * len(curve)) :]
    vals = [r for r in curve if "val_rel_diff" in r]
    result = {
        "steps": args.steps,
        "fp8_outputs": "bf16",  # the autocast dtype (earlier rows: fp32)
        "overrides": " ".join(args.overrides),
        "final_loss_rel_diff": round(curve[-1]["rel_diff"], 5),
        "tail_mean_abs_rel_diff": round(sum(abs(r["rel_diff"]) for r in tail) / len(tail), 5),
        "final_val_rel_diff": round(vals[-1]["val_rel_diff"], 5) if vals else None,
        "final_val_bf16": vals[-1]["val_bf16"] if vals else None,
        "final_val_fp8": vals[-1]["val_fp8"] if vals else None,
    }
    append_result("fp8_vs_bf16", result)
    print(json.dumps(result, indent=1), f"\ncurve: {curve_path}")
    return result


if __name__ == "__main__":
    main()
