"""DeepseekV3 assembly: losses, MTP causality, the cached inference path vs the training path, strict loading.

Tolerances (fp32): cached (absorbed) path vs full training path, 1e-4 absolute on logits of magnitude ~1.
Equivalence of whole-model logits with transformers' DeepseekV3ForCausalLM is tested with the HF export (model.hf).
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from model.cache import MLACache
from model.config import load_preset
from model.moe import DeepseekMoE
from model.transformer import CheckpointMismatchError, DeepseekV3, cross_entropy, load_weights
from tests.unit.test_attention import report, small_cfg


def make_model(seed: int = 0, **kw) -> DeepseekV3:
    torch.manual_seed(seed)
    model = DeepseekV3(small_cfg(**kw))
    with torch.no_grad():  # larger weights than the 0.02 init so that every part visibly matters
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(std=0.15)
    return model


def test_structure_and_names():
    model = make_model()
    cfg = model.config
    names = set(dict(model.named_parameters()))
    assert "model.embed_tokens.weight" in names and "lm_head.weight" in names and "model.norm.weight" in names
    assert "model.layers.0.mlp.gate_proj.weight" in names  # dense layer
    assert "model.layers.1.mlp.gate.weight" in names and "model.layers.1.mlp.experts.gate_proj" in names
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in model.state_dict()
    assert "model.layers.1.self_attn.kv_a_proj_with_mqa.weight" in names
    assert {
        "mtp.0.enorm.weight",
        "mtp.0.hnorm.weight",
        "mtp.0.eh_proj.weight",
        "mtp.0.shared_head.norm.weight",
    } <= names
    assert "mtp.0.layer.self_attn.q_b_proj.weight" in names
    assert len(list(model.moe_layers())) == cfg.num_hidden_layers - cfg.first_k_dense_replace + 1
    assert all(isinstance(m, DeepseekMoE) for m in model.moe_layers())


def test_losses_compose():
    model = make_model()
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    targets = ids.roll(-1, dims=1)
    targets[:, -1] = -100
    targets[0, :3] = -100  # an SFT-style masked prompt
    out = model(ids, targets)
    ref_ce = F.cross_entropy(out.logits_BTV.reshape(-1, cfg.vocab_size), targets.reshape(-1), ignore_index=-100)
    assert torch.allclose(out.ce_loss, ref_ce, atol=1e-6)
    expected = out.ce_loss + cfg.mtp_loss_weight * out.mtp_loss + cfg.seq_aux_alpha * out.balance_loss
    assert torch.allclose(out.loss, expected, atol=1e-6)
    assert out.expert_load_LE.shape == (2, cfg.n_routed_experts)  # one main MoE layer + the MTP layer
    assert out.expert_load_LE.sum(dim=1).tolist() == [24.0 * cfg.num_experts_per_tok, 22.0 * cfg.num_experts_per_tok]
    assert out.dropped == 0 and out.balance_loss > 0
    out.loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert not no_grad, no_grad
    # loss weights: balance mode "none" and mtp weight 0 leave only the CE
    model.config = dataclasses.replace(cfg, mtp_loss_weight=0.0, moe_balance="none")
    assert torch.allclose(model(ids, targets).loss, out.ce_loss, atol=1e-6)
    # every target ignored: a zero loss, not NaN
    assert cross_entropy(out.logits_BTV, torch.full_like(targets, -100)).item() == 0.0


def test_cross_entropy_equals_torch_in_value_and_gradient():
    """Our summed token cross-entropy (lean backward) against F.cross_entropy, with ignored targets, including an
    ignored row whose clamped target logit is -inf (it must contribute 0, not NaN)."""
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11) * 3
    targets = torch.randint(0, 11, (3, 5))
    targets[0, :2] = -100
    logits[0, 0, 0] = float("-inf")  # ignored row 0: its target is clamped to index 0
    logits = logits.requires_grad_()
    ours = cross_entropy(logits, targets)
    ref = F.cross_entropy(logits.reshape(-1, 11), targets.reshape(-1), ignore_index=-100)
    assert torch.allclose(ours, ref, atol=1e-6, rtol=1e-6) and torch.isfinite(ours)
    probe = torch.tensor(0.7)
    (g,) = torch.autograd.grad(ours * probe, logits)
    (g_ref,) = torch.autograd.grad(ref * probe, logits)
    assert torch.allclose(g, g_ref, atol=1e-7, rtol=1e-6) and torch.isfinite(g).all()
    assert (g[0, :2] == 0).all()


def test_mtp_is_causal():
    """MTP depth k at position i sees tokens <= i + k only (it predicts token i + k + 1)."""
    model = make_model(num_nextn_predict_layers=2).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 10))
    j = 6
    ids2 = ids.clone()
    ids2[0, j] = (ids[0, j] + 1) % model.config.vocab_size

    def mtp_logits(x):
        out = {}

        def hook(mod, inp, outp):
            out["h"] = outp  # the final-normed hidden state feeds MTP depth 1

        handle = model.model.norm.register_forward_hook(hook)
        model(x)
        handle.remove()
        rope = model.rotary_emb(torch.arange(x.shape[1])[None])
        return model.mtp_logits(out["h"], x, rope)

    a, b = mtp_logits(ids), mtp_logits(ids2)
    for k, (la, lb) in enumerate(zip(a, b), start=1):
        assert la.shape[1] == 10 - k
        changed = (la - lb).abs().amax(dim=-1)[0] > 1e-4  # fp32 noise is ~1e-6, a real change ~1
        assert not changed[: j - k].any() and changed[j - k :].all(), (k, changed)


def test_cached_decode_matches_full_forward_with_left_padding():
    """Prefill left-padded prompts into MLACache and decode token by token: logits equal the unpadded full pass."""
    model = make_model().eval()
    V = model.config.vocab_size
    torch.manual_seed(1)
    lens, total = [4, 7], 11  # prompt lengths; each row is then extended to its prompt + (total - 7) tokens
    seqs = [torch.randint(2, V, (n + total - 7,)) for n in lens]
    with torch.no_grad():
        refs = [model(s[None]).logits_BTV[0] for s in seqs]  # training path, no padding, no cache

        L = max(lens)
        ids = torch.zeros(2, L, dtype=torch.long)
        mask = torch.zeros(2, L, dtype=torch.bool)
        for b, n in enumerate(lens):
            ids[b, L - n :] = seqs[b][:n]
            mask[b, L - n :] = True
        # the full training path with padding gives the same logits at real positions
        padded = model(ids, attention_mask_BT=mask).logits_BTV
        for b, n in enumerate(lens):
            assert torch.allclose(padded[b, L - n :], refs[b][:n], atol=1e-4, rtol=0), report(
                padded[b, L - n :], refs[b][:n]
            )

        cache = MLACache.for_model(model, batch_size=2, max_seq_len=total)
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
        logits = [model(ids, position_ids_BT=pos, attention_mask_BT=mask, cache=cache).logits_BTV]
        for t in range(total - L):
            nxt = torch.stack([seqs[b][lens[b] + t] for b in range(2)])[:, None]
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.bool)], dim=1)
            logits.append(model(nxt, attention_mask_BT=mask, cache=cache).logits_BTV)  # default positions from mask
        got = torch.cat(logits, dim=1)
    assert cache.seq_len == total
    for b, n in enumerate(lens):
        real = got[b, L - n :]
        assert torch.allclose(real, refs[b], atol=1e-4, rtol=0), report(real, refs[b])


def test_cache_skips_mtp_and_repeat_interleave():
    model = make_model().eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 5))
    with torch.no_grad():
        cache = MLACache.for_model(model, 1, 8)
        out = model(ids, ids, cache=cache)
        assert out.mtp_loss is None and out.expert_load_LE.shape[0] == 1
        cache.repeat_interleave(3)
        nxt = torch.tensor([[7], [7], [9]])
        step = model(nxt, cache=cache).logits_BTV
        ref = model(torch.cat([ids.expand(3, 5), nxt], dim=1)).logits_BTV[:, -1:]
    assert torch.allclose(step, ref, atol=1e-4, rtol=0), report(step, ref)


def test_tiny_preset_learns():
    torch.manual_seed(0)
    model = DeepseekV3(load_preset("tiny"))
    assert 2e6 < sum(p.numel() for p in model.parameters()) < 5e6
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, 4096, (2, 17))
    losses = []
    for _ in range(6):
        out = model(ids[:, :-1], ids[:, 1:])
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 1.0, losses


def test_dense_student_and_tied_embeddings():
    model = DeepseekV3(load_preset("student"))
    assert not list(model.moe_layers())
    out = model(torch.randint(0, 100, (1, 6)), torch.randint(0, 100, (1, 6)))
    assert out.expert_load_LE.shape[0] == 0 and out.balance_loss.item() == 0.0
    tied = make_model(tie_word_embeddings=True)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight


def test_load_weights_lists_offending_names():
    model = make_model()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    load_weights(make_model(seed=1), sd)  # a matching checkpoint loads
    bad = dict(sd)
    bad.pop("model.layers.0.self_attn.o_proj.weight")
    bad["model.layers.9.foo"] = torch.zeros(1)
    bad["lm_head.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointMismatchError) as e:
        load_weights(model, bad)
    msg = str(e.value)
    assert "missing: model.layers.0.self_attn.o_proj.weight" in msg and "unexpected: model.layers.9.foo" in msg
    assert "shape: lm_head.weight: checkpoint (3, 3)" in msg and "1 missing, 1 unexpected, 1 mis-shaped" in msg


def test_meta_build_then_materialize():
    with torch.device("meta"):
        model = DeepseekV3(small_cfg())
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    model.init_weights()
    out = model(torch.randint(0, 256, (1, 5)), torch.randint(0, 256, (1, 5)))
    assert torch.isfinite(out.loss)
    assert model.model.layers[1].mlp.gate.e_score_correction_bias.abs().sum() == 0


def test_bf16_forward_is_close_to_fp32():
    model = make_model().eval()
    ids = torch.randint(0, 256, (2, 8))
    with torch.no_grad():
        ref = model(ids).logits_BTV
        got = model.to(torch.bfloat16)(ids).logits_BTV.float()
    # bf16 (8 mantissa bits) through 2 layers + MTP-free head: a few percent of the logit scale
    assert (got - ref).abs().max() < 0.1 * ref.abs().max(), report(got, ref)


def test_invalid_config_fails_before_allocation(monkeypatch):
    bad = dataclasses.replace(small_cfg(), num_experts_per_tok=99)
    allocated = []
    monkeypatch.setattr(torch.nn.Linear, "reset_parameters", lambda self: allocated.append(self))
    with pytest.raises(ValueError, match=r"ModelConfig\.num_experts_per_tok=99"):
        DeepseekV3(bad)
    assert not allocated


@pytest.mark.slow  # dynamo traces every variant: ~40 s on a quiet 2-core machine
def test_compiled_blocks_give_the_same_gradients_and_tokens():
    """model.compile: every block compiled in place. With dynamo's eager backend and fullgraph=True this checks the
    blocks trace without a graph break (no host sync, no data-dependent shape) and compute the same thing; the
    inductor backend itself is exercised by bench.model_vs_hf --compile."""
    from model.generate import generate

    ref, model = make_model(), make_model()
    model.compile_blocks(backend="eager", fullgraph=True)
    layers = list(model.model.layers) + [model.mtp[0].layer]
    assert all(m._compiled_call_impl is not None for layer in layers for m in (layer.self_attn, layer.mlp))
    ids = torch.randint(0, model.config.vocab_size, (2, 13))
    for m in (ref, model):
        m(ids[:, :-1], targets_BT=ids[:, 1:]).loss.backward()
    for (name, a), b in zip(ref.named_parameters(), model.parameters()):
        if a.grad is not None:
            assert torch.allclose(a.grad, b.grad, atol=1e-6, rtol=1e-5), name
    prompts = [[5, 6, 7], [8, 9]]
    for kw in (dict(speculative=False), dict(n_samples=2)):
        want = generate(ref, prompts, max_new_tokens=6, temperature=0.0, **kw).tokens
        assert generate(model, prompts, max_new_tokens=6, temperature=0.0, **kw).tokens == want
