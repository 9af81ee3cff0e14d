"""The evaluation stage: every checkpoint of a run through every enabled suite, into one `eval.json`.

    python -m eval.run                                   # every checkpoint of outputs/default/ (make eval)
    python -m eval.run run.name=exp1 eval=smoke          # micro budget, seconds per checkpoint
    python -m eval.run ckpt=outputs/exp1/sft/checkpoints/step_000150      # one DCP checkpoint
    python -m eval.run ckpt=outputs/exp1/rl/hf           # a Hugging Face directory (model.hf export / the release)
    python -m eval.run eval.humaneval.n_samples=20 eval.humaneval.temperature=0.8 eval.humaneval.ks=[1,10]  # pass@10
    make eval RUN=<run>

(`ckpt=X` is shorthand for `eval.ckpt=X`.) One process, one device: evaluation is generation-bound and a tiny
model does not shard; a large one is evaluated through its HF export on one GPU.

Checkpoints. Without `ckpt=`, the stage evaluates the newest checkpoint of each training stage of the run:
`outputs/<run>/{pretrain,sft,rl}/checkpoints/step_*` (labels pretrain, sft, rl) and the distilled student
`outputs/<run>/distill/checkpoints/step_*` (label student), falling back to a stage's `hf/` export when it has no
checkpoints directory. A DCP checkpoint carries its `model_config.json`; an HF directory its `config.json` and
`tokenizer.json`. With `ckpt=` inside a run directory (an ancestor holding `data/tokenizer.json`), that run's data
and `eval/` directory are used.

Suites (`conf/eval/`, each `eval.<suite>.enabled`), in `eval/suite_*.py`:
  bpb        bits per byte and loss on the held-out validation split (mixed code and text) and on HumanEval code
  fim        single-line infilling on HumanEval (PSM and SPM): exact match and pass@1 in the sandbox
  humaneval  pass@k (unbiased, n samples; greedy pass@1 over all 164 problems by default) in the sandbox
  reasoning  held-out pass@1 over k samples with the RL graders; GSM8K when a local copy is configured
  moe        expert load per layer and MaxVio on the validation windows

Every score carries a 95% interval over its problems (`eval/stats.py`: Wilson for one binary outcome per problem,
the bootstrap over problems otherwise) and its floors: what an empty completion, a copied prompt or a context-free
model scores on the same problems, computed by the same scorer (each suite's docstring says which apply). The
run's data stage is `run.data_from`'s when set (the seeds of `bench/seeds.py` share one).

Writes `outputs/<run>/eval/`: eval.json = {checkpoint label: {suite: {metric: value, ..., "ci": {metric: [low,
high]}, "floor": {metric: {floor: value}}}}}, samples_<label>_<suite>.jsonl (the sample tables, also logged to W&B),
metrics.jsonl, manifest.json, and the W&B run whose summary holds every metric as `<label>/<suite>/<metric>` (with
`.../ci_low`, `.../ci_high`, `.../floor_<name>`).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

import hydra
from omegaconf import DictConfig

from data.tokenizer import load_tokenizer
from eval import suite_code, suite_lm, suite_reasoning
from eval.checkpoints import discover_checkpoints, label_of, load_checkpoint, resolve_tokenizer, run_dir_of
from eval.config import EvalConfig
from eval.generation import ModelGenerator, SuiteResult
from pipeline.config import Config, stage_dir, to_config
from pipeline.io import atomic_write_json
from pipeline.seed import seed_everything
from pipeline.stage import StageRun
from rewards.humaneval import load_problems
from train.runtime import device_for, dist_info, resolve_precision

log = logging.getLogger(__name__)

STAGE = "eval"
SUITES = ("bpb", "fim", "humaneval", "reasoning", "moe")


# ---------------------------------------------------------------- one checkpoint


def evaluate_checkpoint(
    model,
    tokenizer,
    ecfg: EvalConfig,
    data: dict[str, Path | None],
    precision: str = "fp32",
    tracker=None,
    label: str = "ckpt",
    floor_cache: dict | None = None,
) -> dict[str, dict]:
    """{suite: metrics + {"ci": {metric: [low, high]}, "floor": {metric: {floor: value}}}} of one model; sample tables
    go to the tracker as `samples_<label>_<suite>`. The generative suites' floors do not depend on the model: pass
    the same `floor_cache` dict for every checkpoint of a run and they are computed once."""
    cache = floor_cache if floor_cache is not None else {}
    problems = load_problems()
    workers = ecfg.sandbox_workers
    gen = ModelGenerator(model, tokenizer, precision=precision, seed=ecfg.seed, batch_size=ecfg.reasoning.batch_size)
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    if vocab > model.config.vocab_size:
        raise ValueError(f"tokenizer has {vocab} tokens but the model only {model.config.vocab_size}: wrong tokenizer?")
    batches = None
    if (ecfg.bpb.enabled or ecfg.moe.enabled) and data.get("val") is not None:
        n = max(ecfg.bpb.batches, ecfg.moe.batches)
        batches = suite_lm.val_batches(data["val"], model, ecfg.bpb.batch_size, n, ecfg.bpb.seq_len)
    results: dict[str, dict] = {}
    for suite in SUITES:
        if not getattr(ecfg, suite).enabled:
            continue
        t0 = time.perf_counter()
        if suite in ("bpb", "moe") and batches is None:
            res = SuiteResult({"skipped": "no validation split (outputs/<run>/data/val) for this checkpoint"})
        elif suite == "bpb":
            chosen = batches[: ecfg.bpb.batches]
            res = suite_lm.run_bpb(model, tokenizer, chosen, problems, ecfg.bpb, precision, data.get("train"))
        elif suite == "moe":
            res = suite_lm.run_moe(model, batches, ecfg.moe, precision)
        elif suite == "fim":
            gen.batch_size = ecfg.fim.batch_size
            res = suite_code.run_fim(gen, problems, ecfg.fim, ecfg.seed, workers, ecfg.table_rows, cache.get(suite))
        elif suite == "humaneval":
            gen.batch_size = ecfg.humaneval.batch_size
            res = suite_code.run_humaneval(gen, problems, ecfg.humaneval, workers, ecfg.table_rows, cache.get(suite))
        else:
            gen.batch_size = ecfg.reasoning.batch_size
            r = ecfg.reasoning
            rows = suite_reasoning.load_test_rows(data["reasoning"], r.n) if data.get("reasoning") is not None else []
            gsm8k = suite_reasoning.load_gsm8k_rows(r.gsm8k_path, r.gsm8k_n)
            res = suite_reasoning.run_reasoning(gen, rows, r, gsm8k, gen.count_tokens, ecfg.table_rows)
            if data.get("reasoning") is None:
                res.metrics["skipped"] = "no reasoning test split (outputs/<run>/data/reasoning)"
        if suite in ("fim", "humaneval"):
            cache[suite] = res.floors
        res.metrics["seconds"] = round(time.perf_counter() - t0, 2)
        results[suite] = res.metrics | {
            "ci": {k: [round(lo, 6), round(hi, 6)] for k, (lo, hi) in res.intervals.items()},
            "floor": res.floors,
        }
        if tracker is not None and res.samples:
            columns = list(res.samples[0])
            tracker.log_table(f"samples_{label}_{suite}", columns, [[row[c] for c in columns] for row in res.samples])
        log.info("[eval] %s/%s: %s", label, suite, summarize(res.metrics))
    results["generation"] = dict(gen.stats)
    return results


def summarize(metrics: dict) -> str:
    shown = [
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
        for k, v in metrics.items()
        if isinstance(v, int | float | str) and k != "seconds"
    ]
    return ", ".join(shown[:8])


def flat_metrics(results: dict[str, dict[str, dict]]) -> dict[str, float | int | str]:
    """`<label>/<suite>/<metric>` for every scalar, with `<metric>/ci_low`, `<metric>/ci_high` and
    `<metric>/floor_<name>` beside it (lists such as expert_load stay in eval.json only)."""
    flat: dict[str, float | int | str] = {}
    for label, suites in results.items():
        for suite, m in suites.items():
            key = f"{label}/{suite}"
            flat |= {f"{key}/{k}": v for k, v in m.items() if isinstance(v, int | float | str)}
            for k, (lo, hi) in m.get("ci", {}).items():
                flat |= {f"{key}/{k}/ci_low": lo, f"{key}/{k}/ci_high": hi}
            for k, floors in m.get("floor", {}).items():
                flat |= {f"{key}/{k}/floor_{name}": v for name, v in floors.items()}
    return flat


# ---------------------------------------------------------------- the stage


def run(cfg: Config) -> dict:
    ecfg = cfg.eval
    ecfg.validate()
    if ecfg.ckpt:
        ckpt = Path(ecfg.ckpt)
        if not ckpt.exists():
            raise FileNotFoundError(f"ckpt={ckpt} does not exist")
        found = run_dir_of(ckpt)
        if found is not None:  # evaluate inside the checkpoint's own run directory
            cfg = replace(cfg, run=replace(cfg.run, root=str(found.parent), name=found.name))
        checkpoints = {label_of(ckpt, found): ckpt}
    run_dir = Path(cfg.run.root) / cfg.run.name
    if not ecfg.ckpt:
        checkpoints = discover_checkpoints(run_dir)
        if not checkpoints:
            raise FileNotFoundError(f"no checkpoint under {run_dir}/{{pretrain,sft,rl,distill}}/ (or pass ckpt=<dir>)")
    data_dir = stage_dir(cfg, "data")  # this run's, or run.data_from's
    data = {k: data_dir / k for k in ("val", "reasoning", "train")}
    data = {k: (p if p.exists() else None) for k, p in data.items()}
    tokenizers = {
        label: resolve_tokenizer(p, ecfg.tokenizer, data_dir if data_dir.is_dir() else None)
        for label, p in checkpoints.items()
    }
    inputs = {f"ckpt_{label}": p for label, p in checkpoints.items()}
    inputs |= {f"tokenizer_{label}": p for label, p in tokenizers.items()}
    inputs |= {k: p for k, p in data.items() if p is not None}
    stage = StageRun(cfg, STAGE, inputs=inputs)
    if stage.up_to_date():
        return stage.previous_metrics()
    device = device_for(dist_info())
    with stage:
        cfg = replace(cfg, precision=resolve_precision(cfg.precision, device))  # read while the stage records
        for old in stage.dir.glob("samples_*.jsonl"):  # tables of a previous execution
            old.unlink()
        results, floor_cache = {}, {}
        for label, path in checkpoints.items():
            seed_everything(ecfg.seed, cfg.run.deterministic)
            model = load_checkpoint(path, cfg.precision, cfg.kernels.backend, device, cfg.kernels.scale_formats())
            tok = load_tokenizer(tokenizers[label])
            results[label] = evaluate_checkpoint(
                model, tok, ecfg, data, cfg.precision, stage.tracker, label, floor_cache
            )
            results[label]["checkpoint"] = {"path": str(path)}
            del model
        out = stage.dir / "eval.json"
        atomic_write_json(out, results)
        flat = flat_metrics(results) | {"precision": cfg.precision}
        stage.tracker.log({k: v for k, v in flat.items() if isinstance(v, int | float)})
        return stage.finish(outputs={"eval": out}, metrics=flat)


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(dcfg: DictConfig) -> None:
    print(json.dumps(run(to_config(dcfg)), indent=2, default=str))


def _ckpt_shorthand(argv: list[str]) -> list[str]:
    """`ckpt=X` on the command line means `eval.ckpt=X`."""
    return [f"eval.{a}" if a.startswith("ckpt=") else a for a in argv]


if __name__ == "__main__":
    sys.argv[1:] = _ckpt_shorthand(sys.argv[1:])
    main()
