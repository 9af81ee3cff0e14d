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

The presets in ``conf/parallel/*.yaml`` are flat mappings of these fields.
"""

from dataclasses import dataclass, replace

__all__ = ["ParallelConfig"]


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
