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
4. **Stop strings.** With `stop_strings` and a `decode` function (token ids -> text), a row is also finished at the
   first step whose decoded continuation contains one of the strings (HumanEval's `"\ndef"`: the function is
   complete), and leaves the batch like a stop token. Each check decodes only the tokens a new match could touch
   (`StopStrings`), and the output's `texts` hold each row's decoded continuation cut before its first stop string.
5. **Speculative decoding (default when the model has an MTP module and runs on a GPU).** The MTP module drafts
   each next token and one forward of the main model over [last token, draft] verifies it: up to two tokens per
   forward, greedy output identical to plain decoding and sampled output distributed exactly as plain sampling
   (`model.speculative`). `speculative=False` decodes one token per forward, `True` drafts on any device; the
   output's `acceptance_rate` says how often drafts held.

Output order is prompt-major: prompt 0 samples 0..n-1, prompt 1 samples 0..n-1, ...

**Expert replicas (EPLB).** With `placement=phy2log` (an EPLB placement from `model.eplb`: per MoE layer,
the logical expert held by each physical slot; slot p lives on GPU p // (P / num_gpus)), every MoE layer's
(token, expert) requests are sent to physical slots with `replica_router` (the j-th request for an expert goes to
its replica j mod count, counted across the whole call), and the engine returns how many requests each slot served
(`slot_load_XP`) beside the logical loads (`expert_load_XE`). This is the dispatch decision of an expert-parallel
server, taken and counted on one device: a replica shares its logical expert's weights (nothing is copied), so the
tokens and logits are exactly those of generation without a placement. Every row the MoE layers compute counts,
the left padding of the prefill included; under speculative decoding that includes the MTP layer's rows and the
verified drafts (accepted or not), without it the MTP modules do not run and their rows stay zero.

Legend: B prompts, R = B * n output rows, A rows still active, L longest prompt, S key positions (cached + new),
V vocabulary, N max new tokens; X MoE layers (`model.moe_layers()` order), E logical experts, P physical slots.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass

import torch
from torch import Tensor

from model.attention import absorbed_weights_cached
from model.cache import MLACache
from model.sampling import SamplingParams, next_tokens, token_logprobs
from model.speculative import break_even_acceptance, decode_speculative, prefill_mtp

log = logging.getLogger(__name__)

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
    speculative: bool = False  # decoded with MTP drafts (model.speculative)
    draft_tokens: int = 0  # tokens the MTP module drafted and the main model verified
    accepted_tokens: int = 0  # drafts the main model accepted
    drafts_stopped: bool = False  # the default stopped drafting: acceptance below break-even (model.speculative)
    texts: list[str] | None = None  # with stop_strings: decode(tokens[i]) cut before its first stop string

    @property
    def decode_tokens_per_second(self) -> float:
        return self.num_generated_tokens / max(self.decode_seconds, 1e-9)

    @property
    def acceptance_rate(self) -> float:
        """Accepted / verified drafts (NaN when nothing was drafted, e.g. without speculative decoding)."""
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else float("nan")


DecodeFn = Callable[[list[int]], str]  # token ids -> text (e.g. a tokenizer's decode)


def cut_at_stop_strings(text: str, stop_strings: Sequence[str]) -> str:
    """`text` up to the earliest occurrence of any of the stop strings (all of it when none occurs)."""
    return text[: min((i for s in stop_strings if (i := text.find(s)) >= 0), default=len(text))]


class StopStrings:
    """Which output rows' decoded continuations contain a stop string, found as the tokens are drawn.

    A row's check decodes only its tokens drawn since the last check plus the `lookback` tokens before them: a match
    that is new ends in a new token and spans at most as many tokens as it has UTF-8 bytes, provided `decode` gives
    every token at least one byte of text (byte-level BPE does, special tokens included when they are kept). So a
    step costs a decode of a few tokens per row, never the whole row. A window that starts inside a multi-byte
    character decodes that character as U+FFFD, which no stop string is expected to contain.

    The text cut where the engine stops is the text "decode everything, then cut at the earliest stop string" gives,
    unless one stop string contains another past its first character ("ab" inside "xabc": the engine stops at "ab"
    before "xabc" is complete); none of the code stop sequences contains another.
    """

    def __init__(self, stop_strings: Sequence[str], decode: DecodeFn, R: int) -> None:
        self.strings, self.decode = tuple(stop_strings), decode
        self.lookback = max(len(s.encode("utf-8")) for s in self.strings)
        self.tokens: list[list[int]] = [[] for _ in range(R)]
        self.checked = [0] * R  # tokens of each row already searched
        self.hit = [False] * R

    def add(self, rows: list[int], toks: list[int]) -> None:
        for r, t in zip(rows, toks):
            self.tokens[r].append(t)

    def stopped(self, rows: list[int]) -> list[bool]:
        """For each row: does its continuation contain a stop string now? (Decodes only the new tail.)"""
        for r in rows:
            toks, start = self.tokens[r], self.checked[r]
            if self.hit[r] or start == len(toks):
                continue
            tail = self.decode(toks[max(0, start - self.lookback) :])
            self.hit[r] = any(s in tail for s in self.strings)
            self.checked[r] = len(toks)
        return [self.hit[r] for r in rows]

    def texts(self, tokens: list[list[int]]) -> list[str]:
        return [cut_at_stop_strings(self.decode(t), self.strings) for t in tokens]


class RowOutputs:
    """The R output rows' tokens and log-probabilities, appended as they are drawn (at most N per row).

    Decoding loops keep only their active rows (rows_A: each active row's output row) and call `emit`; a row's
    tokens are written at its own length, so rows may advance by different counts per step (speculative decoding).
    A row is done when it drew a stop token, holds N tokens (`full`) or its text holds a stop string (`stopped`).
    """

    def __init__(
        self,
        R: int,
        N: int,
        device: torch.device,
        stream: StreamFn | None,
        with_logprobs: bool,
        stops: StopStrings | None = None,
    ) -> None:
        self.N, self.stream, self.with_logprobs, self.stops = N, stream, with_logprobs, stops
        self.tokens_RN = torch.full((R, N), PAD_ID, dtype=torch.long, device=device)
        self.logprobs_RN = torch.zeros((R, N), dtype=torch.float32, device=device)
        self.lengths_R = torch.zeros(R, dtype=torch.long, device=device)

    def emit(
        self, rows_A: Tensor, tok_A: Tensor, logits_AV: Tensor, params: SamplingParams, take_A: Tensor | None = None
    ) -> None:
        """Append tok_A, drawn from logits_AV, to output rows rows_A, only where take_A (default: everywhere); their
        log-probabilities are computed only when the caller asked for them."""
        at_A = self.lengths_R[rows_A].clamp(max=self.N - 1)
        if take_A is not None:
            tok_A = torch.where(take_A, tok_A, self.tokens_RN[rows_A, at_A])
        self.tokens_RN[rows_A, at_A] = tok_A
        if self.with_logprobs:
            lp_A = token_logprobs(logits_AV, params, tok_A)
            self.logprobs_RN[rows_A, at_A] = (
                lp_A if take_A is None else torch.where(take_A, lp_A, self.logprobs_RN[rows_A, at_A])
            )
        self.lengths_R[rows_A] += 1 if take_A is None else take_A.long()
        if self.stream is not None or self.stops is not None:
            takes = [True] * len(rows_A) if take_A is None else take_A.tolist()
            taken = [(r, t) for r, t, k in zip(rows_A.tolist(), tok_A.tolist(), takes) if k]
            if self.stops is not None:
                self.stops.add([r for r, _ in taken], [t for _, t in taken])
            if self.stream is not None:
                for r, t in taken:
                    self.stream(r, t)

    def full(self, rows_A: Tensor) -> Tensor:
        """Rows that hold N tokens already (bool [A])."""
        return self.lengths_R[rows_A] >= self.N

    def stopped(self, rows_A: Tensor) -> Tensor:
        """Rows whose decoded continuation contains a stop string (bool [A]; all False without stop strings)."""
        if self.stops is None:
            return torch.zeros(rows_A.shape, dtype=torch.bool, device=rows_A.device)
        return torch.tensor(self.stops.stopped(rows_A.tolist()), dtype=torch.bool, device=rows_A.device)

    def lists(self) -> tuple[list[list[int]], list[list[float]] | None, list[int]]:
        lengths = self.lengths_R.tolist()
        tokens = [row[:n] for row, n in zip(self.tokens_RN.tolist(), lengths)]
        logprobs = [row[:n] for row, n in zip(self.logprobs_RN.tolist(), lengths)] if self.with_logprobs else None
        return tokens, logprobs, lengths


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


def decode_plain(
    model: torch.nn.Module,
    cache: MLACache,
    logits_AV: Tensor,
    mask_AS: Tensor,
    next_pos_A1: Tensor,
    out: RowOutputs,
    params: SamplingParams,
    stop_S: Tensor,
    generator: torch.Generator | None,
    rows_A: Tensor | None = None,
) -> None:
    """One token per row and step: draw from the last logits, feed the token back, until every row is done.

    logits_AV: the active rows' next-token logits (after a prefill, or a speculative phase); rows_A their output rows
    (default: all rows, in order)."""
    if rows_A is None:
        rows_A = torch.arange(logits_AV.shape[0], device=logits_AV.device)
    while True:
        tok_A = next_tokens(logits_AV, params, generator)
        out.emit(rows_A, tok_A, logits_AV, params)
        done_A = torch.isin(tok_A, stop_S) | out.full(rows_A) | out.stopped(rows_A)
        if bool(done_A.any()):  # finished rows leave the batch (and the cache)
            keep_A = (~done_A).nonzero().flatten()
            if keep_A.numel() == 0:
                break
            rows_A, tok_A = rows_A[keep_A], tok_A[keep_A]
            mask_AS, next_pos_A1 = mask_AS[keep_A], next_pos_A1[keep_A]
            cache.index_select(keep_A)
        mask_AS = torch.cat([mask_AS, mask_AS.new_ones((mask_AS.shape[0], 1))], dim=1)
        step = model(tok_A[:, None], position_ids_BT=next_pos_A1, attention_mask_BT=mask_AS, cache=cache)
        logits_AV = step.logits_BTV[:, -1]
        next_pos_A1 = next_pos_A1 + 1


def drafts_by_default(device: torch.device) -> bool:
    """Whether `speculative=None` drafts: on a GPU, where one decode step is bound by reading the weights and a
    forward over 2 positions costs about as much as over 1, yes; on a CPU, where the tiny models' decode is bound by
    compute and per-op overhead, a verify step costs more than an accepted draft saves even at high acceptance
    (bench/model_vs_hf.py's speculative rows), so no."""
    return torch.device(device).type == "cuda"


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
    speculative: bool | None = None,
    stop_strings: Sequence[str] = (),
    decode: DecodeFn | None = None,
) -> GenerationOutput:
    """Sample `n_samples` continuations of each prompt with a latent KV cache (see the module docstring).

    `model` is a `model.transformer.DeepseekV3`; temperature 0 (or top_k 1) is greedy; `seed` seeds a
    `torch.Generator` so that the same call draws the same tokens; `stream(sample_index, token_id)` is called for
    every token as soon as it is drawn (the chat CLI prints with it). `placement` (phy2log [MoE layers, slots], e.g.
    from `model.eplb.rebalance_experts`) routes expert requests to replicas and fills the output's
    `expert_load_XE` / `slot_load_XP` (see the module docstring); it never changes the tokens.
    `speculative`: decode with the MTP module's drafts (`model.speculative`): None (default) = when the model has an
    MTP module and runs on a GPU (`drafts_by_default`), stopping the drafts for the rest of the call when, after the
    first verify steps, their acceptance is below break-even (`break_even_acceptance`); True = always draft
    (required); False = never.
    Greedy tokens are those of plain decoding; sampled tokens follow the same distribution (another draw for the
    same seed).
    `stop_strings` (with `decode`, token ids -> text): a row is finished at the first step whose decoded
    continuation contains one of them (see `StopStrings`); its tokens keep the one that completed the match, and the
    output's `texts` hold `decode(tokens)` cut before the earliest stop string, for every row.
    """
    cfg = model.config
    _check_args(prompts, n_samples, max_new_tokens, cfg.vocab_size)
    if stop_strings and decode is None:
        raise ValueError("stop_strings need decode (token ids -> text) to read the continuation")
    if any(not s for s in stop_strings):
        raise ValueError(f"stop_strings must be non-empty strings, got {list(stop_strings)!r}")
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k)
    params.validate()
    has_mtp = len(getattr(model, "mtp", ())) > 0
    if speculative and not has_mtp:
        raise ValueError("speculative=True needs a model with an MTP module (num_nextn_predict_layers > 0)")
    device = next(model.parameters()).device
    use_mtp = (has_mtp and drafts_by_default(device)) if speculative is None else speculative
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
    stop_S = torch.tensor(sorted(set(stop_token_ids)), dtype=torch.long, device=device)

    dispatch = ReplicaDispatch(model, placement) if placement is not None else None
    was_training = model.training
    model.eval()
    drafted = accepted = 0
    handoff = None
    stack = ExitStack()
    try:
        if dispatch is not None:
            dispatch.attach()
        stack.enter_context(absorbed_weights_cached(model))  # the weights stay fixed for the whole call
        ids_BL, mask_BS, pos_BL = left_pad(prompts, device)
        B, L = ids_BL.shape
        R = B * n_samples
        _sync(device)
        t0 = time.perf_counter()
        slots = L + (2 * max_new_tokens if use_mtp else max_new_tokens)  # a verify step writes 2 positions
        cache = MLACache.for_model(model, batch_size=B, max_seq_len=slots)
        out = model(ids_BL, position_ids_BT=pos_BL, attention_mask_BT=mask_BS, cache=cache, logits_to_keep=1)
        logits_RV, hidden_R1D = out.logits_BTV[:, -1], out.hidden_BTD[:, -1:]
        mtp_cache = prefill_mtp(model, out.hidden_BTD, ids_BL, pos_BL, mask_BS, slots) if use_mtp else None
        if n_samples > 1:
            for c in (cache, mtp_cache):
                if c is not None:
                    c.repeat_interleave(n_samples)
            logits_RV, hidden_R1D = (
                logits_RV.repeat_interleave(n_samples, 0),
                hidden_R1D.repeat_interleave(n_samples, 0),
            )
            mask_BS = mask_BS.repeat_interleave(n_samples, dim=0)
            pos_BL = pos_BL.repeat_interleave(n_samples, dim=0)
        _sync(device)
        t1 = time.perf_counter()
        stops = StopStrings(stop_strings, decode, R) if stop_strings else None
        rows = RowOutputs(R, max_new_tokens, device, stream, return_logprobs, stops)
        next_pos_R1 = pos_BL[:, -1:] + 1
        if use_mtp:
            state = (logits_RV, hidden_R1D, mask_BS, next_pos_R1)
            min_acc = None if speculative else break_even_acceptance(cfg)  # the default drafts only while it pays
            drafted, accepted, handoff = decode_speculative(
                model, cache, mtp_cache, *state, rows, params, stop_S, generator, min_acceptance=min_acc
            )
            if handoff is not None:  # drafts did not pay: the rest without them, from the last drawn token
                rows_A, tok_A, pos_A1, mask_AS = handoff
                mask_AS = torch.cat([mask_AS, mask_AS.new_ones((mask_AS.shape[0], 1))], dim=1)
                step = model(tok_A[:, None], position_ids_BT=pos_A1, attention_mask_BT=mask_AS, cache=cache)
                logits_AV = step.logits_BTV[:, -1]
                decode_plain(model, cache, logits_AV, mask_AS, pos_A1 + 1, rows, params, stop_S, generator, rows_A)
        else:
            decode_plain(model, cache, logits_RV, mask_BS, next_pos_R1, rows, params, stop_S, generator)
        _sync(device)
        t2 = time.perf_counter()
    finally:
        stack.close()
        model.train(was_training)
        if dispatch is not None:
            dispatch.detach()

    tokens, logprobs, lengths = rows.lists()
    result = GenerationOutput(
        tokens=tokens,
        logprobs=logprobs,
        num_generated_tokens=sum(lengths),
        prefill_seconds=t1 - t0,
        decode_seconds=t2 - t1,
        expert_load_XE=dispatch.expert_load_XE.cpu() if dispatch is not None else None,
        slot_load_XP=dispatch.slot_load_XP.cpu() if dispatch is not None else None,
        speculative=use_mtp,
        draft_tokens=drafted,
        accepted_tokens=accepted,
        drafts_stopped=use_mtp and handoff is not None,
        texts=stops.texts(tokens) if stops is not None else None,
    )
    if use_mtp:
        log.info(
            "speculative decoding: %d/%d MTP drafts accepted (%.1f%%), %d tokens%s",
            accepted,
            drafted,
            100 * result.acceptance_rate if drafted else float("nan"),
            result.num_generated_tokens,
            "; drafting stopped (below break-even), the rest decoded plainly" if result.drafts_stopped else "",
        )
    return result
