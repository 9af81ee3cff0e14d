"""Distillation: the RL model's correct reasoning traces teach a small dense student.

    python -m distill.run                                   # CPU default: traces from the tiny RL model, dense student
    python -m distill.run distill.kd_mode=online            # + forward-KL on the teacher's logits (teacher in memory)
    python -m distill.run distill.kd_mode=topk distill.traces.cache_topk=32   # + KL on cached top-32 teacher logits
    python -m distill.run experiment=smoke                  # micro scale, seconds
    make distill RUN=<run>

Reads `outputs/<run>/data/` (tokenizer, reasoning train/test) and the newest checkpoint of `outputs/<run>/rl/`
(the teacher; when the run has no rl/ stage the newest of sft/ is used instead and the reason is printed); writes
`outputs/<run>/distill/`: traces/ (`datasets` directory + provenance.json), checkpoints/ (the student, DCP, with
model_config.json), metrics.jsonl, traces.jsonl (a sample table), manifest.json and the W&B run.

DeepSeek-R1 (section 4.1) found that distilling R1's outputs into small dense models beats running large-scale RL
on those small models directly: the small model inherits reasoning patterns its own exploration would not find.
The stage reproduces that pipeline at our scale:

1. Teacher traces (distill/traces.py): K samples per training prompt from the RL checkpoint; rejection sampling
   keeps the correct, well-formatted, finished ones; the set is saved with its provenance (teacher checkpoint hash,
   sampling settings, acceptance rate) and logged as a W&B artifact. An existing trace set with the same
   provenance key (teacher hash, inputs, sampling settings, seed) is reused, so a re-run after a crash in student
   training does not sample again. A teacher with no correct answer stops the stage with a clear error (the smoke
   experiment, whose micro teacher is untrained, sets `traces.fallback_to_reference` instead).
2. Student (distill/student.py): the dense `student` preset, vocabulary from the tokenizer, first pretrained on
   the run's pretraining data (distill/student_base.py: its own stage `student_base/`, as R1's students are
   pretrained models; `student_init=scratch` skips it), then trained by SFT on the traces; with
   `kd_mode=online|topk` also by forward KL to the teacher's softened logits.
3. Metrics: as in SFT (loss, CE, grad norm, tokens/s), the acceptance rate, the student's held-out accuracy every
   `eval_every` steps, and at the end the teacher's and the student's held-out accuracies (greedy, same prompts,
   same grader), their ratio, and both models' activated parameters per token (model.info) and their ratio.

Where this departs from R1: R1's students are pretrained LLMs fine-tuned on 800k samples; ours is pretrained for
a few minutes on the same small corpus as the teacher and sees a few thousand traces of procedurally generated
arithmetic and Countdown tasks.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, replace
from pathlib import Path

import hydra
from datasets import load_from_disk
from omegaconf import DictConfig

from data.outputs import stage_outputs
from data.tokenizer import load_tokenizer
from distill.config import DistillConfig
from distill.student import train_student
from distill.student_base import pretrain_student_base
from distill.traces import build_traces, load_traces, read_provenance, sampling_settings, trace_key
from model.config import ModelConfig, load_preset
from model.info import model_info
from pipeline.config import Config, stage_dir, to_config
from pipeline.io import hash_path
from pipeline.seed import seed_everything
from pipeline.stage import StageRun
from train.checkpoint import CheckpointManager, read_model_config
from train.parallel.parallelize import world_size_from_env
from train.policy import evaluate_accuracy, load_policy
from train.runtime import build_model, device_for, dist_info, require_one_process, resolve_precision

log = logging.getLogger(__name__)

STAGE = "distill"


def resolve_teacher(run_dir: Path, d: DistillConfig) -> tuple[Path, str]:
    """(checkpoint, where it came from): the configured path, else the newest RL checkpoint, else the newest SFT one
    (printed with the reason)."""
    if d.teacher != "auto":
        path = Path(d.teacher)
        if not path.is_dir():
            raise FileNotFoundError(f"distill.teacher={d.teacher!r}: no checkpoint directory there")
        return path, "configured"
    for stage in ("rl", "sft"):
        found = (
            CheckpointManager(run_dir / stage / "checkpoints", keep_last=0).checkpoints()
            if (run_dir / stage / "checkpoints").is_dir()
            else []
        )
        if found:
            if stage == "sft":
                log.warning(
                    "distill: no RL checkpoint under %s; using the newest SFT checkpoint %s as the teacher",
                    run_dir / "rl" / "checkpoints",
                    found[-1],
                )
            return found[-1], stage
    raise FileNotFoundError(f"no teacher: no checkpoint under {run_dir / 'rl'} or {run_dir / 'sft'} (run rl first)")


def build_student(
    d: DistillConfig, vocab_size: int, precision: str, backend: str, device, base: Path | None = None
) -> tuple:
    """The student model and its config: the preset with the tokenizer's vocabulary (scratch), the pretrained
    student base (`base`, for student_init=pretrain), or a student checkpoint."""
    if d.student_init == "scratch":
        mcfg = load_preset(d.student, vocab_size=vocab_size)
        return build_model(mcfg, precision, backend, device), mcfg
    init = base if d.student_init == "pretrain" else Path(d.student_init)
    if init is None:
        raise ValueError("distill.student_init=pretrain: the student base checkpoint was not built")
    mcfg = ModelConfig(**read_model_config(init))
    model = build_model(mcfg, precision, backend, device)
    CheckpointManager(init.parent, keep_last=0).load(init, model, restore_rng=False)
    return model, mcfg


def teacher_traces(cfg: Config, paths: dict[str, Path], teacher_source: str, teacher, tok, rows, traces_dir: Path):
    """The accepted traces and their provenance: an existing trace set with the same key (teacher hash, inputs,
    sampling settings, seed) is reused, else the teacher samples them now (distill/traces.py)."""
    d = cfg.distill
    identity = {
        "teacher_checkpoint": str(paths["teacher"]),
        "teacher_source": teacher_source,
        "teacher_hash": hash_path(paths["teacher"]),
        "tokenizer_hash": hash_path(paths["tokenizer"]),
        "reasoning_hash": hash_path(paths["reasoning"]),
        "precision": cfg.precision,
    }
    existing = read_provenance(traces_dir)
    if existing is not None and trace_key(existing) == trace_key(identity | sampling_settings(d.traces, cfg.run.seed)):
        traces, provenance = load_traces(traces_dir)
        log.info("distill: reusing %d traces in %s (same teacher, inputs and sampling)", len(traces), traces_dir)
        return traces, provenance
    return build_traces(
        teacher,
        tok,
        rows,
        d.traces,
        provenance=identity,
        out_dir=traces_dir,
        seed=cfg.run.seed,
        precision=cfg.precision,
    )


def distill(cfg: Config, stage: StageRun, paths: dict[str, Path], teacher_source: str) -> dict:
    d = cfg.distill.validate()
    info = dist_info()
    device = device_for(info)
    cfg = replace(cfg, precision=resolve_precision(cfg.precision, device))
    seed_everything(cfg.run.seed, cfg.run.deterministic)
    tok = load_tokenizer(paths["tokenizer"])
    vocab = tok.get_vocab_size(with_added_tokens=True)
    ds = load_from_disk(str(paths["reasoning"]))
    train_rows = ds["train"].to_list()[: d.traces.n_prompts or None]
    test_rows = ds["test"].to_list()[: d.eval_n]
    if not train_rows:
        raise ValueError(f"the reasoning train split at {paths['reasoning']} is empty")
    teacher, tcfg = load_policy(
        paths["teacher"], cfg.precision, cfg.kernels.backend, device, cfg.kernels.scale_formats()
    )
    if d.kd_mode != "none" and tcfg.vocab_size != vocab:
        raise ValueError(
            f"logit distillation needs the teacher's vocabulary ({tcfg.vocab_size}) to equal the "
            f"tokenizer's ({vocab}), which the student uses"
        )
    tracker = stage.tracker

    # ---- 1. teacher traces (reused when an identical trace set exists)
    traces_dir = stage.dir / "traces"
    traces, provenance = teacher_traces(cfg, paths, teacher_source, teacher, tok, train_rows, traces_dir)
    stats = provenance["stats"]
    log.info(
        "distill: %d traces, acceptance rate %.3f (%d/%d samples correct)",
        stats["accepted"],
        stats["acceptance_rate"],
        stats["correct"],
        stats["samples"],
    )
    sample = traces[:: max(1, len(traces) // 8)][:8]
    tracker.log_table(
        "traces",
        ["source_id", "prompt", "completion"],
        [[r["source_id"], r["prompt"], r["completion"]] for r in sample],
        step=0,
    )

    # ---- teacher's held-out accuracy (the reference for the student's)
    teacher_eval = {}
    if test_rows:
        ev = evaluate_accuracy(teacher, tok, test_rows, max_new_tokens=d.eval_max_new_tokens, precision=cfg.precision)
        teacher_eval = {"teacher_eval_accuracy": ev["accuracy"], "teacher_eval_format_rate": ev["format_rate"]}
    tracker.log(
        {
            "acceptance_rate": stats["acceptance_rate"],
            "n_traces": stats["accepted"],
            "prompt_coverage": stats["prompt_coverage"],
            **teacher_eval,
        },
        step=0,
    )
    if d.kd_mode != "online":
        del teacher  # not needed for SFT or cached top-k distillation: free it before the student trains
        teacher = None

    # ---- 2. the student
    student, scfg = build_student(d, vocab, cfg.precision, cfg.kernels.backend, device, paths.get("student_base"))
    if scfg.vocab_size != vocab:
        raise ValueError(
            f"the student's vocabulary ({scfg.vocab_size}) differs from the tokenizer's ({vocab}): "
            f"distill.student_init={d.student_init!r} was trained with another tokenizer"
        )
    t_act, s_act = model_info(tcfg).activated, model_info(scfg).activated
    log.info(
        "distill: teacher %s activated parameters per token, student %s (%.3fx)",
        f"{t_act:,}",
        f"{s_act:,}",
        s_act / t_act,
    )
    result = train_student(
        student,
        tok,
        traces,
        test_rows,
        d,
        ckpt_dir=stage.dir / "checkpoints",
        model_config=asdict(scfg),
        tracker=tracker,
        teacher=teacher,
        precision=cfg.precision,
        seed=cfg.run.seed,
        progress=info.is_main,
    )

    # ---- 3. the comparison the issue asks for
    out = {
        **result,
        **teacher_eval,
        "acceptance_rate": stats["acceptance_rate"],
        "n_traces": stats["accepted"],
        "prompt_coverage": stats["prompt_coverage"],
        "teacher_source": teacher_source,
        "teacher_activated_params": t_act,
        "student_activated_params": s_act,
        "activated_params_ratio": s_act / t_act,
        "precision": cfg.precision,
    }
    if teacher_eval and "eval_accuracy" in result:
        t_acc = teacher_eval["teacher_eval_accuracy"]
        out["accuracy_ratio"] = result["eval_accuracy"] / t_acc if t_acc > 0 else None  # undefined at 0
        log.info(
            "distill: held-out accuracy teacher %.3f, student %.3f (ratio %s) with %.3fx the activated parameters",
            t_acc,
            result["eval_accuracy"],
            out["accuracy_ratio"],
            s_act / t_act,
        )
    return out


def run(cfg: Config) -> dict:
    require_one_process("distill.run", world_size_from_env())
    run_dir = Path(cfg.run.root) / cfg.run.name
    data = stage_outputs(stage_dir(cfg, "data"))
    teacher, source = resolve_teacher(run_dir, cfg.distill)
    paths = {"tokenizer": data["tokenizer"], "reasoning": data["reasoning"], "teacher": teacher}
    if cfg.distill.student_init == "pretrain":  # its own stage (skipped when unchanged), before this one opens
        paths["student_base"] = pretrain_student_base(cfg)
    elif cfg.distill.student_init != "scratch":  # a given checkpoint is an input: its content enters the work key
        paths["student_init"] = Path(cfg.distill.student_init)
    info = dist_info()
    stage = StageRun(cfg, STAGE, inputs=paths, rank=info.rank, resume=cfg.distill.resume)
    if stage.up_to_date():
        return stage.previous_metrics()
    with stage:
        result = distill(cfg, stage, paths, source)
        outputs = {"traces": stage.dir / "traces", "checkpoint": Path(result["checkpoint"])}
        return stage.finish(outputs=outputs, metrics=result)


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(dcfg: DictConfig) -> None:
    print(json.dumps(run(to_config(dcfg)), indent=2, default=str))


if __name__ == "__main__":
    main()
