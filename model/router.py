"""The DeepSeek-V3 router: which experts each token visits, with what weight, and how load is kept balanced.

How DeepSeek-V3 routes a token (report section 2.1.2, eq. 12-16)
-----------------------------------------------------------------
1. Affinity of token t for routed expert i: s_{i,t} = sigmoid(u_t . e_i), one logit per expert from the gate
   weight [E, D], computed in fp32. (V2 used a softmax; sigmoid scores are independent of each other, which is
   why they are renormalized in step 4. Only V3's sigmoid scoring is implemented.)
2. Selection uses *biased* scores s_{i,t} + b_i. The bias b (buffer `e_score_correction_bias`) is the
   auxiliary-loss-free balancing knob: it steers which experts are chosen but never enters a gate value.
3. Group-limited routing: the E experts form G = n_group groups (in the real model one group per node); a group's
   score is the sum of its two highest biased scores; only the topk_group best groups stay eligible, the others
   are masked to -inf. This bounds how many nodes a token's activations travel to. (topk_method "noaux_tc";
   "greedy" skips the group limit.)
4. Top-K of the remaining biased scores picks the experts; their gates are the *unbiased* s_{i,t}, normalized
   to sum to one (norm_topk_prob, +1e-20 as in the release) and multiplied by routed_scaling_factor.

This file follows transformers' `DeepseekV3TopkRouter` op for op (same fp32 logits, topk with sorted=False, same
masking), so the same weights select the same experts and give bit-identical gates; tests check it.

Balancing
---------
- Auxiliary-loss-free (moe_balance="aux_free"): after each step, b_i += gamma * sign(mean_load - load_i): an
  overloaded expert becomes less attractive, an idle one more (`update_expert_bias`). A tiny complementary
  *sequence-wise* balance loss (eq. 17-20) keeps any single sequence from collapsing onto few experts.
- Classic auxiliary loss (moe_balance="aux_loss", Switch/GShard, DeepSeek-V2's expert-level loss): the same
  f_i * P_i product computed once over the whole batch instead of per sequence.
- MaxVio (Wang et al. 2024): (max_i load_i - mean load) / mean load, the balance metric we log.

Shape legend: N tokens (batch * sequence, flattened), D hidden size, E routed experts, K experts per token,
G expert groups, S sequences in the batch (for the sequence-wise loss).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from model.config import ModelConfig

TOPK_METHODS = ("noaux_tc", "greedy")


def _fp32(t: Tensor) -> Tensor:
    return t if t.dtype == torch.float32 else t.float()


def select_experts(
    choice_NE: Tensor, top_k: int, n_group: int, topk_group: int, topk_method: str = "noaux_tc"
) -> Tensor:
    """Indices [N, K] of the experts each token visits, from its selection scores (biased affinities).

    topk_method "noaux_tc" (V3): only the topk_group groups with the largest sum of their top-2 scores are
    eligible; "greedy": no group limit. Indices come in topk's unsorted order (as transformers').
    """
    N, E = choice_NE.shape
    if topk_method != "greedy" and topk_group < n_group:
        choice_NGe = choice_NE.view(N, n_group, E // n_group)
        group_scores_NG = choice_NGe.topk(min(2, E // n_group), dim=-1)[0].sum(dim=-1)
        group_idx_NG = torch.topk(group_scores_NG, k=topk_group, dim=-1, sorted=False)[1]
        group_mask_NG = torch.zeros_like(group_scores_NG, dtype=torch.bool).scatter_(1, group_idx_NG, True)
        choice_NE = choice_NGe.masked_fill(~group_mask_NG.unsqueeze(-1), float("-inf")).view(N, E)
    return torch.topk(choice_NE, k=top_k, dim=-1, sorted=False)[1]


def gate_weights(scores_NE: Tensor, topk_idx_NK: Tensor, norm_topk_prob: bool, routed_scaling_factor: float) -> Tensor:
    """Combine weights [N, K]: the selected experts' UNBIASED affinities, normalized, times the scaling factor."""
    weight_NK = scores_NE.gather(1, topk_idx_NK)
    if norm_topk_prob:
        weight_NK = weight_NK / (weight_NK.sum(dim=-1, keepdim=True) + 1e-20)
    return weight_NK * routed_scaling_factor


class MoEGate(nn.Module):
    """Router: `weight` [E, D] and the selection-only bias buffer `e_score_correction_bias` [E] (fp32).

    forward(x_ND) -> (topk_idx_NK int64, topk_weight_NK fp32, scores_NE fp32 affinities for the balance losses).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.scoring_func != "sigmoid":
            raise ValueError(f"scoring_func must be 'sigmoid' (DeepSeek-V3), got {cfg.scoring_func!r}")
        if cfg.topk_method not in TOPK_METHODS:
            raise ValueError(f"topk_method must be one of {TOPK_METHODS}, got {cfg.topk_method!r}")
        self.n_routed_experts = cfg.n_routed_experts
        self.top_k = cfg.num_experts_per_tok
        self.n_group = cfg.n_group
        self.topk_group = cfg.topk_group
        self.topk_method = cfg.topk_method
        self.norm_topk_prob = cfg.norm_topk_prob
        self.routed_scaling_factor = cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))
        nn.init.normal_(self.weight, mean=0.0, std=cfg.initializer_range)

    def forward(self, x_ND: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if torch.is_autocast_enabled(x_ND.device.type):  # the router stays fp32 even under bf16 autocast
            with torch.autocast(x_ND.device.type, enabled=False):
                logits_NE = F.linear(_fp32(x_ND), _fp32(self.weight))
        else:
            logits_NE = F.linear(_fp32(x_ND), _fp32(self.weight))
        scores_NE = logits_NE.sigmoid()
        with torch.no_grad():
            choice_NE = scores_NE + _fp32(self.e_score_correction_bias)
            topk_idx_NK = select_experts(choice_NE, self.top_k, self.n_group, self.topk_group, self.topk_method)
        topk_weight_NK = gate_weights(scores_NE, topk_idx_NK, self.norm_topk_prob, self.routed_scaling_factor)
        return topk_idx_NK, topk_weight_NK, scores_NE

    def extra_repr(self) -> str:
        return (
            f"experts={self.n_routed_experts}, top_k={self.top_k}, groups={self.n_group}/{self.topk_group}, "
            f"{self.topk_method}"
        )


def expert_counts(expert_A: Tensor, n_experts: int) -> Tensor:
    """int64 [E]: how many entries of expert_A name each expert. A scatter-add of ones: unlike `torch.bincount`,
    whose output size depends on the data (a host sync on CUDA), its shape is known before it runs."""
    ones_A = torch.ones_like(expert_A, dtype=torch.long)
    return torch.zeros(n_experts, dtype=torch.long, device=expert_A.device).scatter_add_(0, expert_A, ones_A)


def expert_load(topk_idx_NK: Tensor, n_experts: int) -> Tensor:
    """Tokens routed to each expert [E] (float; a token counts once per expert it selected)."""
    return expert_counts(topk_idx_NK.reshape(-1), n_experts).float()


def balance_loss(scores_NE: Tensor, topk_idx_NK: Tensor, n_seq: int) -> Tensor:
    """Unweighted balance loss sum_i f_i * P_i, computed per sequence and averaged over the S sequences.

    Per sequence of T tokens (DeepSeek-V3 eq. 17-20): f_i = E / (K * T) * #{t : expert i selected by t},
    P_i = mean_t s'_{i,t} with s' the affinities normalized over all E experts. Perfect balance gives 1.
    n_seq = batch size gives the complementary sequence-wise loss; n_seq = 1 gives the classic batch-wide
    auxiliary loss (Switch/GShard, DeepSeek-V2 expert-level). Gradients flow through P only.
    """
    N, E = scores_NE.shape
    K = topk_idx_NK.shape[1]
    assert N % n_seq == 0, f"{N} tokens do not split into {n_seq} sequences"
    T = N // n_seq
    probs_NE = scores_NE / scores_NE.sum(dim=-1, keepdim=True)
    P_SE = probs_NE.view(n_seq, T, E).mean(dim=1)
    with torch.no_grad():
        ones_SA = torch.ones(n_seq, T * K, device=scores_NE.device, dtype=scores_NE.dtype)
        counts_SE = torch.zeros_like(P_SE).scatter_add_(1, topk_idx_NK.reshape(n_seq, T * K), ones_SA)
        f_SE = counts_SE * (E / (K * T))
    return (f_SE * P_SE).sum(dim=-1).mean()


@torch.no_grad()
def update_expert_bias(moe: nn.Module, load_E: Tensor, gamma: float) -> None:
    """Aux-loss-free balancing step: b_i += gamma * sign(mean(load) - load_i) on `moe.gate.e_score_correction_bias`.

    Call once per optimizer step with the load summed over micro-batches (and all-reduced across data-parallel
    ranks, so every replica applies the same update).
    """
    bias_E = moe.gate.e_score_correction_bias
    load_E = load_E.detach().to(device=bias_E.device, dtype=torch.float32)
    bias_E.add_(gamma * torch.sign(load_E.mean() - load_E))


def max_violation(load_E: Tensor) -> float:
    """MaxVio = (max_i load_i - mean load) / mean load; 0 is perfect balance. NaN when no token was routed."""
    load_E = load_E.detach().float()
    mean = load_E.mean()
    return float((load_E.max() - mean) / mean)
