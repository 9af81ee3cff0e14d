"""Logit distillation: the forward-KL loss with temperature against hand-computed values, the cached top-k variant
equal to the full one when k = V, and the top-k/position alignment of the cached teacher logits."""

import math

import pytest
import torch

from distill.student import kd_loss_full, kd_loss_topk, micro_batch

TOL = {"fp32": dict(atol=1e-6, rtol=1e-5)}  # fp32 everywhere: these are exact formulas on tiny tensors


def _close(got: torch.Tensor, want: float, tol=TOL["fp32"]):
    err = abs(float(got) - want)
    ok = math.isclose(float(got), want, abs_tol=tol["atol"], rel_tol=tol["rtol"])
    assert ok, f"got {float(got)}, want {want}, abs err {err}"


def _kl_by_hand(t_logits: list[float], s_logits: list[float], T: float) -> float:
    """KL(softmax(t/T) || softmax(s/T)) * T^2 with plain Python floats."""
    zt = [math.exp(v / T) for v in t_logits]
    zs = [math.exp(v / T) for v in s_logits]
    p = [v / sum(zt) for v in zt]
    q = [v / sum(zs) for v in zs]
    return T * T * sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def test_full_kd_matches_hand_computed_kl_with_temperature():
    t = [[2.0, 0.5, -1.0], [0.0, 0.0, 3.0]]
    s = [[1.0, 1.0, 0.0], [-1.0, 2.0, 0.5]]
    for T in (1.0, 2.0, 0.5):
        want = sum(_kl_by_hand(a, b, T) for a, b in zip(t, s)) / 2
        _close(kd_loss_full(torch.tensor(s), torch.tensor(t), T), want)


def test_kd_is_zero_for_identical_logits_and_forward_not_reverse():
    x = torch.tensor([[1.0, -2.0, 0.3, 4.0]])
    _close(kd_loss_full(x, x, 2.0), 0.0)
    t, s = [[4.0, 0.0, 0.0]], [[0.0, 0.0, 1.0]]
    forward, reverse = _kl_by_hand(t[0], s[0], 1.0), _kl_by_hand(s[0], t[0], 1.0)
    assert abs(forward - reverse) > 0.1  # the direction matters on this example
    _close(kd_loss_full(torch.tensor(s), torch.tensor(t), 1.0), forward)


def test_t_squared_scaling():
    t, s = torch.tensor([[1.0, 0.0, -1.0]]), torch.tensor([[0.0, 0.5, 0.0]])
    T = 3.0
    logp = torch.log_softmax(t / T, -1)
    unscaled = (logp.exp() * (logp - torch.log_softmax(s / T, -1))).sum()
    _close(kd_loss_full(s, t, T), float(unscaled) * T * T)


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_topk_with_k_equal_vocab_equals_full(T):
    g = torch.Generator().manual_seed(0)
    N, V = 7, 11
    s, t = torch.randn(N, V, generator=g), torch.randn(N, V, generator=g) * 3
    vals, ids = t.topk(V, dim=-1)  # every token, in the teacher's order (a permutation of the vocabulary)
    full, topk = kd_loss_full(s, t, T), kd_loss_topk(s, ids, vals, T)
    err = abs(float(full) - float(topk))
    assert err < 1e-5, f"top-k (k=V) {float(topk)} vs full {float(full)}: abs err {err}"


def test_topk_renormalizes_the_teacher_over_its_top_k():
    s = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    t_vals, t_ids = torch.tensor([[2.0, 1.0]]), torch.tensor([[3, 0]])
    T = 1.0
    p = [math.exp(2) / (math.exp(2) + math.exp(1)), math.exp(1) / (math.exp(2) + math.exp(1))]
    logq = torch.log_softmax(s, -1)[0]
    want = p[0] * (math.log(p[0]) - float(logq[3])) + p[1] * (math.log(p[1]) - float(logq[0]))
    _close(kd_loss_topk(s, t_ids, t_vals, T), want)


def test_kd_gradient_flows_to_student_only():
    s = torch.randn(3, 5, requires_grad=True)
    t = torch.randn(3, 5, requires_grad=True)
    kd_loss_full(s, t.detach(), 2.0).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_micro_batch_aligns_cached_rows_with_response_positions():
    # two examples: ids, mask (prompt 0, response 1), top-k rows for each response target position
    ex = [
        ([5, 6, 7, 8], [0, 0, 1, 1], [[7, 1], [8, 2]], [[1.0, 0.0], [2.0, 0.0]]),
        ([5, 9, 10], [0, 1, 1], [[9, 3], [10, 4]], [[3.0, 0.0], [4.0, 0.0]]),
    ]
    x, y, ids_NK, logits_NK = micro_batch(ex, pad_id=1)
    resp = y != -100
    assert y[resp].tolist() == [7, 8, 9, 10]  # targets in row-major order ...
    assert ids_NK[:, 0].tolist() == [7, 8, 9, 10]  # ... line up with the cached rows
    assert logits_NK[:, 0].tolist() == [1.0, 2.0, 3.0, 4.0]
