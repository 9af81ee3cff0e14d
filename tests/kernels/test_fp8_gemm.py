"""Block-scaled FP8 GEMM (Triton) against an FP64 product of the dequantized inputs and against the reference.

Tolerance: the accumulation model of the machine that runs the kernel (tests/kernels/gemm_bounds.py): in the
interpreter ``(130 + Kt) * 2^-24`` of the sum of |products| per element (FP32 sums of exact e4m3 products), on
a GPU the ~14-bit Tensor-Core accumulator per 128-slice (``kernels.accumulation.HOPPER``). bf16 output: bit-equal
to the round-to-nearest-even of the kernel's own fp32 result in the interpreter; on a GPU within the model's
bound plus half a bf16 ulp. NaN/Inf positions must be equal.
"""

import pytest
import torch
import triton
import triton.language as tl

from kernels import fp8_gemm
from kernels import reference as ref
from kernels.backend import interpreting
from tests.kernels.gemm_bounds import assert_within, bf16_bound, dequant, gemm_bound

FP8 = torch.float8_e4m3fn


def quantized(M: int, N: int, K: int, seed: int, fmt: str = "fp32"):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(M, K, generator=g) * torch.exp2(torch.randint(-8, 8, (M, 1), generator=g))
    b = torch.randn(N, K, generator=g)
    return ref.act_quant_ref(a, fmt), ref.weight_quant_ref(b, fmt), ref.act_quant_ref(b, fmt)


# awkward shapes: one token, K and N not multiples of 128 (nor of 16), a partial last tile on every axis
SHAPES = [(1, 1, 1), (1, 130, 257), (5, 7, 96), (64, 64, 64), (130, 200, 300), (128, 256, 384), (3, 300, 130)]


@pytest.mark.parametrize("M,N,K", SHAPES)
@pytest.mark.parametrize("fmt", ["fp32", "ue8m0"])
def test_gemm_blockwise_and_rowwise(M, N, K, fmt, device):
    (a_q, a_s), (bw_q, bw_s), (br_q, br_s) = quantized(M, N, K, seed=M + N + K, fmt=fmt)
    a64 = dequant(a_q, a_s, blockwise=False)
    for blockwise, b_q, b_s in ((True, bw_q, bw_s), (False, br_q, br_s)):
        b64 = dequant(b_q, b_s, blockwise)
        c64 = a64 @ b64.T
        bound = gemm_bound(a64, b64, device)
        args = (a_q.to(device), a_s.to(device), b_q.to(device), b_s.to(device))
        c = fp8_gemm.fp8_gemm_nt(*args, b_blockwise=blockwise)
        assert c.dtype == torch.float32 and c.shape == (M, N)
        assert_within(c, c64, bound, f"blockwise={blockwise}")
        c_ref = ref.fp8_gemm_nt_ref(a_q, a_s, b_q, b_s, b_blockwise=blockwise)
        assert_within(c_ref, c64, gemm_bound(a64, b64, "cpu"), "reference")
        c_bf16 = fp8_gemm.fp8_gemm_nt(*args, b_blockwise=blockwise, out_dtype=torch.bfloat16)
        if interpreting():
            assert torch.equal(c_bf16.cpu(), c.cpu().to(torch.bfloat16)), "in-kernel bf16 rounding is not RNE"
        else:
            assert_within(c_bf16, c64, bound + bf16_bound(c64), "bf16 output")


def test_gemm_on_transposed_views_for_dgrad(device):
    """Dgrad reads W^T: dX = dY @ W with W's 128x128 blocks transposed; strided views work without a copy."""
    M, N, K = 70, 200, 130
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(8))
    w_q, w_s = ref.weight_quant_ref(w)
    dy_q, dy_s = ref.act_quant_ref(torch.randn(M, N, generator=torch.Generator().manual_seed(9)))
    a64, w64 = dequant(dy_q, dy_s, False), dequant(w_q, w_s, True)
    for wT_q, wT_s in ((w_q.t(), w_s.t()), (w_q.t().contiguous(), w_s.t().contiguous())):
        c = fp8_gemm.fp8_gemm_nt(dy_q.to(device), dy_s.to(device), wT_q.to(device), wT_s.to(device), b_blockwise=True)
        assert_within(c, a64 @ w64, gemm_bound(a64, w64.T, device), "dgrad")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy under the interpreter warns on overflow
@pytest.mark.parametrize("fmt", ["fp32", "ue8m0"])
def test_gemm_nan_and_inf_positions(fmt, device):
    """NaN enters as the quantizer makes it (a NaN tile has a NaN scale), Inf by fp32 overflow of huge scales.

    (A NaN e4m3 byte paired with a finite scale is not a case the pipeline produces; the Triton interpreter
    loads such bytes as +-480, so the NaN is carried by the scale.) ue8m0 stores NaN as the exponent byte 255.
    """
    M, N, K = 6, 130, 256
    g = torch.Generator().manual_seed(10)
    a_q = torch.randn(M, K, generator=g).clamp(-4, 4).to(FP8)
    a_s = torch.exp2(torch.randint(-2, 2, (M, 2), generator=g).float())
    b_q = torch.randn(N, K, generator=g).mul(3).to(FP8)
    b_s = torch.ones(2, 2)  # scale 1: scaling before or after the dot rounds the same
    a_q.view(torch.uint8)[1, 7] = 0x7F
    a_s[1, 0] = float("nan")  # a NaN tile of A: row 1 NaN
    b_q.view(torch.uint8)[129, 140] = 0xFF
    b_s[1, 1] = float("nan")  # a NaN block of B: columns 128.. NaN
    a_q[4] = 0.0
    a_q[4, 200] = 1.0  # row 4: a single huge product per column -> +-inf where |b| > 1.13, finite elsewhere
    a_s[4, 1] = 2.0**127
    if fmt == "ue8m0":  # the same values as exponent bytes (all scales above are powers of two, or NaN)
        a_s, b_s = (torch.where(s.isnan(), 255, (s.view(torch.int32) >> 23) & 0xFF).to(torch.uint8) for s in (a_s, b_s))
    c = fp8_gemm.fp8_gemm_nt(a_q.to(device), a_s.to(device), b_q.to(device), b_s.to(device), b_blockwise=True)
    a64 = ref.act_dequant_ref(a_q, a_s).double()
    b64 = ref.weight_dequant_ref(b_q, b_s).double()
    c64 = (a64.float() @ b64.float().T).double()  # fp32 overflow semantics, like the kernel
    assert bool(c64[4].isinf().any()) and bool(c64[4, :128].isfinite().any())
    assert bool(c64[1].isnan().all()) and bool(c64[:, 128:].isnan().all()) and bool(c64[0, :128].isfinite().all())
    assert_within(c, c64, gemm_bound(a64.nan_to_num(), b64.nan_to_num(), device), "nan/inf")


def test_gemm_addresses_past_2_31(device):
    """Row offsets are int64: A with a row stride of 2^24 bytes puts its 130th row 2.2e9 bytes from the first.

    The storage is reserved but never written except for the rows the GEMM reads (untouched pages cost nothing);
    with int32 offsets the last rows would be read from a wrapped-around address.
    """
    M, N, K, stride = 130, 64, 128, 1 << 24
    (a_q, a_s), (b_q, b_s), _ = quantized(M, N, K, seed=11)
    big = torch.empty((M - 1) * stride + K, dtype=torch.uint8, device=device)
    a_far = big.as_strided((M, K), (stride, 1)).view(FP8)
    a_far.copy_(a_q.to(device))
    c = fp8_gemm.fp8_gemm_nt(a_far, a_s.to(device), b_q.to(device), b_s.to(device), b_blockwise=True)
    a64, b64 = dequant(a_q, a_s, False), dequant(b_q, b_s, True)
    assert_within(c, a64 @ b64.T, gemm_bound(a64, b64, device), "far rows")


def test_gemm_refuses_bad_contracts():
    a_q, a_s = ref.act_quant_ref(torch.randn(4, 96))
    b_q, b_s = ref.weight_quant_ref(torch.randn(8, 96))
    with pytest.raises(ValueError, match="a_q"):
        fp8_gemm.fp8_gemm_nt(a_q.float(), a_s, b_q, b_s, b_blockwise=True)
    with pytest.raises(ValueError, match="scales of b_q"):
        fp8_gemm.fp8_gemm_nt(a_q, a_s, b_q, b_s, b_blockwise=False)
    with pytest.raises(ValueError, match="scales of a_q"):
        fp8_gemm.fp8_gemm_nt(a_q, a_s.double(), b_q, b_s, b_blockwise=True)
    with pytest.raises(ValueError, match="K mismatch"):
        c_q, c_s = ref.weight_quant_ref(torch.randn(8, 64))
        fp8_gemm.fp8_gemm_nt(a_q, a_s, c_q, c_s, b_blockwise=True)
    with pytest.raises(ValueError, match="output dtype"):
        fp8_gemm.fp8_gemm_nt(a_q, a_s, b_q, b_s, b_blockwise=True, out_dtype=torch.int8)


@triton.jit
def _swizzle_probe(out_ptr, num_m, num_n, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    m, n = fp8_gemm._swizzle(pid, num_m, num_n, GROUP_M)
    tl.store(out_ptr + 2 * pid, m)
    tl.store(out_ptr + 2 * pid + 1, n)


@pytest.mark.parametrize("num_m,num_n", [(1, 1), (3, 5), (17, 4), (8, 8), (9, 1)])
def test_swizzle_visits_every_tile_once(num_m, num_n, device):
    """The GROUP_M ordering is a permutation of the output tiles, GROUP_M row tiles at a time."""
    out = torch.full((num_m * num_n, 2), -1, dtype=torch.int32, device=device)
    _swizzle_probe[(num_m * num_n,)](out, num_m, num_n, GROUP_M=8)
    pairs = [tuple(p) for p in out.cpu().tolist()]
    assert sorted(pairs) == [(m, n) for m in range(num_m) for n in range(num_n)]
    assert all(m < 8 for m, _ in pairs[: min(8, num_m) * num_n])  # the first band covers rows 0..7 only
