"""Multi-head Latent Attention (MLA, DeepSeek-V2 section 2.1; DeepSeek-V3 section 2.1.1).

MLA shrinks the KV cache by storing one small latent per token instead of per-head keys and values:

    c_KV = RMSNorm(W_DKV h)                       kv_lora_rank dims, cached       (kv_a_proj_with_mqa, kv_a_layernorm)
    k^R  = RoPE(W_KR h)                           qk_rope_head_dim dims, cached, ONE key shared by all heads
    [k^C_i ; v_i] = W_UKV_i c_KV                  per head i, never cached        (kv_b_proj)
    c_Q  = RMSNorm(W_DQ h);  [q^C_i ; q^R_i] = W_UQ_i c_Q, q^R_i = RoPE(q^R_i)    (q_a_proj, q_a_layernorm, q_b_proj;
                                                  a single q_proj when q_lora_rank is None, as in V2-Lite)
    o_i  = softmax(([q^C_i; q^R_i] . [k^C_i; k^R]) * scale) v_i;  out = W_O [o_1..o_H]               (o_proj)

Why RoPE is "decoupled": if the position-dependent rotation touched k^C_i = W_UK_i c_KV, the product
q^C_i . k^C_i = (W_UK_i^T q^C_i) . c_KV could not be precomputed per query, because a rotation would sit between
W_UK_i and c_KV. Keeping position in the separate, shared k^R leaves the content part linear in c_KV, so:

Training path (`_forward_full`): expand keys and values for all heads and run `F.scaled_dot_product_attention`
(q/k head dim nope+rope = 192 and v head dim 128 differ; SDPA allows it).

Inference path (`_forward_absorbed`, used whenever a cache is given): absorb W_UK into the query and W_UV into the
output, and attend directly over the cached latents:
    score_i(t, s) = (W_UK_i^T q^C_i,t) . c_KV,s + q^R_i,t . k^R_s
    o_i,t = W_UV_i (sum_s p_i(t, s) c_KV,s)
which costs O(C) per cached token and head and reads only the (C + R)-wide cache: the memory-bound decode step
moves 57x fewer bytes than a multi-head cache would. The two paths are equal in exact arithmetic; the tests
check it in fp32.

The softmax scale is 1/sqrt(qk_nope + qk_rope) times YaRN's mscale^2 (`ModelConfig.softmax_scale`).

Shape legend: B batch, T query positions, S key positions, D hidden, H heads, C kv_lora_rank, R qk_rope_head_dim,
K qk_nope_head_dim, V v_head_dim, Q = K + R.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.cache import MLACache
from model.config import ModelConfig
from model.norm import RMSNorm
from model.rope import apply_rope


def build_attention_mask(attention_mask_BS: Tensor | None, T: int, past: int, device: torch.device) -> Tensor | None:
    """Boolean [B or 1, 1, T, S] mask (True = may attend) for T queries after `past` cached positions, or None
    for plain causal attention without a cache (SDPA's fast is_causal path).

    attention_mask_BS (True = real token) covers all S = past + T key positions. A query whose causal window holds
    only padding (a left-pad position itself) is allowed to see itself so its softmax stays finite; its output is
    never used (its targets are ignored and no real token attends to it).
    """
    S = past + T
    if attention_mask_BS is None and past == 0:
        return None
    q_pos_T1 = torch.arange(past, S, device=device)[:, None]
    k_pos_1S = torch.arange(S, device=device)[None, :]
    allowed_TS = k_pos_1S <= q_pos_T1
    if attention_mask_BS is None:
        return allowed_TS[None, None]
    if attention_mask_BS.shape[1] != S:
        raise ValueError(f"attention_mask_BT covers {attention_mask_BS.shape[1]} positions, expected {S} (cached+new)")
    allowed_BTS = allowed_TS[None] & attention_mask_BS.bool()[:, None, :]
    allowed_BTS = allowed_BTS | (k_pos_1S == q_pos_T1)[None]
    return allowed_BTS[:, None]


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = cfg.num_attention_heads
        self.q_lora_rank = cfg.q_lora_rank
        self.kv_lora_rank = cfg.kv_lora_rank
        self.qk_nope_head_dim = cfg.qk_nope_head_dim
        self.qk_rope_head_dim = cfg.qk_rope_head_dim
        self.v_head_dim = cfg.v_head_dim
        self.softmax_scale = cfg.softmax_scale
        self.rope_interleave = cfg.rope_interleave
        self.dropout = cfg.attention_dropout
        D, H, Q = cfg.hidden_size, cfg.num_attention_heads, cfg.qk_head_dim
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(D, H * Q, bias=False)
        else:
            self.q_a_proj = nn.Linear(D, cfg.q_lora_rank, bias=cfg.attention_bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, eps=cfg.rms_norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * Q, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=cfg.attention_bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, eps=cfg.rms_norm_eps)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, H * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(H * cfg.v_head_dim, D, bias=cfg.attention_bias)

    def forward(
        self,
        x_BTD: Tensor,
        rope_cos_sin: tuple[Tensor, Tensor],
        mask_B1TS: Tensor | None = None,
        cache: MLACache | None = None,
    ) -> Tensor:
        """Attention output [B, T, D]. mask_B1TS from `build_attention_mask` (None = causal, no padding)."""
        B, T, _ = x_BTD.shape
        cos_BTR2, sin_BTR2 = rope_cos_sin
        if self.q_lora_rank is None:
            q = self.q_proj(x_BTD)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BTD)))
        q_BTHQ = q.view(B, T, self.n_heads, self.qk_nope_head_dim + self.qk_rope_head_dim)
        q_nope_BTHK, q_rope_BTHR = q_BTHQ.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        q_rope_BTHR = apply_rope(q_rope_BTHR, cos_BTR2, sin_BTR2, self.rope_interleave)

        latent_BTC, k_rope_BTR = self.kv_a_proj_with_mqa(x_BTD).split([self.kv_lora_rank, self.qk_rope_head_dim], -1)
        latent_BTC = self.kv_a_layernorm(latent_BTC)
        k_rope_BTR = apply_rope(k_rope_BTR.unsqueeze(2), cos_BTR2, sin_BTR2, self.rope_interleave).squeeze(2)

        if cache is None:
            o_BTHV = self._forward_full(q_nope_BTHK, q_rope_BTHR, latent_BTC, k_rope_BTR, mask_B1TS)
        else:
            latent_BSC, k_rope_BSR = cache.update(self.layer_idx, latent_BTC, k_rope_BTR)
            if T > 1:  # prefill: expanding keys/values once beats the absorbed path's [T, S] latent scores
                S = latent_BSC.shape[1]
                if mask_B1TS is None and S != T:  # causal, aligned to the end of the cached history
                    mask_B1TS = torch.ones(T, S, dtype=torch.bool, device=x_BTD.device).tril(S - T)[None, None]
                dtype = q_nope_BTHK.dtype
                latent_BSC, k_rope_BSR = latent_BSC.to(dtype), k_rope_BSR.to(dtype)
                o_BTHV = self._forward_full(q_nope_BTHK, q_rope_BTHR, latent_BSC, k_rope_BSR, mask_B1TS)
            else:  # decode: attend over the cached latents directly, never re-expanding them
                o_BTHV = self._forward_absorbed(q_nope_BTHK, q_rope_BTHR, latent_BSC, k_rope_BSR, mask_B1TS)
        return self.o_proj(o_BTHV.reshape(B, T, self.n_heads * self.v_head_dim))

    def _forward_full(
        self, q_nope_BTHK: Tensor, q_rope_BTHR: Tensor, latent_BSC: Tensor, k_rope_BSR: Tensor, mask_B1TS: Tensor | None
    ) -> Tensor:
        """Training path: materialize per-head keys/values from the latent and run SDPA."""
        B, S, _ = latent_BSC.shape
        H, K, R = self.n_heads, self.qk_nope_head_dim, self.qk_rope_head_dim
        kv_BSHKV = self.kv_b_proj(latent_BSC).view(B, S, H, K + self.v_head_dim)
        k_nope_BSHK, v_BSHV = kv_BSHKV.split([K, self.v_head_dim], dim=-1)
        k_BHSQ = torch.cat([k_nope_BSHK, k_rope_BSR[:, :, None, :].expand(B, S, H, R)], dim=-1).transpose(1, 2)
        q_BHTQ = torch.cat([q_nope_BTHK, q_rope_BTHR], dim=-1).transpose(1, 2)
        o_BHTV = F.scaled_dot_product_attention(
            q_BHTQ,
            k_BHSQ,
            v_BSHV.transpose(1, 2),
            attn_mask=mask_B1TS,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=mask_B1TS is None,
            scale=self.softmax_scale,
        )
        return o_BHTV.transpose(1, 2)

    def _forward_absorbed(
        self, q_nope_BTHK: Tensor, q_rope_BTHR: Tensor, latent_BSC: Tensor, k_rope_BSR: Tensor, mask_B1TS: Tensor | None
    ) -> Tensor:
        """Inference path: absorb kv_b_proj into query and output; attend over the cached latents directly."""
        H, K = self.n_heads, self.qk_nope_head_dim
        latent_BSC, k_rope_BSR = latent_BSC.to(q_nope_BTHK.dtype), k_rope_BSR.to(q_nope_BTHK.dtype)
        w_HKVC = self.kv_b_proj.weight.view(H, K + self.v_head_dim, self.kv_lora_rank)
        w_uk_HKC, w_uv_HVC = w_HKVC.split([K, self.v_head_dim], dim=1)
        q_latent_BTHC = torch.einsum("bthk,hkc->bthc", q_nope_BTHK, w_uk_HKC)
        scores_BHTS = torch.einsum("bthc,bsc->bhts", q_latent_BTHC, latent_BSC)
        scores_BHTS = scores_BHTS + torch.einsum("bthr,bsr->bhts", q_rope_BTHR, k_rope_BSR)
        scores_BHTS = scores_BHTS.float() * self.softmax_scale
        if mask_B1TS is None:  # no cache history and no padding: plain causal
            T, S = scores_BHTS.shape[-2:]
            mask_B1TS = torch.ones(T, S, dtype=torch.bool, device=scores_BHTS.device).tril(S - T)[None, None]
        probs_BHTS = scores_BHTS.masked_fill(~mask_B1TS, float("-inf")).softmax(dim=-1).to(latent_BSC.dtype)
        o_latent_BTHC = torch.einsum("bhts,bsc->bthc", probs_BHTS, latent_BSC)
        return torch.einsum("bthc,hvc->bthv", o_latent_BTHC, w_uv_HVC)
