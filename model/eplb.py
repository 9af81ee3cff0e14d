"""EPLB: DeepSeek's expert-parallel load balancer, as pure functions (written from the published description).

The problem
-----------
Under expert parallelism each GPU hosts a fixed set of experts, so the slowest GPU is the one whose experts
received the most tokens. Even with balanced routing on average, some experts run hot. EPLB (DeepSeek-V3 report
sec. 3.4, github.com/deepseek-ai/EPLB) fixes the *placement*, given loads recorded over a past window:

1. give every GPU a few extra "physical" expert slots (redundant experts; V3 serving used 32 over 256 experts);
2. fill the extra slots with replicas of the hottest experts (a replica takes an equal share of its expert's load);
3. pack the physical experts onto GPUs so that every GPU gets the same number of slots and near-equal load.

Two policies (both here):

- hierarchical: when the number of nodes divides the number of expert groups, first pack whole groups onto
  nodes (balancing node loads), so that group-limited routing still bounds the nodes a token visits; then
  replicate inside each node; then pack each node's physical experts onto its GPUs.
- global: otherwise, replicate over all experts at once and pack onto all GPUs, ignoring groups (the hierarchical
  procedure with one group and one node).

Both packing steps use the same greedy: items by decreasing weight, each to the least-loaded pack that still has
room (equal item counts per pack). Replication is greedy too: each extra slot goes to the expert with the largest
load per replica.

Outputs, per layer (the same kind of mapping as the reference implementation):
  phy2log [X, P]: the logical expert in each physical slot; slot p lives on GPU p // (P / num_gpus).
  log2phy [X, E, R]: the physical slots of each logical expert, padded with -1 (R = the largest replica count).
  logcnt  [X, E]: how many replicas each logical expert has (>= 1; sums to P).

``replica_router`` turns one layer's mapping into the function a generation engine uses to send each
(token, expert) request to one of the expert's replicas: the j-th request an expert receives goes to replica
j mod logcnt, so every replica serves an equal share (within one request) of its expert's tokens, which is what the
placement assumed. ``model.generate.generate(..., placement=phy2log)`` routes with it and counts per-slot loads;
``slot_tables`` rebuilds (log2phy, logcnt) from any phy2log (one from this module, or the identity placement).

Legend: X layers, E logical experts, P physical slots, G groups, R max replicas, N tokens, K experts per token.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "balanced_packing",
    "gpu_loads",
    "imbalance",
    "rebalance_experts",
    "replica_router",
    "replicate_experts",
    "slot_tables",
]

POLICIES = ("auto", "hierarchical", "global")


def balanced_packing(weight_XI: Tensor, num_packs: int) -> tuple[Tensor, Tensor]:
    """Put the I items of each row into ``num_packs`` packs of exactly I / num_packs items, balancing pack weight.

    Returns (pack_XI, slot_XI): the pack of each item and its position inside the pack.
    """
    X, I = weight_XI.shape
    assert I % num_packs == 0, (I, num_packs)
    per_pack = I // num_packs
    if per_pack == 1:
        ar = torch.arange(I).expand(X, I).clone()
        return ar, torch.zeros_like(ar)
    pack_XI = torch.empty(X, I, dtype=torch.int64)
    slot_XI = torch.empty(X, I, dtype=torch.int64)
    for x in range(X):
        load = [0.0] * num_packs
        count = [0] * num_packs
        for i in torch.argsort(weight_XI[x], descending=True, stable=True).tolist():
            pack = min((p for p in range(num_packs) if count[p] < per_pack), key=lambda p: load[p])
            pack_XI[x, i], slot_XI[x, i] = pack, count[pack]
            load[pack] += float(weight_XI[x, i])
            count[pack] += 1
    return pack_XI, slot_XI


def replicate_experts(weight_XE: Tensor, num_phy: int) -> tuple[Tensor, Tensor, Tensor]:
    """Grow E experts to ``num_phy`` slots: each extra slot replicates the expert with the most load per replica.

    Returns (phy2log_XP, replica_XP, logcnt_XE): the expert in each slot, which replica of it the slot holds
    (0-based), and each expert's replica count.
    """
    X, E = weight_XE.shape
    assert num_phy >= E, (num_phy, E)
    phy2log_XP = torch.arange(num_phy).expand(X, num_phy).clone()
    replica_XP = torch.zeros(X, num_phy, dtype=torch.int64)
    logcnt_XE = torch.ones(X, E, dtype=torch.int64)
    rows = torch.arange(X)
    for p in range(E, num_phy):
        hottest_X = (weight_XE / logcnt_XE).argmax(dim=-1)
        phy2log_XP[:, p] = hottest_X
        replica_XP[:, p] = logcnt_XE[rows, hottest_X]
        logcnt_XE[rows, hottest_X] += 1
    return phy2log_XP, replica_XP, logcnt_XE


def _invert(perm_XI: Tensor) -> Tensor:
    inv = torch.empty_like(perm_XI)
    inv.scatter_(1, perm_XI, torch.arange(perm_XI.shape[1]).expand_as(perm_XI).clone())
    return inv


def _hierarchical(
    weight_XE: Tensor, num_phy: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[Tensor, Tensor, Tensor]:
    """(phy2log_XP, replica_XP, logcnt_XE) with groups packed onto nodes, replicas within nodes, then GPUs."""
    X, E = weight_XE.shape
    group_size, groups_per_node = E // num_groups, num_groups // num_nodes
    experts_per_node, phy_per_node = E // num_nodes, num_phy // num_nodes
    gpus_per_node = num_gpus // num_nodes

    # 1. whole groups onto nodes. "node-major" order: node 0's groups (in their slot order), then node 1's, ...
    group_load_XG = weight_XE.view(X, num_groups, group_size).sum(dim=-1)
    node_XG, slot_XG = balanced_packing(group_load_XG, num_nodes)
    group_pos_XG = node_XG * groups_per_node + slot_XG  # where each group goes in node-major order
    in_group = torch.arange(group_size)
    pos_of_log_XE = (group_pos_XG.unsqueeze(-1) * group_size + in_group).reshape(X, E)
    log_at_pos_XE = _invert(pos_of_log_XE)  # node-major position -> logical expert

    # 2. replicate inside each node (rows = (layer, node) pairs)
    node_weight = weight_XE.gather(1, log_at_pos_XE).view(X * num_nodes, experts_per_node)
    phy2loc, replica, loccnt = replicate_experts(node_weight, phy_per_node)  # loc = index inside the node

    # 3. pack each node's physical experts onto its GPUs
    phy_load = (node_weight / loccnt).gather(1, phy2loc)
    gpu, slot = balanced_packing(phy_load, gpus_per_node)
    final_pos = gpu * (phy_per_node // gpus_per_node) + slot  # slot index inside the node
    at_pos = _invert(final_pos)
    phy2loc, replica = phy2loc.gather(1, at_pos), replica.gather(1, at_pos)

    # back to global indices: local -> node-major position -> logical expert
    node_offset = (torch.arange(num_nodes) * experts_per_node).repeat(X).unsqueeze(-1)
    phy2pos_XP = (phy2loc + node_offset).view(X, num_phy)
    phy2log_XP = log_at_pos_XE.gather(1, phy2pos_XP)
    logcnt_XE = loccnt.view(X, E).gather(1, pos_of_log_XE)
    return phy2log_XP, replica.view(X, num_phy), logcnt_XE


def rebalance_experts(
    weight: Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int, policy: str = "auto"
) -> tuple[Tensor, Tensor, Tensor]:
    """EPLB entry point: loads ``weight`` [X, E] (or [E]) -> (phy2log [X, P], log2phy [X, E, R], logcnt [X, E]).

    ``num_replicas`` = P physical slots (a multiple of ``num_gpus``, at least E). ``policy`` "auto" uses the
    hierarchical policy when ``num_nodes`` divides ``num_groups`` and the global one otherwise (as the reference
    does); "hierarchical" or "global" forces one. Raises ValueError for impossible shapes.
    """
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    weight_XE = torch.as_tensor(weight, dtype=torch.float64).cpu()
    if weight_XE.dim() == 1:
        weight_XE = weight_XE.unsqueeze(0)
    if weight_XE.dim() != 2:
        raise ValueError(f"weight must be [layers, experts] or [experts], got shape {tuple(weight_XE.shape)}")
    if (weight_XE < 0).any():
        raise ValueError("weight (expert loads) must be non-negative")
    X, E = weight_XE.shape
    if num_replicas < E or num_replicas % num_gpus != 0:
        raise ValueError(f"num_replicas={num_replicas} must be >= experts ({E}) and a multiple of num_gpus={num_gpus}")
    if num_gpus % num_nodes != 0:
        raise ValueError(f"num_nodes={num_nodes} must divide num_gpus={num_gpus}")
    if E % num_groups != 0:
        raise ValueError(f"num_groups={num_groups} must divide the {E} experts")
    if policy == "hierarchical" and num_groups % num_nodes != 0:
        raise ValueError(f"the hierarchical policy needs num_nodes={num_nodes} to divide num_groups={num_groups}")
    if policy == "hierarchical" or (policy == "auto" and num_groups % num_nodes == 0):
        phy2log, replica, logcnt = _hierarchical(weight_XE, num_replicas, num_groups, num_nodes, num_gpus)
    else:
        phy2log, replica, logcnt = _hierarchical(weight_XE, num_replicas, 1, 1, num_gpus)
    R = int(logcnt.max())
    log2phy = torch.full((X, E * R), -1, dtype=torch.int64)
    log2phy.scatter_(1, phy2log * R + replica, torch.arange(num_replicas).expand(X, -1).clone())
    return phy2log, log2phy.view(X, E, R), logcnt


def gpu_loads(weight_XE: Tensor, phy2log_XP: Tensor, logcnt_XE: Tensor, num_gpus: int) -> Tensor:
    """Load on each GPU [X, num_gpus]: every replica carries an equal share of its expert's load."""
    weight_XE = torch.as_tensor(weight_XE, dtype=torch.float64)
    phy_load_XP = (weight_XE / logcnt_XE).gather(1, phy2log_XP)
    return phy_load_XP.view(phy_load_XP.shape[0], num_gpus, -1).sum(dim=-1)


def imbalance(load_XM: Tensor) -> Tensor:
    """max / mean of the per-GPU load, per layer [X] (1.0 is perfect balance)."""
    load_XM = torch.as_tensor(load_XM, dtype=torch.float64)
    return load_XM.max(dim=-1).values / load_XM.mean(dim=-1)


def slot_tables(phy2log_XP: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
    """(log2phy [X, E, R], logcnt [X, E]) of any placement phy2log [X, P], replicas numbered in slot order.

    Raises ValueError when a logical expert has no slot (its tokens would have nowhere to go)."""
    phy2log_XP = torch.as_tensor(phy2log_XP, dtype=torch.int64).cpu()
    if phy2log_XP.dim() != 2 or phy2log_XP.min() < 0 or phy2log_XP.max() >= num_experts:
        raise ValueError(f"phy2log must be [layers, slots] of expert ids in [0, {num_experts})")
    X, P = phy2log_XP.shape
    logcnt_XE = torch.zeros(X, num_experts, dtype=torch.int64).scatter_add_(1, phy2log_XP, torch.ones_like(phy2log_XP))
    if (logcnt_XE == 0).any():
        raise ValueError("every logical expert needs at least one physical slot")
    R = int(logcnt_XE.max())
    log2phy_XER = torch.full((X, num_experts, R), -1, dtype=torch.int64)
    for x in range(X):
        seen = [0] * num_experts
        for p, e in enumerate(phy2log_XP[x].tolist()):
            log2phy_XER[x, e, seen[e]] = p
            seen[e] += 1
    return log2phy_XER, logcnt_XE


def replica_router(log2phy_ER: Tensor, logcnt_E: Tensor) -> Callable[..., Tensor]:
    """For ONE layer: ``route(topk_idx_NK, seen_E=None) -> slots [N, K]``, the physical slot serving each request.

    Requests for expert e, taken in (token, k) order, are numbered from ``seen_E[e]`` (how many requests e received
    before, so a caller that keeps the count spreads consecutive decode steps too; 0 without it), and request j
    goes to replica j mod logcnt[e]: round-robin per expert.
    """
    if log2phy_ER.dim() != 2 or logcnt_E.dim() != 1:
        raise ValueError("replica_router takes one layer: log2phy [E, R] and logcnt [E]; index the layer first")

    def route(topk_idx_NK: Tensor, seen_E: Tensor | None = None) -> Tensor:
        device = topk_idx_NK.device
        table_ER, cnt_E = log2phy_ER.to(device), logcnt_E.to(device)
        expert_A = topk_idx_NK.reshape(-1)
        counts_E = torch.bincount(expert_A, minlength=cnt_E.shape[0])
        order_A = torch.argsort(expert_A, stable=True)
        starts_E = torch.cumsum(counts_E, 0) - counts_E
        rank_A = torch.empty_like(expert_A)
        rank_A[order_A] = torch.arange(expert_A.numel(), device=device) - starts_E[expert_A[order_A]]
        if seen_E is not None:
            rank_A = rank_A + seen_E.to(device)[expert_A]
        return table_ER[expert_A, rank_A % cnt_E[expert_A]].view_as(topk_idx_NK)

    return route
