"""Grouped FP8 GEMMs for the experts (Triton) against FP64 per-expert products of the dequantized inputs.

Layout: tokens sorted by expert, expert e owns rows offsets[e]:offsets[e+1] (model.moe.grouped_mm's contract).
Tolerance: |C - C64| <= 1e-5 * ||A_row|| * ||B_row|| (FP32 accumulation of exact e4m3 products).
"""

import pytest
import torch

from kernels import grouped_gemm
from kernels import reference as ref

# awkward segment sizes: empty experts, a segment crossing a 128-row tile, single rows, a 128-aligned group
CASES = [
    (4, 96, 64, [3, 0, 130, 7]),
    (3, 200, 130, [0, 0, 5]),
    (2, 64, 64, [128, 128]),
    (5, 130, 96, [1, 0, 0, 250, 1]),
]


def offsets_of(counts: list[int]) -> torch.Tensor:
    return torch.tensor([0, *counts]).cumsum(0)


def assert_close(c: torch.Tensor, c64: torch.Tensor, bound: torch.Tensor, what: str) -> None:
    err = (c.double().cpu() - c64).abs()
    if not bool((err <= bound).all()):
        raise AssertionError(f"{what}: max err {err.max():.3e}, mean err {err.mean():.3e}")


@pytest.mark.parametrize("E,N,K,counts", CASES)
def test_grouped_fprop_and_dgrad(E, N, K, counts, device):
    g = torch.Generator().manual_seed(sum(counts))
    M = sum(counts)
    offsets = offsets_of(counts)
    x_q, x_s = ref.act_quant_ref(torch.randn(M, K, generator=g))
    w_q, w_s = ref.weight_quant_ref(torch.randn(E, N, K, generator=g))
    x64, w64 = ref.act_dequant_ref(x_q, x_s).double(), ref.weight_dequant_ref(w_q, w_s).double()
    expert_M = torch.repeat_interleave(torch.arange(E), torch.tensor(counts))
    y64 = torch.einsum("mk,mnk->mn", x64, w64[expert_M])
    bound = 1e-5 * x64.norm(dim=1)[:, None] * w64[expert_M].norm(dim=2) + 1e-30
    args = (x_q.to(device), x_s.to(device), w_q.to(device), w_s.to(device), offsets.to(device))
    y = grouped_gemm.grouped_fp8_gemm_nt(*args)
    assert y.shape == (M, N) and y.dtype == torch.float32
    assert_close(y, y64, bound, "fprop")
    assert_close(ref.grouped_gemm_nt_ref(x_q, x_s, w_q, w_s, offsets), y64, bound, "fprop reference")
    y_bf16 = grouped_gemm.grouped_fp8_gemm_nt(*args, torch.bfloat16)
    assert torch.equal(y_bf16.cpu(), y.cpu().to(torch.bfloat16))
    # Dgrad: dX[rows_e] = dY[rows_e] @ W[e], W read through transposed strides
    dy_q, dy_s = ref.act_quant_ref(torch.randn(M, N, generator=g))
    dy64 = ref.act_dequant_ref(dy_q, dy_s).double()
    dx64 = torch.einsum("mn,mnk->mk", dy64, w64[expert_M])
    bound = 1e-5 * dy64.norm(dim=1)[:, None] * w64[expert_M].norm(dim=1) + 1e-30
    wT_q, wT_s = w_q.to(device).transpose(1, 2), w_s.to(device).transpose(1, 2)
    dx = grouped_gemm.grouped_fp8_gemm_nt(dy_q.to(device), dy_s.to(device), wT_q, wT_s, offsets.to(device))
    assert_close(dx, dx64, bound, "dgrad")


@pytest.mark.parametrize("E,N,K,counts", CASES)
def test_grouped_wgrad(E, N, K, counts, device):
    g = torch.Generator().manual_seed(100 + sum(counts))
    M = sum(counts)
    offsets = offsets_of(counts)
    dyT_q, dyT_s = ref.act_quant_t_ref(torch.randn(M, N, generator=g))  # [N, M], tiles along tokens
    xT_q, xT_s = ref.act_quant_t_ref(torch.randn(M, K, generator=g))  # [K, M]
    a64, b64 = ref.act_dequant_ref(dyT_q, dyT_s).double(), ref.act_dequant_ref(xT_q, xT_s).double()
    dw = grouped_gemm.grouped_fp8_wgrad(
        dyT_q.to(device), dyT_s.to(device), xT_q.to(device), xT_s.to(device), offsets.to(device)
    )
    dw_ref = ref.grouped_wgrad_ref(dyT_q, dyT_s, xT_q, xT_s, offsets)
    assert dw.shape == (E, N, K) and dw.dtype == torch.float32
    for e in range(E):
        lo, hi = offsets[e].item(), offsets[e + 1].item()
        want = a64[:, lo:hi] @ b64[:, lo:hi].T
        bound = 1e-5 * a64[:, lo:hi].norm(dim=1)[:, None] * b64[:, lo:hi].norm(dim=1)[None, :] + 1e-30
        assert_close(dw[e], want, bound, f"wgrad expert {e}")
        assert_close(dw_ref[e], want, bound, f"wgrad reference expert {e}")
        if hi == lo:
            assert bool((dw[e] == 0).all())


def test_tile_schedule_never_crosses_experts():
    offsets = offsets_of([3, 0, 130, 7, 0])
    expert_T, row_T = grouped_gemm.tile_schedule(offsets, 64, M=140)
    assert expert_T.numel() == 3 + 5  # ceil(140 / 64) + E, an upper bound
    real = expert_T < 5
    assert expert_T[real].tolist() == [0, 2, 2, 2, 3]
    assert row_T[real].tolist() == [0, 3, 67, 131, 133]


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
