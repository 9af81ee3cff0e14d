"""EPLB (model/eplb.py): structural invariants of the placement, a case worked by hand, and the point of it
all: the per-GPU load imbalance goes down on skewed loads."""

import pytest
import torch

from model.eplb import (
    balanced_packing,
    gpu_loads,
    imbalance,
    rebalance_experts,
    replica_router,
    replicate_experts,
    slot_tables,
)

# (experts, groups, nodes, gpus, physical slots); the first ones use the hierarchical policy, the last the global one
LAYOUTS = [(16, 4, 2, 4, 20), (12, 4, 2, 8, 16), (64, 8, 4, 16, 80), (16, 4, 1, 4, 16), (12, 3, 2, 4, 16)]


def zipf_loads(layers: int, experts: int, seed: int, s: float = 1.2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = 1.0 / torch.arange(1, experts + 1, dtype=torch.float64) ** s
    return torch.stack([base[torch.randperm(experts, generator=g)] * 1000 for _ in range(layers)])


def naive_gpu_loads(weight_XE: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """Without EPLB: experts in contiguous blocks, no replicas."""
    return weight_XE.view(weight_XE.shape[0], num_gpus, -1).sum(dim=-1)


@pytest.mark.parametrize("E,G,nodes,gpus,P", LAYOUTS)
def test_mapping_invariants(E: int, G: int, nodes: int, gpus: int, P: int) -> None:
    weight = zipf_loads(3, E, seed=E + P)
    phy2log, log2phy, logcnt = rebalance_experts(weight, P, G, nodes, gpus)
    X = weight.shape[0]
    assert phy2log.shape == (X, P) and logcnt.shape == (X, E) and log2phy.shape[:2] == (X, E)
    assert (logcnt >= 1).all(), "every logical expert needs a replica"
    assert (logcnt.sum(dim=-1) == P).all(), "replica counts must fill the physical slots exactly"
    for x in range(X):
        # each physical slot appears once in log2phy, under the expert it holds; padding is -1
        slots = log2phy[x][log2phy[x] >= 0]
        assert sorted(slots.tolist()) == list(range(P))
        for e in range(E):
            mine = log2phy[x, e][log2phy[x, e] >= 0]
            assert len(mine) == logcnt[x, e] and (phy2log[x, mine] == e).all()


@pytest.mark.parametrize("E,G,nodes,gpus,P", [lay for lay in LAYOUTS if lay[1] % lay[2] == 0])
def test_hierarchical_keeps_groups_on_one_node(E: int, G: int, nodes: int, gpus: int, P: int) -> None:
    weight = zipf_loads(4, E, seed=7)
    phy2log, _, _ = rebalance_experts(weight, P, G, nodes, gpus)
    node_of_slot = torch.arange(P) // (P // nodes)
    group_of_expert = torch.arange(E) // (E // G)
    for x in range(weight.shape[0]):
        for g in range(G):
            nodes_holding = node_of_slot[group_of_expert[phy2log[x]] == g].unique()
            assert len(nodes_holding) == 1, f"layer {x}: group {g} spread over nodes {nodes_holding.tolist()}"
        # and every node gets the same number of whole groups
        per_node = [group_of_expert[phy2log[x, node_of_slot == n]].unique().numel() for n in range(nodes)]
        assert per_node == [G // nodes] * nodes


@pytest.mark.parametrize("E,G,nodes,gpus,P", [lay for lay in LAYOUTS if lay[0] % lay[3] == 0])
def test_imbalance_not_worse_on_skewed_loads(E: int, G: int, nodes: int, gpus: int, P: int) -> None:
    weight = zipf_loads(5, E, seed=11)
    phy2log, _, logcnt = rebalance_experts(weight, P, G, nodes, gpus)
    before = imbalance(naive_gpu_loads(weight, gpus))
    after = imbalance(gpu_loads(weight, phy2log, logcnt, gpus))
    assert torch.allclose(gpu_loads(weight, phy2log, logcnt, gpus).sum(-1), weight.sum(-1)), "load must be conserved"
    assert (after <= before + 1e-12).all(), f"before {before.tolist()} after {after.tolist()}"
    assert after.mean() < before.mean(), "on Zipf loads with redundant slots EPLB must strictly help on average"


def test_small_case_by_hand() -> None:
    # 4 experts with loads [10, 1, 1, 1], 6 slots on 2 GPUs, global policy (1 group, 1 node).
    # Replication: slot 4 -> expert 0 (10/1 is the most per replica), slot 5 -> expert 0 again (10/2=5 > 1).
    # Physical loads 10/3 x3, 1 x3; greedy packing, 3 slots per GPU: 3.33->g0, 3.33->g1, 3.33->g0 (tie: first),
    # 1->g1, 1->g1 (g1 full), 1->g0  =>  g0 = 7.667, g1 = 5.333; max/mean = 7.667/6.5.
    # Before: GPUs hold [10, 1] and [1, 1] -> 11 / 6.5.
    weight = torch.tensor([[10.0, 1.0, 1.0, 1.0]])
    phy2log, log2phy, logcnt = rebalance_experts(weight, 6, 1, 1, 2)
    assert logcnt.tolist() == [[3, 1, 1, 1]]
    loads = gpu_loads(weight, phy2log, logcnt, 2)
    assert sorted(loads[0].tolist()) == pytest.approx([16 / 3, 23 / 3])
    assert imbalance(loads).item() == pytest.approx((23 / 3) / 6.5)
    assert imbalance(naive_gpu_loads(weight, 2)).item() == pytest.approx(11 / 6.5)
    assert log2phy.shape == (1, 4, 3) and (log2phy[0, 1:, 1:] == -1).all()


def test_replicate_and_pack_primitives() -> None:
    phy2log, replica, logcnt = replicate_experts(torch.tensor([[8.0, 4.0, 1.0]]), 6)
    # extra slots: 8/1 -> e0 (8/2=4), then tie 4 vs 4 -> e0 (argmax takes the first), then 4 vs 8/3 -> e1
    assert phy2log.tolist() == [[0, 1, 2, 0, 0, 1]] and replica.tolist() == [[0, 0, 0, 1, 2, 1]]
    assert logcnt.tolist() == [[3, 2, 1]]
    pack, slot = balanced_packing(torch.tensor([[5.0, 4.0, 3.0, 3.0, 2.0, 1.0]]), 2)
    # 5->p0, 4->p1, 3->p1 (4<5), 3->p0 (5<7), 2->p1 (7<8; p1 now full), 1->p0
    assert pack.tolist() == [[0, 1, 1, 0, 1, 0]]
    assert sorted(zip(pack[0].tolist(), slot[0].tolist())) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    # every pack gets exactly I / packs items, whatever the weights
    pack, slot = balanced_packing(zipf_loads(6, 24, seed=3), 4)
    for x in range(6):
        assert torch.bincount(pack[x], minlength=4).tolist() == [6] * 4
        assert sorted(zip(pack[x].tolist(), slot[x].tolist())) == [(p, k) for p in range(4) for k in range(6)]


def test_replica_router_round_robin() -> None:
    weight = torch.tensor([[10.0, 1.0, 1.0, 1.0]])
    phy2log, log2phy, logcnt = rebalance_experts(weight, 6, 1, 1, 2)
    route = replica_router(log2phy[0], logcnt[0])
    topk_idx_NK = torch.tensor([[0, 1], [0, 2], [0, 3], [0, 1]])
    phys_NK = route(topk_idx_NK)
    assert (phy2log[0][phys_NK] == topk_idx_NK).all(), "a replica must hold the requested expert"
    replicas_of_0 = phys_NK[:, 0].tolist()
    assert len(set(replicas_of_0[:3])) == 3 and replicas_of_0[3] == replicas_of_0[0], "round robin over 3 replicas"
    with pytest.raises(ValueError, match="one layer"):
        replica_router(log2phy, logcnt)


def test_replica_router_spreads_each_expert_evenly_across_calls() -> None:
    """One token per call (decode with batch 1): round robin per expert, continued with the caller's counts."""
    phy2log, log2phy, logcnt = rebalance_experts(torch.tensor([[10.0, 1.0, 1.0, 1.0]]), 6, 1, 1, 2)
    route = replica_router(log2phy[0], logcnt[0])
    seen_E = torch.zeros(4, dtype=torch.long)
    served_P = torch.zeros(6, dtype=torch.long)
    for _ in range(9):
        topk_idx_NK = torch.tensor([[0, 1]])
        served_P += torch.bincount(route(topk_idx_NK, seen_E).flatten(), minlength=6)
        seen_E += torch.bincount(topk_idx_NK.flatten(), minlength=4)
    assert served_P[phy2log[0] == 0].tolist() == [3, 3, 3], "9 requests for expert 0 over its 3 replicas"
    assert served_P[phy2log[0] == 1].tolist() == [9]


def test_slot_tables_and_forced_policies() -> None:
    weight = zipf_loads(2, 16, seed=2)
    for policy in ("hierarchical", "global"):
        phy2log, _, logcnt = rebalance_experts(weight, 20, 4, 2, 4, policy=policy)
        log2phy, cnt = slot_tables(phy2log, 16)
        assert torch.equal(cnt, logcnt)
        for x in range(2):
            for e in range(16):
                mine = log2phy[x, e][log2phy[x, e] >= 0]
                assert len(mine) == cnt[x, e] and (phy2log[x, mine] == e).all()
    log2phy, cnt = slot_tables(torch.arange(16).expand(2, 16), 16)  # identity: one slot each
    assert (cnt == 1).all() and torch.equal(log2phy[..., 0], torch.arange(16).expand(2, 16))
    with pytest.raises(ValueError, match="at least one physical slot"):
        slot_tables(torch.zeros(1, 16, dtype=torch.long), 16)
    with pytest.raises(ValueError, match="hierarchical policy needs"):
        rebalance_experts(weight, 24, 4, 3, 6, policy="hierarchical")
    with pytest.raises(ValueError, match="policy must be"):
        rebalance_experts(weight, 20, 4, 2, 4, policy="greedy")


def test_rejects_impossible_shapes() -> None:
    w = torch.ones(2, 16)
    with pytest.raises(ValueError, match="num_replicas"):
        rebalance_experts(w, 12, 4, 2, 4)  # fewer slots than experts
    with pytest.raises(ValueError, match="num_replicas"):
        rebalance_experts(w, 18, 4, 2, 4)  # not a multiple of the GPUs
    with pytest.raises(ValueError, match="num_groups"):
        rebalance_experts(w, 16, 3, 1, 4)
    with pytest.raises(ValueError, match="non-negative"):
        rebalance_experts(-w, 16, 4, 2, 4)


def test_bench_picks_recorded_loads_and_plans_out_of_sample(tmp_path) -> None:
    """bench/eplb_imbalance.py on a run directory as the trainer writes it: cumulative expert_load.npy when there is
    one, else the last eval step of metrics.jsonl (one step's [layers][experts] per eval line); with two eval steps it
    also plans on step s and measures on step s + 1. One CSV row per layout and mode."""
    import json

    import numpy as np

    from bench.eplb_imbalance import load_expert_loads, main

    early, late = zipf_loads(2, 16, seed=5).round(), zipf_loads(2, 16, seed=6).round()
    lines = [{"step": 10, "loss": 3.0, "expert_load": early.tolist()}, {"step": 15, "loss": 2.9}]
    lines.append({"step": 20, "expert_load": late.tolist()})
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    loads, what = load_expert_loads(run)
    assert torch.equal(loads, late) and "last eval step (20)" in what
    np.save(run / "expert_load.npy", (early + late).numpy())
    loads, what = load_expert_loads(run)
    assert torch.equal(loads, early + late) and what.startswith("cumulative")

    rows = main(
        [
            "--loads",
            str(run),
            "--gpus",
            "4",
            "--nodes",
            "2",
            "--groups",
            "4",
            "--redundant",
            "4",
            "--result",
            "test_eplb_tmp",
        ]
    )
    from bench.common import RESULTS_DIR

    csv_path = RESULTS_DIR / "test_eplb_tmp.csv"
    try:
        lines = csv_path.read_text().strip().splitlines()
    finally:
        csv_path.unlink()
    assert len(lines) == 3 and lines[0].startswith("date,machine,commit,source,mode")
    assert [r["mode"] for r in rows] == ["in_sample", "next_eval_step"] and rows[0]["physical"] == 20
    for r in rows:
        assert len(r["before_layers"].split("/")) == 2
        assert r["global_mean"] <= r["before_mean"] if r["mode"] == "in_sample" else r["global_mean"] > 0
    assert rows[1]["plan_loads"] == "eval step s in (10)" and "(20)" in rows[1]["measure_loads"]
    synth = main(
        [
            "--gpus",
            "8",
            "--nodes",
            "2",
            "--redundant",
            "8",
            "--experts",
            "32",
            "--layers",
            "2",
            "--result",
            "test_eplb_tmp",
        ]
    )
    csv_path.unlink()
    assert synth[0]["source"] == "SYNTHETIC" and synth[0]["global_mean"] < synth[0]["before_mean"]
