"""One device mesh for the whole job, built from ``ParallelConfig``.

How the ranks are laid out
--------------------------
The dense mesh has three named dimensions, outermost first::

    ("pp", "dp_replicate", "dp_shard")        world_size = pp * dp_replicate * dp_shard

so rank = pp_i * (dp_replicate * dp_shard) + r_i * dp_shard + s_i: the shard dimension is innermost and its ranks
are consecutive (on GPUs, the same node: FSDP's all-gathers and EP's all-to-alls stay on NVLink).

Expert parallelism borrows from ``dp_shard`` (torchtitan's choice): the same ranks are viewed a second time, with
``dp_shard`` unflattened into ``("dp_shard_mod_ep", "ep")``::

    sparse mesh: ("pp", "dp_replicate", "dp_shard_mod_ep", "ep")

- ``ep`` (innermost, consecutive ranks): one EP group. Its ranks hold different tokens (they are ordinary
  data-parallel ranks for attention and the dense layers) and different routed experts; tokens travel to the
  ranks that own their experts with all-to-all (``train.parallel.expert_parallel``).
- ``("dp_replicate", "dp_shard_mod_ep")``: the ranks that hold the SAME experts; expert parameters are replicated
  / FSDP-sharded over it, exactly as dense parameters are over ``("dp_replicate", "dp_shard")``.

A separate EP dimension (world = pp * dp * ep) would also work, but then the ``ep`` ranks would not do data-parallel
work for the dense part; borrowing keeps every rank busy with its own micro-batch.

Legend: E = routed experts.
"""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from train.parallel.config import ParallelConfig

__all__ = ["ParallelMeshes", "build_mesh", "validate_layout"]

# CUDA: NCCL for the training tensors, and gloo for the few CPU-side collectives of torch's own (async DCP's
# coordination, object collectives) in the same device-mapped group, as torchtitan creates it
_BACKENDS = {"cpu": "gloo", "cuda": "cuda:nccl,cpu:gloo"}


def validate_layout(cfg: ParallelConfig, world_size: int, n_routed_experts: int | None = None) -> ParallelConfig:
    """Check that ``cfg`` describes a possible layout on ``world_size`` ranks; return it with -1 sizes resolved.

    Raises ValueError naming the offending field. ``n_routed_experts=None`` skips the expert check (a dense model).
    Pure: no process group needed.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    try:
        cfg.validate()
    except ValueError as e:
        raise ValueError(f"parallel.{e}") from None
    res = cfg.resolved(world_size)
    product = res.pp * res.dp_replicate * res.dp_shard
    if product != world_size:
        raise ValueError(
            f"parallel layout pp*dp_replicate*dp_shard = {res.pp}*{res.dp_replicate}*{res.dp_shard} = {product} "
            f"does not equal world_size={world_size}"
        )
    if res.dp_shard % res.ep != 0:
        raise ValueError(
            f"parallel.ep={res.ep} must divide parallel.dp_shard={res.dp_shard}: expert parallelism borrows its "
            "ranks from the shard dimension"
        )
    if n_routed_experts is not None and res.ep > 1 and n_routed_experts % res.ep != 0:
        raise ValueError(f"parallel.ep={res.ep} must divide n_routed_experts={n_routed_experts}")
    return res


def build_mesh(cfg: ParallelConfig, world_size: int, device_type: str) -> DeviceMesh:
    """The dense mesh ``("pp", "dp_replicate", "dp_shard")``; initializes the default process group (gloo on CPU;
    on CUDA nccl, device-mapped with gloo for CPU tensors) when the caller has not. Under torchrun, ``world_size``
    is ``int(os.environ["WORLD_SIZE"])``."""
    if device_type not in _BACKENDS:
        raise ValueError(f"device_type must be one of {tuple(_BACKENDS)}, got {device_type!r}")
    res = validate_layout(cfg, world_size)
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=_BACKENDS[device_type])
    if dist.get_world_size() != world_size:
        raise ValueError(f"world_size={world_size} but the process group has {dist.get_world_size()} ranks")
    return init_device_mesh(
        device_type, (res.pp, res.dp_replicate, res.dp_shard), mesh_dim_names=("pp", "dp_replicate", "dp_shard")
    )


@dataclass(frozen=True)
class ParallelMeshes:
    """The sub-meshes a trainer hands to FSDP2, pipelining and EP, derived once from the dense mesh.

    torch asks users to keep flattened meshes themselves rather than slicing them back out of the root mesh; this
    is that bookkeeping.
    """

    world: DeviceMesh  # ("pp", "dp_replicate", "dp_shard")
    sparse: DeviceMesh  # ("pp", "dp_replicate", "dp_shard_mod_ep", "ep"): the same ranks, for experts
    dp: DeviceMesh  # 1-D, every data-parallel rank of this stage: data loader rank, loss/metric averaging
    dense_fsdp: DeviceMesh  # 2-D ("dp_replicate", "dp_shard"): fully_shard mesh for dense parameters (HSDP)
    expert_fsdp: DeviceMesh  # 2-D ("dp_replicate", "dp_shard_mod_ep"): fully_shard mesh for routed experts
    ep: DeviceMesh  # 1-D ("ep",): the all-to-all group
    pp: DeviceMesh  # 1-D ("pp",)

    @classmethod
    def from_mesh(cls, mesh: DeviceMesh, ep: int) -> "ParallelMeshes":
        assert mesh.mesh_dim_names == ("pp", "dp_replicate", "dp_shard"), mesh.mesh_dim_names
        dp_shard = mesh["dp_shard"].size()
        if dp_shard % ep != 0:
            raise ValueError(f"ep={ep} must divide the mesh's dp_shard size {dp_shard}")
        sparse = mesh._unflatten("dp_shard", (dp_shard // ep, ep), ("dp_shard_mod_ep", "ep"))
        dense_fsdp = mesh["dp_replicate", "dp_shard"]
        return cls(
            world=mesh,
            sparse=sparse,
            dp=dense_fsdp._flatten("dp"),
            dense_fsdp=dense_fsdp,
            expert_fsdp=sparse["dp_replicate", "dp_shard_mod_ep"],
            ep=sparse["ep"],
            pp=mesh["pp"],
        )
