"""Distillation against RL for the same small student, at equal student compute; and SFT-only against SFT + logit KD.

    make distill RUN=<run> && python -m bench.distill_vs_rl --run outputs/<run>
    python -m bench.distill_vs_rl --run outputs/<run> --sft-steps 100 --rl-steps 20 --eval-n 100

DeepSeek-R1 (section 4.1, table 6) reports that Qwen-32B distilled from R1 beats the same base model trained by
large-scale RL. This bench asks the same question at our scale, on one run directory whose distill stage has run
(its trace set `outputs/<run>/distill/traces/` and the teacher checkpoint named in the set's provenance):

    student_sft_ref        the `student` preset from the run's student base (pretrained, distill/student_base.py;
                           random weights when the run has none), SFT on the data's reference chains of thought
                           (`--sft-steps`): the student's own cold start
    student_sft_ref+grpo   that checkpoint, then GRPO (`--rl-steps`, train.grpo's loop and objective)
    student_distill        the same student from the same start, SFT on the teacher's rejection-sampled traces, as many
                           steps as give the same student training FLOPs as student_sft_ref+grpo
    student_distill+kd     as student_distill plus forward KL to the teacher's logits (`--kd-mode`, online by
                           default): same student FLOPs, plus the teacher's forward passes (reported separately)

Compute is counted in FLOPs of the student, with the usual estimates: 6 N per token trained (forward + backward),
2 N per token forwarded only (GRPO's rollouts, old-policy and reference log-probabilities), N = the student's
activated parameters per token (model.info). The teacher's cost of producing the traces (sampling time from the
provenance) and of KD forwards is reported in its own column, not charged to the student, as in R1's comparison.
Every arm is scored on the same held-out prompts, greedy, with the grader RL optimizes. One row per arm (and one for
the teacher) is appended to bench/results/distill_vs_rl.csv. Results are reported whatever they show.
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
    """Student FLOPs of a GRPO run from its per-step metrics: rollouts (prefill once per prompt, then decode), then
    on the kept sequences the old-policy (and reference) forwards and `updates` forward+backward passes."""
    total = 0.0
    for line in metrics_path.read_text().splitlines():
        m = json.loads(line)
        if "response_len" not in m:
            continue
        resp = m["response_len"]
        total += 2 * n_params * (prompts_per_step * prompt_len + prompts_per_step * group_size * resp)
        kept_tokens = (1 - m["degenerate_frac"]) * prompts_per_step * group_size * (prompt_len + resp)
        total += kept_tokens * n_params * (6 * updates + 2 + (2 if with_ref else 0))
    return total


def main(argv: list[str] | None = None) -> list[dict]:
    from datasets import load_from_disk

    from data.prepare import stage_outputs
    from data.tokenizer import load_tokenizer
    from distill.run import build_student
    from distill.student import encode_traces, train_student
    from distill.traces import load_traces
    from model.info import model_info
    from pipeline.config import compose
    from pipeline.stage import StageRun
    from train import grpo
    from train.chat import render_prompt
    from train.checkpoint import CheckpointManager
    from train.grpo import evaluate_accuracy, load_policy

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="a run directory whose distill stage has run")
    ap.add_argument("--sft-steps", type=int, default=100, help="cold-start SFT steps of the RL arm")
    ap.add_argument("--rl-steps", type=int, default=20, help="GRPO steps of the RL arm")
    ap.add_argument("--kd-mode", default="online", choices=["online", "topk"])
    ap.add_argument("--eval-n", type=int, default=100, help="held-out prompts scored (greedy) for every arm")
    ap.add_argument("--overrides", nargs="*", default=[], help="extra Hydra overrides (distill.*, rl.*)")
    args = ap.parse_args(argv)

    run_dir = args.run.resolve()
    cfg = compose(
        [
            f"run.root={run_dir.parent}",
            f"run.name={run_dir.name}",
            "wandb.mode=disabled",
            "rl.export_hf=false",
            "rl.eval_n=0",
            f"rl.steps={args.rl_steps}",
            *args.overrides,
        ]
    )
    torch.manual_seed(cfg.run.seed)
    device = torch.device("cpu")
    data = stage_outputs(run_dir / "data")
    tok = load_tokenizer(data["tokenizer"])
    vocab = tok.get_vocab_size(with_added_tokens=True)
    ds = load_from_disk(str(data["reasoning"]))
    test_rows = ds["test"].to_list()[: args.eval_n]
    ref_rows = ds["train"].to_list()
    traces, prov = load_traces(run_dir / "distill" / "traces")
    teacher, tcfg = load_policy(Path(prov["teacher_checkpoint"]), cfg.precision, cfg.kernels.backend, device)
    if args.kd_mode == "topk" and "topk_ids" not in traces[0]:
        raise ValueError("--kd-mode topk needs a trace set cached with distill.traces.cache_topk > 0")
    work = run_dir / "bench_distill_vs_rl"
    shutil.rmtree(work, ignore_errors=True)  # every arm starts fresh (the loops would otherwise resume)
    # every student arm starts from the same weights: the run's pretrained student base when it has one (the
    # distill stage's default, distill/student_base.py), else random ones
    base_dir = run_dir / "student_base" / "checkpoints"
    base = CheckpointManager(base_dir, keep_last=0).checkpoints()[-1] if base_dir.is_dir() else None
    if base is not None and not base.is_dir():
        base = None
    d = replace(cfg.distill, student_init="pretrain" if base else "scratch", resume="none", eval_every=0)
    print(f"students start from {base or 'random weights'}")

    def score(model) -> dict:
        ev = evaluate_accuracy(model, tok, test_rows, max_new_tokens=d.eval_max_new_tokens, precision=cfg.precision)
        return {"eval_accuracy": ev["accuracy"], "eval_format_rate": ev["format_rate"], "eval_n": len(test_rows)}

    student, scfg = build_student(d, vocab, cfg.precision, cfg.kernels.backend, device, base)
    n_s = model_info(scfg).activated
    n_t = model_info(tcfg).activated
    common = {
        "run": str(run_dir),
        "student_activated_params": n_s,
        "teacher_activated_params": n_t,
        "trace_acceptance_rate": prov["stats"]["acceptance_rate"],
        "n_traces": len(traces),
    }
    rows = []

    def record(arm: str, row: dict) -> None:
        full = {"arm": arm, **common, **row}
        full.setdefault("note", "")  # every row has the same columns, in the same order (one CSV header)
        rows.append(full)
        append_result("distill_vs_rl", full)
        print(json.dumps(full))

    t0 = time.perf_counter()
    note = f"{prov['teacher_source']} teacher; trace sampling took {prov['sampling_seconds']:.0f}s"
    record(
        "teacher",
        {
            **score(teacher),
            "steps": 0,
            "student_flops": 0.0,
            "teacher_flops_extra": 0.0,
            "wall_s": round(time.perf_counter() - t0, 1),
            "note": note,
        },
    )

    # ---- RL arm: cold-start SFT on reference traces, then GRPO from that checkpoint
    t0 = time.perf_counter()
    sft_res = train_student(
        student,
        tok,
        ref_rows,
        [],
        replace(d, steps=args.sft_steps, kd_mode="none"),
        ckpt_dir=work / "student_sft_ref",
        model_config=asdict(scfg),
        precision=cfg.precision,
        seed=cfg.run.seed,
    )
    f_sft = 6 * n_s * sft_res["trained_tokens"]
    record(
        "student_sft_ref",
        {
            **score(student),
            "steps": args.sft_steps,
            "student_flops": f_sft,
            "teacher_flops_extra": 0.0,
            "wall_s": round(time.perf_counter() - t0, 1),
        },
    )
    t0 = time.perf_counter()
    rl_cfg = replace(cfg, run=replace(cfg.run, name=f"{run_dir.name}/bench_distill_vs_rl"))
    paths = {"tokenizer": data["tokenizer"], "reasoning": data["reasoning"], "init": Path(sft_res["checkpoint"])}
    stage = StageRun(rl_cfg, "student_grpo", inputs=paths, resume=cfg.rl.resume)
    with stage:
        rl_res = grpo.train(rl_cfg, stage, paths)
    rl_model, _ = load_policy(Path(rl_res["checkpoint"]), cfg.precision, cfg.kernels.backend, device)
    prompt_len = sum(len(render_prompt(tok, r["prompt"])) for r in ref_rows) / len(ref_rows)
    r = cfg.rl
    f_rl = grpo_flops(
        stage.tracker.metrics_path,
        n_s,
        r.prompts_per_step,
        r.group_size,
        prompt_len,
        r.updates_per_batch,
        r.kl_coef > 0,
    )
    record(
        "student_sft_ref+grpo",
        {
            **score(rl_model),
            "steps": args.sft_steps + args.rl_steps,
            "student_flops": f_sft + f_rl,
            "teacher_flops_extra": 0.0,
            "wall_s": round(time.perf_counter() - t0, 1),
        },
    )

    # ---- distillation arms, at the RL arm's student FLOPs
    examples, _ = encode_traces(tok, traces, d.max_len, with_topk=False)
    tokens_per_step = d.batch_size * sum(len(e[0]) - 1 for e in examples) / len(examples)
    steps = max(1, round((f_sft + f_rl) / (6 * n_s * tokens_per_step)))
    for arm, kd in (("student_distill", "none"), ("student_distill+kd", args.kd_mode)):
        t0 = time.perf_counter()
        torch.manual_seed(cfg.run.seed)
        student, _ = build_student(d, vocab, cfg.precision, cfg.kernels.backend, device, base)
        dk = replace(d, steps=steps, kd_mode=kd, traces=replace(d.traces, cache_topk=prov["sampling"]["cache_topk"]))
        res = train_student(
            student,
            tok,
            traces,
            [],
            dk,
            ckpt_dir=work / arm.replace("+", "_"),
            model_config=asdict(scfg),
            teacher=teacher if kd == "online" else None,
            precision=cfg.precision,
            seed=cfg.run.seed,
        )
        teacher_extra = 2 * n_t * res["trained_tokens"] if kd == "online" else 0.0
        record(
            arm,
            {
                **score(student),
                "steps": steps,
                "student_flops": 6 * n_s * res["trained_tokens"],
                "teacher_flops_extra": teacher_extra,
                "wall_s": round(time.perf_counter() - t0, 1),
                "note": f"kd_mode={kd}" if kd != "none" else "",
            },
        )
    print("\narm                    accuracy  student GFLOPs  steps")
    for row in rows:
        print(f"{row['arm']:<22} {row['eval_accuracy']:>8.3f}  {row['student_flops'] / 1e9:>14.1f}  {row['steps']:>5}")
    return rows


if __name__ == "__main__":
    main()
