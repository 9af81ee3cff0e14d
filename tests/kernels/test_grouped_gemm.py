"""Grouped FP8 GEMMs for the experts (Triton) against FP64 per-expert products of the dequantized inputs.

Layout: tokens sorted by expert, expert e owns rows offsets[e]:offsets[e+1] (model.moe.grouped_mm's contract).
Tolerance: the accumulation model of the machine that runs the kernel (tests/kernels/gemm_bounds.py), per row
of each expert's product; for Wgrad the reduction runs over the expert's tokens.
"""

import pytest
import torch

from kernels import grouped_gemm, quant
from kernels import reference as ref
from tests.kernels.gemm_bounds import assert_within, dequant, gemm_bound

# awkward segment sizes: empty experts (first, middle, last), one token, a segment crossing a 128-row tile,
# 128-aligned groups, K and N not multiples of 128
CASES = [
    (4, 96, 64, [3, 0, 130, 7]),
    (3, 200, 130, [0, 0, 5]),
    (2, 64, 64, [128, 128]),
    (5, 130, 96, [1, 0, 0, 250, 1]),
    (3, 64, 64, [1, 0, 0]),
    (4, 128, 200, [0, 40, 0, 0]),
]


def offsets_of(counts: list[int]) -> torch.Tensor:
    return torch.tensor([0, *counts]).cumsum(0)


def per_row_bound(a64_MK: torch.Tensor, b64_MNK: torch.Tensor, device) -> torch.Tensor:
    """The model's bound for out[m] = a[m] @ b[m]^T, with b[m] the weight of row m's expert (K = a's width)."""
    rows = [gemm_bound(a64_MK[m : m + 1], b64_MNK[m], device) for m in range(a64_MK.shape[0])]
    return torch.cat(rows) if rows else torch.zeros(0, b64_MNK.shape[1], dtype=torch.float64)


@pytest.mark.parametrize("E,N,K,counts", CASES)
@pytest.mark.parametrize("fmt", ["fp32", "ue8m0"])
def test_grouped_fprop_and_dgrad(E, N, K, counts, fmt, device):
    g = torch.Generator().manual_seed(sum(counts))
    M = sum(counts)
    offsets = offsets_of(counts)
    x_q, x_s = ref.act_quant_ref(torch.randn(M, K, generator=g), fmt)
    w_q, w_s = ref.weight_quant_ref(torch.randn(E, N, K, generator=g), fmt)
    x64, w64 = dequant(x_q, x_s, False), dequant(w_q, w_s, True)
    expert_M = torch.repeat_interleave(torch.arange(E), torch.tensor(counts))
    y64 = torch.einsum("mk,mnk->mn", x64, w64[expert_M])
    args = (x_q.to(device), x_s.to(device), w_q.to(device), w_s.to(device), offsets.to(device))
    y = grouped_gemm.grouped_fp8_gemm_nt(*args)
    assert y.shape == (M, N) and y.dtype == torch.float32
    assert_within(y, y64, per_row_bound(x64, w64[expert_M], device), "fprop")
    y_ref = ref.grouped_gemm_nt_ref(x_q, x_s, w_q, w_s, offsets)
    assert_within(y_ref, y64, per_row_bound(x64, w64[expert_M], "cpu"), "fprop reference")
    # Dgrad: dX[rows_e] = dY[rows_e] @ W[e], W^T made K-major as the autograd Function does
    dy_q, dy_s = ref.act_quant_ref(torch.randn(M, N, generator=g), fmt)
    dy64 = dequant(dy_q, dy_s, False)
    dx64 = torch.einsum("mn,mnk->mk", dy64, w64[expert_M])
    wT_q, wT_s = w_q.transpose(1, 2).contiguous(), w_s.transpose(1, 2).contiguous()
    dx = grouped_gemm.grouped_fp8_gemm_nt(
        dy_q.to(device), dy_s.to(device), wT_q.to(device), wT_s.to(device), offsets.to(device)
    )
    assert_within(dx, dx64, per_row_bound(dy64, w64[expert_M].transpose(1, 2), device), "dgrad")


@pytest.mark.parametrize("E,N,K,counts", CASES)
@pytest.mark.parametrize("fmt", ["fp32", "ue8m0"])
def test_grouped_wgrad(E, N, K, counts, fmt, device):
    """dW[e] from both operand layouts: act_quant_t's padded rows (no copy) and plain [N, M] (copied, padded)."""
    g = torch.Generator().manual_seed(100 + sum(counts))
    M = sum(counts)
    offsets = offsets_of(counts).to(device)
    dy, x = torch.randn(M, N, generator=g), torch.randn(M, K, generator=g)
    dyT_q, dyT_s = ref.act_quant_t_ref(dy, fmt=fmt)  # [N, M], tiles along tokens
    xT_q, xT_s = ref.act_quant_t_ref(x, fmt=fmt)  # [K, M]
    a64, b64 = dequant(dyT_q, dyT_s, False), dequant(xT_q, xT_s, False)
    padded = (quant.act_quant_t(dy.to(device), fmt=fmt), quant.act_quant_t(x.to(device), fmt=fmt))
    plain = ((dyT_q.to(device), dyT_s.to(device)), (xT_q.to(device), xT_s.to(device)))
    for layout, ((aq, as_), (bq, bs)) in (("padded", padded), ("plain", plain)):
        dw = grouped_gemm.grouped_fp8_wgrad(aq, as_, bq, bs, offsets)
        assert dw.shape == (E, N, K) and dw.dtype == torch.float32
        for e in range(E):
            lo, hi = int(offsets[e]), int(offsets[e + 1])
            want = a64[:, lo:hi] @ b64[:, lo:hi].T
            bound = gemm_bound(a64[:, lo:hi], b64[:, lo:hi], device)
            assert_within(dw[e], want, bound, f"wgrad ({layout}) expert {e}")
            if hi == lo:
                assert bool((dw[e] == 0).all())
    dw_ref = ref.grouped_wgrad_ref(dyT_q, dyT_s, xT_q, xT_s, offsets.cpu())
    for e in range(E):
        lo, hi = int(offsets[e]), int(offsets[e + 1])
        want = a64[:, lo:hi] @ b64[:, lo:hi].T
        assert_within(dw_ref[e], want, gemm_bound(a64[:, lo:hi], b64[:, lo:hi], "cpu"), f"wgrad reference {e}")


def test_wgrad_masks_the_neighbours_tokens(device):
    """Two experts share every token tile; huge values in one expert's tokens must not leak into the other's dW."""
    M, N, K = 256, 128, 128
    counts = [5, 123, 1, 127]  # boundaries inside both 128-token tiles
    offsets = offsets_of(counts).to(device)
    g = torch.Generator().manual_seed(7)
    dy, x = torch.randn(M, N, generator=g), torch.randn(M, K, generator=g)
    x[5:128] *= 1e4  # expert 1's tokens: 10^4 times larger (and so are the shared tiles' scales)
    dyT, xT = quant.act_quant_t(dy.to(device)), quant.act_quant_t(x.to(device))
    dw = grouped_gemm.grouped_fp8_wgrad(*dyT, *xT, offsets)
    a64, b64 = dequant(*dyT, False), dequant(*xT, False)
    for e in range(4):
        lo, hi = int(offsets[e]), int(offsets[e + 1])
        assert_within(dw[e], a64[:, lo:hi] @ b64[:, lo:hi].T, gemm_bound(a64[:, lo:hi], b64[:, lo:hi], device), f"{e}")


def test_grouped_addresses_past_2_31(device):
    """int64 row offsets: token rows 2^24 bytes apart (the last 2.2e9 bytes from the first), two experts."""
    M, N, K, stride = 130, 64, 128, 1 << 24
    counts = [60, 70]
    x_q, x_s = ref.act_quant_ref(torch.randn(M, K, generator=torch.Generator().manual_seed(13)))
    w_q, w_s = ref.weight_quant_ref(torch.randn(2, N, K, generator=torch.Generator().manual_seed(14)))
    big = torch.empty((M - 1) * stride + K, dtype=torch.uint8, device=device)  # untouched pages cost nothing
    x_far = big.as_strided((M, K), (stride, 1)).view(torch.float8_e4m3fn)
    x_far.copy_(x_q.to(device))
    offsets = offsets_of(counts)
    y = grouped_gemm.grouped_fp8_gemm_nt(x_far, x_s.to(device), w_q.to(device), w_s.to(device), offsets.to(device))
    x64, w64 = dequant(x_q, x_s, False), dequant(w_q, w_s, True)
    expert_M = torch.repeat_interleave(torch.arange(2), torch.tensor(counts))
    y64 = torch.einsum("mk,mnk->mn", x64, w64[expert_M])
    assert_within(y, y64, per_row_bound(x64, w64[expert_M], device), "far rows")


def test_tile_schedule_never_crosses_experts_and_marks_spare_tiles():
    offsets = offsets_of([3, 0, 130, 7, 0])
    expert_T, row_T = grouped_gemm.tile_schedule(offsets, 64, M=140)
    assert expert_T.numel() == 3 + 5  # ceil(140 / 64) + E, an upper bound
    real = expert_T < 5
    assert expert_T[real].tolist() == [0, 2, 2, 2, 3]
    assert row_T[real].tolist() == [0, 3, 67, 131, 133]
    assert (expert_T[~real] == 5).all()  # spare tiles: the kernel returns before its K loop


def test_grouped_refuses_bad_offsets():
    x_q, x_s = ref.act_quant_ref(torch.randn(10, 64))
    w_q, w_s = ref.weight_quant_ref(torch.randn(2, 32, 64))
    with pytest.raises(ValueError, match="offsets_E1"):
        grouped_gemm.grouped_fp8_gemm_nt(x_q, x_s, w_q, w_s, torch.tensor([0, 10], dtype=torch.int64))
    with pytest.raises(ValueError, match="offsets_E1"):
        grouped_gemm.grouped_fp8_gemm_nt(x_q, x_s, w_q, w_s, torch.tensor([0, 4, 9]))
    with pytest.raises(ValueError, match="offsets_E1"):
        grouped_gemm.grouped_fp8_gemm_nt(x_q, x_s, w_q, w_s, torch.tensor([0, 4, 10], dtype=torch.int32))
    with pytest.raises(ValueError, match="K mismatch"):
        v_q, v_s = ref.weight_quant_ref(torch.randn(2, 32, 96))
        grouped_gemm.grouped_fp8_gemm_nt(x_q, x_s, v_q, v_s, torch.tensor([0, 4, 10]))
