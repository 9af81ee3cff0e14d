"""The README's "Measured" table, written from the newest rows of `bench/results/*.csv` (never typed by hand).

    python -m bench.readme           # rewrite the table in README.md between its two markers
    python -m bench.readme --check   # exit 1 when README.md's table differs from what the CSVs say (a test runs this)

Each entry below reads the rows one bench script appended and says what they show, with the commit and date of
the newest row it used; an entry whose rows are missing says "not measured". Add an entry when you add a script.
"""

import argparse
import csv
import json
import sys
from collections.abc import Callable
from pathlib import Path

from bench.common import RESULTS_DIR

README = Path(__file__).resolve().parent.parent / "README.md"
BEGIN = "<!-- measured: written by `python -m bench.readme` from bench/results/*.csv; do not edit by hand -->"
END = "<!-- measured: end -->"

Row = dict[str, str]


def rows(name: str, **where: str) -> list[Row]:
    """The rows of bench/results/<name>.csv whose columns equal `where`, oldest first."""
    path = RESULTS_DIR / f"{name}.csv"
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return [r for r in csv.DictReader(f) if all(r.get(k) == v for k, v in where.items())]


def last(name: str, **where: str) -> Row | None:
    found = rows(name, **where)
    return found[-1] if found else None


def num(row: Row, key: str, fmt: str = ".3g") -> str:
    return format(float(row[key]), fmt)


def pct(row: Row, key: str, digits: int = 1) -> str:
    return f"{100 * float(row[key]):.{digits}f}%"


def dedup_recall() -> tuple[str, list[Row]]:
    ours = {r["jaccard"]: r for r in rows("dedup_recall", method="ours", threshold="0.85", num_perm="128")}
    ref = {r["jaccard"]: r for r in rows("dedup_recall", method="datasketch", threshold="0.85", num_perm="128")}
    js = [j for j in ("0.8", "0.85", "0.9", "0.95") if j in ours and j in ref]
    text = ", ".join(
        f"J={j}: {pct(ours[j], 'flagged_mean', 0)} vs {pct(ref[j], 'flagged_mean', 0)}"
        f" (sd {pct(ours[j], 'flagged_std', 0)})"
        for j in js
    )
    return f"pairs flagged, ours (datatrove MinHash, 16x8 bands) vs datasketch LSH at threshold 0.85: {text}", [
        ours[j] for j in js
    ]


def data_throughput() -> tuple[str, list[Row]]:
    """The newest run's rows (its commit and corpus size), by BPE sample cap (largest first) and processes."""
    runs = rows("data_throughput", scope="end_to_end")
    if not runs:
        return "", []
    newest = runs[-1]
    found = [
        r
        for r in runs
        if (r["commit"], r["mb_in"], r["date"][:10]) == (newest["commit"], newest["mb_in"], newest["date"][:10])
    ]
    latest: dict[tuple[str, str], Row] = {(r.get("bpe_cap_mb", ""), r["procs"]): r for r in found}
    found = sorted(latest.values(), key=lambda r: (-float(r.get("bpe_cap_mb") or 1e9), int(r["procs"])))
    caps = []
    for cap in dict.fromkeys(r.get("bpe_cap_mb", "") for r in found):
        per = "; ".join(
            f"{r['procs']} process{'es' if r['procs'] != '1' else ''}: {num(r, 'pipeline_mb_s')} vs "
            f"{num(r, 'raw_mb_s')} MB/s (ratio {num(r, 'ratio', '.2f')}; CPU-time ratio {num(r, 'cpu_ratio', '.2f')}, "
            f"load {r['load_avg_1m']})"
            for r in found
            if r.get("bpe_cap_mb", "") == cap
        )
        whole = cap and float(cap) >= float(newest["mb_in"])
        label = "BPE on the whole corpus" if not cap or whole else f"BPE sample capped at {float(cap):.3g} MB"
        caps.append(f"{label}: {per}")
    text = f"{newest['mb_in']} MB corpus vs raw `tokenizers` encode (all cores) in the same run. " + ". ".join(caps)
    return text, found


def tokenizer_sample() -> tuple[str, list[Row]]:
    found = rows("tokenizer_sample")
    if not found:
        return "", []
    found = [r for r in found if r["commit"] == found[-1]["commit"] and r["date"][:10] == found[-1]["date"][:10]]
    found.sort(key=lambda r: float(r["sample_mb"]))
    per = ", ".join(
        f"{r['sample_mb']} MB: {num(r, 'heldout_bytes_per_token', '.3f')} ({num(r, 'train_cpu_s', '.1f')} CPU s)"
        for r in found
    )
    text = (
        f"BPE vocab {found[0]['vocab_size']}, bytes per token on {found[0]['heldout_mb']} MB of held-out documents "
        f"by training sample (training CPU seconds): {per}"
    )
    return text, found


def data_memory() -> tuple[str, list[Row]]:
    found = rows("data_memory")
    if not found:
        return "", []
    found = [r for r in found if r["commit"] == found[-1]["commit"]]  # the newest run's corpus sizes
    big = max(found, key=lambda r: float(r["corpus_mb"]))
    small = min(found, key=lambda r: float(r["corpus_mb"]))
    text = (
        f"peak worker RSS {small['worker_peak_mb']} MB at {small['corpus_mb']} MB of corpus, "
        f"{big['worker_peak_mb']} MB at {big['corpus_mb']} MB (stage: {big['worker_peak_stage']})"
    )
    return text, [big]


def fp8_vs_bf16() -> tuple[str, list[Row]]:
    r = last("fp8_vs_bf16")
    if r is None:
        return "", []
    text = (
        f"{r['steps']} steps: mean abs. rel. loss difference {pct(r, 'tail_mean_abs_rel_diff', 3)} (last 20% of "
        f"steps), final val {pct(r, 'final_val_rel_diff', 2)}"
    )
    return text, [r]


def fp8_accumulation() -> tuple[str, list[Row]]:
    where = dict(dist="normal", K="4096", acc_bits="14")
    limited, promoted = (
        last("fp8_accumulation", mode="limited", **where),
        last("fp8_accumulation", mode="promoted", **where),
    )
    if limited is None or promoted is None:
        return "", []
    text = (
        f"K=4096, 14-bit tensor-core accumulation model: {pct(limited, 'norm_rel_err', 2)} rel. error without "
        f"promotion, {pct(promoted, 'norm_rel_err', 3)} with FP32 promotion every 128"
    )
    return text, [limited, promoted]


def balance() -> tuple[str, list[Row]]:
    found = [last("balance", strategy=s) for s in ("aux_free", "aux_loss", "none")]
    if None in found:
        return "", []
    steps = found[0]["steps"]
    val = " / ".join(num(r, "val_loss", ".3f") for r in found)
    vio = " / ".join(num(r, "maxvio_cumulative", ".2f") for r in found)
    return f"{steps} steps, aux-free / aux-loss / none: val loss {val}; cumulative MaxVio {vio}", found


def model_vs_hf() -> tuple[str, list[Row]]:
    metrics = {
        "train_tokens_per_s": "training",
        "generate_tokens_per_s": "generation",
        "decode_long_tokens_per_s": "decode at 896 tokens of context",
    }
    found = {m: last("model_vs_hf", metric=m) for m in metrics}
    if None in found.values():
        return "", []
    parts = [f"{label} {num(found[m], 'cpu_speed_ratio', '.2f')}x" for m, label in metrics.items()]
    spec = last("model_vs_hf", metric="ckpt_spec_decode_tokens_per_s")
    if spec is not None:
        parts.append(
            f"MTP speculative decode on a pretrained checkpoint: {pct(spec, 'acceptance', 0)} of drafts accepted, "
            f"{num(spec, 'cpu_ratio_to_ours_plain', '.2f')}x our plain decode"
        )
    used = [*found.values(), *([spec] if spec else [])]
    compiled = [
        last("model_vs_hf", metric=m) for m in ("train_tokens_per_s_ours_compiled", "decode_tokens_per_s_ours_compiled")
    ]
    if None not in compiled and compiled[0]["date"][:10] == found["train_tokens_per_s"]["date"][:10]:
        train_c, decode_c = (num(r, "cpu_speed_ratio", ".2f") for r in compiled)
        parts.append(f"with model.compile=true: training {train_c}x, decode {decode_c}x")
        used += compiled
    roof = last("model_vs_hf", metric="train_roofline")
    if roof is not None:
        parts.append(
            f"training-step floor ({num(roof, 'step_gflop_hf')} GFLOP by FlopCounterMode at "
            f"{num(roof, 'sgemm_gflop_per_cpu_s')} GFLOP/s sgemm): ours {num(roof, 'ours_x_floor', '.2f')}x, "
            f"transformers {num(roof, 'hf_x_floor', '.2f')}x it"
        )
        used.append(roof)
    return "CPU-time ratio, ours / transformers: " + ", ".join(parts), used


def cpu_autocast() -> tuple[str, list[Row]]:
    found = rows("cpu_autocast")
    if not found:
        return "", []
    r = found[-1]
    text = (
        f"at equal CPU time ({r['fp32_cpu_s']} s): fp32 {r['fp32_steps']} steps, val {r['fp32_val_loss']}; "
        f"bf16 autocast {r['bf16_steps']} steps, val {r['bf16_val_loss']} ({r['torch_cpu_capability']} CPU)"
    )
    return text, [r]


def host_syncs() -> tuple[str, list[Row]]:
    out, used = [], []
    for layout, nproc in (("single", "1"), ("fsdp_ep", "2")):
        before = [r for r in rows("host_syncs", layout=layout, log_every="1") if r["label"].startswith("before")]
        after = [r for r in rows("host_syncs", layout=layout, log_every="1") if r["label"].startswith("after")]
        if before and after:
            b, a = before[-1], after[-1]
            out.append(
                f"{layout} ({nproc} proc): {num(b, 'syncs_per_step', '.0f')} -> {num(a, 'syncs_per_step', '.0f')}"
                f" ({num(a, 'syncs_train/ema.py', '.0f')} of them the EMA's CPU path, non-blocking on a GPU)"
            )
            used += [b, a]
    return "device-to-host syncs per pretraining step, before -> after the loop rewrite: " + "; ".join(out), used


def dist_layouts() -> tuple[str, list[Row]]:
    found = [r for r in rows("dist_scaling") if float(r["a2a_bytes_predicted"] or 0) > 0]
    if not found:
        return "", []
    newest = {r["layout"] + r["nproc"]: r for r in found}.values()
    same = all(r["a2a_bytes_per_step"] == r["a2a_bytes_predicted"] for r in newest)
    layouts = ", ".join(f"{r['layout']} x{r['nproc']}" for r in newest)
    verdict = "equal" if same else "DIFFER FROM"
    text = f"all-to-all bytes per step {verdict} the prediction from the routing ({layouts}; CPU gloo)"
    return text, list(newest)


def eplb() -> tuple[str, list[Row]]:
    r = last("eplb_imbalance", mode="heldout")
    if r is None:
        return "", []
    text = (
        f"{r['experts']} experts on {r['gpus']} GPUs, {r['physical']} slots, planned on {r['plan_loads']}, measured on "
        f"{r['measure_loads']}: per-GPU max/mean {num(r, 'before_mean', '.2f')} -> {num(r, 'hierarchical_mean', '.2f')}"
        f" / {num(r, 'global_mean', '.2f')} (hierarchical / global)"
    )
    return text, [r]


def sandbox() -> tuple[str, list[Row]]:
    before = last("sandbox_overhead", workload="humaneval", variant="before", workers="4")
    after = last("sandbox_overhead", workload="humaneval", variant="after", workers="4")
    if before is None or after is None:
        return "", []
    text = (
        f"164 HumanEval solutions, 4 workers: {before['wall_ms']} -> {after['wall_ms']} ms per program "
        f"(range {after['wall_ms_min']}-{after['wall_ms_max']}; {after['after_over_before']}x) for bubblewrap "
        "namespaces, fresh uids and a read-only system"
    )
    return text, [before, after]


def wandb_overhead() -> tuple[str, list[Row]]:
    off, dis = rows("wandb_overhead", mode="offline"), rows("wandb_overhead", mode="disabled")
    if not off or not dis:
        return "", []

    def median(rs: list[Row], key: str) -> float:
        vals = sorted(float(r[key]) for r in rs)
        return vals[len(vals) // 2]

    text = (
        f"per logged row: {median(off, 'log_call_us') / 1000:.1f} ms offline vs {median(dis, 'log_call_us'):.0f} us "
        f"disabled (median of {len(off)} runs of {off[-1]['steps']} steps)"
    )
    return text, [off[-1], dis[-1]]


def eval_cost() -> tuple[str, list[Row]]:
    """Stop sequences on vs off on the newest pretrained checkpoint measured (both modes, all 164 problems)."""
    found = [r for r in rows("eval_cost", suite="humaneval", prompts="164") if r.get("finished_early")]
    ckpt = [r for r in found if "checkpoints" in r["model"]]
    if not ckpt:
        return "", []
    model = ckpt[-1]["model"]
    on = [r for r in ckpt if r["model"] == model and r["stop_sequences"] == "on"][-2:]
    off = [r for r in ckpt if r["model"] == model and r["stop_sequences"] == "off"][-2:]
    if not on or not off:
        return "", []
    secs = lambda rs: " / ".join(num(r, "seconds", ".0f") for r in rs)  # noqa: E731
    text = (
        f"HumanEval, 164 problems greedy, 320 new tokens, on `{'/'.join(Path(model).parts[-3:])}`: with stop "
        f"sequences {secs(on)} s, {on[-1]['generated_tokens']} tokens, {on[-1]['finished_early']} completions end "
        f"early; without {secs(off)} s, {off[-1]['generated_tokens']} tokens; same scored programs: "
        f"{on[-1]['same_programs_as_other_mode']}"
    )
    return text, [*on, *off]


def rl_gain() -> tuple[str, list[Row]]:
    r = last("rl_gain")
    if r is None:
        return "", []
    text = (
        f"SFT -> GRPO held-out accuracy ({r['n_test']} prompts, {r['decoding']}), run `{Path(r['run']).name}`, one "
        f"seed: {pct(r, 'sft_accuracy')} -> {pct(r, 'rl_accuracy')} ({float(r['gain_points']):+.1f} points); "
        f"samples that reason {pct(r, 'sft_think_rate', 0)} -> {pct(r, 'rl_think_rate', 0)}"
    )
    if r.get("sft_think_accuracy") and r.get("sft_direct_accuracy"):  # does reasoning pay after SFT?
        text += (
            f"; accuracy of the samples that reason / answer directly: SFT {pct(r, 'sft_think_accuracy')} / "
            f"{pct(r, 'sft_direct_accuracy')}, RL {pct(r, 'rl_think_accuracy')} / {pct(r, 'rl_direct_accuracy')}"
        )
    return text, [r]


def seeds() -> tuple[str, list[Row]]:
    found = rows("seeds_summary", metric="rl_gain_points")
    if not found:
        return "", []
    r = found[-1]
    same = {m["metric"]: m for m in rows("seeds_summary", run=r["run"], seeds=r["seeds"])}  # the newest of each

    def spread(metric: str) -> str:
        m = same.get(metric)
        return f"{100 * float(m['mean']):.1f}% +- {100 * float(m['sd']):.1f}" if m else "?"

    per_seed = ", ".join(f"{v:+.1f}" for v in json.loads(r["values"]))
    text = (
        f"RL gain over {r['n']} seeds ({r['seeds']}) from one pretrained checkpoint: {float(r['mean']):+.1f} +- "
        f"{float(r['sd']):.1f} points (95% t interval {float(r['ci_low']):+.1f} .. {float(r['ci_high']):+.1f}; per "
        f"seed {per_seed}); held-out greedy SFT {spread('sft_heldout_greedy')} -> RL {spread('rl_heldout_greedy')}; "
        f"greedy answers that reason {spread('sft_heldout_think_rate')} -> {spread('rl_heldout_think_rate')}"
    )
    if "rl_code_bpb_over_pretrain" in same:
        text += f"; code bpb after RL / pretrained x{float(same['rl_code_bpb_over_pretrain']['mean']):.3f}"
    return text, [r]


def code_retention() -> tuple[str, list[Row]]:
    """The newest chain per LM-term weight: code bpb after RL over the pretrained model's, and the RL gain."""
    found = {r["lm_mix_sft"]: r for r in rows("code_retention")}
    if not found:
        return "", []
    parts = [
        f"lm_mix={float(w):g}: code bpb {num(r, 'pretrain_code_bpb', '.3f')} -> {num(r, 'sft_code_bpb', '.3f')} (SFT)"
        f" -> {num(r, 'rl_code_bpb', '.3f')} (RL, x{num(r, 'rl_code_bpb_over_pretrain', '.3f')}); held-out greedy "
        f"{pct(r, 'sft_heldout_greedy')} -> {pct(r, 'rl_heldout_greedy')} ({float(r['gain_points']):+.1f})"
        for w, r in sorted(found.items())
    ]
    n = next(iter(found.values()))["n_heldout"]
    return "SFT -> GRPO from one pretrained checkpoint, one seed, " + n + " prompts: " + "; ".join(parts), list(
        found.values()
    )


def distill_vs_rl() -> tuple[str, list[Row]]:
    arms = ("student_sft_ref+grpo", "student_distill", "student_distill+kd")
    summary = rows("distill_vs_rl_summary")
    if not summary:  # one seed, before the bench summarized seeds
        found = [last("distill_vs_rl", arm=a) for a in arms]
        if None in found:
            return "", []
        accs = " / ".join(pct(r, "eval_accuracy") for r in found)
        return (
            f"student, SFT+GRPO / distill / distill+KD: {accs} held-out ({found[0]['eval_n']} prompts, one seed)",
            found,
        )
    newest = summary[-1]
    by_arm = {
        r["arm"]: r
        for r in summary
        if (r["run"], r["commit"], r["seeds"]) == (newest["run"], newest["commit"], newest["seeds"])
    }
    if any(a not in by_arm for a in arms):
        return "", []
    # the newest row of each arm and seed of that run up to the summary (a run's rows may carry several commits)
    newest_rows = {
        (r["arm"], r["seed"]): r for r in rows("distill_vs_rl", run=newest["run"]) if r["date"] <= newest["date"]
    }
    per_seed = [r for (_, seed), r in newest_rows.items() if seed in newest["seeds"].split()]
    teacher = [r for (arm, _), r in newest_rows.items() if arm == "teacher"]

    def gflop(arm: str, key: str) -> float:
        vals = [float(r[key]) for r in per_seed if r["arm"] == arm and r[key]]
        return sum(vals) / len(vals) / 1e9 if vals else float("nan")

    n = per_seed[-1].get("eval_n") if per_seed else ""
    accs = " / ".join(
        f"{100 * float(by_arm[a]['eval_accuracy_mean']):.1f}% +- {100 * float(by_arm[a]['eval_accuracy_sd']):.1f}"
        for a in arms
    )
    text = (
        f"student held-out greedy accuracy{f' ({n} prompts)' if n else ''}, SFT+GRPO / distill / distill+KD, "
        "mean +- sd over "
        f"{by_arm[arms[0]]['eval_accuracy_n']} seeds: {accs}, at ~{gflop(arms[1], 'student_flops'):.0f} GFLOP of "
        f"student training each; the teacher's cost, not charged to the student: traces "
        f"{gflop(arms[1], 'teacher_trace_flops'):.0f} GFLOP, KD's teacher forwards "
        f"+{gflop(arms[2], 'teacher_kd_flops'):.0f}"
    )
    if teacher:
        text += f"; teacher {pct(teacher[-1], 'eval_accuracy')}"
    return text, [by_arm[a] for a in arms]


def code_structure() -> tuple[str, list[Row]]:
    found = rows("code_structure")
    after = [r for r in found if r["rev"] == "worktree"]  # the checkout itself, against the oldest revision measured
    if not found or not after:
        return "", []
    b = after[-1]
    a = [r for r in found if r["rev"] == found[0]["rev"]][-1]
    text = (
        f"stage-to-stage imports {a['arrows_against_flow']} -> {b['arrows_against_flow']}, in-function imports "
        f"{a['in_function_imports']} -> {b['in_function_imports']}, functions over 60 lines "
        f"{a['functions_over_60_lines']} -> {b['functions_over_60_lines']}, longest {a['longest_function_lines']} -> "
        f"{b['longest_function_lines']} lines (`{b['longest_function']}`), revision {a['rev']} -> this checkout"
    )
    return text, [a, b]


def cpu_threads() -> tuple[str, list[Row]]:
    """The newest invocation's rows (one per threads x precision pair, written together)."""
    every = rows("cpu_threads")
    if not every:
        return "", []
    found = [r for r in every if r["date"][:16] == every[-1]["date"][:16] and r["commit"] == every[-1]["commit"]]
    per = "; ".join(
        f"{r['threads']} thread{'s' if r['threads'] != '1' else ''} {r['precision']} "
        f"{num(r, 'median_s_per_step', '.3f')} s ({num(r, 'min_s_per_step', '.3f')}-{num(r, 'max_s_per_step', '.3f')})"
        for r in found
    )
    r = found[-1]
    text = (
        f"tiny preset, one {r['batch']} micro-batch step, median (range) of {r['rounds']} interleaved rounds, "
        f"OMP_WAIT_POLICY={r['omp_wait_policy'] or 'unset'}, CPU flags {r['cpu_flags']}: {per}"
    )
    return text, found


def pipeline_precision() -> tuple[str, list[Row]]:
    """The newest fp32 / bf16 pair of runs (written together)."""
    every = rows("pipeline_precision")
    pair = {r["precision"]: r for r in every[-2:]}
    if set(pair) != {"fp32", "bf16"}:
        return "", []
    f, b = pair["fp32"], pair["bf16"]

    def acc(r: Row) -> str:
        return (
            f"SFT {pct(r, 'sft_eval_accuracy')}, GRPO {pct(r, 'rl_eval_accuracy')}, student "
            f"{pct(r, 'student_eval_accuracy')}, reasoning pass@1 {pct(r, 'rl_reasoning_pass_at_1')}"
        )

    stages = ", ".join(
        f"{s} {float(f[s + '_wall_s']):.0f} / {float(b[s + '_wall_s']):.0f} s"
        for s in ("pretrain", "sft", "rl", "distill", "eval")
    )
    text = (
        f"side by side, one core each (CPU flags: {b['cpu_flags']}): fp32 {float(f['total_wall_s']) / 60:.1f} min, "
        f"bf16 autocast {float(b['total_wall_s']) / 60:.1f} min ({stages}); pretraining val bpb "
        f"{num(f, 'pretrain_val_bpb', '.4f')} / {num(b, 'pretrain_val_bpb', '.4f')}; fp32 {acc(f)}; bf16 {acc(b)}; "
        f"code bpb after GRPO {num(f, 'rl_bpb_code_bpb', '.3f')} / {num(b, 'rl_bpb_code_bpb', '.3f')} (one seed each: "
        "see the seeds row for the spread)"
    )
    return text, [f, b]


def pipeline_total() -> tuple[str, list[Row]]:
    every = rows("pipeline_stages")
    ends = [i for i, s in enumerate(every) if s["stage"] == "total"]
    if not ends:
        return "", []
    r = every[ends[-1]]
    start = ends[-2] + 1 if len(ends) > 1 else 0
    stages = [s for s in every[start : ends[-1]] if s["run"] == r["run"]]  # the rows written with this total
    parts = ", ".join(f"{s['stage']} {num(s, 'stage_wall_s', '.0f')} s" for s in stages)
    text = (
        f"`make pipeline` run `{r['run']}`: {float(r['wall_s']) / 60:.1f} min ({parts}), peak RSS {r['peak_rss_mb']} MB"
    )
    if r.get("note"):
        text += f"; {r['note']}"
    return text, [r]


ENTRIES: list[tuple[str, Callable[[], tuple[str, list[Row]]], str]] = [
    ("near-duplicate recall", dedup_recall, "bench/dedup_recall.py"),
    ("data stage throughput", data_throughput, "bench/data_throughput.py"),
    ("data stage memory", data_memory, "bench/data_memory.py"),
    ("tokenizer training sample", tokenizer_sample, "bench/tokenizer_sample.py"),
    ("FP8 vs BF16 pretraining", fp8_vs_bf16, "bench/fp8_vs_bf16.py"),
    ("FP8 accumulation", fp8_accumulation, "bench/fp8_accumulation.py"),
    ("FP8 kernels on Hopper vs torch._scaled_mm / torchao", lambda: ("", []), "bench/kernels_gpu.py"),
    ("load balancing", balance, "bench/balance.py"),
    ("ours vs transformers' DeepseekV3", model_vs_hf, "bench/model_vs_hf.py"),
    ("bf16 autocast on CPU", cpu_autocast, "bench/cpu_autocast.py"),
    ("CPU threads x precision, training step", cpu_threads, "bench/cpu_threads.py"),
    ("host syncs", host_syncs, "bench/host_syncs.py"),
    ("expert-parallel traffic", dist_layouts, "bench/dist_scaling.py"),
    ("EPLB", eplb, "bench/eplb_imbalance.py"),
    ("code sandbox cost", sandbox, "bench/sandbox_overhead.py"),
    ("W&B cost", wandb_overhead, "bench/wandb_overhead.py"),
    ("evaluation cost", eval_cost, "bench/eval_cost.py"),
    ("GRPO gain", rl_gain, "bench/rl_gain.py"),
    ("GRPO gain over seeds", seeds, "bench/seeds.py"),
    ("post-training keeps code (PPO-ptx term)", code_retention, "bench/code_retention.py"),
    ("distillation vs RL at equal student FLOPs", distill_vs_rl, "bench/distill_vs_rl.py"),
    ("whole pipeline", pipeline_total, "bench/pipeline_stages.py"),
    ("whole pipeline, fp32 vs bf16 autocast", pipeline_precision, "bench/precision_pipeline.py"),
    ("code structure", code_structure, "bench/code_structure.py"),
]


def render() -> str:
    """The table, one line per entry; the newest row an entry used gives its commit and date."""
    lines = ["| what | result | script | newest row |", "| --- | --- | --- | --- |"]
    for what, entry, script in ENTRIES:
        text, used = entry()
        used = [r for r in used if r]
        if not text or not used:
            lines.append(f"| {what} | not measured | `{script}` | - |")
            continue
        newest = max(used, key=lambda r: r["date"])
        lines.append(f"| {what} | {text} | `{script}` | {newest['commit']}, {newest['date'][:10]} |")
    return "\n".join(lines)


def splice(readme: str, table: str) -> str:
    """README text with the part between BEGIN and END replaced by `table`."""
    if BEGIN not in readme or END not in readme:
        raise ValueError(f"README.md lacks the markers {BEGIN!r} ... {END!r}")
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{table}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 if README.md's table is not what the CSVs say")
    args = p.parse_args(argv)
    text = README.read_text()
    new = splice(text, render())
    if args.check:
        if new != text:
            print("README.md's measured table is stale: run `python -m bench.readme`", file=sys.stderr)
            return 1
        return 0
    README.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
