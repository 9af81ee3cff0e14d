"""Load balancing strategies side by side: auxiliary-loss-free vs auxiliary loss vs none (tiny preset).

    python -m bench.balance RUN=default            # needs outputs/<run>/data from `make data`
    python -m bench.balance --run default --steps 200

Same seed, same data, same model; only `model.moe_balance` changes:
- aux_free: DeepSeek-V3's bias-based balancing (the bias moves by gamma against the sign of each expert's load
  error after every step) plus the small complementary sequence-wise loss;
- aux_loss: the classic auxiliary balance loss (weight model.aux_loss_alpha), no bias;
- none: neither.
Reports final validation loss and MaxVio (final batch, and cumulative over the run, averaged over MoE layers).
The DeepSeek-V3 report's claim: better balance (lower MaxVio) without the quality penalty of the auxiliary loss.
Appends one row per strategy to bench/results/balance.csv.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from bench.common import append_result


def main(argv: list[str] | None = None) -> list[dict]:
    from pipeline.config import compose
    from train.metrics import max_violation
    from train.pretrain import run as pretrain

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default="default", help="run whose data stage to use (outputs/<run>/data)")
    ap.add_argument("--root", default="outputs")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--overrides", nargs="*", default=[], help="extra Hydra overrides, e.g. train.batch_size=8")
    args = ap.parse_args(argv)
    data = Path(args.root) / args.run / "data"
    if not (data / "manifest.json").is_file():
        raise SystemExit(f"no finished data stage at {data}: run `make data RUN={args.run}` first")
    rows = []
    for mode in ("aux_free", "aux_loss", "none"):
        name = f"{args.run}_balance_{mode}"
        cfg = compose(
            [
                f"run.root={args.root}",
                f"run.name={name}",
                f"run.data_from={args.run}",
                f"model.moe_balance={mode}",
                f"train.steps={args.steps}",
                f"train.eval_every={args.steps}",
                "train.export_hf=false",
                *args.overrides,
            ]
        )
        result = pretrain(cfg)
        stage_dir = Path(args.root) / name / "pretrain"
        cum = np.load(stage_dir / "expert_load.npy")
        last = [json.loads(x) for x in (stage_dir / "metrics.jsonl").read_text().splitlines()]
        final_batch = next(r for r in reversed(last) if "maxvio_batch" in r)["maxvio_batch"]
        cum_vio = float(np.mean([max_violation(layer_load) for layer_load in torch.from_numpy(cum)]))
        row = {
            "strategy": mode,
            "steps": args.steps,
            "val_loss": round(result["val_loss"], 4),
            "maxvio_final_batch": round(final_batch, 4),
            "maxvio_cumulative": round(cum_vio, 4),
        }
        append_result("balance", row)
        rows.append(row)
        print(row)
    return rows


if __name__ == "__main__":
    main()
