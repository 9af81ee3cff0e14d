"""Block-scaled FP8 GEMM ``C = A @ B^T`` ("NT": both operands K-major) with FP32 promotion every 128 of K.

Why promotion. On H800 Tensor Cores an FP8 MMA accumulates in a register that keeps only ~14 mantissa bits;
DeepSeek-V3 measured a ~2% relative error for K=4096 if one lets it run (see bench/fp8_accumulation.py).
Its fix, reproduced here: let the Tensor Core accumulate one 128-deep slice of K, then add the partial sum
into an FP32 accumulator on CUDA cores. Because the quantization tiles are 128 wide along K, each slice has
a single scale per row of A and per row (or 128-row block) of B, so the scales are applied exactly there::

    acc_MN += dot(a_q[:, k:k+128], b_q[:, k:k+128]^T) * a_s[:, k/128, None] * b_s[None, :, k/128]

The same kernel serves the three GEMMs of a linear layer:

- Fprop ``Y = X W^T``: A = X (1x128 tiles), B = W (128x128 blocks, ``b_blockwise=True``);
- Dgrad ``dX = dY W``: A = dY (1x128 tiles along N), B = ``W^T`` as a strided view, blocks transposed;
- Wgrad ``dW = dY^T X``: A = dY^T and B = X^T, both tiled along tokens (``b_blockwise=False``).

Any K works: out-of-range elements load as zero, which is exactly zero padding of the last tile.
NaN travels through the scales: the quantizer gives a tile holding a NaN a NaN scale (in the Triton
interpreter an e4m3 NaN byte would load as +-480, on a GPU as NaN; with the NaN scale both give NaN).
The reference is ``kernels.reference.fp8_gemm_nt_ref`` (dequantize, FP32 matmul).

Shape legend: M rows of A/C, N rows of B = columns of C, K reduction dim, ``Kt`` = ceil(K / 128).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.backend import interpreting
from kernels.quant import _store_cast, out_kind
from kernels.reference import FP8_DTYPE, TILE, cdiv

INTERPRETED = interpreting()


@triton.jit
def _fp8_gemm_nt_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    as_ptr,
    bs_ptr,
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_bn,
    stride_bk,
    stride_cm,
    stride_cn,
    stride_asm,
    stride_ask,
    stride_bsn,
    stride_bsk,
    B_BLOCKWISE: tl.constexpr,
    OUT_KIND: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    if B_BLOCKWISE:
        bs_row = (offs_n // BLOCK_K) * stride_bsn  # one scale per 128x128 block of B
    else:
        bs_row = offs_n * stride_bsn  # one scale per row of B per 128 of K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kt in range(0, tl.cdiv(K, BLOCK_K)):
        k = kt * BLOCK_K + offs_k
        a = tl.load(
            a_ptr + offs_m[:, None] * stride_am + k[None, :] * stride_ak,
            mask=mask_m[:, None] & (k[None, :] < K),
            other=0.0,
        )
        b = tl.load(
            b_ptr + k[:, None] * stride_bk + offs_n[None, :] * stride_bn,
            mask=(k[:, None] < K) & mask_n[None, :],
            other=0.0,
        )
        a_s = tl.load(as_ptr + offs_m * stride_asm + kt * stride_ask, mask=mask_m, other=0.0)
        b_s = tl.load(bs_ptr + bs_row + kt * stride_bsk, mask=mask_n, other=0.0)
        # the promotion: a 128-deep Tensor-Core partial sum, scaled, added into the FP32 accumulator
        acc += tl.dot(a, b, out_dtype=tl.float32) * a_s[:, None] * b_s[None, :]
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    _store_cast(c_ptrs, acc, mask_m[:, None] & mask_n[None, :], OUT_KIND)


def check_operand(name: str, q: torch.Tensor, s: torch.Tensor, blockwise: bool) -> None:
    """Contract of one GEMM operand: 2-D e4m3 ``q_RK`` and fp32 scales of its tiling."""
    if q.dtype != FP8_DTYPE or q.dim() != 2:
        raise ValueError(f"{name} must be a 2-D {FP8_DTYPE} tensor, got {q.dtype} of shape {tuple(q.shape)}")
    R, K = q.shape
    want = (cdiv(R, TILE), cdiv(K, TILE)) if blockwise else (R, cdiv(K, TILE))
    if s.dtype != torch.float32 or tuple(s.shape) != want:
        raise ValueError(f"scales of {name} must be float32 of shape {want}, got {s.dtype} {tuple(s.shape)}")


def fp8_gemm_nt(
    a_q: torch.Tensor,
    a_s: torch.Tensor,
    b_q: torch.Tensor,
    b_s: torch.Tensor,
    *,
    b_blockwise: bool,
    out_dtype: torch.dtype = torch.float32,
    block_m: int = 128,
    block_n: int = 128,
) -> torch.Tensor:
    """``C_MN = A_MK @ B_NK^T``; A has 1x128 scales ``[M, Kt]``, B 128x128 ``[Nt, Kt]`` or 1x128 ``[N, Kt]``.

    Operands may be strided views (e.g. ``w_q.t()`` for Dgrad); nothing is copied.
    """
    check_operand("a_q", a_q, a_s, blockwise=False)
    check_operand("b_q", b_q, b_s, blockwise=b_blockwise)
    if a_q.shape[1] != b_q.shape[1]:
        raise ValueError(f"K mismatch: a_q is {tuple(a_q.shape)}, b_q is {tuple(b_q.shape)}")
    (M, K), N = a_q.shape, b_q.shape[0]
    c = torch.empty((M, N), dtype=out_dtype, device=a_q.device)
    kind = out_kind(out_dtype)
    if M == 0 or N == 0:
        return c
    if K == 0:
        return c.zero_()
    grid = (cdiv(M, block_m), cdiv(N, block_n))
    _fp8_gemm_nt_kernel[grid](
        a_q,
        b_q,
        c,
        a_s,
        b_s,
        M,
        N,
        K,
        a_q.stride(0),
        a_q.stride(1),
        b_q.stride(0),
        b_q.stride(1),
        c.stride(0),
        c.stride(1),
        a_s.stride(0),
        a_s.stride(1),
        b_s.stride(0),
        b_s.stride(1),
        B_BLOCKWISE=b_blockwise,
        OUT_KIND=kind,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=TILE,
        num_warps=8,
        num_stages=3,
    )
    return c
