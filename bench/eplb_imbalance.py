"""Per-GPU expert load imbalance (max / mean) before and after EPLB, on the expert loads our own runs recorded.

    python -m bench.eplb_imbalance --run lead_default                    # outputs/lead_default/pretrain, 2 layouts
    python -m bench.eplb_imbalance --run lead_default_balance_none --gpus 4 --nodes 2 --redundant 4
    python -m bench.eplb_imbalance --loads outputs/<run>/pretrain/metrics.jsonl     # or a run dir, .npy, .json
    python -m bench.eplb_imbalance                                      # SYNTHETIC Zipf loads, V3 serving shape

Which loads. A run directory (``--run NAME`` = outputs/NAME/pretrain) gives its cumulative loads over the whole
run (``expert_load.npy``, written by train/pretrain.py at the end) when present, else the loads of the last eval
step in ``metrics.jsonl`` (the trainer logs one step's ``expert_load`` at each eval step); a ``metrics.jsonl`` path
gives its last eval step; ``.npy`` / ``.json`` give the array as is. Rows are the MoE layers in
``model.moe_layers()`` order: the main layers, then the MTP module's (the MTP row sees one token less per sequence).
Without ``--run`` / ``--loads`` the loads are SYNTHETIC: per layer, tokens * top-k draws from a Zipf(s) law over a
random permutation of the experts; the ``source`` column says so.

Placements compared, on one layout (``gpus`` GPUs in ``nodes`` nodes, ``redundant`` extra slots in total):
  before:        the identity placement, experts in contiguous blocks, one copy each (plain expert parallelism);
  hierarchical:  EPLB's hierarchical policy (expert groups packed onto nodes first), when nodes divide groups;
  global:        EPLB's global policy (replicate and pack over all GPUs, groups ignored).
A replica takes an equal share of its expert's load (what ``replica_router`` does, round-robin per expert).

Modes (one CSV row per run, layout and mode, appended to bench/results/eplb_imbalance.csv):
  in_sample:       plan and measure on the same loads: the best case, what the placement was fitted to.
  next_eval_step:  plan on the loads of eval step s, measure on eval step s + eval_every; the mean over pairs
                   (needs two eval steps: lead_default has 100/200/300/400).
  heldout:         plan on the training loads above, measure on the FINAL checkpoint's routing of the first
                   ``--heldout-batches`` validation batches (main MoE layers only: MTP does not run without targets).
The out-of-sample modes are the honest ones: a placement is always planned on past loads and served on future ones.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from bench.common import append_result
from model.eplb import gpu_loads, imbalance, rebalance_experts

OUTPUTS = Path("outputs")
RESULT_NAME = "eplb_imbalance"
REAL_LAYOUTS = [(4, 2, 4), (8, 2, 8)]  # (gpus, nodes, redundant slots): 16 experts -> 5 or 3 slots per GPU


def eval_step_loads(metrics: Path) -> dict[int, torch.Tensor]:
    """{step: [layers, experts] loads of that one step} from the ``expert_load`` lines of a trainer metrics.jsonl."""
    out = {}
    for line in metrics.read_text().splitlines():
        if line.strip() and "expert_load" in line:
            row = json.loads(line)
            if "expert_load" in row:
                out[int(row.get("step", len(out)))] = torch.as_tensor(row["expert_load"], dtype=torch.float64)
    return out


def load_expert_loads(path: Path) -> tuple[torch.Tensor, str]:
    """([layers, experts] float64 loads, which loads they are) from a run dir, metrics.jsonl, .npy or .json."""
    path = Path(path)
    if path.is_dir():
        if (path / "expert_load.npy").is_file():
            arr, what = np.load(path / "expert_load.npy"), "cumulative over the run (expert_load.npy)"
        else:
            return load_expert_loads(path / "metrics.jsonl")
    elif path.suffix == ".jsonl":
        steps = eval_step_loads(path)
        if not steps:
            raise ValueError(f"{path}: no line has an 'expert_load' field")
        last = max(steps)
        arr, what = steps[last].numpy(), f"last eval step ({last}) of metrics.jsonl"
    elif path.suffix == ".npy":
        arr, what = np.load(path), "array (.npy)"
    elif path.suffix == ".json":
        data = json.loads(path.read_text())
        arr, what = (data["expert_load"] if isinstance(data, dict) else data), "array (.json)"
    else:
        raise ValueError(f"{path}: expected a run directory, metrics.jsonl, .npy or .json")
    out = torch.as_tensor(np.atleast_2d(np.asarray(arr, dtype=np.float64)))
    if out.dim() != 2:
        raise ValueError(f"{path}: expected [layers, experts] loads, got shape {tuple(out.shape)}")
    return out, what


def synthetic_loads(layers: int, experts: int, tokens: int, top_k: int, s: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    probs = 1.0 / torch.arange(1, experts + 1, dtype=torch.float64) ** s
    rows = []
    for _ in range(layers):
        p = probs[torch.randperm(experts, generator=g)]
        draws = torch.multinomial(p, tokens * top_k, replacement=True, generator=g)
        rows.append(torch.bincount(draws, minlength=experts).double())
    return torch.stack(rows)


def heldout_loads(run_dir: Path, n_batches: int, batch_size: int = 8) -> torch.Tensor:
    """Expert loads [main MoE layers, experts] of the run's final checkpoint over the first validation batches."""
    from eval.checkpoints import load_checkpoint
    from eval.suite_lm import val_batches

    manifest = json.loads((run_dir / "manifest.json").read_text())
    ckpt = Path(manifest["metrics"]["checkpoint"])
    model = load_checkpoint(ckpt)
    seq_len = int(manifest["config"]["train"]["seq_len"])
    load_LE = None
    with torch.no_grad():
        for x, _ in val_batches(Path(manifest["inputs"]["val_shards"]["path"]), model, batch_size, n_batches, seq_len):
            l_LE = model(x).expert_load_LE.double()
            load_LE = l_LE if load_LE is None else load_LE + l_LE
    return load_LE


def compare(plan_XE: torch.Tensor, measure_XE: torch.Tensor, gpus: int, nodes: int, groups: int, phys: int) -> dict:
    """Per-layer max/mean GPU load on ``measure`` for the identity placement and the EPLB placements planned on
    ``plan``: {"before": [X], "hierarchical": [X] (NaN when nodes do not divide groups), "global": [X]}."""
    X, E = measure_XE.shape
    if E % gpus != 0:
        raise ValueError(f"the identity placement needs the {E} experts to split evenly over {gpus} GPUs")
    out = {"before": imbalance(measure_XE.view(X, gpus, -1).sum(-1))}
    for policy in ("hierarchical", "global"):
        if policy == "hierarchical" and groups % nodes != 0:
            out[policy] = torch.full((X,), float("nan"))
            continue
        phy2log, _, logcnt = rebalance_experts(plan_XE, phys, groups, nodes, gpus, policy=policy)
        out[policy] = imbalance(gpu_loads(measure_XE, phy2log, logcnt, gpus))
    return out


def _row(source: str, mode: str, plan: str, measure: str, layout: tuple, res: dict, n_layers: int) -> dict:
    gpus, nodes, groups, phys, experts = layout
    row = {"source": source, "mode": mode, "plan_loads": plan, "measure_loads": measure, "layers": n_layers}
    row |= {"experts": experts, "groups": groups, "nodes": nodes, "gpus": gpus, "physical": phys}
    for name, v in res.items():
        row[f"{name}_mean"] = round(float(v.mean()), 4)
        row[f"{name}_layers"] = "/".join(f"{float(x):.3f}" for x in v)
    return row


def run_real(src: Path, layouts: list[tuple[int, int, int]], groups: int | None, heldout_batches: int) -> list[dict]:
    weight, what = load_expert_loads(src)
    run_dir = src if src.is_dir() else src.parent
    manifest = run_dir / "manifest.json"
    if groups is None:
        groups = json.loads(manifest.read_text())["config"]["model"]["n_group"] if manifest.is_file() else 1
    E = weight.shape[1]
    # (mode, plan description, measure description, [(plan_XE, measure_XE)]): a mode's pairs are averaged per layer
    cases = [("in_sample", what, what, [(weight, weight)])]
    steps = eval_step_loads(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").is_file() else {}
    s = sorted(steps)
    if len(s) >= 2:
        pairs = list(zip(s[:-1], s[1:]))
        plan, meas = (", ".join(str(p[i]) for p in pairs) for i in (0, 1))
        cases.append(
            (
                "next_eval_step",
                f"eval step s in ({plan})",
                f"step s+{s[1] - s[0]} in ({meas})",
                [(steps[a], steps[b]) for a, b in pairs],
            )
        )
    if heldout_batches > 0 and manifest.is_file() and (run_dir / "checkpoints").is_dir():
        val_XE = heldout_loads(run_dir, heldout_batches)
        n = val_XE.shape[0]  # the main MoE layers: the rows of the training loads that come first
        measure = f"final checkpoint on {heldout_batches} val batches"
        cases.append(("heldout", what, measure, [(weight[:n], val_XE)]))
        if s:
            cases.append(("heldout", f"last eval step ({s[-1]})", measure, [(steps[s[-1]][:n], val_XE)]))
    rows = []
    for gpus, nodes, redundant in layouts:
        layout = (gpus, nodes, groups, E + redundant, E)
        for mode, plan, measure, pairs in cases:
            per_pair = [compare(p_XE, m_XE, gpus, nodes, groups, E + redundant) for p_XE, m_XE in pairs]
            res = {k: torch.stack([r[k] for r in per_pair]).mean(0) for k in per_pair[0]}
            rows.append(_row(str(src), mode, plan, measure, layout, res, len(res["before"])))
    return rows


def report(rows: list[dict]) -> None:
    for r in rows:
        print(
            f"{r['source']} [{r['mode']}] {r['experts']} experts -> {r['physical']} slots on {r['gpus']} GPUs /"
            f" {r['nodes']} nodes, {r['groups']} groups; plan: {r['plan_loads']}; measured: {r['measure_loads']}"
        )
        for name in ("before", "hierarchical", "global"):
            print(f"    {name:>12}: mean {r[f'{name}_mean']:.3f}   per layer {r[f'{name}_layers']}")


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--run", default=None, help="a run name: loads from outputs/<run>/pretrain")
    src.add_argument("--loads", type=Path, default=None, help="run dir, metrics.jsonl, .npy or .json")
    ap.add_argument("--gpus", type=int, default=None)
    ap.add_argument("--nodes", type=int, default=None)
    ap.add_argument("--groups", type=int, default=None, help="expert groups (default: the run's n_group, else 1)")
    ap.add_argument("--redundant", type=int, default=None, help="extra physical slots in total")
    ap.add_argument("--heldout-batches", type=int, default=8, help="validation batches for the heldout mode (0: off)")
    ap.add_argument("--layers", type=int, default=8, help="synthetic only")
    ap.add_argument("--experts", type=int, default=256, help="synthetic only")
    ap.add_argument("--zipf", type=float, default=1.0, help="synthetic only: Zipf exponent")
    ap.add_argument("--result", default=RESULT_NAME, help="bench/results/<result>.csv")
    args = ap.parse_args(argv)

    given = (args.gpus, args.nodes, args.redundant)
    if args.run is None and args.loads is None:
        gpus, nodes, redundant = (a if a is not None else d for a, d in zip(given, (32, 4, 32)))
        groups = args.groups if args.groups is not None else 8
        weight = synthetic_loads(args.layers, args.experts, tokens=8192, top_k=8, s=args.zipf, seed=0)
        what = f"SYNTHETIC zipf(s={args.zipf}) 8192 tokens x top-8"
        X, E = weight.shape
        res = compare(weight, weight, gpus, nodes, groups, E + redundant)
        rows = [_row("SYNTHETIC", "in_sample", what, what, (gpus, nodes, groups, E + redundant, E), res, X)]
    else:
        path = OUTPUTS / args.run / "pretrain" if args.run is not None else args.loads
        if all(a is None for a in given):
            layouts = REAL_LAYOUTS
        elif any(a is None for a in given):
            raise ValueError("give all of --gpus, --nodes, --redundant, or none (the default layouts)")
        else:
            layouts = [given]
        rows = run_real(path, layouts, args.groups, args.heldout_batches)
    for row in rows:
        out = append_result(args.result, row)
    report(rows)
    print(f"appended {len(rows)} rows to {out}")
    return rows


if __name__ == "__main__":
    main()
