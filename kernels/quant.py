"""Triton kernels for FP8 quantization: 1x128 activation tiles, their token-major transpose, 128x128 weight blocks.

Each launcher checks its contract, allocates the output and launches; ``kernels/reference.py`` holds the
pure-PyTorch reference of identical bits (``act_quant_ref``, ``act_quant_t_ref``, ``weight_quant_ref``, ...).

How a tile is quantized (online max-abs scaling, as in DeepSeek-V3)::

    amax = max |x_tile|   (NaN if the tile holds one)      s = max(amax, 1e-12) / 448   (ue8m0: round s up to 2^k)
    q    = e4m3(saturate(x / s))                            x ~= q * s

The scale is stored as fp32, or for ``fmt="ue8m0"`` as its exponent byte (``kernels/formats.py``).

Same bits as torch, on both machines. ``x / s`` is an IEEE division (``tl.math.div_rn``: Triton's ``/`` is an
approximate division on NVIDIA GPUs and would not match torch's). The casts depend on one switch, ``NATIVE``
(a constexpr of every kernel; ``True`` on a GPU, ``False`` in the CPU interpreter, overridable per call):

- native (GPU): clamp to +-448 (``tl.where`` keeps NaN, unlike min/max whose NaN handling differs between
  backends), then the hardware conversion ``cvt.rn.satfinite.e4m3x2.f32``, round to nearest even as torch's
  cast; bf16 outputs with ``cvt.rn.bf16.f32``. ``kernels.compile_check`` asserts that this is the PTX.
- bit-built (interpreter, whose own casts truncate, skip the carry into the exponent, mishandle subnormals and
  do not saturate): after the clamp, round to 3 mantissa bits on the fp32 bit pattern, to nearest even (normal
  numbers: add ``0x7FFFF + lsb`` and clear the low 20 bits, the carry correctly bumps the exponent; e4m3
  subnormals, ``|y| < 2^-6`` with spacing 2^-9: ``(|y| + 24576) - 24576``, an fp32 add whose ulp is 2^-9),
  assemble the e4m3 byte (sign, rebiased exponent, mantissa; 0x7F for NaN) and bitcast it. Even casting an
  exactly representable value is unsafe in the interpreter, which turns NaN into 384.

Both paths give torch's bytes; the tests check the bit-built one against torch everywhere, and the native one
against torch on a GPU (in the interpreter only where its cast is exact).

Addresses: row offsets are int64 (a [M, K] activation passes 2^31 elements at M = 300K tokens for K = 7168);
offsets inside a tile stay int32. ``act_quant_t`` writes its [K, M] output with rows padded to a whole number of
128-token tiles (zeros in the padding) and returns the [K, M] view: the grouped Wgrad kernel then loads whole
token tiles without a mask along the contiguous axis (``kernels/grouped_gemm.py``).

Shape legend: M tokens, K channels, N output features, E experts; ``Mt``/``Kt``/``Nt`` counts of 128-tiles,
``Mp`` = 128 * Mt.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.backend import interpreting
from kernels.reference import FP8_DTYPE, TILE, cdiv, scale_dtype

# Whether the kernels below were decorated for the interpreter (checked by kernels.backend.resolve_backend).
INTERPRETED = interpreting()
# The switch: native GPU casts where the kernels are compiled, the bit-built casts in the interpreter.
NATIVE = not INTERPRETED
_FLOAT_INPUTS = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _bits_to_e4m3(y):
    """The bit-built path of ``_to_e4m3`` for a clamped fp32 ``y``: RNE to 3 mantissa bits on the bit pattern."""
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
def _to_e4m3(y, NATIVE: tl.constexpr):
    """fp32 -> float8e4nv, saturating at +-448, round to nearest even, NaN kept (torch's bits on both paths)."""
    y = tl.where(y > 448.0, 448.0, tl.where(y < -448.0, -448.0, y))
    if NATIVE:
        return y.to(tl.float8e4nv)
    else:
        return _bits_to_e4m3(y)


@triton.jit
def _to_bf16(y, NATIVE: tl.constexpr):
    """fp32 -> bfloat16, round to nearest even (natively, or on the bit pattern: the interpreter truncates)."""
    if NATIVE:
        return y.to(tl.bfloat16)
    else:
        bits = y.to(tl.int32, bitcast=True)
        lsb = (bits >> 16) & 1
        return ((bits + 0x7FFF + lsb) & -65536).to(tl.float32, bitcast=True).to(tl.bfloat16)


@triton.jit
def _store_cast(ptrs, val, mask, OUT_KIND: tl.constexpr, NATIVE: tl.constexpr):
    """Store fp32 ``val`` as fp32 (0), bf16 rounded to nearest even (1) or fp16 (2)."""
    if OUT_KIND == 1:
        tl.store(ptrs, _to_bf16(val, NATIVE), mask=mask)
    elif OUT_KIND == 2:
        tl.store(ptrs, val.to(tl.float16), mask=mask)
    else:
        tl.store(ptrs, val, mask=mask)


@triton.jit
def _scale_from_amax(amax, UE8M0: tl.constexpr):
    """(fp32 scale to divide by, scale as stored) from a NaN-propagating amax: max(amax, 1e-12) / 448, or for
    ue8m0 that rounded up to 2^k and stored as its exponent byte (NaN, Inf -> 255)."""
    amax = tl.where(amax < 1e-12, 1e-12, amax)
    s = tl.math.div_rn(amax, tl.full(amax.shape, 448.0, tl.float32))
    if UE8M0:
        bits = s.to(tl.int32, bitcast=True)
        up = tl.where(s != s, s, ((bits + 0x7FFFFF) & 0x7F800000).to(tl.float32, bitcast=True))
        return up, ((up.to(tl.int32, bitcast=True) >> 23) & 0xFF).to(tl.uint8)
    else:
        return s, s


@triton.jit
def _decode_scale(s, UE8M0: tl.constexpr):
    """fp32 value of a loaded scale: fp32 as is, a ue8m0 exponent byte e as 2^(e - 127), 255 as NaN."""
    if UE8M0:
        e = s.to(tl.int32)
        return tl.where(e == 255, float("nan"), (e << 23).to(tl.float32, bitcast=True))
    else:
        return s


@triton.jit
def _amax(x, axis: tl.constexpr):
    """max |x| along ``axis``, NaN if any element is NaN (tl.max drops NaN on GPUs and keeps it in numpy)."""
    return tl.max(tl.abs(x), axis=axis) + tl.sum(tl.where(x != x, x, 0.0), axis=axis)


@triton.jit
def _act_quant_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    M,
    K,
    stride_xm,
    stride_sm,
    UE8M0: tl.constexpr,
    NATIVE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    TILE_K: tl.constexpr,
):
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_M
    kt = tl.program_id(1)
    rows = tl.arange(0, BLOCK_M)
    offs_k = kt * TILE_K + tl.arange(0, TILE_K)
    mask = ((row0 + rows) < M)[:, None] & (offs_k < K)[None, :]
    x = tl.load(x_ptr + row0 * stride_xm + rows[:, None] * stride_xm + offs_k[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    s, s_stored = _scale_from_amax(_amax(x, 1), UE8M0)
    q = _to_e4m3(tl.math.div_rn(x, tl.broadcast_to(s[:, None], x.shape)), NATIVE)
    tl.store(q_ptr + row0 * K + rows[:, None] * K + offs_k[None, :], q, mask=mask)
    tl.store(s_ptr + row0 * stride_sm + rows * stride_sm + kt, s_stored, mask=(row0 + rows) < M)


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
    IN_UE8M0: tl.constexpr,
    UE8M0: tl.constexpr,
    NATIVE: tl.constexpr,
    TILE_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    mt = tl.program_id(0)
    k0 = tl.program_id(1).to(tl.int64) * BLOCK_K
    offs_m = mt * TILE_M + tl.arange(0, TILE_M)
    cols = tl.arange(0, BLOCK_K)
    mask_k = (k0 + cols) < K
    mask = (offs_m < M)[:, None] & mask_k[None, :]
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + k0
    x = tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_IN_SCALE:  # x is the cached e4m3 activation: dequantize with its 1x128 scales first
        xs_rows = xs_ptr + offs_m.to(tl.int64)[:, None] * stride_xsm
        xs = tl.load(xs_rows + ((k0 + cols) // 128)[None, :], mask=mask, other=0)
        x = x * _decode_scale(xs, IN_UE8M0)
    s, s_stored = _scale_from_amax(_amax(x, 0), UE8M0)
    q = _to_e4m3(tl.math.div_rn(x, tl.broadcast_to(s[None, :], x.shape)), NATIVE)
    # rows of q are padded to whole token tiles: the padding (x = 0 there) is written as zeros, unmasked along M
    tl.store(q_ptr + k0 * stride_qk + cols[None, :] * stride_qk + offs_m[:, None], q, mask=mask_k[None, :])
    tl.store(s_ptr + k0 * stride_sk + cols * stride_sk + mt, s_stored, mask=mask_k)


@triton.jit
def _weight_quant_kernel(
    w_ptr,
    q_ptr,
    s_ptr,
    N,
    K,
    stride_we,
    stride_wn,
    stride_se,
    stride_sn,
    UE8M0: tl.constexpr,
    NATIVE: tl.constexpr,
    TILE_: tl.constexpr,
):
    e = tl.program_id(0).to(tl.int64)  # E*N*K can pass 2^31
    nt = tl.program_id(1)
    kt = tl.program_id(2)
    offs_n = nt * TILE_ + tl.arange(0, TILE_)
    offs_k = kt * TILE_ + tl.arange(0, TILE_)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    offs = offs_n.to(tl.int64)[:, None] * stride_wn + offs_k[None, :]
    w = tl.load(w_ptr + e * stride_we + offs, mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.max(tl.abs(w), axis=1), axis=0) + tl.sum(tl.sum(tl.where(w != w, w, 0.0), axis=1), axis=0)
    s, s_stored = _scale_from_amax(tl.full((1,), 0.0, tl.float32) + amax, UE8M0)
    q = _to_e4m3(tl.math.div_rn(w, tl.broadcast_to(s[:, None], w.shape)), NATIVE)
    tl.store(q_ptr + e * N * K + offs_n.to(tl.int64)[:, None] * K + offs_k[None, :], q, mask=mask)
    tl.store(s_ptr + e * stride_se + nt * stride_sn + kt + tl.arange(0, 1), s_stored)


@triton.jit
def _act_dequant_kernel(
    q_ptr,
    s_ptr,
    x_ptr,
    M,
    K,
    stride_qm,
    stride_sm,
    UE8M0: tl.constexpr,
    OUT_KIND: tl.constexpr,
    NATIVE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    TILE_K: tl.constexpr,
):
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_M
    kt = tl.program_id(1)
    rows = tl.arange(0, BLOCK_M)
    offs_k = kt * TILE_K + tl.arange(0, TILE_K)
    mask_m = (row0 + rows) < M
    mask = mask_m[:, None] & (offs_k < K)[None, :]
    q = tl.load(q_ptr + row0 * stride_qm + rows[:, None] * stride_qm + offs_k[None, :], mask=mask, other=0.0)
    s = _decode_scale(tl.load(s_ptr + row0 * stride_sm + rows * stride_sm + kt, mask=mask_m, other=0), UE8M0)
    x_ptrs = x_ptr + row0 * K + rows[:, None] * K + offs_k[None, :]
    _store_cast(x_ptrs, q.to(tl.float32) * s[:, None], mask, OUT_KIND, NATIVE)


@triton.jit
def _cast_kernel(x_ptr, q_ptr, n, NATIVE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    tl.store(q_ptr + offs, _to_e4m3(x, NATIVE), mask=offs < n)


def out_kind(dtype: torch.dtype) -> int:
    """The ``OUT_KIND`` constexpr of ``_store_cast`` for an output dtype."""
    kinds = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
    if dtype not in kinds:
        raise ValueError(f"output dtype must be float32, bfloat16 or float16, got {dtype}")
    return kinds[dtype]


def is_ue8m0(name: str, s: torch.Tensor) -> bool:
    """Whether a scale tensor holds ue8m0 exponent bytes (uint8) rather than fp32; refuses other dtypes."""
    if s.dtype not in (torch.float32, torch.uint8):
        raise ValueError(f"{name} must be float32 (fp32 scales) or uint8 (ue8m0 exponents), got {s.dtype}")
    return s.dtype == torch.uint8


def _rows_contiguous(name: str, x: torch.Tensor, dtypes: tuple[torch.dtype, ...]) -> torch.Tensor:
    """A 2-D input of one of ``dtypes`` with unit column stride (row-strided views are used as they are)."""
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(x.shape)}")
    if x.dtype not in dtypes:
        raise ValueError(f"{name} must be one of {dtypes}, got {x.dtype}")
    return x if x.stride(1) == 1 or x.shape[1] <= 1 else x.contiguous()


def _native(native: bool | None) -> bool:
    return NATIVE if native is None else native


def cast_to_e4m3(x: torch.Tensor, native: bool | None = None) -> torch.Tensor:
    """Saturating RNE cast of fp32 ``x`` (any shape) to e4m3: the building block, exposed to test its bits."""
    if x.dtype != torch.float32:
        raise ValueError(f"cast_to_e4m3 takes float32, got {x.dtype}")
    x = x.contiguous()
    q = torch.empty(x.shape, dtype=FP8_DTYPE, device=x.device)
    if x.numel():
        _cast_kernel[(cdiv(x.numel(), 1024),)](x, q, x.numel(), NATIVE=_native(native), BLOCK=1024)
    return q


def act_quant(
    x_MK: torch.Tensor, fmt: str = "fp32", block_m: int = 64, native: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize in 1x128 tiles -> (q_MK e4m3, s_MKt in format ``fmt``). K need not be a multiple of 128."""
    x_MK = _rows_contiguous("x_MK", x_MK, _FLOAT_INPUTS)
    M, K = x_MK.shape
    q = torch.empty((M, K), dtype=FP8_DTYPE, device=x_MK.device)
    s = torch.empty((M, cdiv(K, TILE)), dtype=scale_dtype(fmt), device=x_MK.device)
    if M and K:
        grid = (cdiv(M, block_m), cdiv(K, TILE))
        _act_quant_kernel[grid](
            x_MK,
            q,
            s,
            M,
            K,
            x_MK.stride(0),
            s.stride(0),
            UE8M0=fmt == "ue8m0",
            NATIVE=_native(native),
            BLOCK_M=block_m,
            TILE_K=TILE,
        )
    return q, s


def act_quant_t(
    x_MK: torch.Tensor,
    s_MKt: torch.Tensor | None = None,
    fmt: str = "fp32",
    block_k: int = 128,
    native: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize along tokens (128x1 tiles), written transposed -> (q_KM e4m3, s_KMt in format ``fmt``).

    With ``s_MKt`` (fp32 or ue8m0), ``x_MK`` is an e4m3 activation with 1x128 scales, dequantized on load (fused).
    ``q_KM`` is a view of a [K, Mp] buffer whose padding columns are zero.
    """
    in_ue8m0 = False
    if s_MKt is None:
        x_MK = _rows_contiguous("x_MK", x_MK, _FLOAT_INPUTS)
    else:
        x_MK = _rows_contiguous("x_MK (with s_MKt)", x_MK, (FP8_DTYPE,))
        in_ue8m0 = is_ue8m0("s_MKt", s_MKt)
        if s_MKt.shape != (x_MK.shape[0], cdiv(x_MK.shape[1], TILE)):
            raise ValueError(f"s_MKt must have shape (M, ceil(K/128)), got {tuple(s_MKt.shape)}")
        s_MKt = s_MKt.contiguous()
    M, K = x_MK.shape
    Mp = cdiv(M, TILE) * TILE
    q = torch.empty((K, Mp), dtype=FP8_DTYPE, device=x_MK.device)
    s = torch.empty((K, cdiv(M, TILE)), dtype=scale_dtype(fmt), device=x_MK.device)
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
            x_MK.stride(0),
            xs.stride(0),
            Mp,
            s.stride(0),
            HAS_IN_SCALE=s_MKt is not None,
            IN_UE8M0=in_ue8m0,
            UE8M0=fmt == "ue8m0",
            NATIVE=_native(native),
            TILE_M=TILE,
            BLOCK_K=block_k,
        )
    return q[:, :M], s


def weight_quant(w: torch.Tensor, fmt: str = "fp32", native: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``w_NK`` or stacked ``w_ENK`` in 128x128 blocks -> (q, s_[E]NtKt in format ``fmt``)."""
    if w.dim() not in (2, 3) or w.dtype not in _FLOAT_INPUTS:
        raise ValueError(f"w must be a 2-D or 3-D float tensor, got {w.dtype} of shape {tuple(w.shape)}")
    squeeze = w.dim() == 2
    w_ENK = w.unsqueeze(0) if squeeze else w
    if w_ENK.stride(2) != 1:
        w_ENK = w_ENK.contiguous()
    E, N, K = w_ENK.shape
    q = torch.empty((E, N, K), dtype=FP8_DTYPE, device=w.device)
    s = torch.empty((E, cdiv(N, TILE), cdiv(K, TILE)), dtype=scale_dtype(fmt), device=w.device)
    if E and N and K:
        grid = (E, cdiv(N, TILE), cdiv(K, TILE))
        _weight_quant_kernel[grid](
            w_ENK,
            q,
            s,
            N,
            K,
            w_ENK.stride(0),
            w_ENK.stride(1),
            s.stride(0),
            s.stride(1),
            UE8M0=fmt == "ue8m0",
            NATIVE=_native(native),
            TILE_=TILE,
        )
    return (q[0], s[0]) if squeeze else (q, s)


def act_dequant(
    q_MK: torch.Tensor,
    s_MKt: torch.Tensor,
    dtype: torch.dtype = torch.float32,
    block_m: int = 64,
    native: bool | None = None,
) -> torch.Tensor:
    """``q * s`` per 1x128 tile (fp32 or ue8m0 scales), stored as ``dtype`` (bf16 rounded to nearest even)."""
    if q_MK.dtype != FP8_DTYPE or q_MK.dim() != 2:
        raise ValueError(f"q_MK must be a 2-D {FP8_DTYPE} tensor, got {q_MK.dtype} of shape {tuple(q_MK.shape)}")
    M, K = q_MK.shape
    if s_MKt.shape != (M, cdiv(K, TILE)):
        raise ValueError(f"s_MKt must have shape {(M, cdiv(K, TILE))}, got {tuple(s_MKt.shape)}")
    ue8m0 = is_ue8m0("s_MKt", s_MKt)
    q_MK, s_MKt = _rows_contiguous("q_MK", q_MK, (FP8_DTYPE,)), s_MKt.contiguous()
    x = torch.empty((M, K), dtype=dtype, device=q_MK.device)
    kind = out_kind(dtype)
    if M and K:
        grid = (cdiv(M, block_m), cdiv(K, TILE))
        _act_dequant_kernel[grid](
            q_MK,
            s_MKt,
            x,
            M,
            K,
            q_MK.stride(0),
            s_MKt.stride(0),
            UE8M0=ue8m0,
            OUT_KIND=kind,
            NATIVE=_native(native),
            BLOCK_M=block_m,
            TILE_K=TILE,
        )
    return x
