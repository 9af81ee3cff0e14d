"""What the trainer measures: FLOPs per token, MFU, bits per byte, the unigram baseline, memory.

FLOPs per token (training, forward + backward = 3x forward), following the PaLM appendix accounting:
    6 * N_active  +  6 * L * T_ctx * H * (d_qk + d_v) / 2 * ... (attention scores and values, causal)
where N_active counts the matmul parameters one token touches (attention projections, dense/shared/top-k routed
expert weights, the output head; not the embedding lookup). MLA's attention core multiplies queries of width
d_nope + d_rope against keys and probabilities against values of width d_v, for each of H heads; causal masking
halves the average context.
"""

from __future__ import annotations

import math
import resource
import sys

import numpy as np
import torch
from torch import nn


def active_matmul_params(model: nn.Module, cfg) -> int:
    """Parameters multiplied per token: everything but embeddings, with routed experts counted top-k of E."""
    total = 0
    for name, p in model.named_parameters():
        if "embed_tokens" in name or p.ndim < 2:
            continue
        if ".experts." in name or name.endswith(("experts.gate_proj", "experts.up_proj", "experts.down_proj")):
            total += p.numel() * cfg.num_experts_per_tok // cfg.n_routed_experts
        else:
            total += p.numel()
    return total


def flops_per_token(model: nn.Module, cfg, seq_len: int) -> float:
    n = active_matmul_params(model, cfg)
    attn = (
        cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim)
    )
    return 6.0 * n + 6.0 * attn * seq_len / 2


def mfu(tokens_per_s: float, flops_per_tok: float, peak_tflops: float) -> float:
    return tokens_per_s * flops_per_tok / (peak_tflops * 1e12)


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def bits_per_byte(mean_loss_nats: float, n_tokens: int, n_bytes: int) -> float:
    """Cross entropy per UTF-8 byte in bits: tokenizer-independent, comparable across vocabularies."""
    return mean_loss_nats * n_tokens / (max(1, n_bytes) * math.log(2))


def unigram_loss(train_tokens: np.ndarray, val_tokens: np.ndarray, vocab_size: int) -> float:
    """Cross entropy (nats/token) of the validation tokens under the train unigram distribution, add-one smoothed."""
    counts = np.bincount(train_tokens.astype(np.int64), minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[val_tokens.astype(np.int64)].mean())


def max_violation(load_E: torch.Tensor) -> float:
    """MaxVio = (max load - mean load) / mean load (DeepSeek-V3 / Wang et al. 2024)."""
    mean = load_E.float().mean()
    return float((load_E.float().max() - mean) / mean) if mean > 0 else 0.0
