"""MLA's inference cache: per layer and token, only the compressed KV latent and the shared RoPE key.

A standard multi-head cache stores 2 * H * head_dim values per token and layer (DeepSeek-V3: 2 * 128 * 128 =
32768). MLA stores c_KV (kv_lora_rank = 512) and k^R (qk_rope_head_dim = 64): 576 values, 57x less. The keys and
values are never materialized at inference: `model.attention.MLA` absorbs the up-projection kv_b_proj into the
query and the output (see its docstring).

The cache is preallocated for `max_seq_len` positions; `seq_len` counts the positions already written (the same for
every row of the batch: rows are left-padded, the attention mask hides the padding). A forward with a cache writes
its T new positions at [seq_len, seq_len + T) in every layer, then the model calls `advance(T)`.

Shape legend: L layers, B batch rows, S max positions, C kv_lora_rank, R qk_rope_head_dim, T new positions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from model.config import ModelConfig


class MLACache:
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
    ) -> None:
        if batch_size <= 0 or max_seq_len <= 0:
            raise ValueError(f"MLACache needs batch_size > 0 and max_seq_len > 0, got {batch_size}, {max_seq_len}")
        self.max_seq_len = max_seq_len
        self.seq_len = 0
        self.latent = [
            torch.zeros(batch_size, max_seq_len, kv_lora_rank, dtype=dtype, device=device) for _ in range(num_layers)
        ]  # L x [B, S, C]
        self.k_rope = [
            torch.zeros(batch_size, max_seq_len, qk_rope_head_dim, dtype=dtype, device=device)
            for _ in range(num_layers)
        ]  # L x [B, S, R]

    @classmethod
    def from_config(
        cls,
        cfg: ModelConfig,
        batch_size: int,
        max_seq_len: int,
        *,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ) -> MLACache:
        """A cache for the main model's layers (MTP modules are not run at inference)."""
        return cls(
            cfg.num_hidden_layers,
            batch_size,
            max_seq_len,
            cfg.kv_lora_rank,
            cfg.qk_rope_head_dim,
            dtype=dtype,
            device=device,
        )

    @classmethod
    def for_model(cls, model: torch.nn.Module, batch_size: int, max_seq_len: int) -> MLACache:
        """A cache in the dtype and on the device of `model`'s parameters (a `model.transformer.DeepseekV3`)."""
        p = model.model.embed_tokens.weight
        return cls.from_config(model.config, batch_size, max_seq_len, dtype=p.dtype, device=p.device)

    @property
    def batch_size(self) -> int:
        return self.latent[0].shape[0]

    @property
    def num_layers(self) -> int:
        return len(self.latent)

    @property
    def bytes_per_token(self) -> int:
        """Bytes one token occupies in this cache, summed over layers (per batch row)."""
        return sum(c[0, 0].nbytes + k[0, 0].nbytes for c, k in zip(self.latent, self.k_rope))

    def update(self, layer_idx: int, latent_BTC: Tensor, k_rope_BTR: Tensor) -> tuple[Tensor, Tensor]:
        """Write T new positions of one layer; return that layer's cache up to seq_len + T (views, no copy)."""
        T = latent_BTC.shape[1]
        end = self.seq_len + T
        if end > self.max_seq_len:
            raise ValueError(f"MLACache overflow: {self.seq_len} cached + {T} new > max_seq_len={self.max_seq_len}")
        if latent_BTC.shape[0] != self.batch_size:
            raise ValueError(f"MLACache holds {self.batch_size} rows, the forward has {latent_BTC.shape[0]}")
        self.latent[layer_idx][:, self.seq_len : end] = latent_BTC
        self.k_rope[layer_idx][:, self.seq_len : end] = k_rope_BTR
        return self.latent[layer_idx][:, :end], self.k_rope[layer_idx][:, :end]

    def advance(self, n: int) -> None:
        """Mark n more positions as written (the model calls this once per forward, after all layers)."""
        assert self.seq_len + n <= self.max_seq_len
        self.seq_len += n

    def repeat_interleave(self, n: int) -> MLACache:
        """In place: row b becomes rows b*n .. b*n+n-1 (prefill a prompt once, decode n samples). Returns self."""
        if n < 1:
            raise ValueError(f"repeat_interleave needs n >= 1, got {n}")
        self.latent = [c.repeat_interleave(n, dim=0) for c in self.latent]
        self.k_rope = [k.repeat_interleave(n, dim=0) for k in self.k_rope]
        return self

    def index_select(self, rows: Tensor) -> MLACache:
        """In place: keep only the given batch rows (e.g. drop finished sequences). Returns self."""
        self.latent = [c.index_select(0, rows) for c in self.latent]
        self.k_rope = [k.index_select(0, rows) for k in self.k_rope]
        return self

    def reset(self) -> None:
        self.seq_len = 0
