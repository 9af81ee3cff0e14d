"""Rotary position embedding with YaRN context extension, as DeepSeek-V3 uses it for MLA's decoupled RoPE dims.

RoPE (Su et al., 2021) rotates each pair of dimensions (x_2i, x_2i+1) of a query/key by the angle pos * theta_i,
theta_i = base^(-2i/d), so that q.k depends only on the distance between positions. MLA applies it only to the
qk_rope_head_dim "decoupled" dims (a per-head query part and ONE key shared by all heads); the other
qk_nope_head_dim dims carry no position, which is what lets inference absorb the key up-projection.

YaRN (Peng et al., 2023) extends the context by a factor s (DeepSeek-V3: 4K -> 128K, s = 40) by blending, per
frequency, the original theta_i (high frequencies, which rotate many times within the original context, are kept:
"extrapolation") and theta_i / s (low frequencies are interpolated), with a linear ramp between the dimensions
whose wavelengths complete beta_fast and beta_slow rotations in the original context. It also sharpens attention:
cos/sin are multiplied by mscale(s, mscale)/mscale(s, mscale_all_dim) (1.0 for DeepSeek-V3) and the softmax scale
by mscale(s, mscale_all_dim)^2 (see `ModelConfig.softmax_scale`); mscale(s, m) = 0.1 m ln s + 1.

The formulas and their floating-point order follow transformers' `_compute_yarn_parameters` (rope_theta, factor,
beta_fast, beta_slow, original_max_position_embeddings, truncate) so that our logits match DeepseekV3ForCausalLM.

Pair layout: DeepSeek's release rotates ADJACENT pairs (x0, x1), (x2, x3)... (``rope_interleave=True``); the
GPT-NeoX layout rotates (x_i, x_{i+d/2}). `apply_rope` handles both with one formula: it splits x into the two
members of each pair and returns [x1 cos - x2 sin, x2 cos + x1 sin] (de-interleaved output, as transformers does).
Queries and keys get the same permutation, so q.k is unchanged, and cached keys stay consistent.

Shape legend: B batch, T positions, H heads, R rope dims (qk_rope_head_dim), R2 = R / 2 frequencies.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from model.config import ModelConfig, yarn_mscale


def rope_parameters(cfg: ModelConfig) -> tuple[Tensor, float]:
    """(inv_freq_R2 fp32 on CPU, attention_factor multiplying cos/sin), from rope_theta and rope_scaling."""
    dim, base = cfg.qk_rope_head_dim, float(cfg.rope_theta)
    pos_freqs = base ** (torch.arange(0, dim, 2, device="cpu").to(torch.float) / dim)
    rs = cfg.rope_scaling
    if rs is None or rs.get("type", rs.get("rope_type")) == "default":
        return 1.0 / pos_freqs, 1.0
    factor = float(rs["factor"])
    original_max = rs["original_max_position_embeddings"]
    mscale, mscale_all_dim = rs.get("mscale"), rs.get("mscale_all_dim")
    attention_factor = rs.get("attention_factor")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim))
        else:
            attention_factor = yarn_mscale(factor)
    beta_fast = rs.get("beta_fast") or 32
    beta_slow = rs.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:  # the dim whose wavelength fits num_rotations in original_max
        return (dim * math.log(original_max / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp_R2 = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low), 0, 1)
    extrapolation_R2 = 1 - ramp_R2  # 1 = keep the original frequency (fast dims), 0 = interpolate (slow dims)
    inv_freq_extrapolation = 1.0 / pos_freqs
    inv_freq_interpolation = 1.0 / (factor * pos_freqs)
    inv_freq = inv_freq_interpolation * (1 - extrapolation_R2) + inv_freq_extrapolation * extrapolation_R2
    return inv_freq, float(attention_factor)


class RotaryEmbedding(nn.Module):
    """Maps position ids to (cos, sin) tables. Holds no parameters or buffers: its frequencies are a pure function
    of the config, kept on the CPU and copied per device, so a model built on the meta device needs no re-init."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.inv_freq_R2, self.attention_factor = rope_parameters(cfg)
        self._on_device: dict[torch.device, Tensor] = {}

    def forward(self, position_ids_BT: Tensor) -> tuple[Tensor, Tensor]:
        """fp32 (cos_BTR2, sin_BTR2) for the given integer positions."""
        dev = position_ids_BT.device
        inv_freq = self._on_device.get(dev)
        if inv_freq is None:
            inv_freq = self._on_device[dev] = self.inv_freq_R2.to(dev)
        freqs_BTR2 = position_ids_BT[..., None].float() * inv_freq
        return freqs_BTR2.cos() * self.attention_factor, freqs_BTR2.sin() * self.attention_factor


def apply_rope(x_BTHR: Tensor, cos_BTR2: Tensor, sin_BTR2: Tensor, interleave: bool = True) -> Tensor:
    """Rotate the pairs of x's last dim (adjacent pairs if interleave, else halves); computed in fp32."""
    x = x_BTHR if x_BTHR.dtype == torch.float32 else x_BTHR.float()
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos_BTR2.unsqueeze(-2), sin_BTR2.unsqueeze(-2)  # broadcast over heads
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out if out.dtype == x_BTHR.dtype else out.to(x_BTHR.dtype)
