"""Apply a parallel layout to a DeepseekV3 built for one device: the model code never changes (torchtitan's way).

What `parallelize` does, in order (world = pp * dp_replicate * dp_shard ranks, see train/parallel/config.py):

1. Expert parallelism (``ep > 1``): every ``DeepseekMoE`` becomes an ``ExpertParallelMoE`` over the mesh's EP group
   (train/parallel/expert_parallel.py): each rank keeps E / ep routed experts, tokens travel by all-to-all.
2. FSDP2 ``fully_shard`` (whenever there is more than one data-parallel rank):
   - the routed experts of each EP layer over ``("dp_replicate", "dp_shard_mod_ep")``, the ranks holding the same
     experts (``fully_shard_experts``, which also rescales their gradients by 1 / ep);
   - each decoder layer (main and MTP), then the root (embedding, final norm, head) over
     ``("dp_replicate", "dp_shard")``. One ``fully_shard`` per layer is the unit of communication: its parameters
     are all-gathered just before the layer runs and freed after, its gradients reduce-scattered as soon as its
     backward is done, so communication overlaps the neighbouring layers' compute.
   With ``dp_shard > 1`` and ``dp_replicate > 1`` this is HSDP: ZeRO-3 inside a shard group (parameters, gradients
   and AdamW state split ``dp_shard`` ways), plain replication across groups (gradients all-reduced between
   replicas). ``dp_shard == 1`` degenerates to DDP (every rank a full replica, gradients all-reduced), so one code
   path serves every data-parallel layout. FSDP averages gradients over the data-parallel ranks, which is exactly
   the gradient of the mean loss a single process computes on the union of the ranks' micro-batches.
3. Mixed precision (``mixed_precision=True``): ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``: the
   all-gathered compute copies are bf16 (half the traffic), gradients are reduced in fp32, the sharded master
   weights and AdamW state stay fp32. Only parameters are cast: the router's ``e_score_correction_bias`` is a
   buffer and stays fp32 (a bias update of 1e-3 would vanish in bf16 next to values of ~1).

The return value, ``DataParallel``, is what the loop needs besides the model: the loader's rank and world size (the
data-parallel coordinates; with pipelining, the ranks of one stage share data) and the data-parallel group, over
which the loop reduces each step's scalars and expert loads in one all-reduce of a device tensor (train/steps.py),
so every rank logs, skips and updates the router biases on the same numbers.

Pipeline parallelism (``pp > 1``): ``parallelize_pipeline`` cuts the model into the stages this rank holds
(train/parallel/pipeline_parallel.py) and, with more than one data-parallel rank per stage (PP x FSDP/HSDP),
applies ``fully_shard`` to each held decoder layer and then to each stage module (its embedding / norm / head)
over ``("dp_replicate", "dp_shard")`` of this pp coordinate. The stage module is the FSDP root the schedule calls;
``PipelineStage`` defers the gradient reduce-scatter to the last micro-batch's backward. Under ``dualpipev`` each
stage module is ONE unit (no per-layer units): with per-layer units inside the two stage roots of one rank, torch
2.13 gave the last stage's decoder layers wrong gradients (off a single process's; cause not
isolated), whole-stage units match. PP x EP is refused.

Gradient clipping: dense and expert gradients are DTensors on different meshes, which torch's
``clip_grad_norm_`` cannot stack; ``clip_grad_norm_`` here takes one norm per mesh and combines them. Under PP
each rank holds other parameters: the squared norms are summed over the pipeline group as well. The clip factor is
applied on the device (no host read), as torch's own ``clip_grad_norm_`` does.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from train.parallel.config import ParallelConfig
from train.parallel.expert_parallel import apply_expert_parallel, fully_shard_experts
from train.parallel.mesh import ParallelMeshes, build_mesh, validate_layout
from train.parallel.pipeline_parallel import Pipeline, build_pipeline

__all__ = [
    "DataParallel",
    "clip_grad_norm_",
    "init_parallel",
    "parallelize",
    "parallelize_pipeline",
    "world_size_from_env",
]


def world_size_from_env() -> int:
    """The number of processes torchrun started (1 for a plain ``python -m``).

    Under a SLURM job of several tasks started by Hydra's submitit launcher (``hydra/launcher=slurm``, no torchrun),
    the ``env://`` variables (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK) are first exported from the
    job's SLURM variables by submitit's ``TorchDistributedEnvironment``.
    """
    slurm_tasks = int(os.environ.get("SLURM_NTASKS", "1"))
    if "WORLD_SIZE" not in os.environ and os.environ.get("SUBMITIT_EXECUTOR") == "slurm" and slurm_tasks > 1:
        # deferred on purpose: submitit (the SLURM launcher's dependency) matters only inside a SLURM job
        from submitit.helpers import TorchDistributedEnvironment

        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass
class DataParallel:
    """Data-parallel coordinates of this rank (the loader reads by them) and the group over which the loop reduces
    its per-step scalars and expert loads (train/steps.py). With one process ``group`` is None."""

    rank: int = 0
    size: int = 1
    group: dist.ProcessGroup | None = None


def init_parallel(cfg: ParallelConfig, device: torch.device, n_routed_experts: int) -> ParallelMeshes | None:
    """Under ``torchrun`` (WORLD_SIZE > 1): validate the layout, initialize the process group (gloo on CPU, nccl on
    CUDA) and build the meshes. With one process: validate that the layout is the single-process one, return None."""
    world = world_size_from_env()
    res = validate_layout(cfg, world, n_routed_experts)
    if world == 1:
        return None
    mesh = build_mesh(res, world, device.type)
    return ParallelMeshes.from_mesh(mesh, res.ep)


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The units of FSDP wrapping: each decoder layer, then each MTP module's decoder layer. (FSDP gathers a unit in
    its module's forward hook; ``DeepseekV3.mtp_logits`` calls an MTP module's parts, not the module, so its small
    norms and ``eh_proj`` stay with the root unit.)"""
    return list(model.model.layers) + [m.layer for m in model.mtp]


def parallelize(
    model: nn.Module,
    meshes: ParallelMeshes | None,
    cfg: ParallelConfig,
    mixed_precision: bool = False,
    reshard_after_forward: bool = True,
) -> DataParallel:
    """Apply EP, then FSDP2/HSDP, to ``model`` in place (see the module docstring); return the data-parallel view.

    ``model`` must be identically initialized on every rank (same seed), on its final device. ``meshes=None`` (one
    process) leaves the model untouched. With ``pp > 1`` use ``parallelize_pipeline``.
    """
    if meshes is None:
        return DataParallel()
    ep = meshes.ep.size()
    if ep > 1:
        apply_expert_parallel(model, meshes.ep, cfg.fp8_dispatch, cfg.bf16_combine)
    dp_size = meshes.dp.size()
    if dp_size > 1:
        kw: dict = {"reshard_after_forward": reshard_after_forward}
        if mixed_precision:
            kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if ep > 1:
            fully_shard_experts(model, meshes, **kw)
        for block in _blocks(model):
            fully_shard(block, mesh=meshes.dense_fsdp, **kw)
        fully_shard(model, mesh=meshes.dense_fsdp, **kw)
    return DataParallel(rank=meshes.dp.get_local_rank(), size=dp_size, group=meshes.dp.get_group())


def parallelize_pipeline(
    model: nn.Module,
    meshes: ParallelMeshes,
    cfg: ParallelConfig,
    n_microbatches: int,
    microbatch_shape: tuple[int, int],
    device: torch.device,
    mixed_precision: bool = False,
) -> tuple[Pipeline, DataParallel]:
    """PP (x FSDP/HSDP): build this rank's stages and schedule (``cfg.pp_schedule``) over ``meshes.pp``, sharding
    each stage over the data-parallel ranks of its pp coordinate when there are several. The schedule leaves
    gradients summed over micro-batches (``scale_grads=False``): the trainer divides by its micro-batch count."""
    if meshes.ep.size() > 1:
        raise ValueError(
            f"parallel.pp={meshes.pp.size()} with parallel.ep={meshes.ep.size()}: pipeline x expert parallelism is not"
            " supported by the trainer (each stage would need its own expert FSDP units); use ep=1 with pp > 1"
        )
    dp_size = meshes.dp.size()
    shard_fn = None
    if dp_size > 1:
        kw: dict = {"mesh": meshes.dense_fsdp}
        if mixed_precision:
            kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)

        def shard_fn(stage: nn.Module) -> None:
            if cfg.pp_schedule == "1f1b":  # see the module docstring for DualPipeV
                for layer in stage.layers.values():
                    fully_shard(layer, **kw)
            fully_shard(stage, **kw)

    compute = torch.bfloat16 if mixed_precision else torch.float32
    pipe = build_pipeline(
        model,
        cfg.pp_schedule,
        meshes.pp.get_group(),
        n_microbatches,
        microbatch_shape,
        device,
        scale_grads=False,
        data_parallel=dp_size > 1,
        shard_fn=shard_fn,
        hidden_dtype=compute if dp_size > 1 else torch.float32,  # bf16 parameters under FSDP's mixed precision
        logits_dtype=compute,
    )
    return pipe, DataParallel(rank=meshes.dp.get_local_rank(), size=dp_size, group=meshes.dp.get_group())


@torch.no_grad()
def clip_grad_norm_(parameters, max_norm: float, pp_group: dist.ProcessGroup | None = None) -> Tensor:
    """Clip the global gradient norm of parameters whose gradients may be DTensors on several meshes (dense vs
    experts); returns the total norm (a plain fp32 tensor, the same on every rank).

    One ``get_total_norm`` per mesh (its ``full_tensor()`` reduces the shards' partial norms over that mesh), plain
    gradients (identical on every rank) taken as they are; the total is the 2-norm of the group norms.
    ``pp_group``: the pipeline group, whose ranks hold disjoint parameters; their squared norms are summed over it.
    """
    groups: dict[object, list[Tensor]] = defaultdict(list)
    parameters = list(parameters)
    device = next((p.device for p in parameters), torch.device("cpu"))
    for p in parameters:
        if p.grad is not None:
            g = p.grad
            groups[g.device_mesh if isinstance(g, DTensor) else None].append(g)
    norms = []
    for grads in groups.values():
        n = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
        norms.append((n.full_tensor() if isinstance(n, DTensor) else n).float())
    total = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros((), device=device)
    if pp_group is not None:
        sq = total.double().square()
        dist.all_reduce(sq, op=dist.ReduceOp.SUM, group=pp_group)
        total = sq.sqrt().float()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)  # on the device: no host read (torch's clip does the same)
    for grads in groups.values():
        torch._foreach_mul_([g.to_local() if isinstance(g, DTensor) else g for g in grads], coef)
    return total
