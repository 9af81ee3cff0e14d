"""Grouped FP8 GEMMs for MoE experts over the expert-sorted, contiguous token layout of the dropless MoE.

The dropless MoE sorts the routed token copies by expert, so expert ``e`` owns rows
``offsets[e]:offsets[e+1]`` of ``x_MK`` (DeepGEMM calls this layout "contiguous"). Two kernels cover the
three GEMMs of the experts' training step:

``grouped_fp8_gemm_nt`` (Fprop and Dgrad): ``out[rows_e] = a[rows_e] @ b[e]^T``. Output tiles of BLOCK_M rows
never straddle two experts: a small tile schedule, built on the device without a host sync, lists for
each tile its expert and first row; segments need no padding (rows past the segment are masked). The grid
has an upper bound of ``ceil(M / BLOCK_M) + E`` tiles; spare tiles find ``expert = E`` and return at once
(with 256 experts and no expert parallelism that is up to half the grid, which would otherwise run the whole
K loop on zeros).

``grouped_fp8_wgrad`` (Wgrad): ``dW[e] = dY[rows_e]^T @ X[rows_e]`` reduces over the expert's tokens.
Both operands are quantized along tokens in global 128-token tiles (``act_quant_t``), whose rows are padded
to whole tiles. The loop walks the global tiles that overlap the segment, loads each whole (masked only by
rows, so the copies are 16-byte ``cp.async`` on a GPU; a mask along the contiguous token axis makes the
compiler fall back to one-byte loads) and zeroes the tokens outside the segment in registers, in one operand.
Every 128-deep partial sum has one scale per row of each operand, applied at promotion as in ``fp8_gemm.py``.
(DeepSeek-V3 pads each expert's segment to 128 tokens instead; here a tile at a boundary shares its scale
between two experts: still exact dequantization, slightly coarser scales.)

Both kernels autotune their output tile and pipeline depth per (N, K) from a small set (``fp8_gemm.gemm_configs``),
visit tiles in GROUP_M bands, and use int64 row offsets. Scales may be fp32 or ue8m0 per operand.
References: ``kernels.reference.grouped_gemm_nt_ref`` and ``grouped_wgrad_ref``.

Shape legend: M sorted token rows, N output features, K reduction dim, E experts, E1 = E + 1 offsets,
``Mt``/``Nt``/``Kt`` counts of 128-tiles, ``Mp`` = 128 * Mt, T scheduled row tiles.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.backend import interpreting
from kernels.fp8_gemm import AUTOTUNE_MIN_OUTPUTS, _block_scales, _swizzle, check_operand, gemm_configs, prune_small
from kernels.quant import NATIVE, _decode_scale, _store_cast, out_kind
from kernels.reference import FP8_DTYPE, TILE, cdiv

INTERPRETED = interpreting()
BLOCK_M = 128  # rows of a Fprop/Dgrad tile: fixed, because the tile schedule is built for it before the launch


def _fprop_configs() -> list[triton.Config]:
    """(BLOCK_N, warps, stages) of the grouped Fprop/Dgrad tile; the interpreter gets the first only."""
    tiles = [(128, 8, 3), (256, 8, 3), (128, 4, 4)]
    if INTERPRETED:
        tiles = tiles[:1]
    return [triton.Config({"BLOCK_N": bn, "GROUP_M": 8}, num_warps=w, num_stages=st) for bn, w, st in tiles]


@triton.autotune(
    configs=_fprop_configs(),
    key=["N", "K"],
    prune_configs_by={"early_config_prune": prune_small(AUTOTUNE_MIN_OUTPUTS, "N", "K")},
)
@triton.heuristics({"EVEN_K": lambda args: args["K"] % 128 == 0})
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
    T,
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
    A_UE8M0: tl.constexpr,
    B_UE8M0: tl.constexpr,
    OUT_KIND: tl.constexpr,
    NATIVE: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    tile, pid_n = _swizzle(tl.program_id(0), T, tl.cdiv(N, BLOCK_N), GROUP_M)
    e = tl.load(tile_expert_ptr + tile)
    if e >= E:  # a spare tile of the upper-bound grid: no rows, no work
        return
    row0 = tl.load(tile_row_ptr + tile).to(tl.int64)
    rows_left = tl.load(offsets_ptr + e + 1) - row0
    n0 = pid_n.to(tl.int64) * BLOCK_N
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mask_m = rm < rows_left
    mask_n = (n0 + rn) < N
    a_ptrs = a_ptr + row0 * stride_am + rm[:, None] * stride_am + rk[None, :] * stride_ak
    b_ptrs = b_ptr + e.to(tl.int64) * stride_be + n0 * stride_bn + rk[:, None] * stride_bk + rn[None, :] * stride_bn
    as_ptrs = as_ptr + (row0 + rm) * stride_asm
    bs_ptrs = bs_ptr + e.to(tl.int64) * stride_bse
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kt in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=mask_m[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=mask_n[None, :], other=0.0)
        else:
            k_left = K - kt * BLOCK_K
            a = tl.load(a_ptrs, mask=mask_m[:, None] & (rk[None, :] < k_left), other=0.0)
            b = tl.load(b_ptrs, mask=(rk[:, None] < k_left) & mask_n[None, :], other=0.0)
        a_s = _decode_scale(tl.load(as_ptrs + kt, mask=mask_m, other=0), A_UE8M0)
        b_s = _block_scales(bs_ptrs + kt * stride_bsk, n0, N, stride_bsn, B_UE8M0, BLOCK_N)
        acc += tl.dot(a, b, out_dtype=tl.float32) * a_s[:, None] * b_s[None, :]
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    c_ptrs = c_ptr + row0 * stride_cm + rm[:, None] * stride_cm + (n0 + rn)[None, :]
    _store_cast(c_ptrs, acc, mask_m[:, None] & mask_n[None, :], OUT_KIND, NATIVE)


@triton.autotune(
    configs=gemm_configs(("BLOCK_N", "BLOCK_K")),
    key=["N", "K"],
    prune_configs_by={"early_config_prune": prune_small(AUTOTUNE_MIN_OUTPUTS, "N", "K")},
)
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
    A_UE8M0: tl.constexpr,
    B_UE8M0: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    TILE_M: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_n, pid_k = _swizzle(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(K, BLOCK_K), GROUP_M)
    e = tl.program_id(1)
    start = tl.load(offsets_ptr + e)
    end = tl.load(offsets_ptr + e + 1)
    n0 = pid_n.to(tl.int64) * BLOCK_N
    k0 = pid_k.to(tl.int64) * BLOCK_K
    rn = tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rm = tl.arange(0, TILE_M)
    mask_n = (n0 + rn) < N
    mask_k = (k0 + rk) < K
    a_rows = a_ptr + n0 * stride_an + rn[:, None] * stride_an
    b_rows = b_ptr + k0 * stride_bk + rk[None, :] * stride_bk
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for mt in range(start // TILE_M, tl.cdiv(end, TILE_M)):  # global token tiles overlapping the segment
        m0 = mt * TILE_M  # int64: the loop runs over the int64 offsets
        # whole token tiles, masked by rows only (the token axis is padded to tiles): 16-byte async copies;
        # the expert's boundaries are applied in registers, to one operand (a zero factor zeroes the product)
        a = tl.load(a_rows + m0 + rm[None, :], mask=mask_n[:, None], other=0.0)
        b = tl.load(b_rows + m0 + rm[:, None], mask=mask_k[None, :], other=0.0)
        in_seg = ((m0 + rm) >= start) & ((m0 + rm) < end)
        a = tl.where(in_seg[None, :], a, tl.zeros_like(a))
        a_s = _decode_scale(tl.load(as_ptr + (n0 + rn) * stride_asn + mt, mask=mask_n, other=0), A_UE8M0)
        b_s = _decode_scale(tl.load(bs_ptr + (k0 + rk) * stride_bsk + mt, mask=mask_k, other=0), B_UE8M0)
        acc += tl.dot(a, b, out_dtype=tl.float32) * a_s[:, None] * b_s[None, :]
    c_ptrs = c_ptr + e.to(tl.int64) * stride_ce + (n0 + rn)[:, None] * stride_cn + (k0 + rk)[None, :]
    tl.store(c_ptrs, acc, mask=mask_n[:, None] & mask_k[None, :])


def check_offsets(offsets_E1: torch.Tensor, E: int, M: int) -> None:
    """Contract of the expert offsets (values are read on the CPU only: reading them would sync a GPU)."""
    if offsets_E1.dtype != torch.int64 or offsets_E1.shape != (E + 1,):
        raise ValueError(
            f"offsets_E1 must be int64 of shape ({E + 1},), got {offsets_E1.dtype} {tuple(offsets_E1.shape)}"
        )
    if offsets_E1.device.type == "cpu":
        first, last = int(offsets_E1[0]), int(offsets_E1[-1])
        if first != 0 or last != M or bool((offsets_E1.diff() < 0).any()):
            raise ValueError(f"offsets_E1 must rise from 0 to M={M}, got {offsets_E1.tolist()}")


def tile_schedule(offsets_E1: torch.Tensor, block_m: int, M: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row tiles that never cross an expert boundary -> (tile_expert_T, tile_row_T), int32, on the device.

    T = ceil(M / block_m) + E is an upper bound; spare tiles get expert E (the kernel returns at once).
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
    native: bool | None = None,
) -> torch.Tensor:
    """``out[rows_e] = a[rows_e] @ b[e]^T`` for every expert e; b is 128x128-block scaled per expert.

    Scales are fp32 or ue8m0 (uint8), per operand. ``b_q_ENK`` may be a strided view; it should be K-major
    (for Dgrad: ``w_q.transpose(1, 2).contiguous()`` with ``w_s.transpose(1, 2)``).
    """
    a_ue8m0 = check_operand("a_q_MK", a_q_MK, a_s_MKt, blockwise=False)
    if b_q_ENK.dtype != FP8_DTYPE or b_q_ENK.dim() != 3:
        raise ValueError(f"b_q_ENK must be a 3-D {FP8_DTYPE} tensor, got {b_q_ENK.dtype} {tuple(b_q_ENK.shape)}")
    E, N, K = b_q_ENK.shape
    if tuple(b_s_ENtKt.shape) != (E, cdiv(N, TILE), cdiv(K, TILE)):
        raise ValueError(f"b_s_ENtKt must have shape {(E, cdiv(N, TILE), cdiv(K, TILE))}")
    b_ue8m0 = check_operand("b_q_ENK[0]", b_q_ENK[0], b_s_ENtKt[0], blockwise=True) if E else False
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
    tile_expert_T, tile_row_T = tile_schedule(offsets_E1, BLOCK_M, M)
    T = tile_expert_T.numel()

    def grid(meta: dict) -> tuple[int]:
        return (T * cdiv(N, meta["BLOCK_N"]),)

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
        T,
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
        A_UE8M0=a_ue8m0,
        B_UE8M0=b_ue8m0,
        OUT_KIND=kind,
        NATIVE=NATIVE if native is None else native,
        BLOCK_M=BLOCK_M,
        BLOCK_K=TILE,
    )
    return c


def token_padded(q_RM: torch.Tensor) -> torch.Tensor:
    """``q_RM`` itself if its rows extend to whole 128-token tiles in memory (as ``act_quant_t`` writes them),
    else a copy into a zero-padded [R, Mp] buffer (a view of its first M columns)."""
    R, M = q_RM.shape
    Mp = cdiv(M, TILE) * TILE
    if q_RM.stride(1) == 1 and q_RM.stride(0) >= Mp:
        storage_end = q_RM.storage_offset() + (R - 1) * q_RM.stride(0) + Mp
        if R == 0 or storage_end <= q_RM.untyped_storage().nbytes() // q_RM.element_size():
            return q_RM
    padded = torch.zeros((R, Mp), dtype=q_RM.dtype, device=q_RM.device)
    padded[:, :M] = q_RM
    return padded[:, :M]


def grouped_fp8_wgrad(
    aT_q_NM: torch.Tensor,
    aT_s_NMt: torch.Tensor,
    bT_q_KM: torch.Tensor,
    bT_s_KMt: torch.Tensor,
    offsets_E1: torch.Tensor,
) -> torch.Tensor:
    """``dW[e] = aT[:, rows_e] @ bT[:, rows_e]^T`` -> fp32 ``[E, N, K]``; operands tiled along tokens (M).

    The operands' rows must reach whole 128-token tiles in memory with finite padding (``act_quant_t``'s output
    does, with zeros); others are copied into such a buffer first.
    """
    a_ue8m0 = check_operand("aT_q_NM", aT_q_NM, aT_s_NMt, blockwise=False)
    b_ue8m0 = check_operand("bT_q_KM", bT_q_KM, bT_s_KMt, blockwise=False)
    (N, M), K = aT_q_NM.shape, bT_q_KM.shape[0]
    if bT_q_KM.shape[1] != M:
        raise ValueError(f"token dim mismatch: aT_q_NM is {tuple(aT_q_NM.shape)}, bT_q_KM {tuple(bT_q_KM.shape)}")
    E = offsets_E1.numel() - 1
    check_offsets(offsets_E1, E, M)
    c = torch.empty((E, N, K), dtype=torch.float32, device=aT_q_NM.device)
    if E == 0 or N == 0 or K == 0 or M == 0:
        return c.zero_()
    aT_q_NM, bT_q_KM = token_padded(aT_q_NM), token_padded(bT_q_KM)
    aT_s_NMt, bT_s_KMt = aT_s_NMt.contiguous(), bT_s_KMt.contiguous()

    def grid(meta: dict) -> tuple[int, int]:
        return (cdiv(N, meta["BLOCK_N"]) * cdiv(K, meta["BLOCK_K"]), E)

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
        A_UE8M0=a_ue8m0,
        B_UE8M0=b_ue8m0,
        TILE_M=TILE,
    )
    return c
