"""Expert parallelism: routed experts sharded over the ranks of an EP group, tokens moved to them by all-to-all.

How one MoE layer runs under EP (R ranks in the EP group, E routed experts, L = E / R local experts per rank)
----------------------------------------------------------------------------------------------------------
Every rank holds its own tokens, a full copy of the router (``gate``) and of the shared experts, and experts
[r*L, (r+1)*L) of the routed ones (rank r's slice of the stacked ``gate_proj/up_proj/down_proj``).

1. Route: the gate picks K experts per token, exactly as the single-device ``DeepseekMoE`` does.
2. Deduplicate: a token that picked several experts on the same rank is sent there ONCE, with per-slot metadata
   (which local expert, which gate weight). One row per (token, destination rank) is what node-limited routing
   bounds (below), so it bounds the dispatch volume, not just the number of peers.
3. Exchange counts: an all-to-all of the per-rank row counts tells every rank how many rows it receives from whom.
4. Dispatch: uneven all-to-alls of the rows (optionally FP8 on the wire) and of their metadata (fp32). While they
   are in flight, the shared experts run on the local tokens (DeepSeek-V3 hides the dispatch the same way).
5. Each received (row, slot) that names a local expert is an assignment; sorted by expert they form contiguous
   groups, and ``ShardedExperts`` runs the three grouped matmuls on the local weight slices. Outputs are multiplied
   by their gate weights and summed per row, so each row returns ONE vector.
6. Combine: all-to-all the rows back along the reverse route (optionally BF16 on the wire); at home, a token sums
   the rows of every rank it visited.

Every all-to-all is the autograd op of ``train.parallel.all_to_all``: the gradients of the activations AND of the gate
weights (shipped in the metadata) travel back along the reverse routes.

Node-limited routing
--------------------
DeepSeek-V3 puts one expert group per node and lets a token pick experts from at most ``topk_group`` groups
("node-limited routing": at most M = 4 nodes per token, report sec. 2.1.2): the cost of a token's dispatch is
bounded by the number of nodes it visits, not by K. Here EP ranks play the nodes: when each rank holds whole
groups (or each group spans whole ranks), ``max_ranks_per_token`` is the bound and ``ranks_per_token`` measures it
(tests/unit/test_ep_routing.py counts the distinct destination ranks per token).

Legend: B batch, T sequence, D hidden, N = B*T tokens, K experts per token, E routed experts, L local experts,
R ranks in the EP group, S rows sent by this rank, Q rows received, C (row, slot) assignments computed here.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard

from model.moe import DeepseekMoE, MoEStats, RoutedExperts, dispatch_order
from model.router import balance_loss, expert_load
from train.parallel.all_to_all import all_to_all, all_to_all_start
from train.parallel.mesh import ParallelMeshes

__all__ = [
    "ExpertParallelMoE",
    "ShardedExperts",
    "apply_expert_parallel",
    "fully_shard_experts",
    "max_ranks_per_token",
    "ranks_per_token",
]


def _local(w: Tensor) -> Tensor:
    return w.to_local() if isinstance(w, DTensor) else w


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``scale``."""

    @staticmethod
    def forward(ctx, w: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return w.view_as(w)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.scale, None


class ShardedExperts(RoutedExperts):
    """``RoutedExperts`` whose stacked weights are DTensors [E, ...] sharded on dim 0 over the EP mesh.

    ``forward(x_QD, offsets_L1)`` is ``forward_sorted`` on the local slices: rows already sorted by local expert.
    ``grad_scale`` multiplies the weights' gradients: ``fully_shard_experts`` sets it to 1 / ep (see there). Without
    FSDP it stays 1.0 and a rank's expert gradient is the sum over the tokens its EP group routed to those experts;
    averaging over data-parallel ranks is then the caller's job (sum over the ``expert_fsdp`` ranks, divide by dp).
    Swapping ``grouped_mm`` (the FP8 path) works as on ``RoutedExperts``.
    """

    grad_scale: float = 1.0

    def _w(self, w: Tensor) -> Tensor:
        w = _local(w)
        return _ScaleGrad.apply(w, self.grad_scale) if self.grad_scale != 1.0 else w

    def forward(self, x_QD: Tensor, offsets_L1: Tensor) -> Tensor:  # type: ignore[override]
        mm = self.grouped_mm
        gate_QF = mm(x_QD, self._w(self.gate_proj), offsets_L1)
        up_QF = mm(x_QD, self._w(self.up_proj), offsets_L1)
        return mm(F.silu(gate_QF) * up_QF, self._w(self.down_proj), offsets_L1)


def ranks_per_token(topk_idx_NK: Tensor, n_experts: int, ep: int) -> Tensor:
    """Distinct EP ranks each token's experts live on [N] (experts owned in contiguous blocks of E / ep)."""
    dest_NK = (topk_idx_NK // (n_experts // ep)).sort(dim=-1).values
    return (dest_NK[:, 1:] != dest_NK[:, :-1]).sum(dim=-1) + 1


def max_ranks_per_token(n_experts: int, n_group: int, topk_group: int, top_k: int, ep: int) -> int:
    """Upper bound on ``ranks_per_token`` under group-limited routing (a token sees at most topk_group groups)."""
    if n_experts % ep != 0 or n_experts % n_group != 0:
        raise ValueError(f"ep={ep} and n_group={n_group} must both divide n_experts={n_experts}")
    per_rank, per_group = n_experts // ep, n_experts // n_group
    ranks_per_group = max(
        (g * per_group + per_group - 1) // per_rank - (g * per_group) // per_rank + 1 for g in range(n_group)
    )
    return min(top_k, ep, topk_group * ranks_per_group)


class ExpertParallelMoE(DeepseekMoE):
    """A ``DeepseekMoE`` whose routed experts are split over an EP group; same ``forward -> (y, MoEStats)``.

    A subclass, so that code dispatching on ``isinstance(m, DeepseekMoE)`` (the decoder layer, ``moe_layers()``,
    ``update_expert_bias``) treats it as the layer it replaces; ``DeepseekMoE.__init__`` is skipped on purpose (it
    would allocate all E experts again).

    Built from a full local layer with identical weights on every rank: ``gate`` and ``shared_experts`` are shared
    with it (same Parameter objects); ``experts`` becomes a ``ShardedExperts`` whose stacked weights are DTensors
    [E, ...] sharded on dim 0 over ``ep_mesh`` (this rank stores its L experts). ``MoEStats`` describe this rank's
    tokens only, exactly as the local layer on the same input would; the trainer all-reduces ``load_E`` over the
    data-parallel ranks before ``update_expert_bias``, as without EP.
    """

    def __init__(
        self, moe: DeepseekMoE, ep_mesh: DeviceMesh, fp8_dispatch: bool = False, bf16_combine: bool = False
    ) -> None:
        nn.Module.__init__(self)
        if not isinstance(ep_mesh, DeviceMesh) or ep_mesh.ndim != 1:
            raise ValueError(f"ep_mesh must be a 1-D DeviceMesh (e.g. ParallelMeshes.ep), got {ep_mesh!r}")
        self.ep_mesh, self.group = ep_mesh, ep_mesh.get_group()
        self.ep, self.ep_rank = ep_mesh.size(), ep_mesh.get_local_rank()
        E = moe.n_routed_experts
        if E % self.ep != 0:
            raise ValueError(f"EP group of {self.ep} ranks must divide n_routed_experts={E}")
        self.n_routed_experts, self.n_local = E, E // self.ep
        self.expert_start = self.ep_rank * self.n_local
        self.top_k, self.moe_impl, self.moe_balance = moe.top_k, moe.moe_impl, moe.moe_balance
        self.capacity_factor = moe.capacity_factor
        self.dispatch_wire = "fp8" if fp8_dispatch else None
        self.combine_wire = "bfloat16" if bf16_combine else None
        self.gate = moe.gate
        self.shared_experts = moe.shared_experts
        # Expert weights become DTensors sharded on dim 0 over the EP mesh: the state dict then describes the
        # full [E, ...] tensors, so DCP saves every rank's slice and reloads under any other EP size.
        _, F_, D = moe.experts.gate_proj.shape
        self.experts = ShardedExperts(self.n_local, D, F_)
        local = slice(self.expert_start, self.expert_start + self.n_local)
        for name in ("gate_proj", "up_proj", "down_proj"):
            w_local = getattr(moe.experts, name).detach()[local].clone()
            dt = DTensor.from_local(w_local, ep_mesh, [Shard(0)], run_check=False)
            setattr(self.experts, name, nn.Parameter(dt))
        self.experts.grouped_mm = moe.experts.grouped_mm
        self.last_dispatch_rows = 0  # rows this rank sent in its last forward (token x destination rank), for logs

    def _routed(self, x_ND: Tensor, topk_idx_NK: Tensor, topk_weight_NK: Tensor, shared):
        """Dispatch, expert compute, combine; ``shared()`` runs while the dispatch is in flight. One host read: the
        exchanged counts (rows and (row, slot) assignments per rank), which the uneven all-to-alls need as Python
        ints; every other size follows from them (``nonzero_static``, scatter-adds instead of ``bincount``)."""
        N, K = topk_idx_NK.shape
        R, L, D = self.ep, self.n_local, x_ND.shape[-1]
        dev = x_ND.device
        # the (token, slot) assignments to compute: all of them (dropless), or those within capacity
        if self.capacity(N) is None:
            kept_NK, dropped = torch.ones(N, K, dtype=torch.bool, device=dev), 0
        else:
            order_M, _, dropped = dispatch_order(topk_idx_NK, topk_weight_NK, self.n_routed_experts, self.capacity(N))
            kept_NK = torch.zeros(N * K, dtype=torch.bool, device=dev).index_fill_(0, order_M, True).view(N, K)
        dest_NK = topk_idx_NK // L

        # one row per (token, destination rank), ordered by rank then token; counts of rows and of assignments
        token_NK = torch.arange(N, device=dev)[:, None].expand(N, K)
        visits_RN = torch.zeros(R * N, dtype=torch.int32, device=dev)
        visits_RN = visits_RN.scatter_reduce_(0, (dest_NK * N + token_NK).flatten(), kept_NK.flatten().int(), "amax")
        visits_RN = visits_RN.view(R, N).bool()
        assigned_R = torch.zeros(R, dtype=torch.long, device=dev).scatter_add_(
            0, dest_NK.flatten(), kept_NK.flatten().long()
        )
        send_R2 = torch.stack([visits_RN.sum(dim=1), assigned_R], dim=1)
        recv_R2 = torch.empty_like(send_R2)
        dist.all_to_all_single(recv_R2, send_R2, group=self.group)
        send_counts, recv_counts = torch.stack([send_R2, recv_R2]).tolist()  # the host read
        send_splits, recv_splits = [c[0] for c in send_counts], [c[0] for c in recv_counts]
        n_assigned = sum(c[1] for c in recv_counts)  # (row, slot) pairs this rank computes
        r_S, n_S = torch.nonzero_static(visits_RN, size=sum(send_splits)).unbind(1)
        self.last_dispatch_rows = len(n_S)
        # with each row, per slot: the local expert wanted on that rank (-1: none) and its gate weight (0)
        here_SK = (dest_NK[n_S] == r_S.unsqueeze(-1)) & kept_NK[n_S]
        local_SK = torch.where(here_SK, topk_idx_NK[n_S] - r_S.unsqueeze(-1) * L, -1)
        w_SK = torch.where(here_SK, topk_weight_NK[n_S], 0.0)
        meta_SK2 = torch.stack([local_SK.to(w_SK.dtype), w_SK], dim=-1).view(-1, 2 * K)  # ids < 2^24: exact

        rows = all_to_all_start(x_ND[n_S], recv_splits, send_splits, self.group, self.dispatch_wire)
        meta = all_to_all_start(meta_SK2, recv_splits, send_splits, self.group)
        shared_out = shared()
        x_QD, meta_QK2 = rows.wait(), meta.wait().view(-1, K, 2)
        local_QK, w_QK = meta_QK2[..., 0].detach().long(), meta_QK2[..., 1]

        # every (row, slot) that names a local expert, sorted by expert: contiguous groups for the grouped matmuls
        Q = x_QD.shape[0]
        local_C = local_QK.reshape(-1)
        valid_C = local_C >= 0
        order_C = torch.argsort(local_C.masked_fill(~valid_C, L), stable=True)[:n_assigned]
        counts_L = torch.zeros(L + 1, dtype=torch.long, device=dev).scatter_add_(
            0, local_C.masked_fill(~valid_C, L), torch.ones_like(local_C)
        )[:L]
        offsets_L1 = F.pad(torch.cumsum(counts_L, 0), (1, 0))
        y_CD = self.experts(x_QD[order_C // K], offsets_L1)  # a module call: FSDP hooks run
        y_CD = y_CD * w_QK.reshape(-1)[order_C].unsqueeze(-1)  # fp32 gates: the combine is fp32
        y_QD = y_CD.new_zeros(Q * K, D).index_copy(0, order_C, y_CD).view(Q, K, D).sum(dim=1)

        # combine: each row's weighted expert sum goes home; a token adds up its rows from every rank it visited
        y_SD = all_to_all(y_QD, send_splits, recv_splits, self.group, self.combine_wire)
        y_ND = y_SD.new_zeros(N, D).index_add(0, n_S, y_SD)
        return y_ND.to(x_ND.dtype), dropped, shared_out

    def forward(self, x_BTD: Tensor) -> tuple[Tensor, MoEStats]:
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(B * T, D)
        topk_idx_NK, topk_weight_NK, scores_NE = self.gate(x_ND)

        def shared() -> Tensor | None:
            return self.shared_experts(x_BTD) if self.shared_experts is not None else None

        routed_ND, dropped, shared_BTD = self._routed(x_ND, topk_idx_NK, topk_weight_NK, shared)
        out_BTD = routed_ND.view(B, T, D)
        if shared_BTD is not None:
            out_BTD = out_BTD + shared_BTD
        if self.moe_balance == "aux_free":
            loss = balance_loss(scores_NE, topk_idx_NK, n_seq=B)
        elif self.moe_balance == "aux_loss":
            loss = balance_loss(scores_NE, topk_idx_NK, n_seq=1)
        else:
            loss = scores_NE.new_zeros(())
        stats = MoEStats(load_E=expert_load(topk_idx_NK, self.n_routed_experts), balance_loss=loss, dropped=dropped)
        return out_BTD, stats

    @torch.no_grad()
    def gather_experts(self) -> dict[str, Tensor]:
        """The full stacked expert weights {name: [E, ...]} gathered from the EP group (checks, export)."""
        return {n: getattr(self.experts, n).full_tensor() for n in ("gate_proj", "up_proj", "down_proj")}

    def extra_repr(self) -> str:
        return (
            f"ep={self.ep}, rank={self.ep_rank}, experts {self.expert_start}..{self.expert_start + self.n_local - 1}"
            f", dispatch={self.dispatch_wire or 'same'}, combine={self.combine_wire or 'same'}"
        )


def apply_expert_parallel(
    model: nn.Module, ep_mesh: DeviceMesh, fp8_dispatch: bool = False, bf16_combine: bool = False
) -> int:
    """Replace every ``DeepseekMoE`` inside ``model`` (decoder and MTP layers) by an ``ExpertParallelMoE`` in place;
    returns how many were replaced. Call on identically initialized models on every rank, before FSDP."""
    targets = [(name, m) for name, m in model.named_modules() if type(m) is DeepseekMoE]
    for name, moe in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, ExpertParallelMoE(moe, ep_mesh, fp8_dispatch, bf16_combine))
    return len(targets)


def fully_shard_experts(model: nn.Module, meshes: ParallelMeshes, **fsdp_kwargs) -> int:
    """FSDP2 for the routed experts of every ``ExpertParallelMoE`` in ``model``; returns how many were wrapped.

    Experts are sharded (and replicated, under HSDP) over ``meshes.expert_fsdp``, the ranks that hold the SAME
    experts; dense parameters go over ``meshes.dense_fsdp`` (the caller wraps the blocks and the root afterwards).
    FSDP averages a gradient over the ranks of its own mesh: dense parameters over all dp ranks, experts over only
    dp / ep of them, although each expert's gradient already sums the tokens of its whole EP group (they arrived by
    all-to-all). So the expert gradients are also scaled by 1 / ep in backward (``ShardedExperts.grad_scale``): both
    then hold d(mean over data-parallel ranks of the loss). (FSDP's ``set_gradient_divide_factor`` would do the same
    but needs PREMUL_SUM, which gloo lacks, and its sum-only fallback mis-scales HSDP on gloo.)
    ``fsdp_kwargs`` (mp_policy, reshard_after_forward, ...) are passed to ``fully_shard``.
    """
    wrapped = 0
    for module in model.modules():
        if isinstance(module, ExpertParallelMoE):
            module.experts.grad_scale = 1.0 / module.ep
            fully_shard(module.experts, mesh=meshes.expert_fsdp, **fsdp_kwargs)
            wrapped += 1
    return wrapped
