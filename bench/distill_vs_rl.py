"""Distillation against RL for the same small student, at equal student compute; and SFT-only against SFT + logit KD.

    make distill RUN=<run> && python -m bench.distill_vs_rl --run outputs/<run> --seeds 0 1 2
    python -m bench.distill_vs_rl --run outputs/<run> --sft-steps 100 --rl-steps 20 --eval-n 100 --seeds 0

DeepSeek-R1 (section 4.1, table 6) reports that Qwen-32B distilled from R1 beats the same base model trained by
large-scale RL. This bench asks the same question at our scale, on one run directory whose distill stage has run
(its trace set `outputs/<run>/distill/traces/` and the teacher checkpoint named in the set's provenance):

    student_sft_ref        the `student` preset from the run's student base (pretrained, distill/student_base.py;
                           random weights when the run has none), SFT on the data's reference chains of thought
                           (`--sft-steps`): the student's own cold start
    student_sft_ref+grpo   that checkpoint, then GRPO (`--rl-steps`, train.grpo's loop and objective, without the
                           pretraining-LM term `rl.lm_mix`: the distillation arms have none)
    student_distill        the same student from the same start, SFT on the teacher's rejection-sampled traces, as many
                           steps as give the same student training FLOPs as student_sft_ref+grpo
    student_distill+kd     as student_distill plus forward KL to the teacher's logits (`--kd-mode`, online by
                           default): same student FLOPs, plus the teacher's forward passes (reported separately)

Each seed (`--seeds`, the run seed of every arm: SFT batch order, GRPO rollouts, student batches) reruns the four
arms; rows carry the seed, and a summary row per arm gives the mean, sd and t interval over seeds.

Compute, in FLOPs with the usual estimates (attention's context-dependent FLOPs left out), N = activated parameters
per token (model.info):
- student training: 6 N per token trained (forward + backward);
- GRPO, per step and from its metrics.jsonl: rollouts 2 N per token (each prompt prefilled once, then the G
  responses decoded); on the kept (non-degenerate) groups, 6 N per token and update for the policy's
  forward+backward, 2 N per token for the frozen reference when the KL term is on, and 2 N per token for the
  old policy only when `rl.updates_per_batch` > 1 (with one update the old policy's log-probabilities are the first
  pass's own, detached: train.grpo.grpo_update computes no extra forward);
- the teacher, in columns of its own and not charged to the student, as in R1's comparison: producing the trace set
  (`teacher_trace_flops`: 2 N_teacher per prompt token once and per sampled token; rejected samples are not stored,
  so they are counted at `max_new_tokens`, an upper bound) and the KD arm's teacher forwards (`teacher_kd_flops`,
  2 N_teacher per trained token). The teacher's own training is not counted.
Every arm is scored on the same held-out prompts, greedy, with the grader RL optimizes, with its Wilson interval.
One row per arm and seed (and one for the teacher) is appended to bench/results/distill_vs_rl.csv, one per arm to
bench/results/distill_vs_rl_summary.csv. Results are reported whatever they show.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from bench.common import append_result


def grpo_flops(
    metrics_path: Path,
    n_params: int,
    prompts_per_step: int,
    group_size: int,
    prompt_len: float,
    updates: int,
    with_ref: bool,
) -> float:
    """Student FLOPs of a GRPO run from its per-step metrics (see the module docstring): rollouts, then on the kept
    sequences `updates` forward+backward passes, the reference's forward (with KL) and the old policy's forward
    (only when updates > 1)."""
    total = 0.0
    for line in metrics_path.read_text().splitlines():
        m = json.loads(line)
        if "response_len" not in m:
            continue
        resp = m["response_len"]
        total += 2 * n_params * (prompts_per_step * prompt_len + prompts_per_step * group_size * resp)
        kept_tokens = (1 - m["degenerate_frac"]) * prompts_per_step * group_size * (prompt_len + resp)
        forwards_only = (2 if with_ref else 0) + (2 if updates > 1 else 0)
        total += kept_tokens * n_params * (6 * updates + forwards_only)
    return total


def trace_flops(prov: dict, traces: list[dict], n_teacher: int, prompt_len: float) -> float:
    """Teacher FLOPs of the trace set: prefill per prompt, decode per sampled token (rejected samples counted at
    max_new_tokens: an upper bound, since the set keeps only the accepted ones)."""
    stats, sampling = prov["stats"], prov["sampling"]
    accepted_tokens = sum(t["n_tokens"] for t in traces)
    rejected = stats["samples"] - len(traces)
    decoded = accepted_tokens + rejected * sampling["max_new_tokens"]
    return 2 * n_teacher * (stats["prompts"] * prompt_len + decoded)


def main(argv: list[str] | None = None) -> list[dict]:
    from datasets import load_from_disk

    from data.outputs import stage_outputs
    from data.tokenizer import load_tokenizer
    from distill.traces import load_traces
    from eval.stats import seed_summary
    from model.info import model_info
    from pipeline.config import compose
    from train.chat import render_prompt
    from train.checkpoint import CheckpointManager
    from train.grpo import load_policy

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="a run directory whose distill stage has run")
    ap.add_argument("--sft-steps", type=int, default=100, help="cold-start SFT steps of the RL arm")
    ap.add_argument("--rl-steps", type=int, default=20, help="GRPO steps of the RL arm")
    ap.add_argument("--kd-mode", default="online", choices=["online", "topk"])
    ap.add_argument("--eval-n", type=int, default=500, help="held-out prompts scored (greedy) for every arm")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="run seeds; every arm is rerun for each")
    ap.add_argument("--overrides", nargs="*", default=[], help="extra Hydra overrides (distill.*, rl.*)")
    args = ap.parse_args(argv)

    run_dir = args.run.resolve()
    base_overrides = [f"run.root={run_dir.parent}", f"run.name={run_dir.name}", "wandb.mode=disabled"]
    base_overrides += ["rl.export_hf=false", "rl.eval_n=0", f"rl.steps={args.rl_steps}", *args.overrides]
    cfg = compose(base_overrides)
    device = torch.device("cpu")
    data = stage_outputs(run_dir / "data")
    tok = load_tokenizer(data["tokenizer"])
    ds = load_from_disk(str(data["reasoning"]))
    test_rows = ds["test"].to_list()[: args.eval_n]
    ref_rows = ds["train"].to_list()
    traces, prov = load_traces(run_dir / "distill" / "traces")
    teacher, tcfg = load_policy(Path(prov["teacher_checkpoint"]), cfg.precision, cfg.kernels.backend, device)
    if args.kd_mode == "topk" and "topk_ids" not in traces[0]:
        raise ValueError("--kd-mode topk needs a trace set cached with distill.traces.cache_topk > 0")
    # every student arm starts from the same weights: the run's pretrained student base when it has one (the
    # distill stage's default, distill/student_base.py), else random ones
    base_dir = run_dir / "student_base" / "checkpoints"
    base = CheckpointManager(base_dir, keep_last=0).checkpoints()[-1] if base_dir.is_dir() else None
    if base is not None and not base.is_dir():
        base = None
    print(f"students start from {base or 'random weights'}")
    from distill.run import build_student

    vocab = tok.get_vocab_size(with_added_tokens=True)
    _, scfg = build_student(cfg.distill, vocab, cfg.precision, cfg.kernels.backend, device, base)
    n_t = model_info(tcfg).activated
    prompt_len = sum(len(render_prompt(tok, r["prompt"])) for r in ref_rows) / len(ref_rows)
    ctx = {
        "cfg": cfg,
        "tok": tok,
        "test_rows": test_rows,
        "ref_rows": ref_rows,
        "traces": traces,
        "prov": prov,
        "teacher": teacher,
        "base": base,
        "data": data,
        "prompt_len": prompt_len,
        "run_name": run_dir.name,
        "n_teacher": n_t,
    }
    common = {
        "run": str(run_dir),
        "student_activated_params": model_info(scfg).activated,
        "teacher_activated_params": n_t,
        "trace_acceptance_rate": prov["stats"]["acceptance_rate"],
        "n_traces": len(traces),
        "eval_n": len(test_rows),
    }
    rows: list[dict] = []

    def record(arm: str, seed: int | str, row: dict) -> None:
        full = {"arm": arm, "seed": seed, **common, **row}
        full.setdefault("note", "")  # every row has the same columns, in the same order (one CSV header)
        rows.append(full)
        append_result("distill_vs_rl", full)
        print(json.dumps(full))

    t0 = time.perf_counter()
    note = f"{prov['teacher_source']} teacher; trace sampling took {prov['sampling_seconds']:.0f}s"
    record(
        "teacher",
        "-",
        {
            **score(teacher, ctx),
            "steps": 0,
            "student_flops": 0.0,
            "teacher_trace_flops": trace_flops(prov, traces, n_t, prompt_len),
            "teacher_kd_flops": 0.0,
            "wall_s": round(time.perf_counter() - t0, 1),
            "note": note,
        },
    )
    for seed in args.seeds:
        seed_cfg = replace(cfg, run=replace(cfg.run, seed=seed))
        for arm, row in run_arms(seed_cfg, ctx, args, run_dir / "bench_distill_vs_rl" / f"seed{seed}"):
            record(arm, seed, row)
    print("\narm                    accuracy [95%]          student GFLOPs  teacher GFLOPs  seed")
    for row in rows:
        teacher_gf = (row["teacher_trace_flops"] + row["teacher_kd_flops"]) / 1e9
        print(
            f"{row['arm']:<22} {row['eval_accuracy']:.3f} [{row['eval_ci_low']:.3f}, {row['eval_ci_high']:.3f}]"
            f"  {row['student_flops'] / 1e9:>14.1f}  {teacher_gf:>14.1f}  {row['seed']}"
        )
    for arm in ("student_sft_ref", "student_sft_ref+grpo", "student_distill", "student_distill+kd"):
        accs = [r["eval_accuracy"] for r in rows if r["arm"] == arm]
        summ = seed_summary(accs)
        append_result(
            "distill_vs_rl_summary",
            {"run": str(run_dir), "arm": arm, "seeds": " ".join(map(str, args.seeds)), "values": accs}
            | {f"eval_accuracy_{k}": v for k, v in summ.items()},
        )
        print(f"{arm:<22} mean {summ['mean']:.3f} +- {summ['sd']:.3f} over {summ['n']} seeds")
    return rows


def score(model, ctx: dict) -> dict:
    """Greedy held-out accuracy with the training grader, and its Wilson interval."""
    from eval.stats import wilson_interval
    from train.grpo import evaluate_accuracy

    cfg = ctx["cfg"]
    ev = evaluate_accuracy(
        model, ctx["tok"], ctx["test_rows"], max_new_tokens=cfg.distill.eval_max_new_tokens, precision=cfg.precision
    )
    n = len(ctx["test_rows"])
    lo, hi = wilson_interval(round(ev["accuracy"] * n), n)
    return {
        "eval_accuracy": ev["accuracy"],
        "eval_ci_low": lo,
        "eval_ci_high": hi,
        "eval_format_rate": ev["format_rate"],
    }


def run_arms(cfg, ctx: dict, args, work: Path):
    """The four student arms of one seed, yielding (arm, row)."""
    from distill.run import build_student
    from distill.student import encode_traces, train_student
    from model.info import model_info
    from pipeline.stage import StageRun
    from train import grpo
    from train.grpo import load_policy

    device = torch.device("cpu")
    tok, prov, traces = ctx["tok"], ctx["prov"], ctx["traces"]
    vocab = tok.get_vocab_size(with_added_tokens=True)
    shutil.rmtree(work, ignore_errors=True)  # every arm starts fresh (the loops would otherwise resume)
    d = replace(cfg.distill, student_init="pretrain" if ctx["base"] else "scratch", resume="none", eval_every=0)
    torch.manual_seed(cfg.run.seed)
    student, scfg = build_student(d, vocab, cfg.precision, cfg.kernels.backend, device, ctx["base"])
    n_s = model_info(scfg).activated
    n_t = ctx["n_teacher"]
    no_teacher = {"teacher_trace_flops": 0.0, "teacher_kd_flops": 0.0}

    # ---- RL arm: cold-start SFT on reference traces, then GRPO from that checkpoint
    t0 = time.perf_counter()
    sft_res = train_student(
        student,
        tok,
        ctx["ref_rows"],
        [],
        replace(d, steps=args.sft_steps, kd_mode="none"),
        ckpt_dir=work / "student_sft_ref",
        model_config=asdict(scfg),
        precision=cfg.precision,
        seed=cfg.run.seed,
    )
    f_sft = 6 * n_s * sft_res["trained_tokens"]
    wall = round(time.perf_counter() - t0, 1)
    row = {**score(student, ctx), "steps": args.sft_steps, "student_flops": f_sft, **no_teacher, "wall_s": wall}
    yield "student_sft_ref", row
    t0 = time.perf_counter()
    # no pretraining-LM term (rl.lm_mix): distillation has none, and its FLOPs are not in the RL arm's count
    rl_cfg = replace(
        cfg,
        run=replace(cfg.run, name=f"{ctx['run_name']}/{work.parent.name}/{work.name}"),
        rl=replace(cfg.rl, lm_mix=0.0),
    )
    paths = {"tokenizer": ctx["data"]["tokenizer"], "reasoning": ctx["data"]["reasoning"]}
    paths["init"] = Path(sft_res["checkpoint"])
    stage = StageRun(rl_cfg, "student_grpo", inputs=paths, resume=cfg.rl.resume)
    with stage:
        rl_res = grpo.train(rl_cfg, stage, paths)
    rl_model, _ = load_policy(Path(rl_res["checkpoint"]), cfg.precision, cfg.kernels.backend, device)
    r = cfg.rl
    f_rl = grpo_flops(
        stage.tracker.metrics_path,
        n_s,
        r.prompts_per_step,
        r.group_size,
        ctx["prompt_len"],
        r.updates_per_batch,
        r.kl_coef > 0,
    )
    wall = round(time.perf_counter() - t0, 1)
    row = {**score(rl_model, ctx), "steps": args.sft_steps + args.rl_steps, "student_flops": f_sft + f_rl}
    yield "student_sft_ref+grpo", row | no_teacher | {"wall_s": wall}

    # ---- distillation arms, at the RL arm's student FLOPs
    examples, _ = encode_traces(tok, traces, d.max_len, with_topk=False)
    tokens_per_step = d.batch_size * sum(len(e[0]) - 1 for e in examples) / len(examples)
    steps = max(1, round((f_sft + f_rl) / (6 * n_s * tokens_per_step)))
    for arm, kd in (("student_distill", "none"), ("student_distill+kd", args.kd_mode)):
        t0 = time.perf_counter()
        torch.manual_seed(cfg.run.seed)
        student, _ = build_student(d, vocab, cfg.precision, cfg.kernels.backend, device, ctx["base"])
        dk = replace(d, steps=steps, kd_mode=kd, traces=replace(d.traces, cache_topk=prov["sampling"]["cache_topk"]))
        res = train_student(
            student,
            tok,
            traces,
            [],
            dk,
            ckpt_dir=work / arm.replace("+", "_"),
            model_config=asdict(scfg),
            teacher=ctx["teacher"] if kd == "online" else None,
            precision=cfg.precision,
            seed=cfg.run.seed,
        )
        yield (
            arm,
            {
                **score(student, ctx),
                "steps": steps,
                "student_flops": 6 * n_s * res["trained_tokens"],
                "teacher_trace_flops": trace_flops(prov, traces, n_t, ctx["prompt_len"]),
                "teacher_kd_flops": 2 * n_t * res["trained_tokens"] if kd == "online" else 0.0,
                "wall_s": round(time.perf_counter() - t0, 1),
                "note": f"kd_mode={kd}" if kd != "none" else "",
            },
        )


if __name__ == "__main__":
    main()
