"""Grouped FP8 GEMMs for MoE experts over the expert-sorted, contiguous token layout of the dropless MoE.

The dropless MoE sorts the routed token copies by expert, so expert ``e`` owns rows
``offsets[e]:offsets[e+1]`` of ``x_MK`` (DeepGEMM calls this layout "contiguous"). Two kernels cover the
three GEMMs of the experts' training step:

``grouped_fp8_gemm_nt`` (Fprop and Dgrad): ``out[rows_e] = a[rows_e] @ b[e]^T``. Output tiles of BLOCK_M rows
never straddle two experts: a small tile schedule, built on the device without a host sync, lists for
each tile its expert and first row; segments need no padding (rows past the segment are masked). The grid
has an upper bound of ``ceil(M / BLOCK_M) + E`` tiles; spare tiles find ``expert = E`` and do nothing.

``grouped_fp8_wgrad`` (Wgrad): ``dW[e] = dY[rows_e]^T @ X[rows_e]`` reduces over the expert's tokens.
Both operands are quantized along tokens in global 128-token tiles (``act_quant_t``). The loop walks those
global tiles that overlap the segment and masks rows outside it, so every 128-deep partial sum has one
scale per row of each operand, applied at promotion as in ``fp8_gemm.py``. (DeepSeek-V3 pads each
expert's segment to 128 tokens instead; here a tile at a boundary shares its scale between two experts:
still exact dequantization, slightly coarser scales.)

References: ``kernels.reference.grouped_gemm_nt_ref`` and ``grouped_wgrad_ref``.

Shape legend: M sorted token rows, N output features, K reduction dim, E experts, E1 = E + 1 offsets,
``Mt``/``Nt``/``Kt`` counts of 128-tiles, T scheduled row tiles.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.backend import interpreting
from kernels.fp8_gemm import check_operand
from kernels.quant import _store_cast, out_kind
from kernels.reference import FP8_DTYPE, TILE, cdiv

INTERPRETED = interpreting()


@triton.jit
def _grouped_gemm_nt_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    as_ptr,
    bs_ptr,
    tile_expert_ptr,
    tile_row_ptr,
    offsets_ptr,
    E,
    N,
    K,
    stride_am,
    stride_ak,
    stride_be,
    stride_bn,
    stride_bk,
    stride_cm,
    stride_asm,
    stride_bse,
    stride_bsn,
    stride_bsk,
    OUT_KIND: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    tile = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(tile_expert_ptr + tile)
    row0 = tl.load(tile_row_ptr + tile)
    row_end = tl.load(offsets_ptr + tl.minimum(e + 1, E))
    row_end = tl.where(e < E, row_end, row0)  # spare tile: no rows
    e = tl.minimum(e, E - 1)
    offs_m = row0 + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < row_end
    mask_n = offs_n < N
    b_base = b_ptr + e.to(tl.int64) * stride_be  # E*N*K can pass 2^31
    bs_row = bs_ptr + e * stride_bse + (offs_n // BLOCK_K) * stride_bsn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kt in range(0, tl.cdiv(K, BLOCK_K)):
        k = kt * BLOCK_K + offs_k
        a = tl.load(
            a_ptr + offs_m[:, None] * stride_am + k[None, :] * stride_ak,
            mask=mask_m[:, None] & (k[None, :] < K),
            other=0.0,
        )
        b = tl.load(
            b_base + k[:, None] * stride_bk + offs_n[None, :] * stride_bn,
            mask=(k[:, None] < K) & mask_n[None, :],
            other=0.0,
        )
        a_s = tl.load(as_ptr + offs_m * stride_asm + kt, mask=mask_m, other=0.0)
        b_s = tl.load(bs_row + kt * stride_bsk, mask=mask_n, other=0.0)
        acc += tl.dot(a, b, out_dtype=tl.float32) * a_s[:, None] * b_s[None, :]
    _store_cast(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :], acc, mask_m[:, None] & mask_n[None, :], OUT_KIND)


@triton.jit
def _grouped_wgrad_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    as_ptr,
    bs_ptr,
    offsets_ptr,
    N,
    K,
    stride_an,
    stride_bk,
    stride_ce,
    stride_cn,
    stride_asn,
    stride_bsk,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    TILE_M: tl.constexpr,
):
    e = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    start = tl.load(offsets_ptr + e)
    end = tl.load(offsets_ptr + e + 1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    mask_k = offs_k < K
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for mt in range(start // TILE_M, tl.cdiv(end, TILE_M)):  # global token tiles overlapping the segment
        m = mt * TILE_M + tl.arange(0, TILE_M)
        in_seg = (m >= start) & (m < end)
        a = tl.load(a_ptr + offs_n[:, None] * stride_an + m[None, :], mask=mask_n[:, None] & in_seg[None, :], other=0.0)
        b = tl.load(b_ptr + m[:, None] + offs_k[None, :] * stride_bk, mask=in_seg[:, None] & mask_k[None, :], other=0.0)
        a_s = tl.load(as_ptr + offs_n * stride_asn + mt, mask=mask_n, other=0.0)
        b_s = tl.load(bs_ptr + offs_k * stride_bsk + mt, mask=mask_k, other=0.0)
        acc += tl.dot(a, b, out_dtype=tl.float32) * a_s[:, None] * b_s[None, :]
    c_ptrs = c_ptr + e.to(tl.int64) * stride_ce + offs_n[:, None] * stride_cn + offs_k[None, :]
    tl.store(c_ptrs, acc, mask=mask_n[:, None] & mask_k[None, :])


def check_offsets(offsets_E1: torch.Tensor, E: int, M: int) -> None:
    """Contract of the expert offsets (checked on shape/dtype only: reading values would sync the GPU)."""
    if offsets_E1.dtype != torch.int64 or offsets_E1.shape != (E + 1,):
        raise ValueError(
            f"offsets_E1 must be int64 of shape ({E + 1},), got {offsets_E1.dtype} {tuple(offsets_E1.shape)}"
        )
    if not offsets_E1.is_cuda:
        first, last = int(offsets_E1[0]), int(offsets_E1[-1])
        if first != 0 or last != M or bool((offsets_E1.diff() < 0).any()):
            raise ValueError(f"offsets_E1 must rise from 0 to M={M}, got {offsets_E1.tolist()}")


def tile_schedule(offsets_E1: torch.Tensor, block_m: int, M: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row tiles that never cross an expert boundary -> (tile_expert_T, tile_row_T), int32, on the device.

    T = ceil(M / block_m) + E is an upper bound; spare tiles get expert E (the kernel skips them).
    """
    E = offsets_E1.numel() - 1
    T = cdiv(M, block_m) + E
    counts_E = offsets_E1.diff()
    tiles_E = (counts_E + block_m - 1) // block_m
    tile_end_E = tiles_E.cumsum(0)
    t_T = torch.arange(T, device=offsets_E1.device)
    expert_T = torch.searchsorted(tile_end_E, t_T, right=True)  # E for tiles past the last one
    e_T = expert_T.clamp(max=E - 1)
    first_tile_T = tile_end_E[e_T] - tiles_E[e_T]
    row_T = offsets_E1[e_T] + (t_T - first_tile_T) * block_m
    return expert_T.to(torch.int32), row_T.to(torch.int32)


def grouped_fp8_gemm_nt(
    a_q_MK: torch.Tensor,
    a_s_MKt: torch.Tensor,
    b_q_ENK: torch.Tensor,
    b_s_ENtKt: torch.Tensor,
    offsets_E1: torch.Tensor,
    out_dtype: torch.dtype = torch.float32,
    block_m: int = 128,
    block_n: int = 128,
) -> torch.Tensor:
    """``out[rows_e] = a[rows_e] @ b[e]^T`` for every expert e; b is 128x128-block scaled per expert.

    ``b_q_ENK`` may be a strided view, e.g. ``w_q.transpose(1, 2)`` with ``w_s.transpose(1, 2)`` for Dgrad.
    """
    check_operand("a_q_MK", a_q_MK, a_s_MKt, blockwise=False)
    if b_q_ENK.dtype != FP8_DTYPE or b_q_ENK.dim() != 3:
        raise ValueError(f"b_q_ENK must be a 3-D {FP8_DTYPE} tensor, got {b_q_ENK.dtype} {tuple(b_q_ENK.shape)}")
    E, N, K = b_q_ENK.shape
    if b_s_ENtKt.dtype != torch.float32 or tuple(b_s_ENtKt.shape) != (E, cdiv(N, TILE), cdiv(K, TILE)):
        raise ValueError(f"b_s_ENtKt must be float32 of shape {(E, cdiv(N, TILE), cdiv(K, TILE))}")
    if a_q_MK.shape[1] != K:
        raise ValueError(f"K mismatch: a_q_MK is {tuple(a_q_MK.shape)}, b_q_ENK is {tuple(b_q_ENK.shape)}")
    M = a_q_MK.shape[0]
    check_offsets(offsets_E1, E, M)
    c = torch.empty((M, N), dtype=out_dtype, device=a_q_MK.device)
    kind = out_kind(out_dtype)
    if M == 0 or N == 0 or E == 0:
        return c
    if K == 0:
        return c.zero_()
    tile_expert_T, tile_row_T = tile_schedule(offsets_E1, block_m, M)
    grid = (tile_expert_T.numel(), cdiv(N, block_n))
    _grouped_gemm_nt_kernel[grid](
        a_q_MK,
        b_q_ENK,
        c,
        a_s_MKt,
        b_s_ENtKt,
        tile_expert_T,
        tile_row_T,
        offsets_E1,
        E,
        N,
        K,
        a_q_MK.stride(0),
        a_q_MK.stride(1),
        b_q_ENK.stride(0),
        b_q_ENK.stride(1),
        b_q_ENK.stride(2),
        c.stride(0),
        a_s_MKt.stride(0),
        b_s_ENtKt.stride(0),
        b_s_ENtKt.stride(1),
        b_s_ENtKt.stride(2),
        OUT_KIND=kind,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=TILE,
        num_warps=8,
        num_stages=3,
    )
    return c


def grouped_fp8_wgrad(
    aT_q_NM: torch.Tensor,
    aT_s_NMt: torch.Tensor,
    bT_q_KM: torch.Tensor,
    bT_s_KMt: torch.Tensor,
    offsets_E1: torch.Tensor,
    block_n: int = 128,
    block_k: int = 128,
) -> torch.Tensor:
    """``dW[e] = aT[:, rows_e] @ bT[:, rows_e]^T`` -> fp32 ``[E, N, K]``; operands tiled along tokens (M)."""
    check_operand("aT_q_NM", aT_q_NM, aT_s_NMt, blockwise=False)
    check_operand("bT_q_KM", bT_q_KM, bT_s_KMt, blockwise=False)
    (N, M), K = aT_q_NM.shape, bT_q_KM.shape[0]
    if bT_q_KM.shape[1] != M:
        raise ValueError(f"token dim mismatch: aT_q_NM is {tuple(aT_q_NM.shape)}, bT_q_KM {tuple(bT_q_KM.shape)}")
    E = offsets_E1.numel() - 1
    check_offsets(offsets_E1, E, M)
    aT_q_NM, bT_q_KM = aT_q_NM.contiguous(), bT_q_KM.contiguous()
    aT_s_NMt, bT_s_KMt = aT_s_NMt.contiguous(), bT_s_KMt.contiguous()
    c = torch.zeros((E, N, K), dtype=torch.float32, device=aT_q_NM.device)
    if E == 0 or N == 0 or K == 0 or M == 0:
        return c
    grid = (E, cdiv(N, block_n), cdiv(K, block_k))
    _grouped_wgrad_kernel[grid](
        aT_q_NM,
        bT_q_KM,
        c,
        aT_s_NMt,
        bT_s_KMt,
        offsets_E1,
        N,
        K,
        aT_q_NM.stride(0),
        bT_q_KM.stride(0),
        c.stride(0),
        c.stride(1),
        aT_s_NMt.stride(0),
        bT_s_KMt.stride(0),
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        TILE_M=TILE,
        num_warps=8,
        num_stages=3,
    )
    return c
