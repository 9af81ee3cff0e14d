"""Triton kernels for FP8 quantization: 1x128 activation tiles, their token-major transpose, 128x128 weight blocks.

Each launcher checks its contract, allocates the output and launches; ``kernels/reference.py`` holds the
pure-PyTorch reference of identical bits (``act_quant_ref``, ``act_quant_t_ref``, ``weight_quant_ref``, ...).

How a tile is quantized (online max-abs scaling, as in DeepSeek-V3)::

    amax = max |x_tile|   (NaN if the tile holds one)      s = max(amax, 1e-12) / 448   (pow2: round s up)
    q    = e4m3(saturate(x / s))                            x ~= q * s

Rounding on the bit pattern. The cast fp32 -> e4m3 is done by two exact steps that give the same bits on a
GPU and in the Triton CPU interpreter (whose own cast truncates, skips the carry into the exponent, mishandles
subnormals and does not saturate):

1. clamp to +-448 (``tl.where`` keeps NaN, unlike min/max whose NaN handling differs between backends);
2. round to 3 mantissa bits, to nearest even: normal numbers by adding ``0x7FFFF + lsb`` to the fp32 bits
   and clearing the low 20 bits (the carry correctly bumps the exponent); e4m3 subnormals (``|y| < 2^-6``,
   spacing 2^-9) by ``(|y| + 24576) - 24576``, an fp32 add whose ulp is 2^-9;
3. assemble the e4m3 byte (sign, rebiased exponent, mantissa; 0x7F for NaN) and bitcast it. Even casting
   an exactly representable value is unsafe in the interpreter, which turns NaN into 384.

The division ``x / s`` uses ``tl.math.div_rn`` (IEEE) because Triton's ``/`` is an approximate division on
NVIDIA GPUs, which would not match torch bit for bit.

Shape legend: M tokens, K channels, N output features, E experts; ``Mt``/``Kt``/``Nt`` counts of 128-tiles.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.backend import interpreting
from kernels.reference import FP8_DTYPE, TILE, cdiv

# Whether the kernels below were decorated for the interpreter (checked by kernels.backend.resolve_backend).
INTERPRETED = interpreting()
_FLOAT_INPUTS = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _round_to_e4m3(y):
    """fp32 -> float8e4nv, saturating at +-448, round to nearest even, NaN kept: the e4m3 byte is built on
    the fp32 bit pattern and bitcast, so no backend's float->fp8 conversion is involved."""
    y = tl.where(y > 448.0, 448.0, tl.where(y < -448.0, -448.0, y))
    bits = y.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    # normal range: round the 23-bit mantissa to 3 bits (nearest even), the carry may bump the exponent
    rounded = (bits + 0x7FFFF + ((bits >> 20) & 1)) & 0x7FF00000
    normal = (((rounded >> 23) - 120) << 3) | ((rounded >> 20) & 7)  # rebias exponent 127 -> 7
    # subnormal range (|y| < 2^-6): an fp32 add with ulp 2^-9 (the e4m3 spacing there) rounds to nearest even
    mag = tl.where(y != y, 0.0, tl.abs(y))  # NaN is handled below; keep it out of the float->int conversion
    subnormal = (((mag + 24576.0) - 24576.0) * 512.0).to(tl.int32)  # 0..8 (8 is the smallest normal, 0x08)
    code = tl.where(mag < 0.015625, subnormal, normal)
    code = tl.where(y != y, 0x7F, code) | sign
    return code.to(tl.uint8).to(tl.float8e4nv, bitcast=True)


@triton.jit
def _round_to_bf16(y):
    """fp32 -> bfloat16, round to nearest even on the bit pattern (the interpreter's cast truncates)."""
    bits = y.to(tl.int32, bitcast=True)
    lsb = (bits >> 16) & 1
    return ((bits + 0x7FFF + lsb) & -65536).to(tl.float32, bitcast=True).to(tl.bfloat16)


@triton.jit
def _store_cast(ptrs, val, mask, OUT_KIND: tl.constexpr):
    """Store fp32 ``val`` as fp32 (0), bf16 rounded to nearest even (1) or fp16 (2)."""
    if OUT_KIND == 1:
        tl.store(ptrs, _round_to_bf16(val), mask=mask)
    elif OUT_KIND == 2:
        tl.store(ptrs, val.to(tl.float16), mask=mask)
    else:
        tl.store(ptrs, val, mask=mask)


@triton.jit
def _scale_from_amax(amax, POW2: tl.constexpr):
    """Scale from a (NaN-propagating) amax: max(amax, 1e-12) / 448, optionally rounded up to 2^k."""
    amax = tl.where(amax < 1e-12, 1e-12, amax)
    s = tl.math.div_rn(amax, tl.full(amax.shape, 448.0, tl.float32))
    if POW2:
        bits = s.to(tl.int32, bitcast=True)
        up = ((bits + 0x7FFFFF) & 0x7F800000).to(tl.float32, bitcast=True)
        s = tl.where(s != s, s, up)
    return s


@triton.jit
def _act_quant_kernel(
    x_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_sm, POW2: tl.constexpr, BLOCK_M: tl.constexpr, TILE_K: tl.constexpr
):
    pid_m = tl.program_id(0)
    kt = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = kt * TILE_K + tl.arange(0, TILE_K)
    mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
    # tl.max drops NaN on GPUs and keeps it in numpy: add a NaN-sum so both propagate it, like torch.amax.
    amax = tl.max(tl.abs(x), axis=1) + tl.sum(tl.where(x != x, x, 0.0), axis=1)
    s = _scale_from_amax(amax, POW2)
    q = _round_to_e4m3(tl.math.div_rn(x, tl.broadcast_to(s[:, None], x.shape)))
    tl.store(q_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], q, mask=mask)
    tl.store(s_ptr + offs_m * stride_sm + kt, s, mask=offs_m < M)


@triton.jit
def _act_quant_t_kernel(
    x_ptr,
    xs_ptr,
    q_ptr,
    s_ptr,
    M,
    K,
    stride_xm,
    stride_xsm,
    stride_qk,
    stride_sk,
    HAS_IN_SCALE: tl.constexpr,
    POW2: tl.constexpr,
    TILE_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    mt = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = mt * TILE_M + tl.arange(0, TILE_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_IN_SCALE:  # x is the cached e4m3 activation: dequantize with its 1x128 scales first
        xs = tl.load(xs_ptr + offs_m[:, None] * stride_xsm + (offs_k // 128)[None, :], mask=mask, other=0.0)
        x = x * xs
    amax = tl.max(tl.abs(x), axis=0) + tl.sum(tl.where(x != x, x, 0.0), axis=0)
    s = _scale_from_amax(amax, POW2)
    q = _round_to_e4m3(tl.math.div_rn(x, tl.broadcast_to(s[None, :], x.shape)))
    tl.store(q_ptr + offs_k[None, :] * stride_qk + offs_m[:, None], q, mask=mask)
    tl.store(s_ptr + offs_k * stride_sk + mt, s, mask=offs_k < K)


@triton.jit
def _weight_quant_kernel(
    w_ptr, q_ptr, s_ptr, N, K, stride_we, stride_wn, stride_se, stride_sn, POW2: tl.constexpr, TILE_: tl.constexpr
):
    e = tl.program_id(0).to(tl.int64)  # E*N*K can pass 2^31
    nt = tl.program_id(1)
    kt = tl.program_id(2)
    offs_n = nt * TILE_ + tl.arange(0, TILE_)
    offs_k = kt * TILE_ + tl.arange(0, TILE_)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    offs = e * stride_we + offs_n[:, None] * stride_wn + offs_k[None, :]
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.max(tl.abs(w), axis=1), axis=0) + tl.sum(tl.sum(tl.where(w != w, w, 0.0), axis=1), axis=0)
    s = _scale_from_amax(tl.full((1,), 0.0, tl.float32) + amax, POW2)
    q = _round_to_e4m3(tl.math.div_rn(w, tl.broadcast_to(s[:, None], w.shape)))
    tl.store(q_ptr + offs, q, mask=mask)
    tl.store(s_ptr + e * stride_se + nt * stride_sn + kt + tl.arange(0, 1), s)


@triton.jit
def _act_dequant_kernel(
    q_ptr, s_ptr, x_ptr, M, K, stride_qm, stride_sm, OUT_KIND: tl.constexpr, BLOCK_M: tl.constexpr, TILE_K: tl.constexpr
):
    pid_m = tl.program_id(0)
    kt = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = kt * TILE_K + tl.arange(0, TILE_K)
    mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    q = tl.load(q_ptr + offs_m[:, None] * stride_qm + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + offs_m * stride_sm + kt, mask=offs_m < M, other=0.0)
    _store_cast(x_ptr + offs_m[:, None] * stride_qm + offs_k[None, :], q * s[:, None], mask, OUT_KIND)


@triton.jit
def _cast_kernel(x_ptr, q_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    tl.store(q_ptr + offs, _round_to_e4m3(x), mask=offs < n)


def out_kind(dtype: torch.dtype) -> int:
    """The ``OUT_KIND`` constexpr of ``_store_cast`` for an output dtype."""
    kinds = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
    if dtype not in kinds:
        raise ValueError(f"output dtype must be float32, bfloat16 or float16, got {dtype}")
    return kinds[dtype]


def _check_2d_float(name: str, x: torch.Tensor) -> torch.Tensor:
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_INPUTS:
        raise ValueError(f"{name} must be float32/bfloat16/float16, got {x.dtype}")
    return x.contiguous()


def cast_to_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Saturating RNE cast of fp32 ``x`` (any shape) to e4m3: the building block, exposed to test its bits."""
    if x.dtype != torch.float32:
        raise ValueError(f"cast_to_e4m3 takes float32, got {x.dtype}")
    x = x.contiguous()
    q = torch.empty(x.shape, dtype=FP8_DTYPE, device=x.device)
    if x.numel():
        _cast_kernel[(cdiv(x.numel(), 1024),)](x, q, x.numel(), BLOCK=1024)
    return q


def act_quant(x_MK: torch.Tensor, pow2: bool = False, block_m: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize in 1x128 tiles -> (q_MK e4m3, s_MKt fp32). K need not be a multiple of 128."""
    x_MK = _check_2d_float("x_MK", x_MK)
    M, K = x_MK.shape
    q = torch.empty((M, K), dtype=FP8_DTYPE, device=x_MK.device)
    s = torch.empty((M, cdiv(K, TILE)), dtype=torch.float32, device=x_MK.device)
    if M and K:
        grid = (cdiv(M, block_m), cdiv(K, TILE))
        _act_quant_kernel[grid](x_MK, q, s, M, K, K, s.stride(0), POW2=pow2, BLOCK_M=block_m, TILE_K=TILE)
    return q, s


def act_quant_t(
    x_MK: torch.Tensor, s_MKt: torch.Tensor | None = None, pow2: bool = False, block_k: int = 128
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize along tokens (128x1 tiles), written transposed -> (q_KM e4m3, s_KMt fp32).

    With ``s_MKt``, ``x_MK`` is an e4m3 activation with 1x128 scales, dequantized on load (fused).
    """
    if s_MKt is None:
        x_MK = _check_2d_float("x_MK", x_MK)
    else:
        if x_MK.dtype != FP8_DTYPE or x_MK.dim() != 2:
            raise ValueError(f"with s_MKt, x_MK must be a 2-D {FP8_DTYPE} tensor, got {x_MK.dtype}")
        if s_MKt.shape != (x_MK.shape[0], cdiv(x_MK.shape[1], TILE)) or s_MKt.dtype != torch.float32:
            raise ValueError(f"s_MKt must be float32 of shape (M, ceil(K/128)), got {tuple(s_MKt.shape)}")
        x_MK, s_MKt = x_MK.contiguous(), s_MKt.contiguous()
    M, K = x_MK.shape
    q = torch.empty((K, M), dtype=FP8_DTYPE, device=x_MK.device)
    s = torch.empty((K, cdiv(M, TILE)), dtype=torch.float32, device=x_MK.device)
    if M and K:
        xs = s_MKt if s_MKt is not None else s  # dummy pointer when there is no input scale
        grid = (cdiv(M, TILE), cdiv(K, block_k))
        _act_quant_t_kernel[grid](
            x_MK,
            xs,
            q,
            s,
            M,
            K,
            K,
            xs.stride(0),
            M,
            s.stride(0),
            HAS_IN_SCALE=s_MKt is not None,
            POW2=pow2,
            TILE_M=TILE,
            BLOCK_K=block_k,
        )
    return q, s


def weight_quant(w: torch.Tensor, pow2: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``w_NK`` or stacked ``w_ENK`` in 128x128 blocks -> (q, s_[E]NtKt fp32)."""
    if w.dim() not in (2, 3) or w.dtype not in _FLOAT_INPUTS:
        raise ValueError(f"w must be a 2-D or 3-D float tensor, got {w.dtype} of shape {tuple(w.shape)}")
    squeeze = w.dim() == 2
    w_ENK = (w.unsqueeze(0) if squeeze else w).contiguous()
    E, N, K = w_ENK.shape
    q = torch.empty((E, N, K), dtype=FP8_DTYPE, device=w.device)
    s = torch.empty((E, cdiv(N, TILE), cdiv(K, TILE)), dtype=torch.float32, device=w.device)
    if E and N and K:
        grid = (E, cdiv(N, TILE), cdiv(K, TILE))
        _weight_quant_kernel[grid](w_ENK, q, s, N, K, N * K, K, s.stride(0), s.stride(1), POW2=pow2, TILE_=TILE)
    return (q[0], s[0]) if squeeze else (q, s)


def act_dequant(
    q_MK: torch.Tensor, s_MKt: torch.Tensor, dtype: torch.dtype = torch.float32, block_m: int = 64
) -> torch.Tensor:
    """``q * s`` per 1x128 tile, stored as ``dtype`` (bf16 rounded to nearest even)."""
    if q_MK.dtype != FP8_DTYPE or q_MK.dim() != 2:
        raise ValueError(f"q_MK must be a 2-D {FP8_DTYPE} tensor, got {q_MK.dtype} of shape {tuple(q_MK.shape)}")
    M, K = q_MK.shape
    if s_MKt.shape != (M, cdiv(K, TILE)):
        raise ValueError(f"s_MKt must have shape {(M, cdiv(K, TILE))}, got {tuple(s_MKt.shape)}")
    q_MK, s_MKt = q_MK.contiguous(), s_MKt.float().contiguous()
    x = torch.empty((M, K), dtype=dtype, device=q_MK.device)
    if M and K:
        grid = (cdiv(M, block_m), cdiv(K, TILE))
        _act_dequant_kernel[grid](
            q_MK, s_MKt, x, M, K, K, s_MKt.stride(0), OUT_KIND=out_kind(dtype), BLOCK_M=block_m, TILE_K=TILE
        )
    return x
