"""Typed configuration of the distillation stage (`conf/distill/`), merged into `pipeline.config.Config` as
`cfg.distill`. Plain dataclasses (OmegaConf structured configs): a misspelt key fails when the config is composed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from train.config import OptimConfig, check_batches, check_choice, check_positive

KD_MODES = ("none", "online", "topk")


def _student_optim() -> OptimConfig:
    return OptimConfig(lr=2e-3, min_lr_ratio=0.1, weight_decay=0.0, warmup_steps=10, schedule="cosine", grad_clip=1.0)


@dataclass
class TraceConfig:
    """Teacher sampling and rejection sampling (distill/traces.py)."""

    samples_per_prompt: int = 8  # K completions drawn per training prompt
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 96
    n_prompts: int = 0  # use the first n_prompts rows of the train split (0 = all)
    prompt_batch_size: int = 32  # prompts per generate() call (each prefilled once for its K samples)
    max_per_prompt: int = 4  # correct traces kept per prompt (0 = all); distinct completions only
    dedup: bool = True  # keep each distinct correct completion of a prompt once
    # also require every `a op b = c` step of the <think> to be true (rewards.graders.arithmetic_steps_valid): a right
    # answer reached through wrong arithmetic would teach the student wrong arithmetic
    verify_steps: bool = True
    cache_topk: int = 0  # >0: store the teacher's top-k logits of every response token (for kd_mode=topk)
    # when the teacher gets nothing right (an untrained smoke-test teacher), train on the data's reference traces
    # instead of failing; recorded as provenance["fallback"] = "reference". Off for real runs.
    fallback_to_reference: bool = False

    def validate(self) -> None:
        check_positive(self, "samples_per_prompt", "max_new_tokens", "prompt_batch_size")
        check_positive(self, "top_k", "n_prompts", "max_per_prompt", "cache_topk", minimum=0)
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"temperature must be >= 0 and top_p in (0, 1], got {self.temperature}, {self.top_p}")


@dataclass
class DistillConfig:
    teacher: str = "auto"  # "auto": newest of outputs/<run>/rl/checkpoints (else sft/, logged) | a checkpoint path
    student: str = "student"  # a model preset, conf/model/<name>.yaml (vocab_size is set from the tokenizer)
    # "pretrain": the student preset pretrained first on the run's data (distill/student_base.py, its own stage
    # outputs/<run>/student_base/) | "scratch": random weights | a student checkpoint path to continue from
    student_init: str = "pretrain"
    student_base_steps: int = 300  # pretraining steps of the student base (batch, length, optimizer: cfg.train)
    traces: TraceConfig = field(default_factory=TraceConfig)
    # student training: SFT on the accepted traces, optionally plus logit distillation
    steps: int = 2000
    batch_size: int = 32
    micro_batch_size: int = 32
    max_len: int = 256  # prompt + completion tokens; longer traces are dropped (and counted)
    kd_mode: str = "none"  # "none" (SFT only) | "online" (teacher forward per batch) | "topk" (cached top-k logits)
    kd_weight: float = 0.5  # loss = (1 - kd_weight) * CE + kd_weight * T^2 * KL(teacher_T || student_T)
    kd_temperature: float = 2.0
    log_every: int = 1
    eval_every: int = 250  # student held-out accuracy (greedy) every N steps and at the end (0: end only)
    eval_n: int = 500  # held-out prompts (greedy) scored for the student during training and for the teacher once
    eval_max_new_tokens: int = 96
    ckpt_every: int = 100
    keep_last: int = 2
    resume: str = "auto"  # "auto" | "none" | a checkpoint path
    max_bad_steps: int = 5
    optim: OptimConfig = field(default_factory=_student_optim)

    def validate(self) -> DistillConfig:
        check_choice(self, "kd_mode", KD_MODES)
        if self.kd_mode == "topk" and self.traces.cache_topk <= 0:
            raise ValueError("kd_mode=topk needs traces.cache_topk > 0 (the cached teacher logits), got 0")
        if not 0.0 <= self.kd_weight <= 1.0:
            raise ValueError(f"kd_weight must be in [0, 1], got {self.kd_weight}")
        if self.kd_temperature <= 0:
            raise ValueError(f"kd_temperature must be > 0, got {self.kd_temperature}")
        if self.student_init == "pretrain" and self.student_base_steps <= 0:
            raise ValueError(f"student_init=pretrain needs student_base_steps >= 1, got {self.student_base_steps}")
        check_positive(self, "steps", "max_len", "log_every", "ckpt_every", "max_bad_steps", "eval_max_new_tokens")
        check_positive(self, "eval_every", "eval_n", "keep_last", minimum=0)
        check_batches(self)
        self.traces.validate()
        return self
