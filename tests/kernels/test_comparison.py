"""The comparison backend (kernels.backend=torchao): torchao's row-wise float8 training against our kernels.

Stated agreement. Both quantize every GEMM input to e4m3 (3 mantissa bits: ~2.6% rms relative error per element,
two quantized factors per product) with different scale granularity (torchao: one scale per row of the whole K;
ours: 1x128 / 128x128 tiles), so neither reproduces the other's bits. Each must lie within 0.06 relative
Frobenius error of the FP64 product (as tests/kernels/test_fp8_linear.py requires of ours), and the two within
0.08 of each other (at most the sum of two independent ~0.04 errors). Row-wise scales lose more on rows whose
magnitude varies along K, which the test inputs have (a few large channels, as LLM activations do): ours is
required to be the closer one there.
"""

import pytest
import torch
from torch import nn

from kernels.comparison import is_torchao_linear, rowwise_quant, rowwise_scaled_mm
from kernels.fp8_linear import FP8GroupedMM, FP8Linear, convert_to_fp8, fp8_modules
from model.transformer import DeepseekV3
from tests.kernels.gemm_bounds import rel_err
from tests.kernels.tiny_model import tiny_config

pytest.importorskip("torchao")


def outlier_inputs(M: int, K: int, N: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    x[:, torch.randperm(K, generator=g)[:4]] *= 30.0  # outlier channels
    return x, torch.randn(N, K, generator=g) * K**-0.5, torch.randn(M, N, generator=g)


def grads(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor):
    x = x.clone().requires_grad_()
    layer.zero_grad()
    y = layer(x)
    y.backward(dy)
    return y.detach(), x.grad, layer.weight.grad.clone()


def test_torchao_rowwise_and_ours_agree_at_the_stated_tolerance():
    x, w, dy = outlier_inputs(64, 256, 192, seed=0)
    base = nn.Linear(256, 192, bias=False)
    with torch.no_grad():
        base.weight.copy_(w)
    ours = FP8Linear.from_linear(nn.Linear(256, 192, bias=False), backend="torch")
    with torch.no_grad():
        ours.weight.copy_(w)
    holder = nn.Module()
    holder.o_proj = base  # a name convert_to_fp8 converts
    ao = convert_to_fp8(holder, backend="torchao").o_proj
    assert is_torchao_linear(ao) and ao.weight is base.weight
    exact = (x.double() @ w.double().T, dy.double() @ w.double(), dy.double().T @ x.double())
    for name, o, a, e in zip(("y", "dx", "dw"), grads(ours, x, dy), grads(ao, x, dy), exact):
        err_ours, err_ao = rel_err(o, e), rel_err(a, e)
        assert err_ours <= 0.06 and err_ao <= 0.06, (name, err_ours, err_ao)
        assert rel_err(o, a) <= 0.08, (name, rel_err(o, a))
        if name == "y":  # the activation's outlier channels cost row-wise scaling its resolution
            assert err_ours < err_ao, (err_ours, err_ao)


def test_rowwise_scaled_mm_is_the_rowwise_product():
    x, w, _ = outlier_inputs(32, 128, 64, seed=1)
    xq, xs = rowwise_quant(x)
    wq, ws = rowwise_quant(w)
    y = rowwise_scaled_mm(xq, xs, wq, ws, torch.float32)
    want = (xq.double() * xs.double()) @ (wq.double() * ws.double()).T
    assert rel_err(y, want) < 1e-5 and rel_err(y, x.double() @ w.double().T) < 0.06


def test_convert_to_fp8_with_the_comparison_backend():
    torch.manual_seed(0)
    model = DeepseekV3(tiny_config())
    keys = list(model.state_dict().keys())
    ids = torch.randint(0, 96, (2, 12))
    loss_hp = model(ids, ids).loss.item()
    params = dict(model.named_parameters())
    convert_to_fp8(model, backend="torchao")
    assert list(model.state_dict().keys()) == keys
    assert all(p is params[n] for n, p in model.named_parameters())
    linears = [m for m in model.modules() if is_torchao_linear(m)]
    assert len(linears) == 3 * 5 + 3 + 3 + 3 + 1  # attention x3 (2 layers, MTP), dense MLP, 2 shared MLPs, eh_proj
    assert not any(isinstance(m, FP8Linear) for m in model.modules())
    assert sum(isinstance(m, FP8GroupedMM) for m in fp8_modules(model).values()) == 2  # experts: ours
    loss = model(ids, ids).loss
    assert abs(loss.item() - loss_hp) < 0.02 * loss_hp
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
