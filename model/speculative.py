"""MTP speculative decoding: the MTP module drafts the next token, one forward of the main model verifies it.

DeepSeek-V3 trains its Multi-Token Prediction module to predict the token two steps ahead (report section 2.2) and
notes that at inference it can serve as the draft model of speculative decoding (85-90% acceptance of the second
token in the report, ~1.8x tokens per second). How it works here, per decoding step and row:

1. **State.** The last token t (drawn, not yet fed to the model) at position p, and a draft d for the token after
   it, drawn from the MTP module's distribution q.
2. **Verify.** One main-model forward over the two positions [t, d] gives the target distributions p_0 (for the
   token after t) and p_1 (for the token after d). Speculative sampling's rule (`model.sampling.verify_draft`)
   accepts d with probability min(1, p_0(d) / q(d)), else draws a replacement from max(0, p_0 - q) renormalized, so
   the token that comes out follows p_0 exactly; greedy decoding accepts d iff it is p_0's argmax, so greedy output is
   plain greedy decoding's, token for token. When d is accepted, a bonus token is drawn from p_1: two tokens for one
   forward. The log-probability reported for each token is the main model's, as in plain decoding.
3. **Draft.** The MTP module runs on its own latent cache over the same two positions: position p combines the main
   model's final hidden state at p with the embedding of the token now known to follow (d or its replacement),
   position p+1 the hidden state at p+1 with the bonus token. Its output at the last valid position drafts the next
   step's d (DeepSeek-V3's MTP inputs, exactly as in training: `DeepseekV3.mtp_forward`).

**Rejected drafts leave holes.** Every verify step writes two positions into both caches. Where the draft was
rejected, the second position holds a token that is not part of the sequence: its slot stays in the caches but is
masked out of every later attention (the same mechanism as left padding), and the row's RoPE positions continue
from the real tokens. So rows of a batch may accept different counts without any cache copy or re-alignment; the
caches hold up to 2 positions per new token. Rows that draw a stop token, complete a stop string or reach
max_new_tokens leave the batch (their cache rows are dropped), as in plain decoding; when the first token of a step
ends the row, its bonus token is dropped, so the row ends on the token plain decoding ends on.

**Prefill.** The prompt goes through the main model once; the MTP module then prefills its cache over the prompt
positions 0..L-2 (the token after each is known), once per prompt, before the cache rows are copied to the n samples
of the prompt. After each sample's first token is drawn, one MTP step at the prompt's last position drafts the
second token.

Only the first MTP module drafts (one draft token per step; DeepSeek-V3 has one module). Each step costs one main
forward over 2 positions plus one MTP layer and head: it pays when the acceptance rate is high (a trained MTP
module), and costs time when it is low (e.g. random weights), while the output is correct either way. So the
engine's default reads the acceptance rate once, after the first verify steps, and decodes the rest of the call
without drafts when it is below `break_even_acceptance`. The switch depends only on tokens already drawn, so every
token still follows the target distribution (and greedy output is unchanged).

Legend: A rows still active, S cache positions, V vocabulary, D hidden; suffix 2 = the two positions of a step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from model.cache import MLACache
from model.sampling import SamplingParams, next_tokens, sampling_probs, verify_draft

if TYPE_CHECKING:
    from model.generate import RowOutputs


def prefill_mtp(
    model: torch.nn.Module, hidden_BLD: Tensor, ids_BL: Tensor, pos_BL: Tensor, mask_BL: Tensor, max_seq_len: int
) -> MLACache:
    """The MTP module's latent cache over prompt positions 0..L-2 (position i sees the hidden state at i and the
    prompt token i+1); position L-1 waits for the first drawn token."""
    cache = MLACache.for_model(model, ids_BL.shape[0], max_seq_len, mtp=True)
    if ids_BL.shape[1] > 1:
        model.mtp_forward(
            hidden_BLD[:, :-1],
            ids_BL[:, 1:],
            position_ids_BT=pos_BL[:, :-1],
            attention_mask_BT=mask_BL[:, :-1],
            cache=cache,
            logits_to_keep=1,
        )
    return cache


CHECK_AFTER_STEPS = 8  # verify steps after which the default decides whether drafting pays


def break_even_acceptance(cfg) -> float:
    """The draft acceptance rate below which drafting costs more than it saves, estimated from the model's shape.

    A verify step costs about one main forward plus the MTP module (one decoder layer and the output head, against
    the main model's num_hidden_layers layers and head) and yields 1 + acceptance tokens per row: drafting pays when
    1 + acceptance > 1 + 2 / (num_hidden_layers + 1). (DeepSeek-V3's 61 layers: 3%; the 4-layer tiny preset: 40%.)"""
    return 2.0 / (cfg.num_hidden_layers + 1)


def _draw(logits_AV: Tensor, params: SamplingParams, generator: torch.Generator | None) -> tuple[Tensor, Tensor | None]:
    """A draft token per row and the distribution it was drawn from (None when greedy)."""
    if params.greedy:
        return logits_AV.float().argmax(dim=-1), None
    q_AV = sampling_probs(logits_AV, params)
    return torch.multinomial(q_AV, 1, generator=generator).squeeze(-1), q_AV


def decode_speculative(
    model: torch.nn.Module,
    cache: MLACache,
    mtp_cache: MLACache,
    logits_AV: Tensor,
    hidden_A1D: Tensor,
    mask_AS: Tensor,
    next_pos_A1: Tensor,
    out: RowOutputs,
    params: SamplingParams,
    stop_S: Tensor,
    generator: torch.Generator | None,
    min_acceptance: float | None = None,
) -> tuple[int, int, tuple[Tensor, Tensor, Tensor, Tensor] | None]:
    """Decode after a prefill (both caches filled, `logits_AV` / `hidden_A1D` at the last prompt position) into
    `out`; returns (drafts verified, drafts accepted, handoff). See the module docstring.

    With `min_acceptance`, the acceptance rate is read once, after CHECK_AFTER_STEPS verify steps; below it the loop
    stops and returns handoff = (rows_A, last token_A, its position_A1, mask_AS without it) for plain decoding to
    continue (the last token is drawn but not yet in the cache). Otherwise handoff is None: every row is done."""
    dev = logits_AV.device
    rows_A = torch.arange(logits_AV.shape[0], device=dev)
    tok_A = next_tokens(logits_AV, params, generator)  # the first token, from the prefill
    out.emit(rows_A, tok_A, logits_AV, params)
    done_A = torch.isin(tok_A, stop_S) | out.full(rows_A) | out.stopped(rows_A)
    pos_A1 = next_pos_A1  # position of tok_A
    # the MTP module's next input: hidden states, the tokens that follow them, positions; first the prompt's last
    mtp_h_AtD, mtp_ids_At, mtp_pos_At = hidden_A1D, tok_A[:, None], pos_A1 - 1
    acc_A = torch.zeros_like(tok_A, dtype=torch.bool)  # whether the last draft was accepted
    drafted, accepted_A, step_2 = 0, torch.zeros((), dtype=torch.long, device=dev), torch.arange(2, device=dev)
    steps = 0
    while True:
        if bool(done_A.any()):  # finished rows leave the batch and both caches
            keep_A = (~done_A).nonzero().flatten()
            if keep_A.numel() == 0:
                break
            rows_A, tok_A, pos_A1, mask_AS, acc_A = (t[keep_A] for t in (rows_A, tok_A, pos_A1, mask_AS, acc_A))
            mtp_h_AtD, mtp_ids_At, mtp_pos_At = (t[keep_A] for t in (mtp_h_AtD, mtp_ids_At, mtp_pos_At))
            cache.index_select(keep_A)
            mtp_cache.index_select(keep_A)
        if min_acceptance is not None and steps == CHECK_AFTER_STEPS and int(accepted_A) < min_acceptance * drafted:
            return drafted, int(accepted_A), (rows_A, tok_A, pos_A1, mask_AS)
        # draft: after an accepted draft the MTP output at the bonus position, else at the position before it
        draft_At_V = model.mtp_forward(
            mtp_h_AtD, mtp_ids_At, position_ids_BT=mtp_pos_At, attention_mask_BT=mask_AS, cache=mtp_cache
        )
        draft_logits_AV = torch.where(acc_A[:, None], draft_At_V[:, -1], draft_At_V[:, 0])
        d_A, q_AV = _draw(draft_logits_AV, params, generator)

        # verify: one main forward over [last token, draft]
        pos_A2 = pos_A1 + step_2
        mask_AS = torch.cat([mask_AS, mask_AS.new_ones((mask_AS.shape[0], 2))], dim=1)
        o = model(torch.stack([tok_A, d_A], dim=1), position_ids_BT=pos_A2, attention_mask_BT=mask_AS, cache=cache)
        acc_A, fix_A = verify_draft(o.logits_BTV[:, 0], d_A, q_AV, params, generator)
        bonus_A = next_tokens(o.logits_BTV[:, 1], params, generator)
        first_A = torch.where(acc_A, d_A, fix_A)
        out.emit(rows_A, first_A, o.logits_BTV[:, 0], params)
        stop_first_A = torch.isin(first_A, stop_S) | out.stopped(rows_A)  # then the bonus token is not taken
        take_bonus_A = acc_A & ~stop_first_A & ~out.full(rows_A)
        out.emit(rows_A, bonus_A, o.logits_BTV[:, 1], params, take_bonus_A)
        done_A = stop_first_A | (take_bonus_A & torch.isin(bonus_A, stop_S)) | out.full(rows_A) | out.stopped(rows_A)
        drafted += acc_A.shape[0]
        accepted_A = accepted_A + acc_A.sum()
        mask_AS[:, -1] = acc_A  # a rejected draft's position is a hole from now on

        steps += 1
        tok_A = torch.where(acc_A, bonus_A, first_A)
        pos_A1 = pos_A1 + 1 + acc_A.long()[:, None]
        mtp_h_AtD, mtp_ids_At, mtp_pos_At = o.hidden_BTD, torch.stack([first_A, bonus_A], dim=1), pos_A2
    return drafted, int(accepted_A), None
