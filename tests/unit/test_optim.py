"""Our AdamW against torch's, the BF16-moment option, and the schedules' shapes."""

import math

import pytest
import torch

from train.config import OptimConfig
from train.optim import AdamW, build_optimizer, lr_at


def _pair(seed=0):
    torch.manual_seed(seed)
    a = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    b = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    b.load_state_dict(a.state_dict())
    return a, b


def _steps(model, opt, n=5):
    torch.manual_seed(1)
    for _ in range(n):
        x = torch.randn(32, 8)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_fp32_moments_match_torch_adamw():
    a, b = _pair()
    _steps(a, AdamW(a.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1))
    _steps(b, torch.optim.AdamW(b.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1))
    for pa, pb in zip(a.parameters(), b.parameters()):
        err = (pa - pb).abs().max().item()
        assert err < 1e-6, f"max abs error {err} vs torch.optim.AdamW (fp32 tol 1e-6)"


def test_bf16_moments_are_stored_in_bf16_and_stay_close():
    a, b = _pair()
    opt = AdamW(a.parameters(), lr=1e-2, moment_dtype=torch.bfloat16)
    _steps(a, opt)
    _steps(b, torch.optim.AdamW(b.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0))
    st = opt.state[next(a.parameters())]
    assert st["exp_avg"].dtype == torch.bfloat16 and st["exp_avg_sq"].dtype == torch.bfloat16
    assert next(a.parameters()).dtype == torch.float32
    for pa, pb in zip(a.parameters(), b.parameters()):
        err = (pa - pb).abs().max().item()
        assert 0 < err < 2e-3, f"bf16 moments drift {err} (expected small but non-zero)"


def test_master_weights_must_be_fp32():
    m = torch.nn.Linear(4, 4).to(torch.bfloat16)
    with pytest.raises(ValueError, match="FP32"):
        build_optimizer(m, OptimConfig())


def test_wsd_schedule_warms_up_holds_then_decays():
    cfg = OptimConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=10, schedule="wsd", decay_start=0.5)
    lrs = [lr_at(s, 100, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(v == 1.0 for v in lrs[10:50])
    assert all(x >= y for x, y in zip(lrs[50:], lrs[51:]))
    assert lrs[-1] == pytest.approx(0.1)


def test_cosine_schedule_and_unknown_schedule():
    cfg = OptimConfig(lr=1.0, min_lr_ratio=0.0, warmup_steps=0, schedule="cosine")
    assert lr_at(0, 101, cfg) == pytest.approx(1.0)
    assert lr_at(50, 101, cfg) == pytest.approx(0.5)
    assert lr_at(100, 101, cfg) == pytest.approx(0.0, abs=1e-12)
    assert not math.isnan(lr_at(5, 6, cfg))
    with pytest.raises(ValueError, match="schedule"):
        lr_at(0, 10, OptimConfig(schedule="linear"))
