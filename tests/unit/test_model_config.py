"""ModelConfig: the published DeepSeek-V3 config.json loads, bad combinations name the field, Hydra accepts it."""

import dataclasses

import pytest
import torch
from omegaconf import OmegaConf

from model.config import ModelConfig

# DeepSeek-V3's published config.json (huggingface.co/deepseek-ai/DeepSeek-V3), written out from the release.
DEEPSEEK_V3_CONFIG_JSON = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "auto_map": {
        "AutoConfig": "configuration_deepseek.DeepseekV3Config",
        "AutoModel": "modeling_deepseek.DeepseekV3Model",
        "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM",
    },
    "aux_loss_alpha": 0.001,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "ep_size": 1,
    "first_k_dense_replace": 3,
    "hidden_act": "silu",
    "hidden_size": 7168,
    "initializer_range": 0.02,
    "intermediate_size": 18432,
    "kv_lora_rank": 512,
    "max_position_embeddings": 163840,
    "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048,
    "moe_layer_freq": 1,
    "n_group": 8,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 61,
    "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1,
    "pretraining_tp": 1,
    "q_lora_rank": 1536,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "quantization_config": {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    },
    "rms_norm_eps": 1e-06,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "rope_theta": 10000,
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "seq_aux": True,
    "tie_word_embeddings": False,
    "topk_group": 4,
    "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1",
    "use_cache": True,
    "v_head_dim": 128,
    "vocab_size": 129280,
}


def test_published_v3_config_loads():
    cfg = ModelConfig.from_hf(DEEPSEEK_V3_CONFIG_JSON)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (7168, 61, 128)
    assert (cfg.q_lora_rank, cfg.kv_lora_rank) == (1536, 512)
    assert (cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim) == (128, 64, 128)
    assert (cfg.n_routed_experts, cfg.n_shared_experts, cfg.num_experts_per_tok) == (256, 1, 8)
    assert (cfg.n_group, cfg.topk_group, cfg.moe_intermediate_size, cfg.intermediate_size) == (8, 4, 2048, 18432)
    assert (cfg.first_k_dense_replace, cfg.vocab_size, cfg.routed_scaling_factor) == (3, 129280, 2.5)
    assert cfg.num_nextn_predict_layers == 1
    rs = cfg.rope_scaling
    assert rs["type"] == "yarn" and rs["factor"] == 40 and rs["original_max_position_embeddings"] == 4096
    assert (rs["beta_fast"], rs["beta_slow"], rs["mscale"], rs["mscale_all_dim"]) == (32, 1, 1.0, 1.0)
    # our dataclass defaults ARE the release (training-only fields aside)
    assert cfg == dataclasses.replace(ModelConfig(), aux_loss_alpha=0.001)


def test_to_hf_roundtrips_through_transformers():
    from transformers import DeepseekV3Config

    cfg = ModelConfig.from_hf(DEEPSEEK_V3_CONFIG_JSON)
    hf = DeepseekV3Config(**cfg.to_hf())
    assert hf.rope_parameters["rope_type"] == "yarn" and hf.rope_parameters["factor"] == 40
    assert hf.num_mtp_layers == 1 and hf.q_lora_rank == 1536
    assert ModelConfig.from_hf(hf.to_dict()) == cfg  # transformers 5 writes rope as "rope_parameters"
    d = cfg.to_hf()
    assert d["model_type"] == "deepseek_v3" and d["architectures"] == ["DeepseekV3ForCausalLM"]
    assert "moe_impl" not in d and "mtp_loss_weight" not in d


def test_softmax_scale_includes_yarn_mscale():
    cfg = ModelConfig()
    import math

    m = 0.1 * 1.0 * math.log(40) + 1.0
    assert cfg.softmax_scale == pytest.approx(192**-0.5 * m * m, rel=1e-12)
    assert dataclasses.replace(cfg, rope_scaling=None).softmax_scale == pytest.approx(192**-0.5, rel=1e-12)


def test_omegaconf_structured():
    conf = OmegaConf.structured(ModelConfig)
    assert conf.hidden_size == 7168 and conf.rope_scaling.type == "yarn" and conf.q_lora_rank == 1536
    conf.q_lora_rank = None  # Optional field
    cfg = OmegaConf.to_object(conf)
    assert isinstance(cfg, ModelConfig) and cfg.q_lora_rank is None
    with pytest.raises(Exception, match="hidden_sise"):
        OmegaConf.merge(OmegaConf.structured(ModelConfig), {"hidden_sise": 3})  # typo fails at once


@pytest.mark.parametrize(
    "change, field",
    [
        ({"num_experts_per_tok": 300}, "num_experts_per_tok"),
        ({"n_group": 7}, "n_group"),
        ({"topk_group": 9}, "topk_group"),
        ({"first_k_dense_replace": 62}, "first_k_dense_replace"),
        ({"num_key_value_heads": 8}, "num_key_value_heads"),
        ({"qk_rope_head_dim": 63}, "qk_rope_head_dim"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"q_lora_rank": 0}, "q_lora_rank"),
        ({"scoring_func": "softmax"}, "scoring_func"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"moe_impl": "dropful"}, "moe_impl"),
        ({"moe_balance": "magic"}, "moe_balance"),
        ({"capacity_factor": 0.0}, "capacity_factor"),
        ({"mtp_loss_weight": -1.0}, "mtp_loss_weight"),
        ({"compile": "yes"}, "compile"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
        ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "rope_scaling"),
        ({"num_experts_per_tok": 8, "topk_group": 1, "n_group": 64}, "num_experts_per_tok"),
    ],
)
def test_invalid_combinations_name_the_field(change, field):
    cfg = dataclasses.replace(ModelConfig(), **change)
    with pytest.raises(ValueError, match=rf"ModelConfig\.{field}="):
        cfg.validate()


def test_dense_model_ignores_moe_fields():
    # a dense model (no routed experts) does not care about routing fields
    cfg = dataclasses.replace(ModelConfig(), n_routed_experts=0, n_group=7, num_experts_per_tok=99)
    assert cfg.validate() is cfg and not cfg.is_moe


def test_from_hf_without_rope_scaling_means_plain_rope():
    d = {k: v for k, v in DEEPSEEK_V3_CONFIG_JSON.items() if k != "rope_scaling"}
    assert ModelConfig.from_hf(d).rope_scaling is None
    with pytest.raises(ValueError, match="hidden_sise"):
        ModelConfig.from_hf(d, hidden_sise=3)


def test_compile_is_not_written_to_the_hf_config():
    from model.hf import hf_config_dict

    cfg = dataclasses.replace(ModelConfig(), compile=True).validate()
    assert "compile" not in cfg.to_hf() and "compile" not in hf_config_dict(cfg, torch.float32)
