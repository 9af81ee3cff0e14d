"""What the eval stage costs per checkpoint at the CPU default, suite by suite, and how long HumanEval bodies are.

    python -m bench.eval_cost --run outputs/<run>                   # the run's tokenizer, a random-init tiny model
    python -m bench.eval_cost --run outputs/<run> --ckpt outputs/<run>/rl/checkpoints/step_000150
    python -m bench.eval_cost --run outputs/<run> --suites humaneval --overrides eval.humaneval.max_new_tokens=256
    python -m bench.eval_cost --run outputs/<run> --ckpt <ckpt> --suites humaneval --stop-sequences on off --repeats 2

HumanEval decoding stops at EOS, at the Codex stop sequences (`eval.humaneval.stop_sequences`, default on) or at
`max_new_tokens`; `--stop-sequences on off` runs the suite both ways in one process, side by side, and reports
whether the scored programs are the same (they must be: the scorer cuts at the same sequences). A model that never
emits EOS or a stop sequence, such as a random-init one, costs the most: without `--ckpt` the figures are the upper
bound for a tiny-model checkpoint. Also reports the canonical HumanEval bodies' length in the run's tokens (median,
99th percentile, max): the room `eval.humaneval.max_new_tokens` must leave to finish a function. Appends one row per
suite (and stop mode) to bench/results/eval_cost.csv, with the machine's load average at the start and end of the
suite (on a shared machine, a load above the core count slows every figure).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import append_result


def main(argv: list[str] | None = None) -> list[dict]:
    from data.tokenizer import load_tokenizer
    from eval.checkpoints import load_checkpoint
    from eval.run import evaluate_checkpoint
    from model.generate import generate
    from pipeline.config import compose
    from rewards.humaneval import load_problems
    from train.runtime import build_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="a run directory with a data stage")
    ap.add_argument("--ckpt", type=Path, default=None, help="a checkpoint (default: a random-init model preset)")
    ap.add_argument("--suites", nargs="*", default=["bpb", "fim", "humaneval", "reasoning", "moe"])
    ap.add_argument("--overrides", nargs="*", default=[], help="Hydra overrides (eval.*, model=...)")
    ap.add_argument("--stop-sequences", nargs="+", choices=["on", "off"], default=None, help="HumanEval decoding modes")
    ap.add_argument("--repeats", type=int, default=1, help="run the whole list this many times (timing spread)")
    args = ap.parse_args(argv)

    cfg = compose(["wandb.mode=disabled", *args.overrides])
    tok = load_tokenizer(args.run / "data" / "tokenizer.json")
    lengths = np.array([len(tok.encode(p.canonical_solution).ids) for p in load_problems()])
    body = {"body_tokens_median": float(np.median(lengths)), "body_tokens_p99": float(np.percentile(lengths, 99))}
    body["body_tokens_max"] = int(lengths.max())
    print(f"canonical HumanEval bodies, in tokens: {body}")
    torch.manual_seed(0)
    if args.ckpt is not None:
        model = load_checkpoint(args.ckpt)
    else:
        cfg.model.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        model = build_model(cfg.model, "fp32", "auto", torch.device("cpu")).eval()
    data = {k: args.run / "data" / k for k in ("val", "reasoning", "train")}
    generate(model, [[1, 2, 3]], max_new_tokens=4)  # warm-up, so that the first suite timed pays no first-call cost
    modes = args.stop_sequences or ["on" if cfg.eval.humaneval.stop_sequences else "off"]
    runs = [(s, m) for _ in range(args.repeats) for s in args.suites for m in (modes if s == "humaneval" else [None])]
    programs: dict[str, list[str]] = {}  # stop mode -> the scored HumanEval programs' completions
    rows = []
    for suite, mode in runs:
        ecfg = cfg.eval
        for other in ("bpb", "fim", "humaneval", "reasoning", "moe"):
            getattr(ecfg, other).enabled = other == suite
        ecfg.humaneval.stop_sequences = mode != "off"
        load0 = os.getloadavg()[0]
        t0, cpu0 = time.perf_counter(), time.process_time()
        if suite == "humaneval":
            res, programs[mode] = humaneval(model, tok, ecfg)
            other = programs.get("off" if mode == "on" else "on")
        else:
            res = evaluate_checkpoint(model, tok, ecfg, data, "fp32")
        row = {
            "suite": suite,
            "model": str(args.ckpt) if args.ckpt else "random-init model preset (upper bound)",
            "seconds": round(time.perf_counter() - t0, 1),
            "cpu_s": round(time.process_time() - cpu0, 1),  # this process's CPU time (all threads + sandbox excluded)
            "generated_tokens": res["generation"]["generated_tokens"],
            "prompts": res["generation"]["prompts"],
            "finished_early": res["generation"].get("finished_early"),  # completions that ended at EOS / a stop
            "config": str(getattr(ecfg, suite)),
            "load_avg_start_end": f"{load0:.1f} {os.getloadavg()[0]:.1f}",  # other jobs on the machine inflate it
            "torch_threads": torch.get_num_threads(),  # OMP_NUM_THREADS; on a loaded machine more threads can be slower
            **body,
        }
        if suite == "humaneval":
            row |= {"stop_sequences": mode, "pass@1": res["humaneval"]["pass@1"]}
            if other is not None:  # are the scored programs those of the other mode's last run?
                same = [x == y for x, y in zip(programs[mode], other, strict=True)]
                row["same_programs_as_other_mode"] = sum(same) / len(same)
        rows.append(row)
        append_result("eval_cost", row)
        extra = f", stop sequences {mode}, pass@1 {row['pass@1']:.4f}" if suite == "humaneval" else ""
        print(f"{suite}: {row['seconds']} s, {row['prompts']} prompts, {row['generated_tokens']} new tokens{extra}")
    return rows


def humaneval(model, tok, ecfg) -> tuple[dict, list[str]]:
    """The HumanEval suite as `eval.run.evaluate_checkpoint` runs it, also returning the scored completions (each
    cut at the stop sequences, as the scorer sees it)."""
    from eval.generation import ModelGenerator
    from eval.suite_code import run_humaneval
    from rewards.humaneval import load_problems, truncate_completion

    gen = ModelGenerator(model, tok, precision="fp32", seed=ecfg.seed, batch_size=ecfg.humaneval.batch_size)
    seen: list[str] = []

    def recording(prompts, sampling):
        out = gen(prompts, sampling)
        seen.extend(truncate_completion(c) for cs in out for c in cs)
        return out

    res = run_humaneval(recording, load_problems(), ecfg.humaneval, ecfg.sandbox_workers, ecfg.table_rows)
    return {"humaneval": res.metrics, "generation": gen.stats}, seen


if __name__ == "__main__":
    main()
