"""Block-scaled FP8 GEMM ``C = A @ B^T`` ("NT": both operands K-major) with FP32 promotion every 128 of K.

Why promotion. On H800 Tensor Cores an FP8 MMA accumulates in a register that keeps only ~14 mantissa bits;
DeepSeek-V3 measured a ~2% relative error for K=4096 if one lets it run (see bench/fp8_accumulation.py).
Its fix, reproduced here: let the Tensor Core accumulate one 128-deep slice of K, then add the partial sum
into an FP32 accumulator on CUDA cores. Because the quantization tiles are 128 wide along K, each slice has
a single scale per row of A and per row (or 128-row block) of B, so the scales are applied exactly there::

    acc_MN += dot(a_q[:, k:k+128], b_q[:, k:k+128]^T) * a_s[:, k/128, None] * b_s[None, :, k/128]

(``kernels/accumulation.py`` states what error this leaves on each machine; the tests' tolerances come from it.)
The same kernel serves the three GEMMs of a linear layer:

- Fprop ``Y = X W^T``: A = X (1x128 tiles), B = W (128x128 blocks, ``b_blockwise=True``);
- Dgrad ``dX = dY W``: A = dY (1x128 tiles along N), B = ``W^T`` made K-major, blocks transposed;
- Wgrad ``dW = dY^T X``: A = dY^T and B = X^T, both tiled along tokens (``b_blockwise=False``).

Schedule. ``triton.autotune`` picks the output tile and pipeline depth per (M, N, K) from a small set (one
config in the interpreter, and for problems too small to be worth timing); BLOCK_K is always 128, the scale tile.
Output tiles are visited in GROUP_M-row bands (the "grouped ordering" of Triton's matmul tutorial) so that a band
of A and a column of B blocks stay in L2 while the band is computed. When K is a multiple of 128 the hot loop
has no K mask, so the operands' loads are 16-byte ``cp.async`` copies (``kernels.compile_check`` asserts it).

Any K works: out-of-range elements load as zero, which is exactly zero padding of the last tile. Scales may be
fp32 or ue8m0 exponent bytes (``kernels/formats.py``), per operand. NaN travels through the scales: the
quantizer gives a tile holding a NaN a NaN scale (in the Triton interpreter an e4m3 NaN byte would load as +-480,
on a GPU as NaN; with the NaN scale both give NaN). Row and column offsets are int64 (M * K passes 2^31 at 300K
tokens). The reference is ``kernels.reference.fp8_gemm_nt_ref`` (dequantize, FP32 matmul).

Shape legend: M rows of A/C, N rows of B = columns of C, K reduction dim, ``Kt`` = ceil(K / 128).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.backend import interpreting
from kernels.quant import NATIVE, _decode_scale, _store_cast, is_ue8m0, out_kind
from kernels.reference import FP8_DTYPE, TILE, cdiv

INTERPRETED = interpreting()
# Below this many output elements a GEMM runs the first config without timing the others.
AUTOTUNE_MIN_OUTPUTS = 1 << 20


def gemm_configs(block_names: tuple[str, str] = ("BLOCK_M", "BLOCK_N")) -> list[triton.Config]:
    """The autotuning set: (rows, cols, warps, stages) of an output tile; BLOCK_K = 128 throughout.

    Shared memory per stage is (rows + cols) * 128 bytes of e4m3, so the deepest pipeline here (128 x 256, 3
    stages) takes 144 KiB of Hopper's 227. The interpreter gets the first config only (it times nothing).
    """
    tiles = [(128, 128, 8, 3), (128, 256, 8, 3), (64, 128, 4, 4), (128, 128, 4, 4)]
    if INTERPRETED:
        tiles = tiles[:1]
    r, c = block_names
    return [triton.Config({r: br, c: bc, "GROUP_M": 8}, num_warps=w, num_stages=s) for br, bc, w, s in tiles]


def prune_small(min_outputs: int, rows: str, cols: str):
    """``early_config_prune`` keeping only the first config when ``rows * cols`` of the problem is small."""

    def prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        return configs if named_args[rows] * named_args[cols] >= min_outputs else configs[:1]

    return prune


@triton.jit
def _swizzle(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """Program id -> (row tile, column tile), walking GROUP_M row tiles across all columns before moving on."""
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % width) % size_m, (pid % width) // size_m


@triton.jit
def _block_scales(bs_ptr, n0, N, stride_bsn, UE8M0: tl.constexpr, BLOCK_N: tl.constexpr):
    """Scales of a BLOCK_N-column tile of a 128x128-block operand (``bs_ptr`` at this K slice): one scalar per
    128-column block (BLOCK_N is 128 or 256, tiles start on a block), broadcast in registers rather than
    gathered per column."""
    tl.static_assert(BLOCK_N == 128 or BLOCK_N == 256, "block scales: BLOCK_N must be 128 or 256")
    rn = tl.arange(0, BLOCK_N)
    s0 = _decode_scale(tl.load(bs_ptr + (n0 // 128) * stride_bsn), UE8M0)
    if BLOCK_N == 256:
        s1 = _decode_scale(tl.load(bs_ptr + (n0 // 128 + 1) * stride_bsn, mask=n0 + 128 < N, other=0), UE8M0)
        return tl.where(rn < 128, s0, s1)
    else:
        return tl.full((BLOCK_N,), 0.0, tl.float32) + s0


@triton.autotune(
    configs=gemm_configs(),
    key=["M", "N", "K"],
    prune_configs_by={"early_config_prune": prune_small(AUTOTUNE_MIN_OUTPUTS, "M", "N")},
)
@triton.heuristics({"EVEN_K": lambda args: args["K"] % 128 == 0})
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
    pid_m, pid_n = _swizzle(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    m0 = pid_m.to(tl.int64) * BLOCK_M
    n0 = pid_n.to(tl.int64) * BLOCK_N
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mask_m = (m0 + rm) < M
    mask_n = (n0 + rn) < N
    a_ptrs = a_ptr + m0 * stride_am + rm[:, None] * stride_am + rk[None, :] * stride_ak
    b_ptrs = b_ptr + n0 * stride_bn + rk[:, None] * stride_bk + rn[None, :] * stride_bn
    as_ptrs = as_ptr + (m0 + rm) * stride_asm
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kt in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=mask_m[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=mask_n[None, :], other=0.0)
        else:
            k_left = K - kt * BLOCK_K
            a = tl.load(a_ptrs, mask=mask_m[:, None] & (rk[None, :] < k_left), other=0.0)
            b = tl.load(b_ptrs, mask=(rk[:, None] < k_left) & mask_n[None, :], other=0.0)
        a_s = _decode_scale(tl.load(as_ptrs + kt * stride_ask, mask=mask_m, other=0), A_UE8M0)
        if B_BLOCKWISE:  # one scale per 128x128 block of B
            b_s = _block_scales(bs_ptr + kt * stride_bsk, n0, N, stride_bsn, B_UE8M0, BLOCK_N)
        else:  # one scale per row of B per 128 of K
            bs_ptrs = bs_ptr + (n0 + rn) * stride_bsn + kt * stride_bsk
            b_s = _decode_scale(tl.load(bs_ptrs, mask=mask_n, other=0), B_UE8M0)
        # the promotion: a 128-deep Tensor-Core partial sum, scaled, added into the FP32 accumulator
        acc += tl.dot(a, b, out_dtype=tl.float32) * a_s[:, None] * b_s[None, :]
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    c_ptrs = c_ptr + m0 * stride_cm + rm[:, None] * stride_cm + (n0 + rn)[None, :] * stride_cn
    _store_cast(c_ptrs, acc, mask_m[:, None] & mask_n[None, :], OUT_KIND, NATIVE)


def check_operand(name: str, q: torch.Tensor, s: torch.Tensor, blockwise: bool) -> bool:
    """Contract of one GEMM operand: 2-D e4m3 ``q_RK`` and scales of its tiling; returns whether they are ue8m0."""
    if q.dtype != FP8_DTYPE or q.dim() != 2:
        raise ValueError(f"{name} must be a 2-D {FP8_DTYPE} tensor, got {q.dtype} of shape {tuple(q.shape)}")
    R, K = q.shape
    want = (cdiv(R, TILE), cdiv(K, TILE)) if blockwise else (R, cdiv(K, TILE))
    if tuple(s.shape) != want:
        raise ValueError(f"scales of {name} must have shape {want}, got {s.dtype} {tuple(s.shape)}")
    return is_ue8m0(f"scales of {name}", s)


def fp8_gemm_nt(
    a_q: torch.Tensor,
    a_s: torch.Tensor,
    b_q: torch.Tensor,
    b_s: torch.Tensor,
    *,
    b_blockwise: bool,
    out_dtype: torch.dtype = torch.float32,
    native: bool | None = None,
) -> torch.Tensor:
    """``C_MN = A_MK @ B_NK^T``; A has 1x128 scales ``[M, Kt]``, B 128x128 ``[Nt, Kt]`` or 1x128 ``[N, Kt]``.

    Scales are fp32 or ue8m0 (uint8), per operand. Operands may be strided views; nothing is copied. Both
    should be K-major (unit stride along K) for the Tensor Cores' FP8 MMA; other layouts work, slowly.
    """
    a_ue8m0 = check_operand("a_q", a_q, a_s, blockwise=False)
    b_ue8m0 = check_operand("b_q", b_q, b_s, blockwise=b_blockwise)
    if a_q.shape[1] != b_q.shape[1]:
        raise ValueError(f"K mismatch: a_q is {tuple(a_q.shape)}, b_q is {tuple(b_q.shape)}")
    (M, K), N = a_q.shape, b_q.shape[0]
    c = torch.empty((M, N), dtype=out_dtype, device=a_q.device)
    kind = out_kind(out_dtype)
    if M == 0 or N == 0:
        return c
    if K == 0:
        return c.zero_()

    def grid(meta: dict) -> tuple[int]:
        return (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),)

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
        A_UE8M0=a_ue8m0,
        B_UE8M0=b_ue8m0,
        OUT_KIND=kind,
        NATIVE=NATIVE if native is None else native,
        BLOCK_K=TILE,
    )
    return c
