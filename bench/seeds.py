"""What a post-training recipe does, not what one run did: SFT -> GRPO -> distillation -> eval for N seeds, from one
pretrained checkpoint, and the mean, sd and t interval of every headline metric.

    make seeds RUN=<run> SEEDS="0 1 2"            # python -m bench.seeds --run outputs/<run> --seeds 0 1 2
    python -m bench.seeds --run outputs/<run> --seeds 0 1 2 --overrides rl.steps=200 sft.steps=600
    python -m bench.seeds --run outputs/<run> --seeds 0 1 --overrides experiment=smoke   # micro scale (the test)
    make seeds RUN=<run> ARGS="--jobs 3"          # the seeds side by side, each one's output in <run>_seed<s>.log

`<run>` must have finished its data and pretrain stages. Seed s runs the pipeline's post-training stages as
`outputs/<run>_seed<s>/` (`python -m pipeline pipeline.stages=[sft,rl,distill,eval] run.seed=<s>
run.data_from=<run> sft.init=<run's newest pretrain checkpoint> distill.student_init=<run's student base>`): the
same data, the same pretrained model and the same student base for every seed (the student base is pretrained once,
in `<run>/student_base/`, when the run has none), so only the post-training randomness (SFT batch order, GRPO
rollouts and prompt order, trace sampling, student batches) differs. A seed whose stages are already done is
skipped stage by stage, as the pipeline always does.

Headline metrics per seed, read from the files the stages wrote: held-out greedy accuracy of SFT and RL (the GRPO
stage scores both on `rl.eval_n` prompts with the training grader) and their difference in points, and the share
of those greedy answers that reason before answering, before and after GRPO; the student's
and teacher's greedy accuracy (distill manifest); from `eval/eval.json`, reasoning pass@1 (sampled, k per prompt)
and held-out code bits per byte of each checkpoint, and the code bpb after RL over the pretrained model's (from
`<run>/eval/eval.json` when the run's eval stage has scored its pretrain checkpoint).

Writes `<run>/seeds/summary.json` (what `eval.report` shows), one row per seed to `bench/results/seeds.csv` and
one row per metric (mean, sd, N, interval, the seeds' values) to `bench/results/seeds_summary.csv`, the file the
README quotes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.common import append_result

REPO = Path(__file__).resolve().parent.parent
POST_STAGES = "[sft,rl,distill,eval]"
# metric -> (stage, key in its manifest's metrics)
MANIFEST_METRICS = {
    "sft_heldout_greedy": ("rl", "eval_accuracy_initial"),
    "rl_heldout_greedy": ("rl", "eval_accuracy"),
    # greedy answers that reason (<think> with content) before and after GRPO: what the gain has tracked
    "sft_heldout_think_rate": ("rl", "eval_think_rate_initial"),
    "rl_heldout_think_rate": ("rl", "eval_think_rate"),
    "student_heldout_greedy": ("distill", "eval_accuracy"),
    "teacher_heldout_greedy": ("distill", "teacher_eval_accuracy"),
}
# metric -> (checkpoint label, suite, key) in eval/eval.json
EVAL_METRICS = {
    f"{label}_{name}": (label, suite, key)
    for label in ("sft", "rl", "student")
    for name, suite, key in (("reasoning_pass@1", "reasoning", "pass@1"), ("code_bpb", "bpb", "code/bpb"))
}


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def seed_metrics(seed_dir: Path, base_eval: dict) -> dict[str, float]:
    """The headline metrics of one seed's run directory (absent ones are left out)."""
    out: dict[str, float] = {}
    for name, (stage, key) in MANIFEST_METRICS.items():
        v = read_json(seed_dir / stage / "manifest.json").get("metrics", {}).get(key)
        if isinstance(v, int | float):
            out[name] = float(v)
    if "sft_heldout_greedy" in out and "rl_heldout_greedy" in out:
        out["rl_gain_points"] = 100 * (out["rl_heldout_greedy"] - out["sft_heldout_greedy"])
    results = read_json(seed_dir / "eval" / "eval.json")
    for name, (label, suite, key) in EVAL_METRICS.items():
        v = results.get(label, {}).get(suite, {}).get(key)
        if isinstance(v, int | float):
            out[name] = float(v)
    base = base_eval.get("pretrain", {}).get("bpb", {}).get("code/bpb")
    if isinstance(base, int | float) and "rl_code_bpb" in out:
        out["rl_code_bpb_over_pretrain"] = out["rl_code_bpb"] / base
    return out


def student_base(run_dir: Path, overrides: list[str]) -> Path:
    """The run's student base checkpoint, pretrained once (in `<run>/student_base/`) when the run has none."""
    from distill.student_base import pretrain_student_base
    from pipeline.config import compose

    cfg = compose([f"run.root={run_dir.parent}", f"run.name={run_dir.name}", *overrides])
    return pretrain_student_base(cfg)


def run_seed(
    run_dir: Path, seed: int, init: Path, base: Path, overrides: list[str], timeout: int, log: bool = False
) -> Path:
    """The post-training stages of one seed, as a pipeline run of their own; returns its run directory. With `log`
    (seeds running side by side) its output goes to `<run>_seed<s>.log` beside the run directories."""
    name = f"{run_dir.name}_seed{seed}"
    cmd = [sys.executable, "-m", "pipeline", f"pipeline.stages={POST_STAGES}", f"run.root={run_dir.parent}"]
    cmd += [f"run.name={name}", f"run.seed={seed}", f"run.data_from={run_dir.name}", f"sft.init={init}"]
    cmd += [f"distill.student_init={base}", *overrides]
    log_path = run_dir.parent / f"{name}.log"
    print(f"[seeds] seed {seed}: {' '.join(cmd[1:])}" + (f" > {log_path}" if log else ""), flush=True)
    env = os.environ | {"PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with open(log_path, "w") if log else contextlib.nullcontext() as out:
        proc = subprocess.run(
            cmd, cwd=REPO, env=env, timeout=timeout, stdout=out, stderr=subprocess.STDOUT if log else None
        )
    if proc.returncode != 0:
        raise RuntimeError(f"seed {seed} failed with exit code {proc.returncode}: {' '.join(cmd)}")
    return run_dir.parent / name


def summarize(per_seed: dict[int, dict[str, float]]) -> dict[str, dict]:
    """{metric: mean, sd, n, ci_low, ci_high, values} over the seeds that have it."""
    from eval.stats import seed_summary

    names = [m for m in {k: None for row in per_seed.values() for k in row}]
    out = {}
    for name in names:
        values = [row[name] for row in per_seed.values() if name in row]
        out[name] = seed_summary(values) | {"values": values}
    return out


def main(argv: list[str] | None = None) -> dict:
    from pipeline.io import atomic_write_json
    from train.grpo import newest_checkpoint

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="a run with finished data and pretrain stages")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument(
        "--overrides", nargs="*", action="extend", default=[], help="Hydra overrides for every seed (sft.*, rl.*, ...)"
    )
    ap.add_argument("--timeout", type=int, default=6 * 3600, help="seconds allowed for one seed's chain")
    ap.add_argument(
        "--jobs", type=int, default=1, help="seeds run side by side (each stage of a tiny model uses ~1 core)"
    )
    args = ap.parse_args(argv)

    run_dir = args.run.resolve()
    init = newest_checkpoint(run_dir / "pretrain" / "checkpoints")
    base = student_base(run_dir, args.overrides)
    base_eval = read_json(run_dir / "eval" / "eval.json")
    if args.jobs < 1:
        ap.error(f"--jobs must be >= 1, got {args.jobs}")
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:  # threads only wait: each seed is a subprocess
        futures = {
            s: pool.submit(run_seed, run_dir, s, init, base, args.overrides, args.timeout, args.jobs > 1)
            for s in args.seeds
        }
    per_seed = {}
    for seed in args.seeds:
        seed_dir = futures[seed].result()
        per_seed[seed] = seed_metrics(seed_dir, base_eval)
        append_result(
            "seeds", {"run": str(run_dir), "seed": seed, "overrides": " ".join(args.overrides)} | per_seed[seed]
        )
    summary = {
        "run": str(run_dir),
        "seeds": args.seeds,
        "pretrained_checkpoint": str(init),
        "student_base": str(base),
        "overrides": args.overrides,
        "command": "python -m bench.seeds " + " ".join(argv if argv is not None else sys.argv[1:]),
        "per_seed": per_seed,
        "metrics": summarize(per_seed),
    }
    atomic_write_json(run_dir / "seeds" / "summary.json", summary)
    for name, m in summary["metrics"].items():
        row = {"run": str(run_dir), "metric": name, **{k: m[k] for k in ("mean", "sd", "n", "ci_low", "ci_high")}}
        append_result("seeds_summary", row | {"seeds": " ".join(map(str, args.seeds)), "values": m["values"]})
        print(f"{name:<28} {m['mean']:.4g} +- {m['sd']:.3g} (N={m['n']})  per seed {m['values']}")
    print(f"wrote {run_dir / 'seeds' / 'summary.json'}")
    return summary


if __name__ == "__main__":
    main()
