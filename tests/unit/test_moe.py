"""DeepSeekMoE: router vs transformers' DeepseekV3TopkRouter/MoE and vs per-token loops; dropless and capacity
dispatch; group limits; the aux-loss-free bias; balance losses on hand-computed examples.

Tolerances (fp32): the router's indices and gates are bit-identical to transformers' (same ops); whole-layer
outputs agree to atol 1e-6 / rtol 1e-5 (only the order of the K-slot sums may differ); a Python per-token loop
reference agrees to atol 1e-5 / rtol 1e-5 (different matmul blocking). bf16 is only checked for dtype.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model.config import ModelConfig
from model.moe import (
    DeepseekMoE,
    MoEStats,
    dispatch_order,
    grouped_mm,
    grouped_mm_reference,
    max_violation,
    update_expert_bias,
)
from model.router import balance_loss, expert_load, select_experts

D, F_, E = 32, 16, 16


def make_cfg(**kw) -> ModelConfig:
    base = dict(
        hidden_size=D,
        moe_intermediate_size=F_,
        n_routed_experts=E,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        n_shared_experts=1,
        routed_scaling_factor=2.5,
    )
    base.update(kw)
    return ModelConfig(**base).validate()


def make_moe(seed: int = 0, bias_std: float = 0.05, **kw) -> DeepseekMoE:
    torch.manual_seed(seed)
    moe = DeepseekMoE(make_cfg(**kw))
    with torch.no_grad():
        moe.gate.weight.normal_(0, 0.3)  # spread the affinities so routing is not a near-tie everywhere
        moe.gate.e_score_correction_bias.normal_(0, bias_std)
    return moe


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, what: str) -> None:
    err = (actual.double() - expected.double()).abs()
    ok = torch.allclose(actual.double(), expected.double(), atol=atol, rtol=rtol)
    assert ok, f"{what}: max err {err.max().item():.3e}, mean err {err.mean().item():.3e} (atol {atol}, rtol {rtol})"


# --------------------------------------------------------------------------------------------- transformers


def hf_moe_from(ours: DeepseekMoE, experts_implementation: str = "eager"):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    g = ours.gate
    hc = DeepseekV3Config(
        hidden_size=D,
        moe_intermediate_size=F_,
        n_routed_experts=g.n_routed_experts,
        num_experts_per_tok=g.top_k,
        n_group=g.n_group,
        topk_group=g.topk_group,
        n_shared_experts=ours.shared_experts.gate_proj.out_features // F_,
        routed_scaling_factor=g.routed_scaling_factor,
        norm_topk_prob=g.norm_topk_prob,
    )
    hc._experts_implementation = experts_implementation
    ref = DeepseekV3MoE(hc)
    with torch.no_grad():
        ref.gate.weight.copy_(g.weight)
        ref.gate.e_score_correction_bias.copy_(g.e_score_correction_bias)
        # transformers 5 fuses gate and up: gate_up_proj [E, 2F, D] = cat(gate_proj, up_proj) along F
        ref.experts.gate_up_proj.copy_(torch.cat([ours.experts.gate_proj, ours.experts.up_proj], dim=1))
        ref.experts.down_proj.copy_(ours.experts.down_proj)
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(ref.shared_experts, name).weight.copy_(getattr(ours.shared_experts, name).weight)
    return ref


ROUTING_CASES = [
    dict(n_group=4, topk_group=2, num_experts_per_tok=4, norm_topk_prob=True),
    dict(n_group=8, topk_group=3, num_experts_per_tok=3, norm_topk_prob=True),
    dict(n_group=1, topk_group=1, num_experts_per_tok=2, norm_topk_prob=False),
]


@pytest.mark.parametrize("case", ROUTING_CASES)
def test_router_bit_identical_to_transformers(case):
    ours = make_moe(**case)
    ref = hf_moe_from(ours)
    x = torch.randn(4, 9, D)
    _, w_ref, idx_ref = ref.gate(x)
    idx, w, _ = ours.gate(x.view(-1, D))
    assert torch.equal(idx, idx_ref), "selected experts differ from transformers'"
    assert torch.equal(w, w_ref), f"gates differ: max err {(w - w_ref).abs().max().item():.3e}"


@pytest.mark.parametrize("impl", ["eager", "grouped_mm"])
@pytest.mark.parametrize("case", ROUTING_CASES)
def test_moe_matches_transformers(case, impl):
    ours = make_moe(**case)
    ref = hf_moe_from(ours, impl)
    x = torch.randn(3, 11, D)
    y, stats = ours(x)
    assert_close(y, ref(x), atol=1e-6, rtol=1e-5, what=f"DeepseekMoE vs transformers ({impl})")
    assert stats.dropped == 0


# --------------------------------------------------------------------------------------------- loop references


def loop_route(moe: DeepseekMoE, x_ND: torch.Tensor) -> tuple[list[list[int]], list[list[float]]]:
    """Independent per-token router written from the DeepSeek-V3 report, in float64 Python arithmetic."""
    g = moe.gate
    per_group = g.n_routed_experts // g.n_group
    logits = (x_ND.double() @ g.weight.double().T).tolist()
    bias = g.e_score_correction_bias.double().tolist()
    chosen, gates = [], []
    for row in logits:
        s = [1.0 / (1.0 + math.exp(-v)) for v in row]
        b = [si + bi for si, bi in zip(s, bias)]
        group_score = [sum(sorted(b[j * per_group : (j + 1) * per_group])[-2:]) for j in range(g.n_group)]
        groups = sorted(range(g.n_group), key=lambda j: -group_score[j])[: g.topk_group]
        eligible = [i for i in range(g.n_routed_experts) if i // per_group in groups]
        top = sorted(eligible, key=lambda i: -b[i])[: g.top_k]
        w = [s[i] for i in top]
        if g.norm_topk_prob:
            w = [v / sum(w) for v in w]
        chosen.append(top)
        gates.append([v * g.routed_scaling_factor for v in w])
    return chosen, gates


def loop_moe(moe: DeepseekMoE, x_ND: torch.Tensor, chosen, gates, keep=None) -> torch.Tensor:
    """Per-token dense reference: y_t = shared(x_t) + sum_k g_tk * expert_{e_tk}(x_t) (optionally only kept slots)."""
    ex = moe.experts
    rows = []
    for t in range(x_ND.shape[0]):
        y = moe.shared_experts(x_ND[t])
        for k, (e, g) in enumerate(zip(chosen[t], gates[t])):
            if keep is not None and (t, k) not in keep:
                continue
            h = torch.nn.functional.silu(ex.gate_proj[e] @ x_ND[t]) * (ex.up_proj[e] @ x_ND[t])
            y = y + g * (ex.down_proj[e] @ h)
        rows.append(y)
    return torch.stack(rows)


@pytest.mark.parametrize("case", ROUTING_CASES)
def test_router_matches_loop_reference(case):
    moe = make_moe(**case)
    x = torch.randn(40, D)
    idx, w, _ = moe.gate(x)
    chosen, gates = loop_route(moe, x)
    for t in range(x.shape[0]):
        order = sorted(range(len(chosen[t])), key=lambda k: chosen[t][k])
        assert sorted(idx[t].tolist()) == [chosen[t][k] for k in order], f"token {t}"
        got = w[t][idx[t].argsort()]
        assert_close(got, torch.tensor([gates[t][k] for k in order]), atol=1e-6, rtol=1e-6, what=f"gates token {t}")


def test_dropless_equals_per_token_loop_and_gradients_reach_used_experts():
    moe = make_moe()
    with torch.no_grad():  # starve experts 0 and 5 so that some experts receive no token at all
        moe.gate.e_score_correction_bias[[0, 5]] = -10.0
    x = torch.randn(2, 13, D)
    y, stats = moe(x)
    chosen, gates = loop_route(moe, x.view(-1, D))
    y_ref = loop_moe(moe, x.view(-1, D), chosen, gates)
    assert_close(y.view(-1, D), y_ref, atol=1e-5, rtol=1e-5, what="dropless vs per-token loop")
    assert stats.dropped == 0
    used = sorted({e for row in chosen for e in row})
    assert stats.load_E.tolist() == [sum(row.count(e) for row in chosen) for e in range(E)]
    assert stats.load_E[0] == 0 and stats.load_E[5] == 0

    probe = torch.randn_like(y)
    grads = torch.autograd.grad((y * probe).sum(), [moe.experts.gate_proj, moe.experts.down_proj, moe.gate.weight])
    ref_grads = torch.autograd.grad(
        (y_ref * probe.view(-1, D)).sum(), [moe.experts.gate_proj, moe.experts.down_proj], allow_unused=True
    )
    for name, g, g_ref in zip(["gate_proj", "down_proj"], grads, ref_grads):
        assert_close(g, g_ref, atol=1e-5, rtol=1e-4, what=f"grad {name} vs loop")
        for e in range(E):
            assert (g[e].abs().sum() > 0) == (e in used), f"grad of {name}[{e}] (used={e in used})"
    assert grads[2].abs().sum() > 0, "no gradient reached the router through the gates"


def test_grouped_mm_with_empty_groups():
    torch.manual_seed(0)
    w = torch.randn(5, 6, 4)
    counts = [0, 3, 0, 2, 0]  # empty first, middle and last groups
    x = torch.randn(sum(counts), 4, requires_grad=True)
    offsets = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()])
    out = grouped_mm(x, w, offsets)
    expert_of_row = [e for e, c in enumerate(counts) for _ in range(c)]
    ref = torch.stack([w[e] @ x[r] for r, e in enumerate(expert_of_row)])
    assert_close(out, ref, atol=1e-6, rtol=1e-6, what="grouped_mm vs per-row")
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    empty = grouped_mm(torch.randn(0, 4), w, torch.zeros(6, dtype=torch.int64))
    assert empty.shape == (0, 6)


# --------------------------------------------------------------------------------------------- capacity


def test_capacity_mode_drops_lowest_gates_and_counts_them():
    moe = make_moe(moe_impl="capacity", capacity_factor=0.25).train()
    x = torch.randn(2, 8, D)
    N, K = 16, moe.top_k
    cap = moe.capacity(N)
    assert cap == math.ceil(0.25 * N * K / E) == 1
    y, stats = moe(x)
    idx, w, _ = moe.gate(x.view(-1, D))
    keep = set()
    for e in range(E):  # per expert, keep the `cap` assignments with the largest gate
        slots = [(w[t, k].item(), -t, t, k) for t in range(N) for k in range(K) if idx[t, k] == e]
        keep |= {(t, k) for *_, t, k in sorted(slots, reverse=True)[:cap]}
    assert stats.dropped == N * K - len(keep) > 0
    assert stats.load_E.sum() == N * K, "load_E counts routed assignments, before dropping"
    y_ref = loop_moe(moe, x.view(-1, D), idx.tolist(), w.tolist(), keep=keep)
    assert_close(y.view(-1, D), y_ref, atol=1e-5, rtol=1e-5, what="capacity mode vs loop over kept slots")

    moe.eval()  # no dropping at evaluation / generation
    y_eval, stats_eval = moe(x)
    assert stats_eval.dropped == 0
    y_dropless = loop_moe(moe, x.view(-1, D), idx.tolist(), w.tolist())
    assert_close(y_eval.view(-1, D), y_dropless, atol=1e-5, rtol=1e-5, what="capacity module in eval mode")


def test_capacity_mode_with_large_capacity_equals_dropless():
    x = torch.randn(3, 10, D)
    y_cap, st_cap = make_moe(moe_impl="capacity", capacity_factor=float(E)).train()(x)
    y_drop, _ = make_moe(moe_impl="dropless").train()(x)
    assert st_cap.dropped == 0
    assert torch.equal(y_cap, y_drop)


def test_dispatch_order_is_sorted_by_expert_and_stable():
    idx = torch.tensor([[2, 0], [0, 1], [2, 1], [0, 2]])
    w = torch.tensor([[0.1, 0.9], [0.5, 0.2], [0.8, 0.3], [0.7, 0.6]])
    order, offsets, dropped = dispatch_order(idx, w, n_experts=4)
    assert order.tolist() == [1, 2, 6, 3, 5, 0, 4, 7] and offsets.tolist() == [0, 3, 5, 8, 8] and dropped == 0
    order, offsets, dropped = dispatch_order(idx, w, n_experts=4, capacity=2)
    # expert 0 keeps gates 0.9, 0.7 (slots 1, 6) and drops slot 2 (0.5); expert 1 keeps both (slots 3, 5);
    # expert 2 keeps 0.8, 0.6 (slots 4, 7) and drops slot 0 (0.1); kept slots stay in batch order
    assert order.tolist() == [1, 6, 3, 5, 4, 7] and offsets.tolist() == [0, 2, 4, 6, 6] and dropped == 2


# --------------------------------------------------------------------------------------------- routing rules


def test_group_limited_routing_stays_inside_chosen_groups():
    torch.manual_seed(1)
    n_group, topk_group, per_group = 8, 3, 4
    choice = torch.rand(500, n_group * per_group) + torch.randn(n_group * per_group)
    idx = select_experts(choice, top_k=6, n_group=n_group, topk_group=topk_group)
    group_scores = choice.view(500, n_group, per_group).topk(2, dim=-1)[0].sum(-1)
    best_groups = group_scores.topk(topk_group, dim=-1)[1]
    for t in range(500):
        assert set((idx[t] // per_group).tolist()) <= set(best_groups[t].tolist()), f"token {t}"
    # and the limit binds: without it, some token would have picked an expert outside its groups
    free = select_experts(choice, top_k=6, n_group=1, topk_group=1)
    assert any(not set((free[t] // per_group).tolist()) <= set(best_groups[t].tolist()) for t in range(500))


def test_bias_changes_selection_but_not_gate_values():
    moe = make_moe(bias_std=0.0)
    x = torch.randn(64, D)
    idx0, _, scores = moe.gate(x)
    with torch.no_grad():
        moe.gate.e_score_correction_bias[3] = 5.0  # make expert 3 irresistible
        moe.gate.e_score_correction_bias[7] = -5.0  # and expert 7 unreachable
    idx1, w1, scores1 = moe.gate(x)
    assert torch.equal(scores, scores1), "the bias must not touch affinities"
    assert not torch.equal(idx0.sort(-1)[0], idx1.sort(-1)[0])
    assert (idx1 == 3).any(-1).all() and not (idx1 == 7).any()
    s_sel = scores.gather(1, idx1)
    expected = s_sel / (s_sel.sum(-1, keepdim=True) + 1e-20) * moe.gate.routed_scaling_factor
    assert torch.equal(w1, expected), "gates are the normalized UNBIASED affinities of the selected experts"
    with torch.no_grad():  # a uniform shift of every bias changes nothing
        moe.gate.e_score_correction_bias += 0.5
    idx2, w2, _ = moe.gate(x)
    assert torch.equal(idx1, idx2) and torch.equal(w1, w2)


def test_update_expert_bias_moves_against_load_error():
    moe = make_moe(bias_std=0.0)
    load = torch.zeros(E)
    load[:4] = torch.tensor([30.0, 10.0, 20.0, 20.0])  # mean over 16 experts = 5
    update_expert_bias(moe, load, gamma=0.01)
    b = moe.gate.e_score_correction_bias
    assert b.dtype == torch.float32
    assert torch.allclose(b[:4], torch.full((4,), -0.01)) and torch.allclose(b[4:], torch.full((12,), 0.01))
    update_expert_bias(moe, torch.full((E,), 7.0), gamma=0.01)  # balanced load: no move
    assert torch.allclose(b[:4], torch.full((4,), -0.01))


def test_bias_update_reduces_imbalance():
    moe = make_moe(bias_std=0.0)
    x = torch.randn(256, D) + 1.0
    with torch.no_grad():
        moe.gate.weight[:2] += 0.1  # experts 0 and 1 start popular with every token

    def load() -> torch.Tensor:
        return expert_load(moe.gate(x)[0], E)

    first = max_violation(load())
    for _ in range(100):
        update_expert_bias(moe, load(), gamma=0.02)
    last = max_violation(load())
    assert last < 0.5 * first, (first, last)


def test_max_violation_formula():
    assert max_violation(torch.tensor([4.0, 2.0, 2.0, 0.0])) == pytest.approx(1.0)
    assert max_violation(torch.tensor([3.0, 3.0, 3.0])) == 0.0
    assert max_violation(torch.tensor([10, 0, 0, 0, 0])) == pytest.approx(4.0)


# --------------------------------------------------------------------------------------------- balance losses


def hand_example():
    # 2 sequences x 2 tokens, E = 4 experts, K = 2 (scores are already affinities; rows normalize as written)
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0], [2.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    idx = torch.tensor([[0, 1], [0, 1], [2, 3], [0, 1]])
    return scores.requires_grad_(), idx


def test_sequence_wise_balance_loss_hand_computed():
    scores, idx = hand_example()
    # seq 0: counts [2,2,0,0], f = 4/(2*2) * counts = [2,2,0,0], P = mean([.25]*4, [.5,.25,.25,0]) = [.375,.25,.25,.125]
    #        L0 = 2*.375 + 2*.25 = 1.25.   seq 1: counts [1,1,1,1], f = 1, P = .25 each, L1 = 1.   mean 1.125
    loss = balance_loss(scores, idx, n_seq=2)
    assert loss.item() == pytest.approx(1.125, abs=1e-7)
    loss.backward()
    assert scores.grad is not None and scores.grad.abs().sum() > 0


def test_batch_aux_loss_hand_computed():
    scores, idx = hand_example()
    # whole batch, T = 4: counts [3,3,1,1], f = 4/(2*4) * counts = [1.5,1.5,.5,.5], P = [.3125,.25,.25,.1875]
    # L = 1.5*.3125 + 1.5*.25 + .5*.25 + .5*.1875 = 1.0625
    assert balance_loss(scores, idx, n_seq=1).item() == pytest.approx(1.0625, abs=1e-7)


@pytest.mark.parametrize("mode", ["aux_free", "aux_loss", "none"])
def test_moe_reports_the_balance_loss_of_its_mode(mode):
    moe = make_moe(moe_balance=mode)
    x = torch.randn(3, 5, D)
    _, stats = moe(x)
    assert isinstance(stats, MoEStats)
    idx, _, scores = moe.gate(x.view(-1, D))
    expected = {"aux_free": balance_loss(scores, idx, 3), "aux_loss": balance_loss(scores, idx, 1)}.get(mode)
    if expected is None:
        assert stats.balance_loss.item() == 0.0
    else:
        assert_close(stats.balance_loss, expected, atol=1e-7, rtol=1e-6, what=f"balance loss ({mode})")
        assert stats.balance_loss.requires_grad


def test_bad_modes_raise():
    cfg = make_cfg()
    cfg.moe_impl = "padded"
    with pytest.raises(ValueError, match="moe_impl"):
        DeepseekMoE(cfg)
    cfg = make_cfg()
    cfg.moe_balance = "z_loss"
    with pytest.raises(ValueError, match="moe_balance"):
        DeepseekMoE(cfg)


def test_bf16_module_keeps_dtype():
    moe = make_moe().to(torch.bfloat16)
    y, stats = moe(torch.randn(2, 6, D, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    assert stats.load_E.sum() == 2 * 6 * moe.top_k


def test_router_stays_fp32_under_autocast():
    moe = make_moe()
    x = torch.randn(20, D)
    idx, w, scores = moe.gate(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        idx_ac, w_ac, scores_ac = moe.gate(x)
    assert scores_ac.dtype == torch.float32 and torch.equal(scores_ac, scores)
    assert torch.equal(idx_ac, idx) and torch.equal(w_ac, w)


@settings(max_examples=40, deadline=None)
@given(
    n_tokens=st.integers(0, 40),
    n_experts=st.integers(1, 9),
    top_k=st.integers(1, 3),
    capacity=st.one_of(st.none(), st.integers(0, 6)),
    seed=st.integers(0, 2**16),
)
def test_dispatch_order_invariants(n_tokens, n_experts, top_k, capacity, seed):
    g = torch.Generator().manual_seed(seed)
    top_k = min(top_k, n_experts)
    idx = torch.rand(n_tokens, n_experts, generator=g).argsort(dim=-1)[:, :top_k]  # K distinct experts per token
    w = torch.randint(0, 4, (n_tokens, top_k), generator=g).float()  # coarse values: plenty of ties
    order, offsets, dropped = dispatch_order(idx, w, n_experts, capacity)
    flat_e, flat_w = idx.reshape(-1), w.reshape(-1)
    counts = torch.bincount(flat_e, minlength=n_experts)
    kept = counts if capacity is None else counts.clamp(max=capacity)
    assert offsets.tolist() == [0, *torch.cumsum(kept, 0).tolist()]
    assert dropped == n_tokens * top_k - order.numel() and len(set(order.tolist())) == order.numel()
    for e in range(n_experts):
        mine = order[offsets[e] : offsets[e + 1]]
        assert (flat_e[mine] == e).all() and (mine.diff() > 0).all(), "grouped by expert, batch order inside"
        if capacity is not None:
            slots = (flat_e == e).nonzero().view(-1).tolist()
            best = sorted(slots, key=lambda a: (-flat_w[a].item(), a))[:capacity]  # largest gate, then earliest
            assert sorted(best) == mine.tolist()


# --------------------------------------------------------------------------------------------- grouped GEMM


@pytest.mark.parametrize(
    ("dtype", "K", "N", "atol"),
    [
        (torch.float32, 32, 16, 1e-6),  # torch._grouped_mm (rows of 16-byte multiples)
        (torch.float32, 6, 5, 1e-6),  # unaligned: the reference loop inside the same operator
        (torch.bfloat16, 32, 16, 2e-2),
    ],
)
def test_grouped_mm_equals_the_reference_loop_forward_and_backward(dtype, K, N, atol):
    torch.manual_seed(0)
    counts = [0, 5, 3, 0, 7, 1, 0]  # empty first, middle and last groups
    offsets = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()])
    x = torch.randn(sum(counts), K, dtype=dtype, requires_grad=True)
    w = torch.randn(len(counts), N, K, dtype=dtype, requires_grad=True)
    x_ref, w_ref = (t.detach().clone().requires_grad_() for t in (x, w))
    y, y_ref = grouped_mm(x, w, offsets), grouped_mm_reference(x_ref, w_ref, offsets)
    assert y.dtype == dtype
    assert_close(y.float(), y_ref.float(), atol=atol, rtol=atol, what="forward")
    probe = torch.randn_like(y)
    (y * probe).sum().backward()
    (y_ref * probe).sum().backward()
    assert_close(x.grad.float(), x_ref.grad.float(), atol=atol, rtol=atol, what="dX")
    assert_close(w.grad.float(), w_ref.grad.float(), atol=atol, rtol=atol, what="dW")
    assert (w.grad[[0, 3, 6]] == 0).all(), "experts without rows get no gradient"


def test_grouped_mm_uses_torch_grouped_mm_where_supported(monkeypatch):
    import model.grouped_mm as gm

    def no_loop(*args):
        raise AssertionError("the reference loop ran")

    monkeypatch.setattr(gm, "grouped_mm_reference", no_loop)
    x, w = torch.randn(12, 32, requires_grad=True), torch.randn(4, 16, 32, requires_grad=True)
    grouped_mm(x, w, torch.tensor([0, 3, 3, 10, 12])).sum().backward()  # aligned fp32: never the loop
    with pytest.raises(AssertionError, match="reference loop ran"):
        grouped_mm(torch.randn(12, 6), torch.randn(4, 5, 6), torch.tensor([0, 3, 3, 10, 12]))


@pytest.mark.parametrize("balance", ["aux_free", "aux_loss"])
def test_dropless_moe_training_step_needs_no_host_sync(balance):
    """Under FakeTensorMode no tensor holds data: any op that must read one on the host (.tolist(), .item(),
    nonzero, bincount's output size, boolean indexing...) raises. The dropless layer's forward and backward run."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    moe = make_moe(moe_balance=balance).train()
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.randn(2, 16, D, requires_grad=True)
        y, stats = moe(x)
        (y.sum() + stats.balance_loss + stats.load_E.sum()).backward()
        assert stats.dropped == 0 and y.shape == (2, 16, D)
    with FakeTensorMode(allow_non_fake_inputs=True), pytest.raises(Exception):  # noqa: B017 (the test can fail)
        torch.randn(4).tolist()


@pytest.mark.parametrize("n_tokens", [1, 3, 16])
def test_dense_expert_path_equals_grouped_forward_and_backward(n_tokens):
    """Every expert on every token, keeping each token's K (the CPU decode path), against the grouped GEMM."""
    moe = make_moe()
    x = torch.randn(n_tokens, D, requires_grad=True)
    idx, w, _ = moe.gate(x)
    experts = moe.experts
    assert experts.dense_is_cheaper(x, idx.shape[1])
    dense = experts.forward_dense(x, idx, w)
    order, offsets, _ = dispatch_order(idx, w, E)
    y_sorted = experts.forward_sorted(x[order // idx.shape[1]], offsets) * w.reshape(-1)[order].unsqueeze(-1)
    grouped = y_sorted.new_zeros(idx.numel(), D).index_copy(0, order, y_sorted).view(*idx.shape, D).sum(1)
    assert_close(dense, grouped, atol=1e-6, rtol=1e-5, what="dense vs grouped experts")
    probe = torch.randn_like(dense)
    params = [x, experts.gate_proj, experts.up_proj, experts.down_proj]
    for g, g_ref, name in zip(
        torch.autograd.grad((dense * probe).sum(), params, retain_graph=True),
        torch.autograd.grad((grouped * probe).sum(), params),
        ["x", "gate_proj", "up_proj", "down_proj"],
    ):
        assert_close(g, g_ref, atol=1e-6, rtol=1e-5, what=f"grad {name}")


def test_dense_expert_path_only_for_few_rows_on_cpu_with_the_default_gemm():
    experts = make_moe().experts
    K = 4
    assert experts.dense_is_cheaper(torch.zeros(E, D), K)  # 4 rows per expert on average
    assert not experts.dense_is_cheaper(torch.zeros(E + 1, D), K)
    assert not experts.dense_is_cheaper(torch.zeros(1, D, device="meta"), K)  # not a CPU tensor
    experts.grouped_mm = grouped_mm_reference  # a swapped-in GEMM (the FP8 path) keeps its own quantized calls
    assert not experts.dense_is_cheaper(torch.zeros(1, D), K)
