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
(q/k head dim nope+rope = 192, v head dim 128: the values are zero-padded to 192 so that SDPA's fused flash kernel
runs; without equal widths it falls back to its unfused math path). Prefill uses it too. On the CPU, causal
attention without padding runs as batched matmuls by query blocks instead (`causal_attention_blocked`): no padded
values, the fully masked key blocks skipped, and a cheaper backward than the CPU flash kernel's.

Inference path (`_forward_absorbed`, with a cache, once positions are cached): absorb W_UK into the query and W_UV
into the output, and attend directly over the cached latents:
    score_i(t, s) = (W_UK_i^T q^C_i,t) . c_KV,s + q^R_i,t . k^R_s
    o_i,t = W_UV_i (sum_s p_i(t, s) c_KV,s)
which costs O(C) per cached token and head and reads only the (C + R)-wide cache: the memory-bound decode step
moves 57x fewer bytes than a multi-head cache would. All heads and query positions share the same keys, so it runs
as ONE single-head SDPA over the cache rows [c_KV ; k^R] with T * H queries [W_UK^T q^C ; q^R]. W_UK is folded into
the query projection's weight and W_UV into o_proj's when both are plain nn.Linear (`MLA.absorbed_weights`, once
per generate call by `absorbed_weights_cached`), so a decode step runs no per-head einsum on its activations.
Which path a cached forward takes is a cost rule (`MLA.absorbed_is_cheaper`): absorbed for decoding, speculative
verification and short chunks, expanded for a prefill. The two paths are equal in exact arithmetic; the tests check
it in fp32.

The softmax scale is 1/sqrt(qk_nope + qk_rope) times YaRN's mscale^2 (`ModelConfig.softmax_scale`).

Shape legend: B batch, T query positions, S key positions, D hidden, H heads, C kv_lora_rank, R qk_rope_head_dim,
K qk_nope_head_dim, V v_head_dim, Q = K + R, X = C + R (a cache row), N = T * H (absorbed queries).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.cache import LayerCache, MLACache
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
    if attention_mask_BS is not None and attention_mask_BS.shape[1] != S:
        raise ValueError(f"attention_mask_BT covers {attention_mask_BS.shape[1]} positions, expected {S} (cached+new)")
    if attention_mask_BS is not None and T == 1:  # one query (a decode step): every real key, and itself
        allowed_BS = attention_mask_BS.bool().clone()
        allowed_BS[:, -1] = True
        return allowed_BS[:, None, None, :]
    q_pos_T1 = torch.arange(past, S, device=device)[:, None]
    k_pos_1S = torch.arange(S, device=device)[None, :]
    allowed_TS = k_pos_1S <= q_pos_T1
    if attention_mask_BS is None:
        return allowed_TS[None, None]
    allowed_BTS = allowed_TS[None] & attention_mask_BS.bool()[:, None, :]
    allowed_BTS = allowed_BTS | (k_pos_1S == q_pos_T1)[None]
    return allowed_BTS[:, None]


@contextmanager
def absorbed_weights_cached(model: nn.Module) -> Iterator[None]:
    """Within the block, every MLA layer of `model` that folds its projections computes the folded weights once (in
    its first absorbed forward) instead of per forward: for a generate call, whose weights cannot change while it
    runs (nothing is kept past the block)."""
    layers = [m for m in model.modules() if isinstance(m, MLA)]
    try:
        for layer in layers:  # filled by the first absorbed forward (inside it, where FSDP has gathered the weights)
            layer._absorbed = []
        yield
    finally:
        for layer in layers:
            layer._absorbed = None


def causal_attention_blocked(q_BHTQ: Tensor, k_BHTQ: Tensor, v_BHTV: Tensor, scale: float, n_blocks: int = 2) -> Tensor:
    """Causal attention [B, H, T, V] as batched matmuls and a softmax, by query blocks that skip the masked keys.

    The CPU training/prefill path: torch's CPU flash kernel wants equal q/k and v widths (MLA's values are narrower,
    so they would be padded) and its backward is slower than autograd through `bmm` at these head widths. Query
    block i (of `n_blocks` near-equal blocks) attends only to keys 0 .. end of block i, so the fully masked upper-right
    blocks are never computed (about a quarter of the scores with two blocks), and the values keep their width.
    Scores and softmax in the inputs' dtype, as transformers' eager attention."""
    B, H, T, Q = q_BHTQ.shape
    V = v_BHTV.shape[-1]
    q_NTQ, k_NTQ, v_NTV = (x.reshape(B * H, T, x.shape[-1]) for x in (q_BHTQ, k_BHTQ, v_BHTV))
    pos_T = torch.arange(T, device=q_BHTQ.device)
    causal_TT = torch.zeros(T, T, dtype=q_BHTQ.dtype, device=q_BHTQ.device)
    causal_TT.masked_fill_(pos_T[None, :] > pos_T[:, None], float("-inf"))
    edges = sorted({T * i // n_blocks for i in range(n_blocks + 1)})  # block bounds (fewer blocks when T is small)
    outs = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        scores_NcS = torch.baddbmm(causal_TT[lo:hi, :hi], q_NTQ[:, lo:hi], k_NTQ[:, :hi].transpose(1, 2), alpha=scale)
        outs.append(torch.bmm(scores_NcS.softmax(dim=-1), v_NTV[:, :hi]))
    o_NTV = torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]
    return o_NTV.view(B, H, T, V)


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
        self._absorbed: list[tuple[Tensor, Tensor]] | None = None  # a cache only inside `absorbed_weights_cached`

    def forward(
        self,
        x_BTD: Tensor,
        rope_cos_sin: tuple[Tensor, Tensor],
        mask_B1TS: Tensor | None = None,
        cache: MLACache | LayerCache | None = None,
    ) -> Tensor:
        """Attention output [B, T, D]. mask_B1TS from `build_attention_mask` (None = causal, no padding); `cache`:
        the model's MLACache or this layer's view of it (what `DeepseekV3` passes)."""
        B, T, _ = x_BTD.shape
        H, K, R, C = self.n_heads, self.qk_nope_head_dim, self.qk_rope_head_dim, self.kv_lora_rank
        cos_BTR2, sin_BTR2 = rope_cos_sin
        if isinstance(cache, MLACache):
            cache = cache.layer(self.layer_idx)
        # decode, speculative verification, short chunks: attend over the cached latents (see absorbed_is_cheaper)
        absorbed = cache is not None and cache.seq_len > 0 and self.absorbed_is_cheaper(T, cache.seq_len + T)
        q_in = x_BTD if self.q_lora_rank is None else self.q_a_layernorm(self.q_a_proj(x_BTD))
        folded = absorbed and self.folds_projections()
        if folded:  # W_UK folded into the query projection: the latent query [W_UK^T q^C ; q^R] in one matmul
            w_q_absorbed, w_o_absorbed = self.absorbed_weights()
            q_latent_BTHC, q_rope_BTHR = F.linear(q_in, w_q_absorbed).view(B, T, H, C + R).split([C, R], dim=-1)
        else:
            q = self.q_proj(q_in) if self.q_lora_rank is None else self.q_b_proj(q_in)
            q_nope_BTHK, q_rope_BTHR = q.view(B, T, H, K + R).split([K, R], dim=-1)
            if absorbed:  # a swapped-in projection (FP8) keeps its own GEMM: absorb W_UK into the activations
                q_latent_BTHC = torch.einsum("bthk,hkc->bthc", q_nope_BTHK, self._w_uk_uv()[0])
        latent_BTC, k_rope_BTR = self.kv_a_proj_with_mqa(x_BTD).split([C, R], dim=-1)
        latent_BTC = self.kv_a_layernorm(latent_BTC)
        # one rotation for the H query heads and the shared key (as an extra head): the same elementwise ops
        rope_BTH1R = apply_rope(
            torch.cat([q_rope_BTHR, k_rope_BTR.unsqueeze(2)], 2), cos_BTR2, sin_BTR2, self.rope_interleave
        )
        q_rope_BTHR, k_rope_BT1R = rope_BTH1R.split([H, 1], dim=2)
        k_rope_BTR = k_rope_BT1R.squeeze(2)

        if cache is None:
            o_BTHV = self._forward_full(q_nope_BTHK, q_rope_BTHR, latent_BTC, k_rope_BTR, mask_B1TS)
        else:
            kv_BSX = cache.update(latent_BTC, k_rope_BTR)
            if kv_BSX.dtype != q_rope_BTHR.dtype:  # a cache kept in another dtype than the activations
                kv_BSX = kv_BSX.to(q_rope_BTHR.dtype)
            S = kv_BSX.shape[1]
            if mask_B1TS is None and S != T:  # causal, aligned to the end of the cached history
                mask_B1TS = torch.ones(T, S, dtype=torch.bool, device=x_BTD.device).tril(S - T)[None, None]
            if absorbed:
                o_latent_BTHC = self._forward_absorbed(q_latent_BTHC, q_rope_BTHR, kv_BSX, mask_B1TS)
                if folded:  # W_UV folded into the output projection: it takes the latent outputs directly
                    return F.linear(o_latent_BTHC.reshape(B, T, H * C), w_o_absorbed, self.o_proj.bias)
                o_BTHV = torch.einsum("bthc,hvc->bthv", o_latent_BTHC, self._w_uk_uv()[1])
            else:  # prefill: expanding keys/values once beats the absorbed path's [T, S] latent scores
                latent_BSC, k_rope_BSR = kv_BSX.split([C, R], dim=-1)
                o_BTHV = self._forward_full(q_nope_BTHK, q_rope_BTHR, latent_BSC, k_rope_BSR, mask_B1TS)
        return self.o_proj(o_BTHV.reshape(B, T, H * self.v_head_dim))

    def folds_projections(self) -> bool:
        """Whether the absorbed path folds W_UK and W_UV into the query and output projections' weights: when both
        are plain `nn.Linear` (an FP8 projection, `kernels.fp8_linear.FP8Linear`, keeps its GEMM) and the folded
        projections take no more multiply-adds per token than projecting and then absorbing. That holds for small
        latents (the tiny presets: C <= V); DeepSeek-V3's C = 512 > V = 128 would make the folded o_proj 4x o_proj's
        size, so it absorbs into the activations (as DeepSeek's own inference code does)."""
        q_linear = self.q_proj if self.q_lora_rank is None else self.q_b_proj
        if type(q_linear) is not nn.Linear or type(self.o_proj) is not nn.Linear:
            return False
        H, K, R, C, V = self.n_heads, self.qk_nope_head_dim, self.qk_rope_head_dim, self.kv_lora_rank, self.v_head_dim
        I, D = q_linear.in_features, self.o_proj.out_features
        folded = H * (C + R) * I + D * H * C
        unfolded = H * (K + R) * I + H * K * C + H * C * V + D * H * V
        return folded <= unfolded

    def _w_uk_uv(self) -> tuple[Tensor, Tensor]:
        """(W_UK [H, K, C], W_UV [H, V, C]): views of kv_b_proj's weight."""
        H, K, V = self.n_heads, self.qk_nope_head_dim, self.v_head_dim
        return self.kv_b_proj.weight.view(H, K + V, self.kv_lora_rank).split([K, V], dim=1)

    def absorbed_weights(self) -> tuple[Tensor, Tensor]:
        """(w_q [H * (C + R), q_lora_rank or D], w_o [D, H * C]): the query projection with W_UK folded into its
        per-head nope rows (they give W_UK^T q^C, the latent query, directly; the rope rows are kept), and o_proj with
        W_UV folded in (it maps the per-head latent outputs). Products of the weights only: `absorbed_weights_cached`
        computes them once for a whole generate call; without it every absorbed forward recomputes them."""
        if self._absorbed:
            return self._absorbed[0]
        H, K, R, C, V = self.n_heads, self.qk_nope_head_dim, self.qk_rope_head_dim, self.kv_lora_rank, self.v_head_dim
        w_uk_HKC, w_uv_HVC = self._w_uk_uv()
        w_q_HQI = (self.q_proj if self.q_lora_rank is None else self.q_b_proj).weight.view(H, K + R, -1)
        w_nope_HKI, w_rope_HRI = w_q_HQI.split([K, R], dim=1)
        with torch.autocast(w_q_HQI.device.type, enabled=False):  # folded in the weights' dtype (fp32 masters)
            w_q = torch.cat([w_uk_HKC.transpose(1, 2) @ w_nope_HKI, w_rope_HRI], dim=1).reshape(H * (C + R), -1)
            w_o_DHV = self.o_proj.weight.view(-1, H, V)
            w_o = torch.einsum("dhv,hvc->dhc", w_o_DHV, w_uv_HVC).reshape(w_o_DHV.shape[0], H * C)
        if self._absorbed is not None:
            self._absorbed.append((w_q, w_o))
        return w_q, w_o

    def absorbed_is_cheaper(self, T: int, S: int) -> bool:
        """Whether T queries over S cached positions cost fewer multiply-adds (per row and head) on the absorbed path
        (scores and values over the C + R cached channels, plus absorbing W_UK and W_UV) than by expanding the S
        latents into keys and values (kv_b_proj over S positions, then attention over K + R and V channels)."""
        C, K, R, V = self.kv_lora_rank, self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim
        expand = S * C * (K + V) + T * S * (K + R + V)
        absorbed = T * C * (K + V) + 2 * T * S * (C + R)
        return absorbed < expand

    def _forward_full(
        self, q_nope_BTHK: Tensor, q_rope_BTHR: Tensor, latent_BSC: Tensor, k_rope_BSR: Tensor, mask_B1TS: Tensor | None
    ) -> Tensor:
        """Training path: materialize per-head keys/values from the latent and run SDPA.

        The values are zero-padded from V to the query/key width K + R: SDPA's fused (flash) kernels want one head
        width, and without them it falls back to its unfused math path (several times slower on CPU, as on GPU).
        The padded channels of the output are zero and sliced off; the rest is the same attention."""
        B, S, _ = latent_BSC.shape
        H, K, R, V = self.n_heads, self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim
        kv_BSHKV = self.kv_b_proj(latent_BSC).view(B, S, H, K + V)
        k_nope_BSHK, v_BSHV = kv_BSHKV.split([K, V], dim=-1)
        # concatenated head-major ([B, H, S, Q] contiguous): batched matmuls over B * H need no further copy
        k_BHSQ = torch.cat([k_nope_BSHK.transpose(1, 2), k_rope_BSR[:, None].expand(B, H, S, R)], dim=-1)
        q_BHTQ = torch.cat([q_nope_BTHK.transpose(1, 2), q_rope_BTHR.transpose(1, 2)], dim=-1)
        v_BHSV = v_BSHV.transpose(1, 2)
        if mask_B1TS is None and q_BHTQ.device.type == "cpu" and not (self.training and self.dropout > 0):
            return causal_attention_blocked(q_BHTQ, k_BHSQ, v_BHSV, self.softmax_scale).transpose(1, 2)
        if V < K + R:
            v_BHSV = F.pad(v_BHSV, (0, K + R - V))
        o_BHTV = F.scaled_dot_product_attention(
            q_BHTQ,
            k_BHSQ,
            v_BHSV,
            attn_mask=mask_B1TS,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=mask_B1TS is None,
            scale=self.softmax_scale,
        )
        return o_BHTV[..., :V].transpose(1, 2)

    def _forward_absorbed(
        self, q_latent_BTHC: Tensor, q_rope_BTHR: Tensor, kv_BSX: Tensor, mask_B1TS: Tensor
    ) -> Tensor:
        """Inference path: attend over the cached latents directly; returns the latent outputs [B, T, H, C].

        The queries come already absorbed (W_UK^T q^C, from `absorbed_weights`' query projection); W_UV is applied
        by the absorbed output projection. Every head and query position attends over the same S cached
        [latent ; rope key] rows, so they form one single-head attention with T * H queries (SDPA's fused kernel):
        keys = the cache rows, values = the same rows (their last R channels come out as extra output channels,
        dropped), scale as in training."""
        B, T, H, C = q_latent_BTHC.shape
        X, S = kv_BSX.shape[-1], kv_BSX.shape[1]
        q_B1NX = torch.cat([q_latent_BTHC, q_rope_BTHR], dim=-1).view(B, 1, T * H, X)  # N = T * H queries
        if T > 1:  # each query position's mask row, repeated for its H heads
            Bm = mask_B1TS.shape[0]
            mask_B1TS = mask_B1TS[:, :, :, None, :].expand(Bm, 1, T, H, S).reshape(Bm, 1, T * H, S)
        kv_B1SX = kv_BSX.unsqueeze(1)
        o_B1NX = F.scaled_dot_product_attention(q_B1NX, kv_B1SX, kv_B1SX, attn_mask=mask_B1TS, scale=self.softmax_scale)
        return o_B1NX[..., :C].reshape(B, T, H, C)
