"""FP8 training path: autograd Functions, FP8Linear, fp8_grouped_mm, convert_to_fp8, fp8_stats, backend switch.

Tolerances:
- triton vs torch backend (same quantized bits, accumulation in another order and precision): per element, the
  accumulation model's bound of each of the three GEMMs (tests/kernels/gemm_bounds.py: FP32 sums in the
  interpreter, the ~14-bit Tensor-Core accumulator on a GPU) plus the torch backend's own FP32 bound, plus one
  bf16 rounding of each side for bf16 outputs;
- FP8 vs FP64 high precision: relative Frobenius error <= 0.06 (e4m3 has 3 mantissa bits: ~2.6% rms relative
  error per quantized element, two quantized factors per product), and >= 0.005 (FP8 really ran).
"""

import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kernels import reference as ref
from kernels.backend import resolve_backend
from kernels.formats import ScaleFormats
from kernels.fp8_linear import (
    FP8_LINEAR_NAMES,
    FP8GroupedMM,
    FP8Linear,
    ScaleStats,
    check_fp8_dims,
    convert_to_fp8,
    fp8_grouped_mm,
    fp8_linear,
    fp8_modules,
    fp8_stats,
)
from model.config import ModelConfig
from model.moe import grouped_mm
from model.transformer import DeepseekV3
from tests.kernels.gemm_bounds import assert_within, bf16_bound, dequant, gemm_bound, grouped_bounds, rel_err
from tests.kernels.tiny_model import tiny_config


def assert_rel(a: torch.Tensor, b: torch.Tensor, tol: float, what: str) -> None:
    err = rel_err(a, b)
    if not err <= tol:
        diff = (a.double() - b.double()).abs()
        raise AssertionError(f"{what}: rel err {err:.3e} > {tol}; max {diff.max():.3e}, mean {diff.mean():.3e}")


def run_linear(backend: str, x, w, b, dy):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    b = b.clone().requires_grad_() if b is not None else None
    if backend == "fp64":
        y = F.linear(x.double(), w.double(), b.double() if b is not None else None)
    else:
        y = fp8_linear(x, w, b, backend=backend)
    y.backward(dy.to(y.dtype))
    return y.detach(), x.grad, w.grad, (b.grad if b is not None else None)


def linear_bounds(x, w, dy, device) -> dict[str, torch.Tensor]:
    """Per-element bounds on |triton - torch| for y, dx, dw of ``fp8_linear`` (both backends quantize to the
    same bits, computed here with the reference)."""
    x_MK, dy_MN = x.reshape(-1, x.shape[-1]).cpu(), dy.reshape(-1, dy.shape[-1]).cpu()
    x_q, x_s = ref.act_quant_ref(x_MK)
    w64 = dequant(*ref.weight_quant_ref(w.cpu()), blockwise=True)
    x64, dy64 = dequant(x_q, x_s, False), dequant(*ref.act_quant_ref(dy_MN), blockwise=False)
    dyT64 = dequant(*ref.act_quant_t_ref(dy_MN), blockwise=False)
    xT64 = dequant(*ref.act_quant_t_ref(x_q, x_s), blockwise=False)
    return {
        "y": gemm_bound(x64, w64, device, vs_reference=True),
        "dx": gemm_bound(dy64, w64.T, device, vs_reference=True),
        "dw": gemm_bound(dyT64, xT64, device, vs_reference=True),
    }


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_fp8_linear_backends_agree_and_approximate_fp64(x_dtype, bias, device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 96, generator=g).to(x_dtype)
    w = torch.randn(80, 96, generator=g) * 0.1  # fp32 master weight
    b = torch.randn(80, generator=g) if bias else None
    dy = torch.randn(2, 9, 80, generator=g)
    x, w, dy = x.to(device), w.to(device), dy.to(device)
    b = b.to(device) if b is not None else None
    tri, tor, hp = (run_linear(be, x, w, b, dy) for be in ("triton", "torch", "fp64"))
    bounds = linear_bounds(x, w, dy.to(x_dtype), device)
    for name, t, r, h in zip(("y", "dx", "dw", "db"), tri, tor, hp):
        if h is None:
            continue
        if name == "db":  # a plain sum of dy, not an FP8 GEMM
            assert_rel(t, r, 1e-5, "db triton vs torch")
            continue
        r2 = r.reshape(bounds[name].shape)
        bound = bounds[name] + (2 * bf16_bound(r2) if t.dtype == torch.bfloat16 else 0)
        assert_within(t.reshape(r2.shape), r2, bound, f"{name} triton vs torch")
        assert 0.005 <= rel_err(r, h) <= 0.06, f"{name}: FP8 vs fp64 rel err {rel_err(r, h):.3e}"
    assert tri[0].dtype == x_dtype and tri[1].dtype == x_dtype and tri[2].dtype == torch.float32


def test_fp8_linear_saves_the_quantized_activation():
    x = torch.randn(4, 200, requires_grad=True)
    w = torch.randn(64, 200, requires_grad=True)
    y = fp8_linear(x, w, backend="torch")
    saved = y.grad_fn.saved_tensors
    assert saved[0].dtype == torch.float8_e4m3fn and saved[0].shape == x.shape
    assert not any(t.dtype == x.dtype and t.shape == x.shape for t in saved), "high-precision x was saved"


def test_fp8_linear_ue8m0_scales_and_shape_errors():
    x = torch.randn(5, 64)
    w = torch.randn(32, 64)
    stats = ScaleStats()
    fp8_linear(x, w, backend="torch", scale_formats="ue8m0", stats=stats)
    lo, hi, _ = stats.last.tolist()
    assert torch.log2(torch.tensor([lo, hi])).frac().abs().max() == 0  # powers of two, decoded from exponents
    with pytest.raises(ValueError, match="features"):
        fp8_linear(torch.randn(5, 63), w, backend="torch")
    with pytest.raises(ValueError, match="scale format of grad"):
        fp8_linear(x, w, backend="torch", scale_formats=ScaleFormats(grad="e5m2"))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_scale_format_per_tensor_class(backend, device):
    """Each class gets its own format: act ue8m0, weight fp32, grad ue8m0 here; every GEMM matches the reference
    fed with exactly those quantizations (torch backend on the CPU: bit for bit; else within the model's bound)."""
    formats = ScaleFormats(act="ue8m0", weight="fp32", grad="ue8m0")
    g = torch.Generator().manual_seed(4)
    x = torch.randn(7, 200, generator=g).to(device).requires_grad_()
    w = (torch.randn(136, 200, generator=g) * 0.1).to(device).requires_grad_()
    dy = torch.randn(7, 136, generator=g).to(device)
    y = fp8_linear(x, w, backend=backend, scale_formats=formats)
    saved = y.grad_fn.saved_tensors
    assert saved[1].dtype == torch.uint8 and saved[3].dtype == torch.float32  # x_s ue8m0, w_s fp32
    y.backward(dy)
    xc, wc, dyc = x.detach().cpu(), w.detach().cpu(), dy.cpu()
    x_q, x_s = ref.act_quant_ref(xc, "ue8m0")
    w_q, w_s = ref.weight_quant_ref(wc, "fp32")
    dy_q, dy_s = ref.act_quant_ref(dyc, "ue8m0")
    want = {
        "y": ref.fp8_gemm_nt_ref(x_q, x_s, w_q, w_s, b_blockwise=True),
        "dx": ref.fp8_gemm_nt_ref(dy_q, dy_s, w_q.t().contiguous(), w_s.t().contiguous(), b_blockwise=True),
        "dw": ref.fp8_gemm_nt_ref(
            *ref.act_quant_t_ref(dyc, fmt="ue8m0"), *ref.act_quant_t_ref(x_q, x_s, "ue8m0"), b_blockwise=False
        ),
    }
    got = {"y": y.detach(), "dx": x.grad, "dw": w.grad}
    operands = {  # the dequantized operands of each GEMM, for the triton backend's bound
        "y": (ref.act_dequant_ref(x_q, x_s), ref.weight_dequant_ref(w_q, w_s)),
        "dx": (ref.act_dequant_ref(dy_q, dy_s), ref.weight_dequant_ref(w_q, w_s).T),
        "dw": (
            ref.act_dequant_ref(*ref.act_quant_t_ref(dyc, fmt="ue8m0")),
            ref.act_dequant_ref(*ref.act_quant_t_ref(x_q, x_s, "ue8m0")),
        ),
    }
    for name in want:
        if backend == "torch" and device == "cpu":  # the very computation of the reference
            assert torch.equal(got[name].cpu(), want[name]), name
        else:
            a64, b64 = (t.double() for t in operands[name])
            assert_within(got[name], want[name], gemm_bound(a64, b64, device, vs_reference=True), name)
    other = fp8_linear(x.detach(), w.detach(), backend="torch")  # all fp32 scales: different bits
    assert not torch.equal(other.cpu(), want["y"])


def test_outputs_in_bf16_under_autocast_like_nn_linear():
    """precision=fp8 runs under bf16 autocast: FP8 layers then output bf16 (as nn.Linear does there), and return
    dX in the input's dtype; without autocast the output keeps the input's dtype."""
    lin = nn.Linear(200, 72, bias=True)
    fl = FP8Linear.from_linear(lin, backend="torch")
    x = torch.randn(6, 200, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_fp8, y_bf16 = fl(x), lin(x)
    assert y_fp8.dtype == y_bf16.dtype == torch.bfloat16
    assert rel_err(y_fp8, y_bf16) < 0.06
    y_fp8.float().sum().backward()
    assert x.grad.dtype == torch.float32 and lin.weight.grad.dtype == torch.float32
    assert fl(x).dtype == torch.float32


@pytest.mark.parametrize("counts", [[5, 0, 20, 3], [0, 0, 0, 9]])
def test_fp8_grouped_mm_matches_model_grouped_mm(counts, device):
    E, N, K = 4, 48, 64
    g = torch.Generator().manual_seed(1)
    offsets = torch.tensor([0, *counts]).cumsum(0)
    x = torch.randn(sum(counts), K, generator=g)
    w = torch.randn(E, N, K, generator=g) * 0.1
    dy = torch.randn(sum(counts), N, generator=g)
    results = {}
    for be in ("triton", "torch", "fp64"):
        xx, ww = x.to(device).clone().requires_grad_(), w.to(device).clone().requires_grad_()
        if be == "fp64":
            y = grouped_mm(xx.double(), ww.double(), offsets)
        else:
            y = fp8_grouped_mm(xx, ww, offsets.to(device), backend=be)
        y.backward(dy.to(device, y.dtype))
        results[be] = (y.detach(), xx.grad, ww.grad)
    bounds = grouped_bounds(x, w, dy, offsets, device)
    for i, name in enumerate(("y", "dx", "dw")):
        assert_within(results["triton"][i], results["torch"][i], bounds[name], f"{name} triton vs torch")
        assert rel_err(results["torch"][i], results["fp64"][i]) <= 0.06, name
    empty = [e for e, c in enumerate(counts) if c == 0]
    assert bool((results["triton"][2][empty] == 0).all())


def test_convert_to_fp8_swaps_exactly_the_deepseek_v3_gemms():
    torch.manual_seed(0)
    model = DeepseekV3(tiny_config())
    keys_before = list(model.state_dict().keys())
    params_before = dict(model.named_parameters())
    ids = torch.randint(0, 96, (2, 12))
    loss_hp = model(ids, ids).loss
    convert_to_fp8(model, backend="torch")
    assert list(model.state_dict().keys()) == keys_before
    assert all(p is params_before[n] for n, p in model.named_parameters())  # same Parameter objects
    converted = fp8_modules(model)
    linear_names = {n.rsplit(".", 1)[-1] for n, m in converted.items() if isinstance(m, FP8Linear)}
    assert linear_names == FP8_LINEAR_NAMES - {"q_proj"}  # q_lora_rank is set: q_a_proj/q_b_proj
    assert sum(isinstance(m, FP8GroupedMM) for m in converted.values()) == 2  # layer 1 and the MTP layer
    assert type(model.lm_head) is nn.Linear and type(model.model.embed_tokens) is nn.Embedding
    for moe in model.moe_layers():
        assert not isinstance(moe.gate, FP8Linear)
        assert isinstance(moe.shared_experts.down_proj, FP8Linear)
    assert isinstance(model.model.layers[0].mlp.gate_proj, FP8Linear)  # the dense layer's MLP too
    assert fp8_stats(model) == {}
    loss_fp8 = model(ids, ids).loss
    assert abs(loss_fp8.item() - loss_hp.item()) < 0.02 * loss_hp.item()
    stats = fp8_stats(model, per_module=True)
    assert stats["modules"] == len(converted)
    assert 0 < stats["act_scale_min"] <= stats["act_scale_mean"] <= stats["act_scale_max"]
    assert "model.layers.0.self_attn.o_proj/act_scale_max" in stats
    loss_fp8.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert convert_to_fp8(model, backend="torch") is model  # idempotent
    assert fp8_modules(model).keys() == converted.keys()


def test_fp8_linear_module_from_linear_keeps_state_dict():
    lin = nn.Linear(96, 40)
    fl = FP8Linear.from_linear(lin, backend="torch")
    assert fl.weight is lin.weight and fl.bias is lin.bias
    assert fl.state_dict().keys() == lin.state_dict().keys()
    x = torch.randn(3, 96)
    assert rel_err(fl(x), lin(x)) < 0.06


def test_resolve_backend(monkeypatch):
    assert resolve_backend("torch") == "torch"
    assert resolve_backend("auto") == ("triton" if torch.cuda.is_available() else "torch")
    with pytest.raises(ValueError, match="kernels.backend"):
        resolve_backend("cuda")
    if torch.cuda.is_available():
        return
    assert resolve_backend("triton") == "triton"  # conftest set TRITON_INTERPRET=1
    monkeypatch.setitem(sys.modules, "kernels.quant", types.SimpleNamespace(INTERPRETED=False))
    with pytest.raises(RuntimeError, match="imported before TRITON_INTERPRET"):
        resolve_backend("triton")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        resolve_backend("triton")


def test_fp8_linear_ignores_autocast():
    """The trainer runs fp8 under bf16 autocast; inside the FP8 Function the GEMM precision is ours, not autocast's."""
    x = torch.randn(6, 200).bfloat16()
    w = torch.randn(72, 200, requires_grad=True)
    y_plain = fp8_linear(x, w, backend="torch")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_auto = fp8_linear(x, w, backend="torch")
    assert y_auto.dtype == torch.bfloat16 and torch.equal(y_auto, y_plain)


def test_check_fp8_dims_lists_padded_gemms():
    notes = check_fp8_dims(tiny_config())
    assert any(n.startswith("q_a_proj: N=48 -> 128, K=64 -> 128") for n in notes), notes
    v3 = ModelConfig()  # the released DeepSeek-V3 shapes
    assert [n.split(":")[0] for n in check_fp8_dims(v3)] == ["kv_a_proj_with_mqa"]  # N = 512 + 64


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_no_tokens(backend, device):
    """A micro-batch can route no token to a layer's experts (or hold no rows at all): empty in, zeros for dW."""
    x = torch.zeros(0, 64, device=device, requires_grad=True)
    w = torch.randn(3, 32, 64, device=device, requires_grad=True)
    y = fp8_grouped_mm(x, w, torch.zeros(4, dtype=torch.int64, device=device), backend=backend)
    y.sum().backward()
    assert y.shape == (0, 32) and x.grad.shape == (0, 64) and bool((w.grad == 0).all())
    w2 = torch.randn(32, 64, device=device, requires_grad=True)
    y2 = fp8_linear(x, w2, backend=backend)
    y2.sum().backward()
    assert y2.shape == (0, 32) and bool((w2.grad == 0).all())
