"""Block-scaled FP8 GEMM (Triton) against an FP64 product of the dequantized inputs and against the reference.

Tolerance (fp32 output): |C - C64| <= 1e-5 * ||A_row|| * ||B_row|| (FP32 accumulation of 128-deep partial sums;
the inputs are exact e4m3 values, so the only error is accumulation rounding). bf16 output: bit-equal to the
round-to-nearest-even of the kernel's own fp32 result. NaN/Inf positions must be equal.
"""

import pytest
import torch

from kernels import fp8_gemm
from kernels import reference as ref

FP8 = torch.float8_e4m3fn


def assert_gemm_close(c: torch.Tensor, c64: torch.Tensor, bound: torch.Tensor, what: str) -> None:
    c = c.double().cpu()
    assert torch.equal(c.isnan(), c64.isnan()), f"{what}: NaN positions differ"
    assert torch.equal(c.isinf(), c64.isinf()) and torch.equal(c[c.isinf()], c64[c64.isinf()]), f"{what}: Inf differ"
    finite = c64.isfinite()
    err = (c - c64)[finite].abs()
    tol = bound[finite]
    if err.numel() and not bool((err <= tol).all()):
        raise AssertionError(f"{what}: max err {err.max():.3e}, mean err {err.mean():.3e}, max tol {tol.max():.3e}")


def quantized(M: int, N: int, K: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(M, K, generator=g) * torch.exp2(torch.randint(-8, 8, (M, 1), generator=g))
    b = torch.randn(N, K, generator=g)
    return ref.act_quant_ref(a), ref.weight_quant_ref(b), ref.act_quant_ref(b)


def bound_of(a64: torch.Tensor, b64: torch.Tensor) -> torch.Tensor:
    return 1e-5 * a64.norm(dim=1)[:, None] * b64.norm(dim=1)[None, :] + 1e-30


SHAPES = [(1, 1, 1), (5, 7, 96), (64, 64, 64), (130, 200, 300), (128, 256, 384)]


@pytest.mark.parametrize("M,N,K", SHAPES)
def test_gemm_blockwise_and_rowwise(M, N, K, device):
    (a_q, a_s), (bw_q, bw_s), (br_q, br_s) = quantized(M, N, K, seed=M + N + K)
    a64 = ref.act_dequant_ref(a_q, a_s).double()
    for blockwise, b_q, b_s in ((True, bw_q, bw_s), (False, br_q, br_s)):
        b64 = (ref.weight_dequant_ref(b_q, b_s) if blockwise else ref.act_dequant_ref(b_q, b_s)).double()
        c64 = a64 @ b64.T
        args = (a_q.to(device), a_s.to(device), b_q.to(device), b_s.to(device))
        c = fp8_gemm.fp8_gemm_nt(*args, b_blockwise=blockwise)
        assert c.dtype == torch.float32 and c.shape == (M, N)
        assert_gemm_close(c, c64, bound_of(a64, b64), f"blockwise={blockwise}")
        c_ref = ref.fp8_gemm_nt_ref(a_q, a_s, b_q, b_s, b_blockwise=blockwise)
        assert_gemm_close(c_ref, c64, bound_of(a64, b64), "reference")
        c_bf16 = fp8_gemm.fp8_gemm_nt(*args, b_blockwise=blockwise, out_dtype=torch.bfloat16)
        assert torch.equal(c_bf16.cpu(), c.cpu().to(torch.bfloat16)), "in-kernel bf16 rounding is not RNE"


def test_gemm_on_transposed_views_for_dgrad(device):
    """Dgrad reads W^T through strides: dX = dY @ W with W's 128x128 blocks transposed, no copy."""
    M, N, K = 70, 200, 130
    (dy_q, dy_s), _, _ = quantized(M, N, 1, seed=7)
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(8))
    w_q, w_s = ref.weight_quant_ref(w)
    dy_q, dy_s = ref.act_quant_ref(torch.randn(M, N, generator=torch.Generator().manual_seed(9)))
    c = fp8_gemm.fp8_gemm_nt(dy_q.to(device), dy_s.to(device), w_q.to(device).t(), w_s.to(device).t(), b_blockwise=True)
    a64 = ref.act_dequant_ref(dy_q, dy_s).double()
    w64 = ref.weight_dequant_ref(w_q, w_s).double()
    assert_gemm_close(c, a64 @ w64, bound_of(a64, w64.T), "dgrad")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy under the interpreter warns on overflow
def test_gemm_nan_and_inf_positions(device):
    """NaN enters as the quantizer makes it (a NaN tile has a NaN scale), Inf by fp32 overflow of huge scales.

    (A NaN e4m3 byte paired with a finite scale is not a case the pipeline produces; the Triton interpreter
    loads such bytes as +-480, so the NaN is carried by the scale.)
    """
    M, N, K = 6, 130, 256
    g = torch.Generator().manual_seed(10)
    a_q = torch.randn(M, K, generator=g).clamp(-4, 4).to(FP8)
    a_s = torch.rand(M, 2, generator=g) + 0.5
    b_q = torch.randn(N, K, generator=g).mul(3).to(FP8)
    b_s = torch.ones(2, 2)  # scale 1: scaling before or after the dot rounds the same
    a_q.view(torch.uint8)[1, 7] = 0x7F
    a_s[1, 0] = float("nan")  # a NaN tile of A: row 1 NaN
    b_q.view(torch.uint8)[129, 140] = 0xFF
    b_s[1, 1] = float("nan")  # a NaN block of B: columns 128.. NaN
    a_q[4] = 0.0
    a_q[4, 200] = 1.0  # row 4: a single huge product per column -> +-inf where |b| > 1.13, finite elsewhere
    a_s[4, 1] = 3e38
    c = fp8_gemm.fp8_gemm_nt(a_q.to(device), a_s.to(device), b_q.to(device), b_s.to(device), b_blockwise=True)
    a64 = ref.act_dequant_ref(a_q, a_s).double()
    b64 = ref.weight_dequant_ref(b_q, b_s).double()
    c64 = (a64.float() @ b64.float().T).double()  # fp32 overflow semantics, like the kernel
    assert bool(c64[4].isinf().any()) and bool(c64[4, :128].isfinite().any())
    assert bool(c64[1].isnan().all()) and bool(c64[:, 128:].isnan().all()) and bool(c64[0, :128].isfinite().all())
    assert_gemm_close(c, c64, bound_of(a64.nan_to_num(), b64.nan_to_num()), "nan/inf")


def test_gemm_refuses_bad_contracts():
    a_q, a_s = ref.act_quant_ref(torch.randn(4, 96))
    b_q, b_s = ref.weight_quant_ref(torch.randn(8, 96))
    with pytest.raises(ValueError, match="a_q"):
        fp8_gemm.fp8_gemm_nt(a_q.float(), a_s, b_q, b_s, b_blockwise=True)
    with pytest.raises(ValueError, match="scales of b_q"):
        fp8_gemm.fp8_gemm_nt(a_q, a_s, b_q, b_s, b_blockwise=False)
    with pytest.raises(ValueError, match="K mismatch"):
        c_q, c_s = ref.weight_quant_ref(torch.randn(8, 64))
        fp8_gemm.fp8_gemm_nt(a_q, a_s, c_q, c_s, b_blockwise=True)
    with pytest.raises(ValueError, match="output dtype"):
        fp8_gemm.fp8_gemm_nt(a_q, a_s, b_q, b_s, b_blockwise=True, out_dtype=torch.int8)
