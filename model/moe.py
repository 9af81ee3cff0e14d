"""DeepSeekMoE: shared experts plus many fine-grained routed experts, computed dropless with grouped matmuls.

The layer (DeepSeek-V3 report eq. 12):  h'_t = u_t + sum_shared FFN(u_t) + sum_{i in topK(t)} g_{i,t} FFN_i(u_t)
(the residual u_t is added by the decoder layer, not here). Experts are small SwiGLU MLPs of width
moe_intermediate_size; the shared experts are merged into one MLP of width moe_intermediate_size * n_shared_experts
that every token visits. Routing (which K of the E routed experts, with what gates g) is in `model/router.py`.

How the routed experts are computed without dropping tokens
-----------------------------------------------------------
Each token picks K experts, giving A = N*K (token, slot) assignments. We sort the assignments by expert (stable
argsort of the flattened top-k indices), gather the tokens' hidden states in that order, so each expert's rows are
contiguous, and run each of the three projections as ONE grouped matmul: rows offsets[e]:offsets[e+1] times
expert e's weight. No capacity, no padding: an expert with zero tokens is simply an empty group. The outputs are
multiplied by their gate (in fp32), put back in assignment order and summed over the K slots of each token in
fp32: a deterministic reduction (as transformers' grouped_mm path does), where an index_add_ scatter would use
float atomics on CUDA and change the sum order from run to run.

The grouped matmul is `model.grouped_mm.grouped_mm`: `torch._grouped_mm` where this torch build has it (CPU fp32/bf16,
CUDA bf16), one call for all experts with no host sync, else the readable loop `grouped_mm_reference`; one operator
either way, so the layer traces under torch.compile. With that default GEMM and more rows than expert weight rows
(training, prefill), the gate and up projections of all experts run as ONE grouped matmul over the concatenated
[E, 2F, D] weights (half the calls forward and backward; the parameters stay separate, as the release and the FP8
path name them; decoding's few rows would not pay for the weight copy). `RoutedExperts.grouped_mm` is an instance
attribute so that the FP8 path can replace it; a replaced GEMM gets the three projections one by one, so its
per-weight quantization blocks are those of each projection.

Capacity mode (moe_impl="capacity", the GShard/Switch baseline)
--------------------------------------------------------------
In training, each expert takes at most C = ceil(capacity_factor * N * K / E) assignments per forward. When more
arrive it keeps those with the LARGEST gate weight (the ones that matter most to the output; DeepSeek-V2 also
drops the lowest-affinity tokens) and drops the rest: a dropped (token, slot) contributes nothing; the token
still gets its shared-expert output and its residual. MoEStats.dropped counts dropped assignments. At
evaluation/generation (module.eval()) nothing is dropped, as in DeepSeek-V2, so a token's output never depends on
which other tokens share its batch.

Shape legend: B batch, T sequence, D hidden, N = B*T tokens, E routed experts, K experts per token,
F expert width (moe_intermediate_size), A = N*K assignments, M assignments actually computed (A unless dropped).
In `grouped_mm` alone, M/K/N are the matmul's rows/contraction/columns, as its signature says.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.grouped_mm import grouped_mm, grouped_mm_reference
from model.router import MoEGate, balance_loss, expert_counts, expert_load, max_violation, update_expert_bias

if TYPE_CHECKING:
    from model.config import ModelConfig

__all__ = [
    "MLP",
    "DeepseekMoE",
    "MoEGate",
    "MoEStats",
    "RoutedExperts",
    "dispatch_order",
    "grouped_mm",
    "grouped_mm_reference",
    "max_violation",
    "update_expert_bias",
]

MOE_IMPLS = ("dropless", "capacity")
MOE_BALANCES = ("aux_free", "aux_loss", "none")


class MLP(nn.Module):
    """SwiGLU feed-forward: down_proj(silu(gate_proj(x)) * up_proj(x)). Dense layers and the shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


@torch.no_grad()
def dispatch_order(
    topk_idx_NK: Tensor, topk_weight_NK: Tensor, n_experts: int, capacity: int | None = None
) -> tuple[Tensor, Tensor, int]:
    """Which assignments to compute, in expert order: (order_M, offsets_E1, dropped).

    order_M indexes the flattened [A] assignments (token = order // K), sorted by expert, stably (within an expert,
    batch order). Without a capacity M = A and dropped = 0. With one, each expert keeps its `capacity` assignments
    of largest gate weight (ties: earlier slot first) and dropped = A - M.
    """
    expert_A = topk_idx_NK.reshape(-1)
    counts_E = expert_counts(expert_A, n_experts)
    order_M = torch.argsort(expert_A, stable=True)
    dropped = 0
    if capacity is not None:
        by_weight_A = torch.argsort(topk_weight_NK.reshape(-1), descending=True, stable=True)
        by_expert_weight_A = by_weight_A[torch.argsort(expert_A[by_weight_A], stable=True)]
        starts_E = torch.cumsum(counts_E, 0) - counts_E
        rank_A = torch.arange(expert_A.numel(), device=expert_A.device) - starts_E[expert_A[by_expert_weight_A]]
        keep_A = torch.empty_like(expert_A, dtype=torch.bool)
        keep_A[by_expert_weight_A] = rank_A < capacity
        order_M = order_M[keep_A[order_M]]
        counts_E = counts_E.clamp(max=capacity)
        dropped = expert_A.numel() - order_M.numel()
    offsets_E1 = F.pad(torch.cumsum(counts_E, 0), (1, 0))
    return order_M, offsets_E1, dropped


class RoutedExperts(nn.Module):
    """E SwiGLU experts stored stacked: gate_proj [E, F, D], up_proj [E, F, D], down_proj [E, D, F]."""

    def __init__(self, n_experts: int, hidden_size: int, intermediate_size: int, init_std: float = 0.02) -> None:
        super().__init__()
        self.n_experts = n_experts
        self.gate_proj = nn.Parameter(torch.empty(n_experts, intermediate_size, hidden_size))
        self.up_proj = nn.Parameter(torch.empty(n_experts, intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(n_experts, hidden_size, intermediate_size))
        for w in (self.gate_proj, self.up_proj, self.down_proj):
            nn.init.normal_(w, mean=0.0, std=init_std)
        self.grouped_mm = grouped_mm

    def forward_sorted(self, x_MD: Tensor, offsets_E1: Tensor) -> Tensor:
        """The experts on rows already sorted by expert (also the entry point after an expert-parallel all-to-all)."""
        E, F_, _ = self.gate_proj.shape
        # the default GEMM with more rows than expert weight rows (training, prefill): gate and up of every expert in
        # one grouped matmul; the concatenated weights are a copy, which a few decode rows would not pay back
        if self.grouped_mm is grouped_mm and x_MD.shape[0] >= E * F_:
            w_gate_up_E2FD = torch.cat([self.gate_proj, self.up_proj], dim=1)
            gate_MF, up_MF = self.grouped_mm(x_MD, w_gate_up_E2FD, offsets_E1).chunk(2, dim=-1)
        else:  # (a swapped-in GEMM, FP8, quantizes each projection's weight on its own)
            gate_MF = self.grouped_mm(x_MD, self.gate_proj, offsets_E1)
            up_MF = self.grouped_mm(x_MD, self.up_proj, offsets_E1)
        return self.grouped_mm(F.silu(gate_MF) * up_MF, self.down_proj, offsets_E1)

    def dense_is_cheaper(self, x_ND: Tensor, K: int) -> bool:
        """Whether to run every expert on every token (`forward_dense`): on the CPU with the default GEMM, when the
        experts average at most 4 rows each (decoding), where a grouped GEMM is E tiny matmul calls per projection
        and three calls of E / K times the work cost less. Never on a GPU, where the grouped kernel is one launch and
        reads only the experts that received rows."""
        N, E = x_ND.shape[0], self.n_experts
        return x_ND.device.type == "cpu" and self.grouped_mm is grouped_mm and N * K <= 4 * E

    def forward_dense(self, x_ND: Tensor, topk_idx_NK: Tensor, topk_weight_NK: Tensor) -> Tensor:
        """The same sum as `forward`, computing all E experts for all N tokens and keeping each token's K: two
        matmuls over the stacked gate and up weights and one batched matmul over the experts' down weights."""
        (N, K), (E, F_, D) = topk_idx_NK.shape, self.gate_proj.shape
        gate_NEF = (x_ND @ self.gate_proj.view(E * F_, D).T).view(N, E, F_)
        up_NEF = (x_ND @ self.up_proj.view(E * F_, D).T).view(N, E, F_)
        h_ENF = (F.silu(gate_NEF) * up_NEF).transpose(0, 1)
        y_NED = torch.bmm(h_ENF, self.down_proj.transpose(1, 2)).transpose(0, 1)
        y_NKD = y_NED.gather(1, topk_idx_NK[:, :, None].expand(N, K, D))
        return (y_NKD * topk_weight_NK.unsqueeze(-1)).sum(dim=1).to(x_ND.dtype)  # gates are fp32: fp32 combine

    def forward(
        self, x_ND: Tensor, topk_idx_NK: Tensor, topk_weight_NK: Tensor, capacity: int | None = None
    ) -> tuple[Tensor, int]:
        """sum_k gate[n, k] * expert_{idx[n, k]}(x[n]) for every token: ([N, D] in x's dtype, dropped assignments)."""
        N, K = topk_idx_NK.shape
        if capacity is None and self.dense_is_cheaper(x_ND, K):
            return self.forward_dense(x_ND, topk_idx_NK, topk_weight_NK), 0
        order_M, offsets_E1, dropped = dispatch_order(topk_idx_NK, topk_weight_NK, self.n_experts, capacity)
        y_MD = self.forward_sorted(x_ND[order_M // K], offsets_E1)
        y_MD = y_MD * topk_weight_NK.reshape(-1)[order_M].unsqueeze(-1)  # gates are fp32: the combine is fp32
        new = y_MD.new_empty if order_M.numel() == N * K else y_MD.new_zeros  # dropped slots must read as zero
        y_AD = new(N * K, y_MD.shape[-1]).index_copy(0, order_M, y_MD)
        return y_AD.view(N, K, x_ND.shape[-1]).sum(dim=1).to(x_ND.dtype), dropped

    def extra_repr(self) -> str:
        E, F_, D = self.gate_proj.shape
        return f"experts={E}, hidden={D}, width={F_}"


@dataclass
class MoEStats:
    """What one MoE forward reports besides its output.

    load_E: assignments routed to each expert by the router (detached float [E], counted before any capacity drop;
    the input of update_expert_bias and max_violation). balance_loss: UNWEIGHTED scalar: the sequence-wise loss
    (moe_balance="aux_free"), the batch-wide auxiliary loss ("aux_loss") or 0 ("none", and whenever gradients are
    disabled: nothing trains then, and evaluation and generation skip its ops). dropped: assignments
    dropped by the capacity limit (always 0 when dropless or in eval mode).
    """

    load_E: Tensor
    balance_loss: Tensor
    dropped: int = 0


class DeepseekMoE(nn.Module):
    """DeepSeekMoE block: `gate` (MoEGate), `experts` (RoutedExperts), `shared_experts` (MLP, or None if none)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.moe_impl not in MOE_IMPLS:
            raise ValueError(f"moe_impl must be one of {MOE_IMPLS}, got {cfg.moe_impl!r}")
        if cfg.moe_balance not in MOE_BALANCES:
            raise ValueError(f"moe_balance must be one of {MOE_BALANCES}, got {cfg.moe_balance!r}")
        if cfg.moe_impl == "capacity" and not cfg.capacity_factor > 0:
            raise ValueError(f"capacity_factor must be > 0, got {cfg.capacity_factor}")
        self.n_routed_experts = cfg.n_routed_experts
        self.top_k = cfg.num_experts_per_tok
        self.moe_impl = cfg.moe_impl
        self.capacity_factor = cfg.capacity_factor
        self.moe_balance = cfg.moe_balance
        self.gate = MoEGate(cfg)
        self.experts = RoutedExperts(
            cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size, init_std=cfg.initializer_range
        )
        n_shared = cfg.n_shared_experts or 0
        self.shared_experts = MLP(cfg.hidden_size, cfg.moe_intermediate_size * n_shared) if n_shared > 0 else None

    def capacity(self, n_tokens: int) -> int | None:
        """Per-expert capacity for a forward of n_tokens, or None when nothing may be dropped."""
        if self.moe_impl != "capacity" or not self.training:
            return None
        return math.ceil(self.capacity_factor * n_tokens * self.top_k / self.n_routed_experts)

    def forward(self, x_BTD: Tensor) -> tuple[Tensor, MoEStats]:
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(B * T, D)
        topk_idx_NK, topk_weight_NK, scores_NE = self.gate(x_ND)
        routed_ND, dropped = self.experts(x_ND, topk_idx_NK, topk_weight_NK, self.capacity(B * T))
        out_BTD = routed_ND.view(B, T, D)
        if self.shared_experts is not None:
            out_BTD = out_BTD + self.shared_experts(x_BTD)
        if self.moe_balance == "none" or not torch.is_grad_enabled():  # nothing trains (evaluation, generation)
            loss = scores_NE.new_zeros(())
        else:
            loss = balance_loss(scores_NE, topk_idx_NK, n_seq=B if self.moe_balance == "aux_free" else 1)
        stats = MoEStats(load_E=expert_load(topk_idx_NK, self.n_routed_experts), balance_loss=loss, dropped=dropped)
        return out_BTD, stats
