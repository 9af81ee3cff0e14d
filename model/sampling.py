"""Next-token sampling: temperature, top-k and top-p (nucleus) truncation, seeded draws.

How a token is drawn from a row of logits `z` (vocabulary V):

1. temperature T: `z / T`. T -> 0 sharpens the distribution onto the argmax; `T == 0` means greedy decoding.
2. top-k: keep the k largest logits, set the others to -inf (k = 0 keeps all).
3. top-p: sort the remaining probabilities in decreasing order and keep the smallest prefix whose mass reaches p;
   the most likely token is always kept, so p -> 0 is greedy too (p = 1 keeps all).
4. draw from softmax of what is left with `torch.multinomial` and an explicit `torch.Generator`, so that a seed
   reproduces the same samples.

The log-probability reported for a sampled token is taken under the temperature-scaled distribution *before*
truncation, `log_softmax(z / T)` (plain `log_softmax(z)` when greedy): with T = 1 and no truncation, which is what
GRPO rollouts use, it is exactly the policy's log-probability that the trainer recomputes.

Legend: B rows (sequences being decoded), V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingParams:
    """How to turn logits into a token. `temperature == 0` (or `top_k == 1`) is greedy decoding."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0

    def validate(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


def filter_logits(logits_BV: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Set the logits outside the top-k and the top-p nucleus to -inf (returns a new tensor)."""
    logits_BV = logits_BV.clone()
    V = logits_BV.shape[-1]
    if 0 < top_k < V:
        kth_B1 = torch.topk(logits_BV, top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    if top_p < 1.0:
        sorted_BV, order_BV = torch.sort(logits_BV, dim=-1, descending=True)
        cum_BV = sorted_BV.softmax(dim=-1).cumsum(dim=-1)
        # drop a token when the mass *before* it already reaches top_p: the first token is always kept
        drop_sorted_BV = (cum_BV - sorted_BV.softmax(dim=-1)) >= top_p
        drop_BV = torch.zeros_like(drop_sorted_BV).scatter(-1, order_BV, drop_sorted_BV)
        logits_BV = logits_BV.masked_fill(drop_BV, float("-inf"))
    return logits_BV


def sample_next(
    logits_BV: Tensor, params: SamplingParams, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Draw one token per row. Returns (tokens_B int64, logprobs_B fp32 of those tokens, see module docstring)."""
    logits_BV = logits_BV.float()
    scaled_BV = logits_BV / params.temperature if params.temperature > 0 else logits_BV
    logprobs_BV = scaled_BV.log_softmax(dim=-1)
    if params.greedy:
        tokens_B = logits_BV.argmax(dim=-1)
    else:
        probs_BV = filter_logits(scaled_BV, params.top_k, params.top_p).softmax(dim=-1)
        tokens_B = torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)
    return tokens_B, logprobs_BV.gather(-1, tokens_B[:, None]).squeeze(-1)
