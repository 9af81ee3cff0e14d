"""Typed configuration of the training loops (pretraining here; SFT and GRPO extend it)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class OptimConfig:
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # final learning rate = lr * min_lr_ratio
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping (the norm is still measured)
    bf16_moments: bool = False  # keep AdamW's first and second moments in BF16, as DeepSeek-V3 does
    schedule: str = "wsd"  # "wsd": warmup, constant, cosine decay (DeepSeek-V3's shape) | "cosine"
    warmup_steps: int = 20
    decay_start: float = 0.7  # wsd: fraction of the run after which the cosine decay starts


@dataclass
class TrainConfig:
    steps: int = 400
    batch_size: int = 16  # sequences per optimizer step, over all data-parallel ranks
    micro_batch_size: int = 8  # sequences per forward/backward on one rank; accumulation fills the rest
    seq_len: int = 256
    log_every: int = 1
    eval_every: int = 100
    eval_batches: int = 8
    ckpt_every: int = 100
    keep_last: int = 2
    resume: str = "auto"  # "auto": newest valid checkpoint of this run | "none" | a checkpoint path
    ema_decay: float = 0.995  # 0 disables the EMA
    ema_every: int = 1  # EMA update period in steps (kept off the hot path: no_grad foreach lerp)
    max_bad_steps: int = 5  # consecutive NaN/Inf steps before the run stops (with a checkpoint)
    peak_tflops: float = 1.0  # hardware peak for MFU (bf16 dense); ~1 for 2 CPU cores, 989 for an H100
    export_hf: bool = True  # write an HF-format export of the final weights beside the checkpoints
    optim: OptimConfig = field(default_factory=OptimConfig)
    inject_nan_at_step: int = -1  # fault-injection for tests: make that step's loss NaN
