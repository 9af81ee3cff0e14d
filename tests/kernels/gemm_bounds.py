"""Tolerances of the kernel tests, from the accumulation model of the machine that runs them (kernels/accumulation.py).

Interpreter (CPU): exact e4m3 products summed in FP32, ``(130 + Kt) * 2^-24`` of the sum of |products| per element.
GPU: a ~14-bit Tensor-Core accumulator inside each 128-deep slice (``HOPPER``), FP32 across slices: about
``2^-8`` of the sum of |products|. BF16 outputs add half a BF16 ulp (``2^-8`` relative) of the value.
"""

from __future__ import annotations

import torch

from kernels import reference as ref
from kernels.accumulation import HOPPER, INTERPRETER, AccumulationModel, emulate_gemm, model_for

BF16_UNIT = 2.0**-8  # half an ulp of bf16, relative


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def dequant(q: torch.Tensor, s: torch.Tensor, blockwise: bool) -> torch.Tensor:
    """The exact values of a quantized operand, float64 on the CPU."""
    q, s = q.cpu(), s.cpu()
    return (ref.weight_dequant_ref(q, s) if blockwise else ref.act_dequant_ref(q, s)).double()


def gemm_bound(
    a64: torch.Tensor, b64: torch.Tensor, device: torch.device | str, *, vs_reference: bool = False
) -> torch.Tensor:
    """Per-element bound on |C - A B^T| for the kernels on ``device``; with ``vs_reference`` the bound on the
    difference from the torch backend, which itself errs by up to the interpreter's bound."""
    bound = model_for(device).bound(a64, b64)
    return bound + INTERPRETER.bound(a64, b64) if vs_reference else bound


def assert_within(c: torch.Tensor, want: torch.Tensor, bound: torch.Tensor, what: str) -> None:
    """Equal NaN/Inf positions (and Inf signs); elsewhere ``|c - want| <= bound``; prints max/mean error on failure."""
    c, want, bound = c.double().cpu(), want.double().cpu(), bound.double().cpu()
    assert torch.equal(c.isnan(), want.isnan()), f"{what}: NaN positions differ"
    assert torch.equal(c.isinf(), want.isinf()) and torch.equal(c[c.isinf()], want[want.isinf()]), f"{what}: Inf"
    finite = want.isfinite()
    err, tol = (c - want)[finite].abs(), bound[finite]
    if err.numel() and not bool((err <= tol).all()):
        bad = err > tol
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{err.numel()} entries out of bound; max err {err.max():.3e}, "
            f"mean err {err.mean():.3e}, max err/bound {(err / tol.clamp(min=1e-300)).max():.2f}"
        )


def bf16_bound(c64: torch.Tensor) -> torch.Tensor:
    """Rounding of a bf16 output: half an ulp of the value (with the model's own error added by the caller)."""
    return BF16_UNIT * c64.abs() * 1.01


def grouped_bounds(x_MK, w_ENK, dy_MN, offsets_E1, device, vs_reference: bool = True) -> dict[str, torch.Tensor]:
    """Per-element bounds for y, dx, dw of ``fp8_grouped_mm`` (fp32 scales), expert by expert."""
    x_MK, w_ENK, dy_MN, bounds = x_MK.cpu(), w_ENK.cpu(), dy_MN.cpu(), offsets_E1.tolist()
    x_q, x_s = ref.act_quant_ref(x_MK)
    x64, dy64 = dequant(x_q, x_s, False), dequant(*ref.act_quant_ref(dy_MN), blockwise=False)
    w64 = dequant(*ref.weight_quant_ref(w_ENK), blockwise=True)
    dyT64 = dequant(*ref.act_quant_t_ref(dy_MN), blockwise=False)
    xT64 = dequant(*ref.act_quant_t_ref(x_q, x_s), blockwise=False)
    y, dx = torch.zeros(dy_MN.shape, dtype=torch.float64), torch.zeros(x_MK.shape, dtype=torch.float64)
    dw = torch.zeros(w_ENK.shape, dtype=torch.float64)
    for e in range(w_ENK.shape[0]):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            y[lo:hi] = gemm_bound(x64[lo:hi], w64[e], device, vs_reference=vs_reference)
            dx[lo:hi] = gemm_bound(dy64[lo:hi], w64[e].T, device, vs_reference=vs_reference)
            dw[e] = gemm_bound(dyT64[:, lo:hi], xT64[:, lo:hi], device, vs_reference=vs_reference)
    return {"y": y, "dx": dx, "dw": dw}


def emulated_ops(model: AccumulationModel = HOPPER):
    """The torch backend's kernel set with every GEMM summed as ``model`` says (``emulate_gemm``, on the CPU):
    what the model predicts a GPU run of the Triton kernels computes, for tolerances of whole training steps."""
    from kernels.fp8_linear import _Ops, ops_for

    def gemm(a_q, a_s, b_q, b_s, *, b_blockwise, out_dtype=torch.float32):
        c = emulate_gemm(a_q.cpu(), a_s.cpu(), b_q.cpu(), b_s.cpu(), b_blockwise=b_blockwise, model=model)
        return c.to(a_q.device, out_dtype)

    def grouped(a_q, a_s, b_q, b_s, offsets_E1, out_dtype=torch.float32):
        bounds = offsets_E1.tolist()
        out = torch.zeros(a_q.shape[0], b_q.shape[1], device=a_q.device)
        for e in range(b_q.shape[0]):
            lo, hi = bounds[e], bounds[e + 1]
            if hi > lo:
                out[lo:hi] = gemm(a_q[lo:hi], a_s[lo:hi], b_q[e], b_s[e], b_blockwise=True)
        return out.to(out_dtype)

    def wgrad(aT_q, aT_s, bT_q, bT_s, offsets_E1):
        bounds = offsets_E1.tolist()
        out = torch.zeros(len(bounds) - 1, aT_q.shape[0], bT_q.shape[0], device=aT_q.device)
        for e in range(len(bounds) - 1):
            seg = aT_q.clone()
            seg.view(torch.uint8)[:, : bounds[e]] = 0  # the kernel's in-register mask: global token tiles kept
            seg.view(torch.uint8)[:, bounds[e + 1] :] = 0
            out[e] = gemm(seg, aT_s, bT_q, bT_s, b_blockwise=False)
        return out

    torch_ops = ops_for("torch")
    return _Ops(torch_ops.act_quant, torch_ops.act_quant_t, torch_ops.weight_quant, gemm, grouped, wgrad)
