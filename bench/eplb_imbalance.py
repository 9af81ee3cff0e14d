"""Per-GPU expert load imbalance (max / mean) before and after EPLB, from recorded expert loads.

    python -m bench.eplb_imbalance                                  # SYNTHETIC Zipf loads, DeepSeek-V3 serving shape
    python -m bench.eplb_imbalance --loads outputs/<run>/pretrain/metrics.jsonl --gpus 4 --nodes 1 --groups 1
    python -m bench.eplb_imbalance --loads loads.npy --gpus 8 --nodes 2 --groups 4 --redundant 8

Loads: a ``.npy`` or ``.json`` array [layers, experts] (or [experts]), or a trainer ``metrics.jsonl`` whose lines
carry ``expert_load`` ([layers][experts] per logged step; summed over the lines). Without ``--loads``, the loads are
SYNTHETIC: per layer, tokens * top-k assignments drawn from a Zipf(s) distribution over a random permutation of the
experts; the CSV's ``source`` column says so.

"Before" places the experts in contiguous blocks, one copy each (what plain EP does); "after" is EPLB with
``--redundant`` extra slots. One row per run appends to bench/results/eplb.csv (machine, commit, date included).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import platform
from pathlib import Path

import numpy as np
import torch

from bench.common import commit as git_commit
from train.parallel.eplb import gpu_loads, imbalance, rebalance_experts

RESULTS = Path(__file__).parent / "results" / "eplb.csv"


def load_expert_loads(path: Path) -> torch.Tensor:
    """[layers, experts] float64 from .npy, .json or metrics.jsonl (``expert_load`` lines summed)."""
    if path.suffix == ".npy":
        arr = np.load(path)
    elif path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        loads = [np.atleast_2d(np.asarray(r["expert_load"], dtype=np.float64)) for r in rows if "expert_load" in r]
        if not loads:
            raise ValueError(f"{path}: no line has an 'expert_load' field")
        arr = np.sum(loads, axis=0)
    elif path.suffix == ".json":
        data = json.loads(path.read_text())
        arr = data["expert_load"] if isinstance(data, dict) else data
    else:
        raise ValueError(f"{path}: expected .npy, .json or .jsonl")
    out = torch.as_tensor(np.atleast_2d(np.asarray(arr, dtype=np.float64)))
    if out.dim() != 2:
        raise ValueError(f"{path}: expected [layers, experts] loads, got shape {tuple(out.shape)}")
    return out


def synthetic_loads(layers: int, experts: int, tokens: int, top_k: int, s: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    probs = 1.0 / torch.arange(1, experts + 1, dtype=torch.float64) ** s
    rows = []
    for _ in range(layers):
        p = probs[torch.randperm(experts, generator=g)]
        draws = torch.multinomial(p, tokens * top_k, replacement=True, generator=g)
        rows.append(torch.bincount(draws, minlength=experts).double())
    return torch.stack(rows)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--loads", type=Path, default=None, help="npy/json/metrics.jsonl; omit for synthetic loads")
    ap.add_argument("--gpus", type=int, default=32)
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--redundant", type=int, default=32, help="extra physical slots in total")
    ap.add_argument("--layers", type=int, default=8, help="synthetic only")
    ap.add_argument("--experts", type=int, default=256, help="synthetic only")
    ap.add_argument("--zipf", type=float, default=1.0, help="synthetic only: Zipf exponent")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)

    if args.loads is None:
        weight = synthetic_loads(args.layers, args.experts, tokens=8192, top_k=8, s=args.zipf, seed=0)
        source = f"SYNTHETIC zipf(s={args.zipf}) 8192 tokens x top-8"
    else:
        weight = load_expert_loads(args.loads)
        source = str(args.loads)
    X, E = weight.shape
    P = E + args.redundant
    phy2log, _, logcnt = rebalance_experts(weight, P, args.groups, args.nodes, args.gpus)
    after = imbalance(gpu_loads(weight, phy2log, logcnt, args.gpus))
    before = imbalance(weight.view(X, args.gpus, -1).sum(-1)) if E % args.gpus == 0 else torch.full((X,), float("nan"))
    row = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.machine()}",
        "commit": git_commit(),
        "source": source,
        "layers": X,
        "experts": E,
        "groups": args.groups,
        "nodes": args.nodes,
        "gpus": args.gpus,
        "physical": P,
        "policy": "hierarchical" if args.groups % args.nodes == 0 else "global",
        "imbalance_before_mean": round(float(before.mean()), 4),
        "imbalance_before_max": round(float(before.max()), 4),
        "imbalance_after_mean": round(float(after.mean()), 4),
        "imbalance_after_max": round(float(after.max()), 4),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    new = not args.out.exists()
    with args.out.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)
    print(f"{source}: {X} layers x {E} experts -> {P} slots on {args.gpus} GPUs / {args.nodes} nodes ({row['policy']})")
    print(
        f"per-GPU load max/mean: before {row['imbalance_before_mean']:.3f} (worst {row['imbalance_before_max']:.3f})"
        f" -> after {row['imbalance_after_mean']:.3f} (worst {row['imbalance_after_max']:.3f}); wrote {args.out}"
    )
    return row


if __name__ == "__main__":
    main()
