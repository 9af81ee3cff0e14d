"""The parallel layout of a job, as a Hydra/OmegaConf structured config.

Four sizes describe every layout this project runs (torchtitan's vocabulary):

    world_size = pp * dp_replicate * dp_shard

- ``pp``: pipeline stages (``torch.distributed.pipelining``).
- ``dp_replicate``: pure data-parallel replicas (DDP, or the replicate dim of HSDP).
- ``dp_shard``: ZeRO-3 sharding of parameters, gradients and optimizer state (FSDP2 ``fully_shard``).
- ``-1`` in ``dp_replicate`` or ``dp_shard`` (at most one of them) means "every rank left over", e.g.
  ``dp_shard = world_size // (pp * dp_replicate)``: one preset then fits any number of GPUs.
- ``ep``: expert parallelism. It is NOT a separate factor of the world size: EP *borrows* ranks from the
  ``dp_shard`` dimension (as torchtitan does), so ``ep`` must divide ``dp_shard``. The ``ep`` ranks of one EP group
  see different tokens (they are data-parallel for the dense part) and each holds ``n_routed_experts / ep`` experts;
  the ``dp_shard / ep`` EP groups inside one shard group hold copies of the same experts, which FSDP shards again.

Pipeline parallelism (``pp > 1``, train/parallel/pipeline_parallel.py) has two more fields:

- ``pp_schedule``: ``1f1b`` (one stage per rank) or ``dualpipev`` (DeepSeek's DualPipe "V": two stages per rank,
  the first and the last on pp rank 0; needs ``n_microbatches >= 2 * pp``; the only schedule that keeps MTP).
- ``pp_microbatches``: pipeline micro-batches (of ``train.micro_batch_size`` sequences) per schedule round;
  ``-1`` (default) puts all of a step's micro-batches, ``batch_size / (micro_batch_size * dp ranks)``, into one
  round; a positive value must divide that count (the step then runs several rounds and accumulates).

``grad_sync``: ``last`` (default) reduces gradients over the data-parallel ranks once per optimizer step, in the
last accumulation micro-batch's backward (FSDP2 keeps the unsharded gradients of the micro-batches before it:
DDP's memory for gradients); ``every`` reduce-scatters after every micro-batch (ZeRO-3's gradient memory, ``accum``
times the traffic). Pipeline stages always reduce in the last micro-batch's backward.

The presets in ``conf/parallel/*.yaml`` are flat mappings of these fields. ``validate()`` checks what does not
depend on the world size (at compose time); ``train.parallel.mesh.validate_layout`` the rest, at launch.
"""

from dataclasses import dataclass, replace

__all__ = ["GRAD_SYNCS", "PP_SCHEDULES", "ParallelConfig"]

PP_SCHEDULES = ("1f1b", "dualpipev")
GRAD_SYNCS = ("last", "every")


@dataclass
class ParallelConfig:
    dp_replicate: int = 1
    dp_shard: int = -1
    ep: int = 1
    pp: int = 1
    pp_schedule: str = "1f1b"  # "1f1b" | "dualpipev" (only read when pp > 1)
    pp_microbatches: int = -1  # micro-batches per schedule round; -1: every micro-batch of the step
    fp8_dispatch: bool = False  # EP dispatch sends activations as e4m3 + a per-token scale (DeepSeek-V3 sec. 3.3)
    bf16_combine: bool = False  # EP combine sends expert outputs in bfloat16 (DeepSeek-V3); else in their dtype
    grad_sync: str = "last"  # "last": reduce gradients once, after the last micro-batch | "every" micro-batch

    def validate(self) -> None:
        """The rules that hold whatever the world size (each message starts with the field it names)."""
        for name in ("dp_replicate", "dp_shard", "ep", "pp"):
            value = getattr(self, name)
            if value < 1 and not (value == -1 and name in ("dp_replicate", "dp_shard")):
                raise ValueError(f"{name} must be >= 1 (or -1 for dp_replicate/dp_shard), got {value}")
        if self.dp_replicate == -1 and self.dp_shard == -1:
            raise ValueError("at most one of dp_replicate, dp_shard may be -1 (fill the rest), got both")
        if self.pp_schedule not in PP_SCHEDULES:
            raise ValueError(f"pp_schedule must be one of {PP_SCHEDULES}, got {self.pp_schedule!r}")
        if self.pp_microbatches < 1 and self.pp_microbatches != -1:
            raise ValueError(f"pp_microbatches must be >= 1 (or -1: every micro-batch), got {self.pp_microbatches}")
        for flag in ("fp8_dispatch", "bf16_combine"):
            if getattr(self, flag) and self.ep == 1:
                raise ValueError(f"{flag}=true needs parallel.ep > 1 (without EP there is no all-to-all), got ep=1")
        if self.grad_sync not in GRAD_SYNCS:
            raise ValueError(f"grad_sync must be one of {GRAD_SYNCS}, got {self.grad_sync!r}")

    def resolved(self, world_size: int) -> "ParallelConfig":
        """A copy with the ``-1`` size replaced by the number of ranks left over. Raises ValueError when two
        sizes are -1 or the rest does not divide; the full check is ``train.parallel.mesh.validate_layout``."""
        auto = [name for name in ("dp_replicate", "dp_shard") if getattr(self, name) == -1]
        if not auto:
            return replace(self)
        if len(auto) > 1:
            raise ValueError("at most one of parallel.dp_replicate, parallel.dp_shard may be -1 (fill the rest)")
        fixed = self.pp * (self.dp_shard if auto[0] == "dp_replicate" else self.dp_replicate)
        if fixed < 1 or world_size % fixed != 0:
            raise ValueError(
                f"parallel.{auto[0]}=-1 cannot fill world_size={world_size}: the other sizes multiply to {fixed}"
            )
        return replace(self, **{auto[0]: world_size // fixed})
