"""Does post-training keep the code model? Held-out code bits per byte before and after SFT -> GRPO, for several
weights of the pretraining-LM term (`sft.lm_mix` = `rl.lm_mix`, train/lm_mix.py), from one pretrained checkpoint.

    python -m bench.code_retention --run outputs/<run> --lm-mix 0 0.3 1     # <run>: finished data and pretrain
    python -m bench.code_retention --run outputs/<run> --lm-mix 0 1 --jobs 2 --overrides rl.steps=100
    python -m bench.code_retention --run outputs/<run> --lm-mix 0 --overrides experiment=smoke   # micro scale

For each weight w the post-training chain runs as its own pipeline run `outputs/<run>_ptx<w><tag>/` (`python -m pipeline
pipeline.stages=[sft,rl] run.data_from=<run> sft.init=<run's newest pretrain checkpoint> sft.lm_mix=w rl.lm_mix=w`,
`--jobs` chains at a time; a finished chain is skipped, as the pipeline always does), so every chain starts from the
same data and weights and only the weight differs. Then, per chain:
- held-out code bpb of the pretrained, SFT and RL checkpoints: HumanEval's 164 programs (prompt + canonical
  solution, removed from the training corpus by the data stage), `eval.suite_lm.code_bpb`, with the bootstrap
  interval over programs, and the RL figure over the pretrained one (the issue's goal: <= 1.10);
- held-out reasoning greedy accuracy after SFT and after RL (the GRPO stage scores both checkpoints on `rl.eval_n`
  test prompts with the training grader, read from its manifest) and the gain in points;
- the final LM loss of each stage (next-token CE on its pretraining batch) and the stages' wall times.

Appends one row per weight to bench/results/code_retention.csv (`bench.common.append_result`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from bench.common import append_result

REPO = Path(__file__).resolve().parent.parent


def chain_name(run_dir: Path, weight: float, tag: str = "") -> str:
    return f"{run_dir.name}_ptx{weight:g}".replace(".", "p") + tag


def chain_command(run_dir: Path, weight: float, init: Path, overrides: list[str], tag: str = "") -> list[str]:
    """The pipeline command of one weight's SFT -> GRPO chain."""
    cmd = [sys.executable, "-m", "pipeline", "pipeline.stages=[sft,rl]", f"run.root={run_dir.parent}"]
    cmd += [f"run.name={chain_name(run_dir, weight, tag)}", f"run.data_from={run_dir.name}", f"sft.init={init}"]
    return cmd + [f"sft.lm_mix={weight}", f"rl.lm_mix={weight}", *overrides]


def run_chains(run_dir: Path, weights: list[float], init: Path, overrides: list[str], jobs: int, tag: str = "") -> None:
    """Every weight's chain, `jobs` at a time; each one's output goes to <chain>/bench.log."""
    env = os.environ | {"PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    pending = list(weights)
    running: list[tuple[float, subprocess.Popen, object]] = []
    failed = []
    while pending or running:
        while pending and len(running) < jobs:
            w = pending.pop(0)
            cmd = chain_command(run_dir, w, init, overrides, tag)
            log_path = run_dir.parent / chain_name(run_dir, w, tag) / "bench.log"
            log_path.parent.mkdir(parents=True, exist_ok=True)
            print(f"[code_retention] lm_mix={w:g}: {' '.join(cmd[1:])}  (log: {log_path})", flush=True)
            log = open(log_path, "a")  # noqa: SIM115  (closed when the process ends)
            running.append((w, subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), log))
        w, proc, log = running.pop(0)
        if proc.wait() != 0:
            failed.append(w)
        log.close()
    if failed:
        raise RuntimeError(f"the chains of lm_mix={failed} failed (see their bench.log)")


def checkpoint_code_bpb(ckpt: Path, tokenizer_path: Path) -> dict[str, float]:
    """Code bpb of one checkpoint over all 164 HumanEval programs, with its 95% interval."""
    import torch

    from data.tokenizer import load_tokenizer
    from eval.suite_lm import code_bpb
    from rewards.humaneval import load_problems
    from train.policy import load_policy

    model, _ = load_policy(ckpt, "fp32", "auto", torch.device("cpu"))
    res = code_bpb(model, load_tokenizer(tokenizer_path), load_problems())
    lo, hi = res.intervals["code/bpb"]
    return {"bpb": res.metrics["code/bpb"], "bpb_ci_low": lo, "bpb_ci_high": hi}


def manifest_metrics(stage_dir: Path) -> dict:
    m = stage_dir / "manifest.json"
    return json.loads(m.read_text()) if m.is_file() else {}


def chain_row(run_dir: Path, weight: float, base_bpb: dict, tokenizer_path: Path, tag: str = "") -> dict:
    from train.policy import newest_checkpoint

    chain = run_dir.parent / chain_name(run_dir, weight, tag)
    sft, rl = manifest_metrics(chain / "sft"), manifest_metrics(chain / "rl")
    row: dict = {"run": str(chain)}
    for stage, m in (("sft", sft), ("rl", rl)):  # a manifest's config holds what the stage read
        row |= {f"{k}_{stage}": m["config"][stage].get(k, "") for k in ("lm_mix", "lm_batch_size")}
    row |= {f"pretrain_code_{k}": round(v, 4) for k, v in base_bpb.items()}
    for stage in ("sft", "rl"):
        bpb = checkpoint_code_bpb(newest_checkpoint(chain / stage / "checkpoints"), tokenizer_path)
        row |= {f"{stage}_code_{k}": round(v, 4) for k, v in bpb.items()}
    row["rl_code_bpb_over_pretrain"] = round(row["rl_code_bpb"] / base_bpb["bpb"], 4)
    acc_sft, acc_rl = rl["metrics"].get("eval_accuracy_initial"), rl["metrics"].get("eval_accuracy")
    row |= {"n_heldout": rl["config"]["rl"]["eval_n"], "sft_heldout_greedy": acc_sft, "rl_heldout_greedy": acc_rl}
    if acc_sft is not None and acc_rl is not None:
        row["gain_points"] = round(100 * (acc_rl - acc_sft), 2)
    row |= {"sft_lm_loss": sft["metrics"].get("lm_loss", ""), "sft_ce_loss": sft["metrics"].get("ce_loss")}
    row |= {"sft_wall_s": sft.get("wall_time_s"), "rl_wall_s": rl.get("wall_time_s")}
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    from data.prepare import stage_outputs
    from train.policy import newest_checkpoint

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="a run with finished data and pretrain stages")
    ap.add_argument("--lm-mix", type=float, nargs="+", default=[0.0, 0.3, 1.0], help="weights of the LM term")
    ap.add_argument("--jobs", type=int, default=1, help="chains run at a time")
    ap.add_argument("--tag", default="", help="suffix of the chains' run names (another schedule, another chain)")
    ap.add_argument("--overrides", nargs="*", default=[], help="Hydra overrides for every chain (sft.*, rl.*, ...)")
    args = ap.parse_args(argv)

    run_dir = args.run.resolve()
    init = newest_checkpoint(run_dir / "pretrain" / "checkpoints")
    run_chains(run_dir, args.lm_mix, init, args.overrides, args.jobs, args.tag)
    tokenizer_path = stage_outputs(run_dir / "data")["tokenizer"]
    base_bpb = checkpoint_code_bpb(init, tokenizer_path)
    rows = []
    for w in args.lm_mix:
        row = chain_row(run_dir, w, base_bpb, tokenizer_path, args.tag) | {"overrides": " ".join(args.overrides)}
        path = append_result("code_retention", row)
        rows.append(row)
        print(
            f"lm_mix={w:g}: code bpb {row['pretrain_code_bpb']:.3f} (pretrain) -> {row['sft_code_bpb']:.3f} (SFT) -> "
            f"{row['rl_code_bpb']:.3f} (RL) = x{row['rl_code_bpb_over_pretrain']:.2f}; held-out greedy "
            f"{row['sft_heldout_greedy']} -> {row['rl_heldout_greedy']} ({row.get('gain_points', '?')} points); {path}"
        )
    return rows


if __name__ == "__main__":
    main()
