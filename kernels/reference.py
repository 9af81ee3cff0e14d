"""Pure-PyTorch references of the FP8 kernels: the numerics every Triton kernel must reproduce.

Quantization follows DeepSeek-V3 (report section 3.3, "fine-grained quantization"):

- activations in 1x128 tiles: one scale per token per 128 channels, ``s = amax(|x_tile|) / 448``;
- weights in 128x128 blocks: one scale per block;
- e4m3 (``torch.float8_e4m3fn``, max 448) for every GEMM input, saturating at +-448;
- online scaling: the scale comes from the tensor being quantized right now, no history;
- the scale format (``kernels/formats.py``): ``fp32`` scales, or ``ue8m0``: the scale rounded up to a power of
  two and stored as its biased exponent in one byte (``decode_scale`` turns either into fp32).

Shapes that are not multiples of 128 are zero-padded to whole tiles: the padding does not move the max-abs
and multiplies to zero, so a 96-wide matrix behaves as if its last tile held 32 columns of zeros.

Bits: ``q = saturate(x / s).to(e4m3)`` with an IEEE division, and the Triton kernels give the very same bytes.
The GEMM references dequantize (``q * s``, exact per element in fp32) and multiply in FP32; the kernels
instead apply the scales to each 128-deep partial sum (the promotion step), so the two agree to FP32
rounding of the accumulation, not bit for bit.

Shape legend: M tokens (rows of the activation), N output features, K reduction dim, E experts,
``Mt``/``Nt``/``Kt`` the number of 128-tiles along that dim, ``E1`` = E + 1 offsets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.formats import SCALE_FORMATS

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
TILE = 128
# An all-zero tile has amax 0; flooring amax keeps its scale finite and its quantized values at 0.
AMAX_EPS = 1e-12


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def cast_to_e4m3(y: torch.Tensor) -> torch.Tensor:
    """Saturating round-to-nearest-even cast of fp32 values to e4m3; NaN stays NaN."""
    return y.float().clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def scale_dtype(fmt: str) -> torch.dtype:
    """How a scale tensor of format ``fmt`` is stored: float32, or uint8 exponents for ue8m0."""
    if fmt not in SCALE_FORMATS:
        raise ValueError(f"scale format must be one of {SCALE_FORMATS}, got {fmt!r}")
    return torch.uint8 if fmt == "ue8m0" else torch.float32


def scale_from_amax(amax: torch.Tensor, fmt: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
    """-> (fp32 scale to divide by, the scale as stored in format ``fmt``); NaN kept.

    fp32: ``max(amax, eps) / 448``. ue8m0: that value rounded up to a power of two on the bit pattern (add an
    all-ones mantissa, keep the exponent: exact, no log2), stored as its exponent byte (NaN and Inf -> 255).
    """
    s = amax.float().clamp(min=AMAX_EPS) / FP8_MAX
    if scale_dtype(fmt) == torch.float32:
        return s, s
    bits = s.view(torch.int32)
    up = torch.where(s.isnan(), s, ((bits + 0x7FFFFF) & 0x7F800000).view(torch.float32))
    return up, ((up.view(torch.int32) >> 23) & 0xFF).to(torch.uint8)


def decode_scale(s: torch.Tensor) -> torch.Tensor:
    """fp32 value of a stored scale: fp32 as is, a ue8m0 exponent byte ``e`` as ``2^(e - 127)`` (255: NaN)."""
    if s.dtype != torch.uint8:
        return s.float()
    e = s.to(torch.int32)
    return torch.where(e == 255, float("nan"), (e << 23).view(torch.float32))


def _pad_last(x: torch.Tensor, multiple: int = TILE) -> torch.Tensor:
    pad = cdiv(x.shape[-1], multiple) * multiple - x.shape[-1]
    return F.pad(x, (0, pad)) if pad else x


def act_quant_ref(x_MK: torch.Tensor, fmt: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x_MK`` in 1x128 tiles -> (q_MK e4m3, s_MKt in format ``fmt``)."""
    M, K = x_MK.shape
    xp = _pad_last(x_MK.float()).view(M, cdiv(K, TILE), TILE)
    s32_MKt, s_MKt = scale_from_amax(xp.abs().amax(dim=-1), fmt)
    q = cast_to_e4m3(xp / s32_MKt[..., None])
    return q.view(M, cdiv(K, TILE) * TILE)[:, :K].contiguous(), s_MKt


def act_dequant_ref(q_MK: torch.Tensor, s_MKt: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of ``act_quant_ref``: ``q * s`` per 1x128 tile (in fp32, then cast to ``dtype``)."""
    K = q_MK.shape[-1]
    s_MK = decode_scale(s_MKt).repeat_interleave(TILE, dim=-1)[..., :K]
    return (q_MK.float() * s_MK).to(dtype)


def act_quant_t_ref(
    x_MK: torch.Tensor, s_MKt: torch.Tensor | None = None, fmt: str = "fp32"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x_MK`` along the token dim (128x1 tiles) and return it transposed: (q_KM, s_KMt).

    This is the Wgrad operand: ``dW = dY^T @ X`` reduces over tokens, so both operands need their
    scale tiles along M. With ``s_MKt`` given, ``x_MK`` is the saved e4m3 activation (1x128 tiles) and is
    dequantized first (its scales in either format): DeepSeek-V3's dequantize -> transpose -> re-quantize of the
    cached FP8 activation. The output's scales are in format ``fmt``.
    """
    x = act_dequant_ref(x_MK, s_MKt) if s_MKt is not None else x_MK.float()
    return act_quant_ref(x.t(), fmt)


def weight_quant_ref(w: torch.Tensor, fmt: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``w_NK`` (or stacked experts ``w_ENK``) in 128x128 blocks -> (q, s_[E]NtKt in format ``fmt``)."""
    squeeze = w.dim() == 2
    w_ENK = w.unsqueeze(0) if squeeze else w
    E, N, K = w_ENK.shape
    Nt, Kt = cdiv(N, TILE), cdiv(K, TILE)
    wp = F.pad(w_ENK.float(), (0, Kt * TILE - K, 0, Nt * TILE - N)).view(E, Nt, TILE, Kt, TILE)
    s32_ENtKt, s_ENtKt = scale_from_amax(wp.abs().amax(dim=(2, 4)), fmt)
    q = cast_to_e4m3(wp / s32_ENtKt[:, :, None, :, None]).view(E, Nt * TILE, Kt * TILE)[:, :N, :K].contiguous()
    return (q[0], s_ENtKt[0]) if squeeze else (q, s_ENtKt)


def weight_dequant_ref(q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of ``weight_quant_ref`` for ``[N, K]`` or ``[E, N, K]`` (also on transposed views)."""
    N, K = q.shape[-2:]
    s_full = decode_scale(s).repeat_interleave(TILE, dim=-2).repeat_interleave(TILE, dim=-1)[..., :N, :K]
    return (q.float() * s_full).to(dtype)


def fp8_gemm_nt_ref(
    a_q: torch.Tensor,
    a_s: torch.Tensor,
    b_q: torch.Tensor,
    b_s: torch.Tensor,
    *,
    b_blockwise: bool,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``C_MN = A_MK @ B_NK^T`` on e4m3 inputs; A has 1x128 scales, B 128x128 (``b_blockwise``) or 1x128."""
    a = act_dequant_ref(a_q, a_s)
    b = weight_dequant_ref(b_q, b_s) if b_blockwise else act_dequant_ref(b_q, b_s)
    return (a @ b.t()).to(out_dtype)


def grouped_gemm_nt_ref(
    a_q_MK: torch.Tensor,
    a_s_MKt: torch.Tensor,
    b_q_ENK: torch.Tensor,
    b_s_ENtKt: torch.Tensor,
    offsets_E1: torch.Tensor,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Rows ``offsets[e]:offsets[e+1]`` of A times ``B[e]^T`` (tokens sorted by expert, contiguous)."""
    a_MK = act_dequant_ref(a_q_MK, a_s_MKt)
    b_ENK = weight_dequant_ref(b_q_ENK, b_s_ENtKt)
    out_MN = a_MK.new_zeros(a_MK.shape[0], b_ENK.shape[1])
    bounds = offsets_E1.tolist()
    for e in range(b_ENK.shape[0]):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            out_MN[lo:hi] = a_MK[lo:hi] @ b_ENK[e].t()
    return out_MN.to(out_dtype)


def grouped_wgrad_ref(
    aT_q_NM: torch.Tensor,
    aT_s_NMt: torch.Tensor,
    bT_q_KM: torch.Tensor,
    bT_s_KMt: torch.Tensor,
    offsets_E1: torch.Tensor,
) -> torch.Tensor:
    """Per-expert weight gradient ``dW[e] = dY[seg]^T @ X[seg]`` from token-tiled operands -> fp32 [E, N, K]."""
    aT_NM = act_dequant_ref(aT_q_NM, aT_s_NMt)
    bT_KM = act_dequant_ref(bT_q_KM, bT_s_KMt)
    E = offsets_E1.numel() - 1
    out_ENK = aT_NM.new_zeros(E, aT_NM.shape[0], bT_KM.shape[0])
    bounds = offsets_E1.tolist()
    for e in range(E):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            out_ENK[e] = aT_NM[:, lo:hi] @ bT_KM[:, lo:hi].t()
    return out_ENK
