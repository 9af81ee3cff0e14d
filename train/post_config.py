"""Typed configuration of reasoning post-training: cold-start SFT (`conf/sft/`) and GRPO (`conf/rl/`).

OmegaConf structured configs (plain dataclasses, `Optional`, nested dataclasses), merged into `pipeline.config.Config`
as `cfg.sft` and `cfg.rl`; a misspelt key fails when the config is composed, and so does a value `validate()`
refuses (an enum, a range, a rule between two fields).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from train.config import OptimConfig, check_batches, check_choice, check_positive

LOSS_AGGS = ("seq_mean", "token_mean", "seq_sum_norm")
ADV_NORMS = ("std", "none")


def _sft_optim() -> OptimConfig:
    return OptimConfig(lr=3e-3, min_lr_ratio=0.1, weight_decay=0.0, warmup_steps=10, schedule="cosine")


def _rl_optim() -> OptimConfig:
    return OptimConfig(lr=5e-5, min_lr_ratio=1.0, weight_decay=0.0, warmup_steps=0, schedule="cosine", grad_clip=1.0)


@dataclass
class SFTConfig:
    steps: int = 500
    batch_size: int = 32  # (prompt, trace) pairs per optimizer step
    micro_batch_size: int = 32
    max_len: int = 256  # tokens of prompt + completion; longer examples are dropped (and counted)
    n_train: int = 0  # use the first n_train rows of the train split (0 = all)
    log_every: int = 1
    ckpt_every: int = 100
    keep_last: int = 2
    resume: str = "auto"  # "auto" | "none" | a checkpoint path
    init: str = "auto"  # "auto": newest checkpoint of outputs/<run>/pretrain | a checkpoint path | "scratch"
    max_bad_steps: int = 5
    export_hf: bool = True
    eval_n: int = 500  # held-out prompts scored (greedy) at the end; 0 disables
    eval_max_new_tokens: int = 96
    table_every: int = 100  # greedy samples of a few prompts as a W&B table every N steps (0 disables)
    table_rows: int = 4
    lm_mix: float = 1.0  # weight of the pretraining-LM loss on the packed train shards each step (0 = off; lm_mix.py)
    lm_batch_size: int = 4  # packed pretraining windows per optimizer step when lm_mix > 0
    optim: OptimConfig = field(default_factory=_sft_optim)

    def validate(self) -> None:
        check_positive(self, "steps", "max_len", "log_every", "ckpt_every", "max_bad_steps", "eval_max_new_tokens")
        check_positive(self, "table_rows")
        check_positive(self, "n_train", "keep_last", "eval_n", "table_every", minimum=0)
        check_batches(self)
        check_lm_mix(self)


@dataclass
class GRPOConfig:
    steps: int = 150
    prompts_per_step: int = 16  # B prompts per batch
    group_size: int = 8  # G samples per prompt (one prefill each, see model.generate)
    max_new_tokens: int = 96
    temperature: float = 0.7  # rollout temperature tau; the loss optimizes the sampled policy softmax(logits / tau)
    top_p: float = 1.0
    updates_per_batch: int = 1  # mu: optimizer steps on each batch of rollouts (GRPO's inner iterations)
    micro_batch_size: int = 64  # sequences per forward/backward
    clip_eps: float = 0.2  # lower clip range: ratio >= 1 - clip_eps
    clip_eps_high: float = 0.28  # upper clip range: ratio <= 1 + clip_eps_high (DAPO's clip-higher; = clip_eps off)
    kl_coef: float = 0.01  # beta of the k3 KL penalty to the frozen reference (0 disables and skips the reference)
    loss_agg: str = "token_mean"  # "seq_mean" (GRPO) | "token_mean" (DAPO) | "seq_sum_norm" (Dr. GRPO)
    adv_norm: str = "std"  # "std": (r - mean) / std (GRPO) | "none": r - mean (Dr. GRPO)
    format_weight: float = 0.1  # reward = correct + format_weight * format
    n_train: int = 0  # use the first n_train prompts of the train split (0 = all)
    kinds: list[str] = field(default_factory=list)  # task kinds trained on (empty = all); evaluation keeps all
    init: str = "auto"  # "auto": newest checkpoint of outputs/<run>/sft | a checkpoint path
    log_every: int = 1
    table_every: int = 10  # a W&B table of prompts, completions, rewards every N steps (0 disables)
    table_rows: int = 8
    ckpt_every: int = 20
    keep_last: int = 2
    resume: str = "auto"
    max_bad_steps: int = 5
    export_hf: bool = True
    eval_n: int = 500  # held-out prompts scored (greedy) at the start and the end; 0 disables
    lm_mix: float = 1.0  # weight of the pretraining-LM loss on the packed train shards per update (0 = off)
    lm_batch_size: int = 4  # packed pretraining windows per optimizer step when lm_mix > 0
    optim: OptimConfig = field(default_factory=_rl_optim)

    def validate(self) -> None:
        check_choice(self, "loss_agg", LOSS_AGGS)
        check_choice(self, "adv_norm", ADV_NORMS)
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 (advantages are relative to the group), got {self.group_size}")
        check_positive(self, "steps", "prompts_per_step", "updates_per_batch", "micro_batch_size", "max_new_tokens")
        check_positive(self, "log_every", "ckpt_every", "max_bad_steps", "table_rows")
        check_positive(self, "n_train", "keep_last", "eval_n", "table_every", "kl_coef", "format_weight", minimum=0)
        if self.clip_eps <= 0 or self.clip_eps_high <= 0:
            raise ValueError(f"clip_eps and clip_eps_high must be > 0, got {self.clip_eps}, {self.clip_eps_high}")
        if self.temperature < 0 or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"temperature must be >= 0 and top_p in (0, 1], got {self.temperature}, {self.top_p}")
        check_lm_mix(self)


def check_lm_mix(section: SFTConfig | GRPOConfig) -> None:
    """`lm_mix`, the weight of the pretraining-LM term, is a finite number >= 0; its batch holds >= 1 window."""
    if not 0.0 <= section.lm_mix < math.inf:
        raise ValueError(f"lm_mix must be a finite weight >= 0 (0 = off), got {section.lm_mix}")
    check_positive(section, "lm_batch_size")
