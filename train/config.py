"""Typed configuration of the training loops (pretraining here; SFT and GRPO in train/post_config.py).

Each dataclass states its own rules in `validate()`, which `pipeline.config.to_config` calls when the config is
composed (the message is prefixed with the section's key, e.g. `train.optim: schedule must be one of ...`). Rules
that involve other sections or the number of processes (the sequence length against the model's context, the
batch against the data-parallel ranks, the pipeline's micro-batches) are checked by the stage before any work:
`train.pretrain.check_config`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SCHEDULES = ("wsd", "cosine")
ACTIVATION_CHECKPOINTING = ("none", "full")


def check_positive(section: object, *names: str, minimum: float = 1) -> None:
    """ValueError naming the first of `names` whose value is below `minimum`."""
    for name in names:
        value = getattr(section, name)
        if value < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {value}")


def check_choice(section: object, name: str, allowed: tuple[str, ...]) -> None:
    value = getattr(section, name)
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def check_batches(section: object) -> None:
    """`batch_size` splits into micro-batches of `micro_batch_size` (a smaller batch is one micro-batch)."""
    check_positive(section, "batch_size", "micro_batch_size")
    b, m = section.batch_size, section.micro_batch_size
    if b >= m and b % m:
        raise ValueError(
            f"batch_size={b} is not divisible by micro_batch_size={m} (set micro_batch_size to a divisor of {b})"
        )


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

    def validate(self) -> None:
        check_choice(self, "schedule", SCHEDULES)
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        for name in ("min_lr_ratio", "decay_start"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.eps <= 0:
            raise ValueError(f"eps must be > 0, got {self.eps}")
        check_positive(self, "weight_decay", "grad_clip", "warmup_steps", minimum=0)


@dataclass
class TrainConfig:
    steps: int = 400
    batch_size: int = 16  # sequences per optimizer step, over all data-parallel ranks
    # sequences per forward/backward on one rank; accumulation fills the rest. When batch_size is smaller than
    # micro_batch_size x data-parallel ranks, each rank takes one micro-batch of batch_size / ranks sequences
    micro_batch_size: int = 8
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
    # build the model on the meta device and materialise each rank's shard after parallelization (no rank ever
    # holds the whole model); the initial weights are init_weights()'s on the seeded generator, the same for every
    # layout, but not the same draw as the default construction on the device
    meta_init: bool = False
    activation_checkpointing: str = "none"  # "none" | "full": every decoder layer recomputed in backward
    async_checkpoint: bool = False  # DCP async_save: training continues while the checkpoint is written
    optim: OptimConfig = field(default_factory=OptimConfig)
    inject_nan_at_step: int = -1  # fault-injection for tests: make that step's loss NaN

    def validate(self) -> None:
        check_positive(self, "steps", "seq_len", "log_every", "eval_every", "eval_batches", "ckpt_every")
        check_positive(self, "ema_every", "max_bad_steps")
        check_positive(self, "keep_last", minimum=0)
        check_batches(self)
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1) (0 disables the EMA), got {self.ema_decay}")
        if self.peak_tflops <= 0:
            raise ValueError(f"peak_tflops must be > 0, got {self.peak_tflops}")
        check_choice(self, "activation_checkpointing", ACTIVATION_CHECKPOINTING)
