"""MLA, RoPE/YaRN and the latent cache, against transformers' DeepseekV3 (a reference nobody here wrote).

Tolerances (fp32): 1e-5 absolute on attention outputs of magnitude ~1; the absorbed inference path vs the training
path: 1e-4 on logits (a different association order of the same sums).
"""

import dataclasses

import pytest
import torch
from transformers import DeepseekV3Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf

from model.attention import MLA, absorbed_weights_cached, build_attention_mask, causal_attention_blocked
from model.cache import MLACache
from model.config import ModelConfig
from model.norm import RMSNorm
from model.rope import RotaryEmbedding, apply_rope, rope_parameters


def small_cfg(**kw) -> ModelConfig:
    base = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=48,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=24,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=1,
        num_nextn_predict_layers=1,
        max_position_embeddings=512,
        rope_scaling={
            "type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 128,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 0.8,
        },
    )
    base.update(kw)
    return ModelConfig(**base).validate()


def report(a, b):
    d = (a - b).abs()
    return f"max err {d.max().item():.3e}, mean err {d.mean().item():.3e}"


@pytest.mark.parametrize("rope_scaling", ["v3", "v2lite", "attention_factor", None])
def test_rope_frequencies_match_transformers_bitwise(rope_scaling):
    scalings = {
        "v3": ModelConfig().rope_scaling,
        "v2lite": {**ModelConfig().rope_scaling, "mscale": 0.707, "mscale_all_dim": 0.707},
        "attention_factor": {**ModelConfig().rope_scaling, "mscale": 1.0, "mscale_all_dim": 0.5},
        None: None,
    }
    cfg = dataclasses.replace(ModelConfig(), rope_scaling=scalings[rope_scaling])
    hf_cfg = DeepseekV3Config(**cfg.to_hf())
    kind = hf_cfg.rope_parameters["rope_type"]
    if kind == "default":
        ref_inv, ref_factor = hf.DeepseekV3RotaryEmbedding.compute_default_rope_parameters(hf_cfg)
    else:
        ref_inv, ref_factor = ROPE_INIT_FUNCTIONS[kind](hf_cfg)
    inv, factor = rope_parameters(cfg)
    assert torch.equal(inv, ref_inv) and factor == ref_factor
    # and the softmax scale transformers' attention uses
    assert cfg.softmax_scale == pytest.approx(hf.yarn_apply_mscale(hf_cfg.rope_parameters, cfg.qk_head_dim**-0.5))
    # cos/sin tables for arbitrary positions
    pos = torch.tensor([[0, 5, 4095, 100000]])
    cos, sin = RotaryEmbedding(cfg)(pos)
    ref_cos, ref_sin = hf.DeepseekV3RotaryEmbedding(hf_cfg)(torch.zeros(1, dtype=torch.float32), pos)
    assert torch.equal(torch.cat([cos, cos], -1), ref_cos) and torch.equal(torch.cat([sin, sin], -1), ref_sin)


@pytest.mark.parametrize("interleave", [True, False])
def test_apply_rope_matches_transformers(interleave):
    torch.manual_seed(0)
    cfg = small_cfg()
    q, k = torch.randn(2, 4, 7, 8), torch.randn(2, 1, 7, 8)  # transformers' [B, H, T, R]
    pos = torch.arange(7)[None].expand(2, 7)
    cos, sin = RotaryEmbedding(cfg)(pos)
    fn = hf.apply_rotary_pos_emb_interleave if interleave else hf.apply_rotary_pos_emb
    ref_q, ref_k = fn(q, k, torch.cat([cos, cos], -1), torch.cat([sin, sin], -1))
    ours_q = apply_rope(q.transpose(1, 2), cos, sin, interleave).transpose(1, 2)
    ours_k = apply_rope(k.transpose(1, 2), cos, sin, interleave).transpose(1, 2)
    assert torch.equal(ours_q, ref_q) and torch.equal(ours_k, ref_k)
    # a rotation scaled by YaRN's attention factor (mscale 1.0 / mscale_all_dim 0.8 here: != 1)
    factor = RotaryEmbedding(cfg).attention_factor
    assert factor != 1.0
    assert torch.allclose(ours_q.norm(dim=-1), q.norm(dim=-1) * factor, atol=1e-5)


def hf_attention(cfg: ModelConfig, ours: MLA, interleave: bool) -> hf.DeepseekV3Attention:
    hf_cfg = DeepseekV3Config(**cfg.to_hf())
    assert hf_cfg.rope_interleave == interleave
    hf_cfg._attn_implementation = "eager"
    ref = hf.DeepseekV3Attention(hf_cfg, layer_idx=0)
    missing, unexpected = ref.load_state_dict(ours.state_dict(), strict=True)
    assert not missing and not unexpected
    return ref.eval(), hf_cfg


@pytest.mark.parametrize("q_lora_rank", [48, None])
@pytest.mark.parametrize("interleave", [True, False])
def test_mla_matches_transformers(q_lora_rank, interleave):
    torch.manual_seed(0)
    cfg = small_cfg(q_lora_rank=q_lora_rank, rope_interleave=interleave)
    ours = MLA(cfg, layer_idx=0).eval()
    for p in ours.parameters():
        torch.nn.init.normal_(p, std=0.2)
    ref, hf_cfg = hf_attention(cfg, ours, interleave)
    B, T = 2, 11
    x = torch.randn(B, T, cfg.hidden_size)
    pos = torch.arange(T)[None].expand(B, T) + 200  # beyond original_max_position_embeddings: YaRN matters
    causal = torch.full((T, T), float("-inf")).triu(1)[None, None]
    ref_out, _ = ref(x, hf.DeepseekV3RotaryEmbedding(hf_cfg)(x, pos), causal)
    out = ours(x, RotaryEmbedding(cfg)(pos))
    assert torch.allclose(out, ref_out, atol=1e-5, rtol=0), report(out, ref_out)


def test_absorbed_cache_path_matches_full_attention():
    """Prefill a prefix into the latent cache, decode the rest one token at a time: same outputs as one pass."""
    torch.manual_seed(0)
    cfg = small_cfg()
    mla = MLA(cfg, layer_idx=0).eval()
    for p in mla.parameters():
        torch.nn.init.normal_(p, std=0.2)
    B, T, P = 3, 9, 5
    x = torch.randn(B, T, cfg.hidden_size)
    rope = RotaryEmbedding(cfg)
    pos = torch.arange(T)[None].expand(B, T)
    full = mla(x, rope(pos))
    cache = MLACache(1, B, T, cfg.kv_lora_rank, cfg.qk_rope_head_dim, dtype=torch.float32)
    outs = [mla(x[:, :P], rope(pos[:, :P]), build_attention_mask(None, P, 0, x.device), cache)]
    cache.advance(P)
    for t in range(P, T):
        outs.append(mla(x[:, t : t + 1], rope(pos[:, t : t + 1]), build_attention_mask(None, 1, t, x.device), cache))
        cache.advance(1)
    inc = torch.cat(outs, dim=1)
    assert torch.allclose(inc, full, atol=1e-4, rtol=0), report(inc, full)
    assert cache.seq_len == T
    # the cache holds exactly the latent and rope key, nothing per head
    assert cache.bytes_per_token == (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4


def test_attention_mask_left_padding():
    m = build_attention_mask(torch.tensor([[False, False, True, True], [True, True, True, True]]), 4, 0, "cpu")
    assert m.shape == (2, 1, 4, 4)
    # row 0: pads see only themselves; real tokens see real tokens up to themselves
    assert m[0, 0].tolist() == [
        [True, False, False, False],
        [False, True, False, False],
        [False, False, True, False],
        [False, False, True, True],
    ]
    assert torch.equal(m[1, 0], torch.ones(4, 4, dtype=torch.bool).tril())
    assert build_attention_mask(None, 4, 0, "cpu") is None
    with pytest.raises(ValueError, match="attention_mask_BT covers 3"):
        build_attention_mask(torch.ones(1, 3, dtype=torch.bool), 2, 2, "cpu")


@pytest.mark.parametrize("last_is_real", [True, False])
def test_decode_step_mask_is_the_last_row_of_the_full_mask(last_is_real):
    """One new query after a cache (the decode shortcut) gets the last query row of the general rule's mask, and
    the caller's mask is left unchanged."""
    mask_BS = torch.tensor([[False, True, True, last_is_real], [True, True, False, last_is_real]])
    before = mask_BS.clone()
    step = build_attention_mask(mask_BS, 1, 3, "cpu")
    full = build_attention_mask(mask_BS, 4, 0, "cpu")
    assert step.shape == (2, 1, 1, 4) and torch.equal(step[:, :, 0], full[:, :, -1])
    assert torch.equal(mask_BS, before)


def test_cache_repeat_interleave_and_overflow():
    cache = MLACache(2, 2, 4, 3, 2, dtype=torch.float32)
    c = torch.arange(2 * 2 * 3, dtype=torch.float32).view(2, 2, 3)
    k = torch.ones(2, 2, 2)
    for layer in range(2):
        cache.update(layer, c, k)
    cache.advance(2)
    cache.repeat_interleave(3)
    assert cache.batch_size == 6 and cache.seq_len == 2
    assert torch.equal(cache.latent[1][:3, :2], c[0].expand(3, 2, 3))
    assert torch.equal(cache.latent[0][3:, :2], c[1].expand(3, 2, 3))
    with pytest.raises(ValueError, match="overflow"):
        cache.update(0, torch.zeros(6, 3, 3), torch.zeros(6, 3, 2))
    assert MLACache(61, 1, 1, 512, 64).bytes_per_token == 61 * 576 * 2  # DeepSeek-V3, bf16


def test_verify_chunks_take_the_absorbed_path_and_match_full_attention():
    """Two new positions after a cached prefix (speculative verification), with a padded row: the absorbed path
    (one SDPA over the merged latent + rope cache, T * H queries) equals the training path on the whole sequence."""
    torch.manual_seed(0)
    cfg = small_cfg()
    mla = MLA(cfg, layer_idx=0).eval()
    for p in mla.parameters():
        torch.nn.init.normal_(p, std=0.2)
    B, T, P = 2, 9, 5
    x = torch.randn(B, T, cfg.hidden_size)
    mask_BS = torch.ones(B, T, dtype=torch.bool)
    mask_BS[1, :2] = False  # row 1 is left-padded by two positions
    pos = (mask_BS.long().cumsum(-1) - 1).clamp(min=0)
    rope = RotaryEmbedding(cfg)
    full = mla(x, rope(pos), build_attention_mask(mask_BS, T, 0, x.device))
    assert mla.absorbed_is_cheaper(2, P + 2) and not mla.absorbed_is_cheaper(512, 512)
    cache = MLACache(1, B, T, cfg.kv_lora_rank, cfg.qk_rope_head_dim, dtype=torch.float32)
    outs = [mla(x[:, :P], rope(pos[:, :P]), build_attention_mask(mask_BS[:, :P], P, 0, x.device), cache)]
    cache.advance(P)
    for t in range(P, T, 2):
        m = build_attention_mask(mask_BS[:, : t + 2], 2, t, x.device)
        outs.append(mla(x[:, t : t + 2], rope(pos[:, t : t + 2]), m, cache))
        cache.advance(2)
    inc = torch.cat(outs, dim=1)[:, :T]
    real = mask_BS[:, :, None].expand_as(full)
    assert torch.allclose(inc[real], full[real], atol=1e-4, rtol=0), report(inc[real], full[real])


def test_rms_norm_fp32_fast_path_is_bit_identical_to_the_formula():
    torch.manual_seed(0)
    norm = RMSNorm(48, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(48))
    x = torch.randn(3, 7, 48) * 4
    x32 = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    assert torch.equal(norm(x), norm.weight * x32)  # transformers' DeepseekV3RMSNorm order, in fp32
    xb = x.bfloat16()
    want = norm.weight * (xb.float() * torch.rsqrt(xb.float().pow(2).mean(-1, keepdim=True) + 1e-6)).bfloat16()
    assert torch.equal(norm(xb), want)  # other dtypes: the formula itself


@pytest.mark.parametrize("T", [1, 7, 16])
@pytest.mark.parametrize("n_blocks", [1, 2, 3])
def test_blocked_causal_attention_equals_sdpa_forward_and_backward(T, n_blocks):
    """The CPU path's query blocks (skipping fully masked keys, values narrower than q/k) against SDPA's causal."""
    torch.manual_seed(0)
    B, H, Q, V = 2, 3, 12, 8
    q, k, v = (torch.randn(B, H, T, w, requires_grad=True) for w in (Q, Q, V))
    out = causal_attention_blocked(q, k, v, scale=0.3, n_blocks=n_blocks)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3)
    assert torch.allclose(out, ref, atol=1e-6, rtol=0), report(out, ref)
    probe = torch.randn_like(ref)
    grads = torch.autograd.grad((out * probe).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * probe).sum(), (q, k, v))
    for g, g_ref in zip(grads, ref_grads):
        assert torch.allclose(g, g_ref, atol=1e-5, rtol=0), report(g, g_ref)


@pytest.mark.parametrize("q_lora_rank", [48, None])
def test_absorbed_weights_cached_changes_nothing_and_is_dropped_after(q_lora_rank):
    """Decode steps inside `absorbed_weights_cached` give exactly the outputs of the same steps outside it (which
    fold the weights on every forward), and the folded weights are not kept past the block."""
    torch.manual_seed(0)
    cfg = small_cfg(q_lora_rank=q_lora_rank)
    mla = MLA(cfg, layer_idx=0).eval()
    for p in mla.parameters():
        torch.nn.init.normal_(p, std=0.2)
    B, P = 2, 5
    x = torch.randn(B, P + 2, cfg.hidden_size)
    rope = RotaryEmbedding(cfg)
    pos = torch.arange(P + 2)[None].expand(B, P + 2)

    def decode_two() -> torch.Tensor:
        cache = MLACache(1, B, P + 2, cfg.kv_lora_rank, cfg.qk_rope_head_dim, dtype=torch.float32)
        mla(x[:, :P], rope(pos[:, :P]), build_attention_mask(None, P, 0, x.device), cache)
        cache.advance(P)
        outs = []
        for t in (P, P + 1):
            outs.append(mla(x[:, t : t + 1], rope(pos[:, t : t + 1]), build_attention_mask(None, 1, t, "cpu"), cache))
            cache.advance(1)
        return torch.cat(outs, dim=1)

    with torch.inference_mode():
        plain = decode_two()
        with absorbed_weights_cached(mla):
            cached = decode_two()
            # computed by the first absorbed forward and reused by the second (when the shapes fold at all)
            assert len(mla._absorbed) == int(mla.folds_projections())
    assert torch.equal(cached, plain)
    assert mla._absorbed is None


def test_projections_are_folded_only_when_it_saves_multiply_adds():
    """The tiny shapes fold; DeepSeek-V3's (C = 512 > V = 128) would quadruple o_proj, so they do not."""
    assert MLA(small_cfg(), layer_idx=0).folds_projections()
    v3 = small_cfg(
        hidden_size=256,
        num_attention_heads=2,
        num_key_value_heads=2,
        q_lora_rank=96,
        kv_lora_rank=256,
        qk_nope_head_dim=64,
        v_head_dim=64,
    )
    assert not MLA(v3, layer_idx=0).folds_projections()


def test_swapped_projections_are_not_folded_and_decode_the_same():
    """A projection that is not a plain nn.Linear (the FP8 path's) keeps its own GEMM on the absorbed path."""

    class OwnLinear(torch.nn.Linear):  # stands for kernels.fp8_linear.FP8Linear: an nn.Linear subclass
        pass

    torch.manual_seed(0)
    cfg = small_cfg()
    mla = MLA(cfg, layer_idx=0).eval()
    for p in mla.parameters():
        torch.nn.init.normal_(p, std=0.2)
    B, P = 2, 4
    x = torch.randn(B, P + 1, cfg.hidden_size)
    rope = RotaryEmbedding(cfg)
    pos = torch.arange(P + 1)[None].expand(B, P + 1)

    def last_step() -> torch.Tensor:
        cache = MLACache(1, B, P + 1, cfg.kv_lora_rank, cfg.qk_rope_head_dim, dtype=torch.float32)
        mla(x[:, :P], rope(pos[:, :P]), build_attention_mask(None, P, 0, x.device), cache)
        cache.advance(P)
        return mla(x[:, P:], rope(pos[:, P:]), build_attention_mask(None, 1, P, x.device), cache)

    with torch.no_grad():
        folded = last_step()
        own = OwnLinear(mla.o_proj.in_features, mla.o_proj.out_features, bias=False)
        own.weight = mla.o_proj.weight
        mla.o_proj = own
        assert not mla.folds_projections()
        calls = []
        own.register_forward_hook(lambda *_: calls.append(1))
        unfolded = last_step()
    assert calls, "the swapped-in output projection was bypassed"
    assert torch.allclose(unfolded, folded, atol=1e-5, rtol=0), report(unfolded, folded)
