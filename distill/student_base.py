"""The student's base model: the pretraining loop run on the student preset, before distillation.

DeepSeek-R1 distils into pretrained models (Qwen2.5 and Llama 3 bases), not into random weights: the student
already knows the language and only has to learn to reason. At our scale the same holds. A student that starts from
scratch must learn the tokens, copying numbers from the prompt and arithmetic from a few thousand traces; on the
default run it ends with a lower held-out accuracy than a student distilled the same way from this base
(`python -m distill.run` with `distill.student_init=scratch` against the default; figures in the README).

`distill.student_init=pretrain` (the default) runs `train.pretrain_loop.train` — the pretraining stage's loop,
data shards, tokenizer, optimizer and schedule as the teacher's pretraining (`cfg.train`), with
`distill.student_base_steps` steps — on the `distill.student` preset, as a stage of its own,
`outputs/<run>/student_base/`: manifest, metrics.jsonl, W&B run in the run's group, DCP checkpoints; skipped when
its config and inputs are unchanged, resumed after a crash (`train.resume=auto`). The distillation stage then lists
the base checkpoint among its inputs, so the lineage reads data -> student_base -> distill.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from data.outputs import stage_outputs
from model.config import load_preset
from pipeline.config import Config, stage_dir
from pipeline.stage import StageRun
from train.pretrain_loop import train as pretrain_loop

log = logging.getLogger(__name__)

STAGE = "student_base"


def student_base_config(cfg: Config) -> Config:
    """The run's config with the student preset as the model and the base pretraining's step count (no HF export:
    the base is an intermediate, the distilled student is exported)."""
    d = cfg.distill
    model = load_preset(d.student)
    steps = d.student_base_steps
    every = {"eval_every": min(cfg.train.eval_every, steps), "ckpt_every": min(cfg.train.ckpt_every, steps)}
    train = replace(cfg.train, steps=steps, export_hf=False, **every)
    return replace(cfg, model=model, train=train)


def pretrain_student_base(cfg: Config) -> Path:
    """The newest checkpoint of `outputs/<run>/student_base/`, pretrained now unless an identical one exists."""
    scfg = student_base_config(cfg)
    data = stage_outputs(stage_dir(cfg, "data"))
    inputs = {"train_shards": data["train"], "val_shards": data["val"], "tokenizer": data["tokenizer"]}
    stage = StageRun(scfg, STAGE, inputs=inputs, resume=scfg.train.resume)
    result = stage.run_checkpointed(lambda st: pretrain_loop(scfg, st, data))
    if result.get("skipped"):
        log.info("distill: student base up to date in %s", stage.dir)
    return Path(result["checkpoint"])
