"""Parameter accounting and KV-cache size, computed from the real modules built on the meta device.

Nothing is estimated from formulas: the model is instantiated with `torch.device("meta")` (shapes, no memory, so
the 671B preset builds in a second) and the numbers are sums over its actual parameters and cache tensors.

Conventions (DeepSeek's, reproduced by v3_671b):
- total: every distinct parameter of the main model (embedding, layers, final norm, output head), MTP excluded.
  DeepSeek-V3: 671B.
- activated: parameters whose matmuls a token passes through in the main model: attention, dense MLPs, final
  norm, output head, and in each MoE layer the router, the shared experts and top-k of the routed experts (k/E
  of them). The input embedding table is NOT counted (a row lookup, no matmul): this is the convention that
  reproduces all three published figures, V3 36.6B -> "37B", V2 20.9B -> "21B", V2-Lite 2.45B -> "2.4B"
  (counting the embedding too gives 37.6B, 21.4B, 2.66B: `activated_with_embedding`).
- mtp: the MTP modules' own parameters (their embedding and head are the main model's, not counted again).
  The release stores each MTP module with copies of the embedding and head; `mtp_as_released` counts those, and
  `total + mtp_as_released` is the Hugging Face checkpoint's 685B.
- kv_cache_bytes_per_token: per token, summed over layers, MLA's cached latent + RoPE key in bf16.

    python -m model.info --model v3_671b            # a preset from conf/model/<name>.yaml
    python -m model.info model=v3_671b --json       # the Hydra-style spelling works too
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass

import torch
from torch import nn

from model.cache import MLACache
from model.config import ModelConfig, load_preset
from model.moe import DeepseekMoE
from model.transformer import DeepseekV3


@dataclass
class ModelInfo:
    total: int
    activated: int
    activated_with_embedding: int
    embedding: int  # input embedding + output head (once if tied)
    mtp: int
    mtp_as_released: int
    mtp_activated: int
    kv_cache_bytes_per_token: int
    mha_kv_cache_bytes_per_token: int  # what a multi-head cache of the same attention would take (for comparison)

    @property
    def total_with_mtp_as_released(self) -> int:
        return self.total + self.mtp_as_released


def build_meta(cfg: ModelConfig) -> DeepseekV3:
    """The model on the meta device: real module tree and shapes, no storage."""
    with torch.device("meta"):
        return DeepseekV3(cfg)


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _activated(module: nn.Module) -> float:
    """Parameters of `module` one token uses: routed experts count top_k / n_routed of their weights."""
    moes = [m for m in module.modules() if isinstance(m, DeepseekMoE)]
    routed = sum(_numel(m.experts) for m in moes)
    fraction = sum(_numel(m.experts) * m.top_k / m.n_routed_experts for m in moes)
    return _numel(module) - routed + fraction


def kv_cache_bytes_per_token(model: DeepseekV3, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes per token of an MLACache sized from the model's attention modules (latent width, rope-key width)."""
    attn = [layer.self_attn for layer in model.model.layers]
    C = attn[0].kv_a_layernorm.weight.numel()
    R = attn[0].kv_a_proj_with_mqa.out_features - C
    return MLACache(len(attn), 1, 1, C, R, dtype=dtype, device="meta").bytes_per_token


def model_info(cfg: ModelConfig) -> ModelInfo:
    model = build_meta(cfg)
    embed, head = model.model.embed_tokens.weight, model.lm_head.weight
    embedding = embed.numel() + (0 if head is embed else head.numel())
    mtp = _numel(model.mtp)
    mtp_copies = cfg.num_nextn_predict_layers * (embed.numel() + head.numel())
    total = _numel(model) - mtp
    # tied: the one matrix serves as the head and is counted once; untied: the head replaces the embedding
    activated = _activated(model.model) + (0 if head is embed else head.numel())
    mtp_activated = sum(_activated(m) for m in model.mtp)
    a0 = model.model.layers[0].self_attn
    mha = 2 * len(model.model.layers) * a0.n_heads * (a0.qk_nope_head_dim + a0.qk_rope_head_dim)
    return ModelInfo(
        total=total,
        activated=round(activated - (0 if head is embed else embed.numel())),
        activated_with_embedding=round(activated),
        embedding=embedding,
        mtp=mtp,
        mtp_as_released=mtp + mtp_copies,
        mtp_activated=round(mtp_activated),
        kv_cache_bytes_per_token=kv_cache_bytes_per_token(model),
        mha_kv_cache_bytes_per_token=mha * 2,
    )


def _fmt(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra-style 'model=<preset>' (same as --model)")
    parser.add_argument("--model", default=None, help="preset name in conf/model/ (default tiny)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    name = args.model
    for o in args.overrides:
        key, _, value = o.partition("=")
        if key != "model" or not value:
            parser.error(f"unsupported override {o!r} (only model=<preset>)")
        name = value
    name = name or "tiny"
    info = model_info(load_preset(name))
    d = asdict(info) | {"total_with_mtp_as_released": info.total_with_mtp_as_released, "preset": name}
    if args.json:
        print(json.dumps(d, indent=2))
    else:
        rows = [
            ("total (main model, no MTP)", _fmt(info.total)),
            ("activated per token", _fmt(info.activated)),
            ("  activated incl. input embedding", _fmt(info.activated_with_embedding)),
            ("embedding + output head", _fmt(info.embedding)),
            ("MTP modules (own params)", _fmt(info.mtp)),
            ("MTP as released (+ emb/head copies)", _fmt(info.mtp_as_released)),
            ("total + MTP as released (HF ckpt)", _fmt(info.total_with_mtp_as_released)),
            ("MTP activated per token", _fmt(info.mtp_activated)),
            ("KV cache bytes/token (bf16, MLA)", f"{info.kv_cache_bytes_per_token:,}"),
            ("  vs multi-head cache bytes/token", f"{info.mha_kv_cache_bytes_per_token:,}"),
        ]
        print(f"model preset: {name}")
        for k, v in rows:
            print(f"  {k:<38} {v:>12}")
    return d


if __name__ == "__main__":
    main(sys.argv[1:])
