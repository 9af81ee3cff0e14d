"""Batched generation with MLA's latent KV cache: prefill each prompt once, then decode its n samples together.

How it works, step by step:

1. **Left padding.** Prompts of different lengths are right-aligned in one [B, L] batch; the pad slots are marked
   False in `attention_mask_BS`, so no real token ever attends to them, and each row's positions count from 0 at its
   first real token (RoPE sees exactly the positions it would see without padding).
2. **Prefill once.** One forward over the [B, L] prompts fills an `MLACache` with, per layer and token, only the
   compressed KV latent (kv_lora_rank) and the shared RoPE key (qk_rope_head_dim): this is what makes MLA cheap to
   serve. Then `cache.repeat_interleave(n)` copies each prompt's cache to its n samples (rows b*n .. b*n+n-1), so a
   GRPO group of n rollouts costs one prefill instead of n.
3. **Decode.** Each step feeds one token per row, appends one key position to the mask and draws the next token
   (`model.sampling`). A row that draws a stop token is finished: it keeps its stop token and leaves the batch
   (its cache rows are dropped with `cache.index_select`), so long rollouts do not pay for the ones already done.
   Decoding ends when every row is finished or `max_new_tokens` is reached.

Output order is prompt-major: prompt 0 samples 0..n-1, prompt 1 samples 0..n-1, ...

**Expert replicas (EPLB).** With `placement=phy2log` (an EPLB placement from `model.eplb`: per MoE layer,
the logical expert held by each physical slot; slot p lives on GPU p // (P / num_gpus)), every MoE layer's
(token, expert) requests are sent to physical slots with `replica_router` (the j-th request for an expert goes to
its replica j mod count, counted across the whole call), and the engine returns how many requests each slot served
(`slot_load_XP`) beside the logical loads (`expert_load_XE`). This is the dispatch decision of an expert-parallel
server, taken and counted on one device: a replica shares its logical expert's weights (nothing is copied), so the
tokens and logits are exactly those of generation without a placement. Every row the MoE layers compute counts,
the left padding of the prefill included; MTP modules do not run while decoding, so their rows stay zero.

Legend: B prompts, R = B * n output rows, A rows still active, L longest prompt, S key positions (cached + new),
V vocabulary, N max new tokens; X MoE layers (`model.moe_layers()` order), E logical experts, P physical slots.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from model.cache import MLACache
from model.sampling import SamplingParams, sample_next

PAD_ID = 0  # what left padding is filled with; masked out, so its value never matters

StreamFn = Callable[[int, int], None]  # stream(sample_index, token_id), called as each token is drawn


@dataclass
class GenerationOutput:
    """Generated tokens (stop token included when one was drawn), prompt-major: tokens[b * n + j]."""

    tokens: list[list[int]]
    logprobs: list[list[float]] | None  # per token, log p under softmax(logits / temperature); see model.sampling
    num_generated_tokens: int
    prefill_seconds: float
    decode_seconds: float
    expert_load_XE: Tensor | None = None  # with a placement: requests per logical expert, per MoE layer (int64)
    slot_load_XP: Tensor | None = None  # with a placement: requests served by each physical slot (sums to the above)

    @property
    def decode_tokens_per_second(self) -> float:
        return self.num_generated_tokens / max(self.decode_seconds, 1e-9)


def left_pad(prompts: Sequence[Sequence[int]], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Right-align prompts in one batch. Returns (input_ids_BL, attention_mask_BL bool, position_ids_BL)."""
    L = max(len(p) for p in prompts)
    ids_BL = torch.full((len(prompts), L), PAD_ID, dtype=torch.long)
    mask_BL = torch.zeros((len(prompts), L), dtype=torch.bool)
    for b, p in enumerate(prompts):
        ids_BL[b, L - len(p) :] = torch.tensor(list(p), dtype=torch.long)
        mask_BL[b, L - len(p) :] = True
    pos_BL = (mask_BL.long().cumsum(-1) - 1).clamp(min=0)
    return ids_BL.to(device), mask_BL.to(device), pos_BL.to(device)


class ReplicaDispatch:
    """Sends each MoE layer's requests to the physical slots of an EPLB placement and counts them, while attached.

    It observes the router's choice (a forward hook on every `moe.gate`, removed by `detach`), so the model code and the
    training path are untouched and generation without a placement pays nothing.
    """

    def __init__(self, model: torch.nn.Module, phy2log_XP: Tensor) -> None:
        from model.eplb import replica_router, slot_tables

        self.moes = list(model.moe_layers())
        E = model.config.n_routed_experts
        phy2log_XP = torch.as_tensor(phy2log_XP, dtype=torch.long)
        if phy2log_XP.dim() != 2 or phy2log_XP.shape[0] != len(self.moes):
            raise ValueError(
                f"placement must be phy2log [MoE layers={len(self.moes)}, slots], got shape {tuple(phy2log_XP.shape)}"
            )
        log2phy_XER, logcnt_XE = slot_tables(phy2log_XP, E)
        device = next(model.parameters()).device
        X, P = phy2log_XP.shape
        self.routes = [replica_router(log2phy_XER[x].to(device), logcnt_XE[x].to(device)) for x in range(X)]
        self.expert_load_XE = torch.zeros(X, E, dtype=torch.long, device=device)
        self.slot_load_XP = torch.zeros(X, P, dtype=torch.long, device=device)
        self.handles: list = []

    def _hook(self, x: int) -> Callable:
        E, P = self.expert_load_XE.shape[1], self.slot_load_XP.shape[1]

        def count(_module: torch.nn.Module, _inputs: tuple, output: tuple[Tensor, Tensor, Tensor]) -> None:
            topk_idx_NK = output[0]
            slot_NK = self.routes[x](topk_idx_NK, self.expert_load_XE[x])
            self.expert_load_XE[x] += torch.bincount(topk_idx_NK.reshape(-1), minlength=E)
            self.slot_load_XP[x] += torch.bincount(slot_NK.reshape(-1), minlength=P)

        return count

    def attach(self) -> None:
        self.handles = [moe.gate.register_forward_hook(self._hook(x)) for x, moe in enumerate(self.moes)]

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _check_args(prompts: Sequence[Sequence[int]], n_samples: int, max_new_tokens: int, vocab_size: int) -> None:
    if not prompts:
        raise ValueError("prompts is empty: give at least one prompt")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompts[{i}] is empty: every prompt needs at least one token (e.g. BOS)")
        if min(p) < 0 or max(p) >= vocab_size:
            raise ValueError(f"prompts[{i}] has token ids outside [0, {vocab_size})")
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")


@torch.inference_mode()
def generate(
    model: torch.nn.Module,
    prompts: list[list[int]],
    *,
    n_samples: int = 1,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    stop_token_ids: Sequence[int] = (),
    seed: int | None = None,
    return_logprobs: bool = False,
    stream: StreamFn | None = None,
    placement: Tensor | None = None,
) -> GenerationOutput:
    """Sample `n_samples` continuations of each prompt with a latent KV cache (see the module docstring).

    `model` is a `model.transformer.DeepseekV3`; temperature 0 (or top_k 1) is greedy; `seed` seeds a
    `torch.Generator` so that the same call draws the same tokens; `stream(sample_index, token_id)` is called for
    every token as soon as it is drawn (the chat CLI prints with it). `placement` (phy2log [MoE layers, slots], e.g.
    from `model.eplb.rebalance_experts`) routes expert requests to replicas and fills the output's
    `expert_load_XE` / `slot_load_XP` (see the module docstring); it never changes the tokens.
    """
    cfg = model.config
    _check_args(prompts, n_samples, max_new_tokens, cfg.vocab_size)
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k)
    params.validate()
    device = next(model.parameters()).device
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
    stop_S = torch.tensor(sorted(set(stop_token_ids)), dtype=torch.long, device=device)

    dispatch = ReplicaDispatch(model, placement) if placement is not None else None
    was_training = model.training
    model.eval()
    try:
        if dispatch is not None:
            dispatch.attach()
        ids_BL, mask_BS, pos_BL = left_pad(prompts, device)
        B, L = ids_BL.shape
        R = B * n_samples
        _sync(device)
        t0 = time.perf_counter()
        cache = MLACache.for_model(model, batch_size=B, max_seq_len=L + max_new_tokens)
        out = model(ids_BL, position_ids_BT=pos_BL, attention_mask_BT=mask_BS, cache=cache)
        logits_RV = out.logits_BTV[:, -1]
        if n_samples > 1:
            cache.repeat_interleave(n_samples)
            logits_RV = logits_RV.repeat_interleave(n_samples, dim=0)
            mask_BS = mask_BS.repeat_interleave(n_samples, dim=0)
            pos_BL = pos_BL.repeat_interleave(n_samples, dim=0)
        _sync(device)
        t1 = time.perf_counter()

        # decode: A = rows still active; rows_A maps them to their output row (compacted as rows finish)
        rows_A = torch.arange(R, device=device)
        next_pos_A1 = pos_BL[:, -1:] + 1
        mask_AS = mask_BS
        logits_AV = logits_RV
        tokens_RN = torch.full((R, max_new_tokens), PAD_ID, dtype=torch.long, device=device)
        logprobs_RN = torch.zeros((R, max_new_tokens), dtype=torch.float32, device=device)
        lengths_R = torch.zeros(R, dtype=torch.long, device=device)
        for step in range(max_new_tokens):
            tok_A, lp_A = sample_next(logits_AV, params, generator)
            tokens_RN[rows_A, step] = tok_A
            logprobs_RN[rows_A, step] = lp_A
            lengths_R[rows_A] += 1
            if stream is not None:
                for r, t in zip(rows_A.tolist(), tok_A.tolist()):
                    stream(r, t)
            if step == max_new_tokens - 1:
                break
            done_A = torch.isin(tok_A, stop_S)
            if bool(done_A.any()):  # finished rows leave the batch (and the cache)
                keep_A = (~done_A).nonzero().flatten()
                if keep_A.numel() == 0:
                    break
                rows_A, tok_A = rows_A[keep_A], tok_A[keep_A]
                mask_AS, next_pos_A1 = mask_AS[keep_A], next_pos_A1[keep_A]
                cache.index_select(keep_A)
            mask_AS = torch.cat([mask_AS, mask_AS.new_ones((mask_AS.shape[0], 1))], dim=1)
            out = model(tok_A[:, None], position_ids_BT=next_pos_A1, attention_mask_BT=mask_AS, cache=cache)
            logits_AV = out.logits_BTV[:, -1]
            next_pos_A1 = next_pos_A1 + 1
        _sync(device)
        t2 = time.perf_counter()
    finally:
        model.train(was_training)
        if dispatch is not None:
            dispatch.detach()

    lengths = lengths_R.tolist()
    tokens = [row[:n] for row, n in zip(tokens_RN.tolist(), lengths)]
    logprobs = [row[:n] for row, n in zip(logprobs_RN.tolist(), lengths)] if return_logprobs else None
    return GenerationOutput(
        tokens=tokens,
        logprobs=logprobs,
        num_generated_tokens=sum(lengths),
        prefill_seconds=t1 - t0,
        decode_seconds=t2 - t1,
        expert_load_XE=dispatch.expert_load_XE.cpu() if dispatch is not None else None,
        slot_load_XP=dispatch.slot_load_XP.cpu() if dispatch is not None else None,
    )
