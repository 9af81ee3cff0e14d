"""Hugging Face export/import: transformers' DeepseekV3ForCausalLM on our exported weights gives our logits, and
export -> import round-trips bit for bit.

Reference: transformers 5.23's DeepseekV3ForCausalLM (written by others), loaded from the exported directory with
`AutoModelForCausalLM.from_pretrained`, which also exercises its per-expert -> fused conversion of the release names.
Tolerance (fp32, logits of magnitude ~1-10): |ours - hf| <= 1e-5 absolute + 1e-5 relative (measured max ~2e-6).
A single token routed to another expert, a permuted RoPE pair or a wrong softmax scale moves logits by >= 1e-2
(zeroing the routing bias moves them by ~3).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from model.config import ModelConfig
from model.hf import HFFormatError, export_hf, import_hf, main
from model.transformer import DeepseekV3


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models gain nothing from a 2nd thread, and on a loaded 2-core machine OpenMP's spinning barriers make
    each op up to 100x slower (measured: this file 60 s with 2 threads vs 9 s with 1 under load)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


ATOL, RTOL = 1e-5, 1e-5


def tiny_config(**kw) -> ModelConfig:
    base = dict(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_shared_experts=1,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        first_k_dense_replace=1,
        kv_lora_rank=32,
        q_lora_rank=48,
        qk_rope_head_dim=8,
        qk_nope_head_dim=16,
        v_head_dim=16,
        max_position_embeddings=256,
        rope_scaling=None,
        num_nextn_predict_layers=1,
        routed_scaling_factor=2.5,
    )
    base.update(kw)
    return ModelConfig(**base).validate()


def random_model(cfg: ModelConfig, seed: int = 0) -> DeepseekV3:
    """Random-normal weights well above init scale and a non-zero routing bias, so routing differences show."""
    torch.manual_seed(seed)
    m = DeepseekV3(cfg)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.15)
            else:  # norms: around 1, not exactly 1
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
        for moe in m.moe_layers():
            moe.gate.e_score_correction_bias.normal_(0.0, 0.1)
    return m.eval()


def close(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    err = (ours - ref).abs()
    ok = bool((err <= ATOL + RTOL * ref.abs()).all())
    assert ok, f"{what}: max abs err {err.max():.3e}, mean {err.mean():.3e} (fp32, atol {ATOL}, rtol {RTOL})"


CASES = {
    "q_lora_yarn": dict(
        q_lora_rank=48,
        rope_scaling={
            "type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 64,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
    ),
    "no_q_lora": dict(q_lora_rank=None),
    "rope_halves": dict(rope_interleave=False),  # GPT-NeoX pair layout: transformers' rotate_half path
}


TINY_PRESET = Path(__file__).resolve().parents[2] / "conf" / "model" / "tiny.yaml"


def preset_config(path: Path) -> ModelConfig:
    from omegaconf import OmegaConf

    return ModelConfig(**OmegaConf.to_container(OmegaConf.load(path), resolve=True)).validate()


@pytest.fixture(scope="module", params=[*CASES, "tiny_preset"])
def exported(request, tmp_path_factory):
    if request.param == "tiny_preset":  # the exact shape of conf/model/tiny.yaml (16 experts, 4 groups, MTP)
        cfg = preset_config(TINY_PRESET)
    else:
        cfg = tiny_config(**CASES[request.param])
    model = random_model(cfg)
    d = tmp_path_factory.mktemp(request.param)
    export_hf(model, d)
    hf, info = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, output_loading_info=True)
    return model, hf.eval(), info, d


def test_transformers_loads_export_without_missing_keys(exported):
    model, hf, info, d = exported
    L = model.config.num_hidden_layers
    assert not info["missing_keys"], info["missing_keys"]
    assert not info.get("mismatched_keys"), info["mismatched_keys"]
    # transformers has no MTP module: exactly the MTP layer's keys are unexpected
    assert info["unexpected_keys"] and all(k.startswith(f"model.layers.{L}.") for k in info["unexpected_keys"])
    assert hf.config.rope_interleave == model.config.rope_interleave and hf.config.num_hidden_layers == L


def test_logits_match_transformers(exported):
    model, hf, _, _ = exported
    ids_BT = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(ids_BT).logits_BTV
        ref = hf(input_ids=ids_BT, use_cache=False).logits
    close(ours, ref, "logits")


def test_logits_match_transformers_with_left_padding(exported):
    model, hf, _, _ = exported
    ids_BT = torch.randint(2, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(2))
    mask_BT = torch.ones_like(ids_BT, dtype=torch.bool)
    mask_BT[1, :9] = False
    ids_BT[1, :9] = 0
    pos_BT = (mask_BT.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ours = model(ids_BT, position_ids_BT=pos_BT, attention_mask_BT=mask_BT).logits_BTV
        ref = hf(input_ids=ids_BT, attention_mask=mask_BT.long(), position_ids=pos_BT, use_cache=False).logits
    close(ours[mask_BT], ref[mask_BT], "logits at real tokens, left-padded batch")


def test_greedy_generation_matches_transformers_generate(exported):
    from model.generate import generate

    model, hf, _, _ = exported
    prompt = [[3, 14, 15, 92, 65, 35]]
    ours = generate(model, prompt, max_new_tokens=10, temperature=0.0).tokens[0]
    with torch.no_grad():
        ref = hf.generate(torch.tensor(prompt), max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0)[
            0, len(prompt[0]) :
        ].tolist()
    assert ours == ref


def test_release_tensor_names(exported):
    model, _, _, d = exported
    cfg = model.config
    t = load_file(str(d / "model.safetensors"))
    L, E, F, D = cfg.num_hidden_layers, cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size
    for i in (1, L):  # a main MoE layer and the MTP layer
        for e in range(E):
            assert t[f"model.layers.{i}.mlp.experts.{e}.gate_proj.weight"].shape == (F, D)
            assert t[f"model.layers.{i}.mlp.experts.{e}.up_proj.weight"].shape == (F, D)
            assert t[f"model.layers.{i}.mlp.experts.{e}.down_proj.weight"].shape == (D, F)
        assert t[f"model.layers.{i}.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    for name in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight"):
        assert f"model.layers.{L}.{name}" in t
    assert torch.equal(t[f"model.layers.{L}.embed_tokens.weight"], t["model.embed_tokens.weight"])
    assert torch.equal(t[f"model.layers.{L}.shared_head.head.weight"], t["lm_head.weight"])
    assert not any(".experts.gate_proj" in k or k.startswith("mtp.") for k in t)
    cfg_json = json.loads((d / "config.json").read_text())
    assert cfg_json["model_type"] == "deepseek_v3" and cfg_json["num_nextn_predict_layers"] == 1


def test_export_import_round_trip_is_bit_exact(exported, tmp_path):
    model, _, _, d = exported
    back = import_hf(d)
    assert back.config == model.config
    ours, theirs = model.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]), k
    bias = [k for k in ours if k.endswith("e_score_correction_bias")]
    assert bias and all(ours[k].abs().sum() > 0 for k in bias)


def test_sharded_export_round_trips(tmp_path):
    model = random_model(tiny_config(), seed=3)
    export_hf(model, tmp_path, max_shard_bytes=40_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    back = import_hf(tmp_path)
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items())


def test_import_is_strict(tmp_path):
    cfg = tiny_config(num_nextn_predict_layers=0)
    export_hf(random_model(cfg), tmp_path)
    t = load_file(str(tmp_path / "model.safetensors"))
    del t["model.layers.2.mlp.experts.5.up_proj.weight"]
    t["model.layers.9.extra.weight"] = torch.zeros(2)
    t["model.layers.0.self_attn.kv_b_proj.weight"] = torch.zeros(3, 3)
    save_file(t, str(tmp_path / "model.safetensors"))
    with pytest.raises(HFFormatError) as e:
        import_hf(tmp_path)
    msg = str(e.value)
    assert "missing: model.layers.2.mlp.experts.5.up_proj.weight" in msg
    assert "unexpected: model.layers.9.extra.weight" in msg
    assert "shape: model.layers.0.self_attn.kv_b_proj.weight" in msg


def test_tokenizer_export_and_chat_template(tmp_path):
    from model.chat import render_chat
    from tests.unit.test_generate import tiny_tokenizer

    tok = tiny_tokenizer()
    tok.save(str(tmp_path / "tok.json"))
    export_hf(random_model(tiny_config(num_nextn_predict_layers=0)), tmp_path / "hf", tmp_path / "tok.json")
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    msgs = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": "2+3"},
    ]
    ids = hf_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert list(ids) == render_chat(msgs, tok, bos_token_id=0)


def test_cli_export_and_import(tmp_path):
    import dataclasses

    model = random_model(tiny_config(), seed=4)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    (tmp_path / "w.json").write_text(json.dumps(dataclasses.asdict(model.config)))
    main(["export", str(tmp_path / "w.safetensors"), str(tmp_path / "hf")])
    main(["import", str(tmp_path / "hf"), str(tmp_path / "back.safetensors")])
    back = load_file(str(tmp_path / "back.safetensors"))
    assert all(torch.equal(v, back[k]) for k, v in model.state_dict().items())
    assert ModelConfig(**json.loads((tmp_path / "back.json").read_text())) == model.config


def test_import_dequantizes_fp8_release_blocks(tmp_path):
    model = random_model(tiny_config(num_nextn_predict_layers=0), seed=5)
    export_hf(model, tmp_path)
    t = load_file(str(tmp_path / "model.safetensors"))
    bn = bk = 16  # small blocks so that the tiny shapes hold several of them, one of them partial
    want = {}
    for name in ("model.layers.0.self_attn.kv_b_proj.weight", "model.layers.2.mlp.experts.3.down_proj.weight"):
        w = t[name]
        N, K = w.shape
        w8 = torch.empty_like(w, dtype=torch.float8_e4m3fn)
        scale = torch.empty((N + bn - 1) // bn, (K + bk - 1) // bk)
        ref = torch.empty_like(w)
        for i in range(scale.shape[0]):
            for j in range(scale.shape[1]):
                blk = w[i * bn : (i + 1) * bn, j * bk : (j + 1) * bk]
                scale[i, j] = blk.abs().max() / 448.0
                w8[i * bn : (i + 1) * bn, j * bk : (j + 1) * bk] = (blk / scale[i, j]).to(torch.float8_e4m3fn)
                ref[i * bn : (i + 1) * bn, j * bk : (j + 1) * bk] = (
                    w8[i * bn : (i + 1) * bn, j * bk : (j + 1) * bk].float() * scale[i, j]
                )
        t[name], t[name + "_scale_inv"], want[name] = w8, scale, ref
    save_file(t, str(tmp_path / "model.safetensors"))
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [bn, bk]}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    back = import_hf(tmp_path).state_dict()
    assert torch.equal(
        back["model.layers.0.self_attn.kv_b_proj.weight"], want["model.layers.0.self_attn.kv_b_proj.weight"]
    )
    assert torch.equal(
        back["model.layers.2.mlp.experts.down_proj"][3], want["model.layers.2.mlp.experts.3.down_proj.weight"]
    )
    err = (
        back["model.layers.0.self_attn.kv_b_proj.weight"]
        - model.state_dict()["model.layers.0.self_attn.kv_b_proj.weight"]
    )
    assert 0 < err.abs().max() < 0.1  # e4m3 rounding, not garbage


def test_tied_embeddings_export_import(tmp_path):
    model = random_model(tiny_config(tie_word_embeddings=True), seed=6)
    export_hf(model, tmp_path)
    assert "lm_head.weight" not in load_file(str(tmp_path / "model.safetensors"))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids_BT = torch.randint(0, 96, (1, 16), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        close(model(ids_BT).logits_BTV, hf(input_ids=ids_BT).logits, "logits, tied embeddings")
    back = import_hf(tmp_path)
    assert back.lm_head.weight is back.model.embed_tokens.weight
    assert torch.equal(back.lm_head.weight, model.lm_head.weight)
