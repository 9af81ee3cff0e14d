"""MLA's inference cache: per layer and token, only the compressed KV latent and the shared RoPE key.

A standard multi-head cache stores 2 * H * head_dim values per token and layer (DeepSeek-V3: 2 * 128 * 128 =
32768). MLA stores c_KV (kv_lora_rank = 512) and k^R (qk_rope_head_dim = 64): 576 values, 57x less. The keys and
values are never materialized at inference: `model.attention.MLA` absorbs the up-projection kv_b_proj into the
query and the output (see its docstring).

Per layer the two live side by side in one [B, S, C + R] buffer (see `MLACache`). The cache is preallocated for
`max_seq_len` positions; `seq_len` counts the positions already written (the same for
every row of the batch: rows are left-padded, the attention mask hides the padding). A forward with a cache writes
its T new positions at [seq_len, seq_len + T) in every layer, then the model calls `advance(T)`.

Shape legend: L layers, B batch rows, S max positions, C kv_lora_rank, R qk_rope_head_dim, T new positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from model.config import ModelConfig


@dataclass
class LayerCache:
    """One layer's view of an `MLACache`: its [B, S_max, C + R] buffer and how many positions are written.

    What a layer's attention receives: a buffer and an int, nothing that names the layer, so that one compiled
    decoder block (torch.compile) serves every layer without specializing on which one it is."""

    kv_BSX: Tensor
    seq_len: int
    kv_lora_rank: int

    def update(self, latent_BTC: Tensor, k_rope_BTR: Tensor) -> Tensor:
        """Write T new positions; return the layer's cache up to seq_len + T: a view [B, S, C + R]."""
        T = latent_BTC.shape[1]
        end = self.seq_len + T
        if end > self.kv_BSX.shape[1]:
            raise ValueError(f"MLACache overflow: {self.seq_len} cached + {T} new > max_seq_len={self.kv_BSX.shape[1]}")
        if latent_BTC.shape[0] != self.kv_BSX.shape[0]:
            raise ValueError(f"MLACache holds {self.kv_BSX.shape[0]} rows, the forward has {latent_BTC.shape[0]}")
        self.kv_BSX[:, self.seq_len : end] = torch.cat([latent_BTC, k_rope_BTR], dim=-1)
        return self.kv_BSX[:, :end]


class MLACache:
    """Per layer one buffer [B, S, C + R]: the latent in the first C channels, the RoPE key in the last R, so that the
    absorbed decode path attends over both with one matmul (`latent` and `k_rope` are views of the same buffers).

    `first_layer` is the layer index of the first buffer: 0 for the main model, `num_hidden_layers` for the cache of
    the MTP modules (their attention layers are numbered after the main ones), which speculative decoding fills.
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        max_seq_len: int,
        kv_lora_rank: int,
        qk_rope_head_dim: int,
        *,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
        first_layer: int = 0,
    ) -> None:
        if batch_size <= 0 or max_seq_len <= 0:
            raise ValueError(f"MLACache needs batch_size > 0 and max_seq_len > 0, got {batch_size}, {max_seq_len}")
        self.max_seq_len = max_seq_len
        self.seq_len = 0
        self.kv_lora_rank = kv_lora_rank
        self.first_layer = first_layer
        X = kv_lora_rank + qk_rope_head_dim
        self.kv = [torch.zeros(batch_size, max_seq_len, X, dtype=dtype, device=device) for _ in range(num_layers)]

    @classmethod
    def from_config(
        cls,
        cfg: ModelConfig,
        batch_size: int,
        max_seq_len: int,
        *,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
        mtp: bool = False,
    ) -> MLACache:
        """A cache for the main model's layers, or with `mtp` for the MTP modules' layers."""
        n = cfg.num_nextn_predict_layers if mtp else cfg.num_hidden_layers
        first = cfg.num_hidden_layers if mtp else 0
        C, R = cfg.kv_lora_rank, cfg.qk_rope_head_dim
        return cls(n, batch_size, max_seq_len, C, R, dtype=dtype, device=device, first_layer=first)

    @classmethod
    def for_model(cls, model: torch.nn.Module, batch_size: int, max_seq_len: int, mtp: bool = False) -> MLACache:
        """A cache in the dtype and on the device of `model`'s parameters (a `model.transformer.DeepseekV3`)."""
        p = model.model.embed_tokens.weight
        return cls.from_config(model.config, batch_size, max_seq_len, dtype=p.dtype, device=p.device, mtp=mtp)

    @property
    def latent(self) -> list[Tensor]:
        """L x [B, S, C] views: the compressed KV latents."""
        return [kv[..., : self.kv_lora_rank] for kv in self.kv]

    @property
    def k_rope(self) -> list[Tensor]:
        """L x [B, S, R] views: the shared RoPE keys."""
        return [kv[..., self.kv_lora_rank :] for kv in self.kv]

    @property
    def batch_size(self) -> int:
        return self.kv[0].shape[0]

    @property
    def num_layers(self) -> int:
        return len(self.kv)

    @property
    def bytes_per_token(self) -> int:
        """Bytes one token occupies in this cache, summed over layers (per batch row)."""
        return sum(kv[0, 0].nbytes for kv in self.kv)

    def layer(self, layer_idx: int) -> LayerCache:
        """The view that layer `layer_idx` (numbered as in the model) reads and writes."""
        return LayerCache(self.kv[layer_idx - self.first_layer], self.seq_len, self.kv_lora_rank)

    def update(self, layer_idx: int, latent_BTC: Tensor, k_rope_BTR: Tensor) -> Tensor:
        """Write T new positions of one layer; return that layer's cache up to seq_len + T: a view [B, S, C + R]."""
        return self.layer(layer_idx).update(latent_BTC, k_rope_BTR)

    def advance(self, n: int) -> None:
        """Mark n more positions as written (the model calls this once per forward, after all layers)."""
        assert self.seq_len + n <= self.max_seq_len
        self.seq_len += n

    def repeat_interleave(self, n: int) -> MLACache:
        """In place: row b becomes rows b*n .. b*n+n-1 (prefill a prompt once, decode n samples). Returns self."""
        if n < 1:
            raise ValueError(f"repeat_interleave needs n >= 1, got {n}")
        self.kv = [kv.repeat_interleave(n, dim=0) for kv in self.kv]
        return self

    def index_select(self, rows: Tensor) -> MLACache:
        """In place: keep only the given batch rows (e.g. drop finished sequences). Returns self."""
        self.kv = [kv.index_select(0, rows) for kv in self.kv]
        return self

    def reset(self) -> None:
        self.seq_len = 0
