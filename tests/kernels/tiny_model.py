"""The micro model config the kernel tests convert to FP8."""

from model.config import ModelConfig


def tiny_config(**overrides) -> ModelConfig:
    """A two-layer MoE with MTP and every DeepSeek-V3 GEMM, small enough for the Triton interpreter."""
    base = dict(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_shared_experts=1,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=1,
        kv_lora_rank=32,
        q_lora_rank=48,
        qk_rope_head_dim=8,
        qk_nope_head_dim=16,
        v_head_dim=16,
        max_position_embeddings=64,
        rope_scaling=None,
        num_nextn_predict_layers=1,
        bos_token_id=0,
        eos_token_id=1,
    )
    return ModelConfig(**(base | overrides)).validate()
