"""Next-token sampling: temperature, top-k and top-p (nucleus) truncation, seeded draws.

How a token is drawn from a row of logits `z` (vocabulary V):

1. temperature T: `z / T`. T -> 0 sharpens the distribution onto the argmax; `T == 0` means greedy decoding.
2. top-k: keep the k largest logits, set the others to -inf (k = 0 keeps all).
3. top-p: sort the remaining probabilities in decreasing order and keep the smallest prefix whose mass reaches p;
   the most likely token is always kept, so p -> 0 is greedy too (p = 1 keeps all).
4. draw from softmax of what is left with `torch.multinomial` and an explicit `torch.Generator`, so that a seed
   reproduces the same samples.

Speculative decoding (`model.speculative`) draws a token from a cheap draft distribution q and lets the target
distribution p accept or replace it (`verify_draft`): the tokens that come out follow p exactly, whatever q is.

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


def sampling_probs(logits_BV: Tensor, params: SamplingParams) -> Tensor:
    """The distribution `sample_next` draws from when not greedy: softmax of the truncated z / T (fp32 [B, V])."""
    scaled_BV = logits_BV.float() / params.temperature
    return filter_logits(scaled_BV, params.top_k, params.top_p).softmax(dim=-1)


def token_logprobs(logits_BV: Tensor, params: SamplingParams, tokens_B: Tensor) -> Tensor:
    """log p of the given tokens under log_softmax(z / T), before truncation (see the module docstring)."""
    logits_BV = logits_BV.float()
    scaled_BV = logits_BV / params.temperature if params.temperature > 0 else logits_BV
    return scaled_BV.log_softmax(dim=-1).gather(-1, tokens_B[:, None]).squeeze(-1)


def next_tokens(logits_BV: Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> Tensor:
    """Draw one token per row (int64 [B]): the argmax when greedy, else from `sampling_probs`."""
    if params.greedy:
        return logits_BV.float().argmax(dim=-1)
    return torch.multinomial(sampling_probs(logits_BV, params), 1, generator=generator).squeeze(-1)


def sample_next(
    logits_BV: Tensor, params: SamplingParams, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Draw one token per row. Returns (tokens_B int64, logprobs_B fp32 of those tokens, see module docstring)."""
    tokens_B = next_tokens(logits_BV, params, generator)
    return tokens_B, token_logprobs(logits_BV, params, tokens_B)


def verify_draft(
    target_logits_BV: Tensor,
    draft_B: Tensor,
    draft_probs_BV: Tensor | None,
    params: SamplingParams,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Speculative sampling's accept/resample rule for one drafted token per row: (accepted_B bool, fallback_B).

    The draft d was drawn from q (`draft_probs_BV`, the same `sampling_probs` transform of the draft model's
    logits); p = `sampling_probs` of the target logits. d is accepted with probability min(1, p(d) / q(d)); where it
    is rejected, the row's token is `fallback_B`, drawn from the residual max(0, p - q) renormalized. The token that
    comes out is then distributed exactly as p (Leviathan et al. 2023, Chen et al. 2023): accepting gives
    q(x) min(1, p(x)/q(x)) = min(q(x), p(x)), rejecting adds (1 - sum_y min(q(y), p(y))) * residual(x)
    = p(x) - min(q(x), p(x)). Greedy: d is accepted iff it is the target's argmax, which is also the fallback.
    `fallback_B` is computed for every row; it is only meaningful where the draft was rejected.
    """
    if params.greedy:
        best_B = target_logits_BV.float().argmax(dim=-1)
        return best_B == draft_B, best_B
    assert draft_probs_BV is not None, "sampled drafts need their draft distribution"
    p_BV = sampling_probs(target_logits_BV, params)
    p_d_B = p_BV.gather(-1, draft_B[:, None]).squeeze(-1)
    q_d_B = draft_probs_BV.gather(-1, draft_B[:, None]).squeeze(-1)
    u_B = torch.rand(draft_B.shape, generator=generator, device=draft_B.device)
    accepted_B = u_B * q_d_B < p_d_B
    residual_BV = (p_BV - draft_probs_BV).clamp(min=0.0)
    empty_B1 = residual_BV.sum(dim=-1, keepdim=True) <= 0  # only where p == q: nothing can be rejected there
    residual_BV = torch.where(empty_B1, p_BV, residual_BV)
    fallback_B = torch.multinomial(residual_BV, 1, generator=generator).squeeze(-1)
    return accepted_B, fallback_B
