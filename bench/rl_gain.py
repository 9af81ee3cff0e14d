"""Does GRPO improve on its SFT starting point? Held-out accuracy of a run's SFT and RL checkpoints, same grader.

    python -m bench.rl_gain --run outputs/<run>                     # greedy, the whole held-out split
    python -m bench.rl_gain --run outputs/<run> --temperature 1 --k 4   # pass@1 averaged over 4 samples at T=1
    make sft rl RUN=<run> && python -m bench.rl_gain --run outputs/<run>

Both checkpoints (the newest of `sft/checkpoints/` and of `rl/checkpoints/`) are scored on the `test` split of
`data/reasoning` with `train.grpo.evaluate_accuracy`: the same chat template, the same generation engine, and the
grader whose score GRPO optimized (`rewards.graders.task_reward`: numeric match for arithmetic, the Countdown
expression verified by rule). Prints both accuracies with their 95% intervals over prompts (Wilson when greedy, else the
bootstrap of per-prompt means), the difference (points, absolute) with its paired bootstrap interval (both
checkpoints answer the same prompts, so the gain is resampled prompt by prompt) and the rate of completions that
reason in `<think>`; appends one row to bench/results/rl_gain.csv (`bench.common.append_result`: machine, commit,
date) with per-kind accuracies, the accuracy of the completions that reason and of those that answer directly, and
the stages' wall times from their manifests.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench.common import append_result
from eval.stats import bootstrap_interval, problem_interval
from rewards.graders import shows_thinking


def per_prompt_accuracy(samples: list[tuple], n_prompts: int, k: int) -> list[float]:
    """Mean correctness of each prompt's k samples (samples are prompt-major)."""
    return [sum(s[2] for s in samples[i * k : (i + 1) * k]) / k for i in range(n_prompts)]


def stage_wall_time(stage_dir: Path) -> float | None:
    m = stage_dir / "manifest.json"
    return json.loads(m.read_text()).get("wall_time_s") if m.is_file() else None


def main(argv: list[str] | None = None) -> dict:
    from datasets import load_from_disk

    from data.outputs import stage_outputs
    from data.tokenizer import load_tokenizer
    from train.grpo import evaluate_accuracy, load_policy, newest_checkpoint

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="a run directory: outputs/<run>")
    ap.add_argument("--n", type=int, default=0, help="held-out prompts scored (0 = the whole test split)")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--k", type=int, default=1, help="samples per prompt (pass@1 averaged over k; needs T > 0)")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.temperature == 0 and args.k != 1:
        raise ValueError("--k > 1 needs --temperature > 0 (greedy decoding draws one answer per prompt)")

    data = stage_outputs(args.run / "data")
    tok = load_tokenizer(data["tokenizer"])
    rows = load_from_disk(str(data["reasoning"]))["test"].to_list()[: args.n or None]
    if not rows:
        raise ValueError(f"the held-out split of {data['reasoning']} is empty")
    device = torch.device("cpu")
    results = {}
    for stage in ("sft", "rl"):
        ckpt = newest_checkpoint(args.run / stage / "checkpoints")
        model, _ = load_policy(ckpt, "fp32", "auto", device)
        t0 = time.perf_counter()
        ev = evaluate_accuracy(
            model,
            tok,
            rows,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            k=args.k,
            batch_size=args.batch_size,
            seed=args.seed,
        )
        results[stage] = ev | {"checkpoint": str(ckpt), "eval_s": time.perf_counter() - t0}
        print(
            f"{stage:>3}: accuracy {ev['accuracy']:.3f}  format {ev['format_rate']:.3f}  "
            f"think {ev['think_rate']:.3f}  length {ev['response_len']:.1f} tokens  ({ckpt})"
        )
    gain = results["rl"]["accuracy"] - results["sft"]["accuracy"]
    acc = {st: per_prompt_accuracy(results[st]["samples"], len(rows), args.k) for st in ("sft", "rl")}
    intervals = {f"{st}_accuracy": problem_interval(acc[st]) for st in ("sft", "rl")}
    lo, hi = bootstrap_interval([b - a for a, b in zip(acc["sft"], acc["rl"])])
    intervals["gain_points"] = (100 * lo, 100 * hi)
    kinds = sorted({r["kind"] for r in rows})
    by_kind, by_style = {}, {}
    for stage in ("sft", "rl"):
        samples = results[stage]["samples"]  # prompt-major: prompt i's k samples sit at i * k .. i * k + k - 1
        for kind in kinds:
            idx = [i * args.k + j for i, r in enumerate(rows) if r["kind"] == kind for j in range(args.k)]
            by_kind[f"{stage}_{kind}"] = round(sum(samples[i][2] for i in idx) / max(1, len(idx)), 4)
        # accuracy of the completions that reasoned in <think> and of those that answered directly
        for style, keep in (("think", True), ("direct", False)):
            scores = [s[2] for s in samples if shows_thinking(s[1]) is keep]
            by_style[f"{stage}_{style}_accuracy"] = round(sum(scores) / len(scores), 4) if scores else ""
    row = {
        "run": str(args.run),
        "n_test": len(rows),
        "decoding": "greedy" if args.temperature == 0 else f"pass@1 over k={args.k} at T={args.temperature}",
        "sft_accuracy": round(results["sft"]["accuracy"], 4),
        "rl_accuracy": round(results["rl"]["accuracy"], 4),
        "gain_points": round(100 * gain, 2),
        **{
            f"{k}_ci_{end}": round(v, 4)
            for k, (lo_, hi_) in intervals.items()
            for end, v in (("low", lo_), ("high", hi_))
        },
        **by_kind,
        "sft_format_rate": round(results["sft"]["format_rate"], 4),
        "rl_format_rate": round(results["rl"]["format_rate"], 4),
        "sft_response_len": round(results["sft"]["response_len"], 2),
        "rl_response_len": round(results["rl"]["response_len"], 2),
        "sft_wall_s": stage_wall_time(args.run / "sft"),
        "rl_wall_s": stage_wall_time(args.run / "rl"),
        "grader_errors": results["sft"]["grader_errors"] + results["rl"]["grader_errors"],
        "sft_think_rate": round(results["sft"]["think_rate"], 4),
        "rl_think_rate": round(results["rl"]["think_rate"], 4),
        **by_style,
    }
    path = append_result("rl_gain", row)
    print(
        f"gain: {100 * gain:+.1f} points absolute, 95% [{intervals['gain_points'][0]:+.1f}, "
        f"{intervals['gain_points'][1]:+.1f}] (SFT {row['sft_accuracy']:.3f} -> RL {row['rl_accuracy']:.3f}); "
        f"think rate {row['sft_think_rate']:.2f} -> {row['rl_think_rate']:.2f}; wrote {path}"
    )
    return row


if __name__ == "__main__":
    main()
