"""Generation engine: cached greedy decoding == full recomputation, prefill once, sampling controls, streaming.

References: greedy decoding by full recomputation (argmax of an uncached forward over the whole sequence, one prompt
at a time, no padding); transformers' TopK/TopP logits warpers for the truncation rules.
"""

from __future__ import annotations

import io
import re

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

import model.generate as model_generate
from model.chat import EOS, TextStreamer, chat_turn, render_chat
from model.config import ModelConfig
from model.generate import generate, left_pad
from model.sampling import SamplingParams, filter_logits, sample_next
from model.transformer import DeepseekV3
from tests.kernels.tiny_model import tiny_config as shared_tiny_config


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models gain nothing from a 2nd thread, and on a loaded 2-core machine OpenMP's spinning barriers make
    each op up to 100x slower (measured: this file 60 s with 2 threads vs 9 s with 1 under load)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


PROMPTS = [[5, 17, 9, 30, 2, 44, 3], [7, 8], [60, 1, 22, 13]]  # different lengths: left padding matters


def tiny_config(**kw) -> ModelConfig:
    """The kernel tests' micro model (shared_tiny_config) with max_position_embeddings=256."""
    return shared_tiny_config(**({"max_position_embeddings": 256} | kw))


@pytest.fixture(scope="module")
def model() -> DeepseekV3:
    torch.manual_seed(0)
    m = DeepseekV3(tiny_config())
    with torch.no_grad():  # larger-than-init weights: peaked, well-separated logits so greedy choices are stable
        for p in m.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.15)
        for moe in m.moe_layers():
            moe.gate.e_score_correction_bias.normal_(0.0, 0.1)
    return m.eval()


def greedy_by_recompute(model: DeepseekV3, prompt: list[int], n_new: int) -> list[int]:
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n_new):
            logits_TV = model(torch.tensor([seq])).logits_BTV[0]
            seq.append(int(logits_TV[-1].argmax()))
    return seq[len(prompt) :]


# ------------------------------------------------------------------------------------------------ engine


def test_left_pad_positions_start_at_each_prompt():
    ids_BL, mask_BL, pos_BL = left_pad([[4, 5, 6], [7]], torch.device("cpu"))
    assert ids_BL.tolist() == [[4, 5, 6], [0, 0, 7]]
    assert mask_BL.tolist() == [[True, True, True], [False, False, True]]
    assert pos_BL[0].tolist() == [0, 1, 2] and pos_BL[1, -1].item() == 0


def test_cached_greedy_equals_full_recomputation(model):
    n_new = 12
    out = generate(model, PROMPTS, max_new_tokens=n_new, temperature=0.0)
    for prompt, got in zip(PROMPTS, out.tokens):
        want = greedy_by_recompute(model, prompt, n_new)
        assert got == want, f"prompt {prompt}: cached {got} != recomputed {want}"
    assert out.num_generated_tokens == n_new * len(PROMPTS)


@pytest.mark.parametrize("speculative", [False, True])
def test_generation_records_no_autograd_graph(model, speculative):
    """Every forward of a generate call (prefill, decode, drafts) runs in inference mode: no graph, no balance loss."""
    seen = []

    def record(module, args, output):
        seen.append((torch.is_inference_mode_enabled(), output.requires_grad))

    handles = [layer.self_attn.register_forward_hook(record) for layer in [*model.model.layers, model.mtp[0].layer]]
    try:
        generate(model, PROMPTS, max_new_tokens=4, temperature=0.0, speculative=speculative)
    finally:
        for h in handles:
            h.remove()
    assert seen and all(inference and not grad for inference, grad in seen), seen


@pytest.mark.parametrize("speculative", [False, True])
def test_prompt_prefilled_once_and_shared_by_samples(model, speculative):
    calls, mtp_calls = [], []
    orig, orig_mtp = model.forward, model.mtp_forward

    def counting_forward(input_ids_BT, *a, **kw):
        calls.append(tuple(input_ids_BT.shape))
        return orig(input_ids_BT, *a, **kw)

    def counting_mtp(h_BTD, next_ids_BT, **kw):
        mtp_calls.append(tuple(next_ids_BT.shape))
        return orig_mtp(h_BTD, next_ids_BT, **kw)

    model.forward, model.mtp_forward = counting_forward, counting_mtp
    try:
        n, n_new = 3, 5
        out = generate(
            model, PROMPTS, n_samples=n, max_new_tokens=n_new, temperature=1.0, seed=1, speculative=speculative
        )
    finally:
        del model.forward, model.mtp_forward
    L, R = max(len(p) for p in PROMPTS), len(PROMPTS) * n
    assert calls[0] == (len(PROMPTS), L), "one prefill over the B prompts, not B * n"
    assert len(out.tokens) == R and all(len(t) == n_new for t in out.tokens)
    if not speculative:
        assert all(c == (R, 1) for c in calls[1:]), calls
        assert len(calls) == n_new and not mtp_calls  # prefill + (n_new - 1) decode steps
        return
    # the MTP module prefills the prompts once too, then drafts for the R rows from each prompt's last position
    assert mtp_calls[:2] == [(len(PROMPTS), L - 1), (R, 1)], mtp_calls
    assert all(c[0] <= R and c[1] == 2 for c in calls[1:] + mtp_calls[2:]), (calls, mtp_calls)
    assert out.speculative and out.draft_tokens == sum(c[0] for c in calls[1:])
    assert len(calls) - 1 <= n_new - 1, "a verify step yields at least one token per row"


def test_samples_of_a_prompt_share_its_prefix(model):
    # greedy with n samples: all samples of one prompt equal that prompt's single greedy continuation
    out1 = generate(model, PROMPTS, max_new_tokens=6, temperature=0.0)
    outn = generate(model, PROMPTS, n_samples=2, max_new_tokens=6, temperature=0.0)
    for b in range(len(PROMPTS)):
        assert outn.tokens[2 * b] == outn.tokens[2 * b + 1] == out1.tokens[b]


def test_stop_tokens_stop_rows(model):
    free = generate(model, PROMPTS, max_new_tokens=8, temperature=0.0)
    stop = free.tokens[0][2]  # a token that the first row draws at step 2
    out = generate(model, PROMPTS, max_new_tokens=8, temperature=0.0, stop_token_ids=[stop], return_logprobs=True)
    for got, full in zip(out.tokens, free.tokens):
        cut = full.index(stop) + 1 if stop in full else len(full)
        assert got == full[:cut], "a row keeps its stop token and grows no further"
    assert out.tokens[0][-1] == stop and len(out.tokens[0]) <= 3
    assert [len(lp) for lp in out.logprobs] == [len(t) for t in out.tokens]
    assert out.num_generated_tokens == sum(len(t) for t in out.tokens)


def test_finished_rows_leave_the_batch(model):
    free = generate(model, PROMPTS, max_new_tokens=8, temperature=0.0)
    stop = free.tokens[1][1]  # row 1 stops after its second token
    calls = []
    orig = model.forward

    def counting_forward(input_ids_BT, *a, **kw):
        calls.append(input_ids_BT.shape[0])
        return orig(input_ids_BT, *a, **kw)

    model.forward = counting_forward
    try:  # plain decoding: one token per row and step
        out = generate(model, PROMPTS, max_new_tokens=8, temperature=0.0, stop_token_ids=[stop], speculative=False)
    finally:
        del model.forward
    assert out.tokens[1] == free.tokens[1][:2]
    n_active = [sum(1 for t in out.tokens if len(t) > step) for step in range(8)]
    assert calls[1:] == n_active[1 : len(calls)], (calls, n_active)  # decode step s feeds the rows still growing


def test_top_k_one_equals_greedy(model):
    greedy = generate(model, PROMPTS, max_new_tokens=8, temperature=0.0)
    topk1 = generate(model, PROMPTS, max_new_tokens=8, temperature=1.3, top_k=1, seed=3)
    assert topk1.tokens == greedy.tokens


def test_seeded_sampling_is_reproducible(model):
    kw = dict(n_samples=2, max_new_tokens=10, temperature=1.0, top_p=0.9, seed=1234, return_logprobs=True)
    a = generate(model, PROMPTS, **kw)
    b = generate(model, PROMPTS, **kw)
    c = generate(model, PROMPTS, **{**kw, "seed": 99})
    assert a.tokens == b.tokens and a.logprobs == b.logprobs
    assert a.tokens != c.tokens, "another seed should draw other tokens"


def test_logprobs_match_a_full_forward(model):
    out = generate(model, PROMPTS[:2], max_new_tokens=6, temperature=1.0, seed=5, return_logprobs=True)
    with torch.no_grad():
        for prompt, toks, lps in zip(PROMPTS, out.tokens, out.logprobs):
            logits_TV = model(torch.tensor([prompt + toks])).logits_BTV[0].float()
            want = logits_TV[len(prompt) - 1 : -1].log_softmax(-1).gather(-1, torch.tensor(toks)[:, None]).flatten()
            err = (torch.tensor(lps) - want).abs()
            assert err.max() < 1e-4, f"fp32 logprobs: max err {err.max():.2e}, mean {err.mean():.2e}"


def test_generate_rejects_bad_input(model):
    with pytest.raises(ValueError, match="prompts\\[1\\] is empty"):
        generate(model, [[1], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [[1]], max_new_tokens=2, top_p=0.0)
    with pytest.raises(ValueError, match="n_samples"):
        generate(model, [[1]], max_new_tokens=2, n_samples=0)


# ------------------------------------------------------------------------------------------------ sampling


@pytest.mark.parametrize("k", [1, 5, 40])
def test_top_k_matches_transformers(k):
    logits_BV = torch.randn(4, 50, generator=torch.Generator().manual_seed(k))
    want = TopKLogitsWarper(top_k=k)(None, logits_BV.clone())
    got = filter_logits(logits_BV, top_k=k)
    assert torch.equal(torch.isinf(got), torch.isinf(want))


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.999])
def test_top_p_matches_transformers(p):
    logits_BV = 3 * torch.randn(6, 50, generator=torch.Generator().manual_seed(int(p * 1000)))
    want = TopPLogitsWarper(top_p=p)(None, logits_BV.clone())
    got = filter_logits(logits_BV, top_p=p)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    assert (~torch.isinf(got)).sum(-1).min() >= 1


def test_sample_next_draws_from_the_truncated_distribution():
    logits_BV = torch.tensor([[0.0, 0.0, 5.0, -9.0]]).repeat(4000, 1)
    tok_B, lp_B = sample_next(logits_BV, SamplingParams(temperature=1.0, top_k=2), torch.Generator().manual_seed(0))
    assert set(tok_B.tolist()) <= {0, 1, 2}
    freq2 = (tok_B == 2).float().mean().item()
    p2 = torch.tensor([0.0, 0.0, 5.0]).softmax(-1)[2].item()  # top-2 keeps 2 and one of the zero-logit ties
    assert freq2 > 0.95 * p2
    assert torch.allclose(lp_B, logits_BV.log_softmax(-1).gather(-1, tok_B[:, None]).squeeze(-1))


# ------------------------------------------------------------------------------------------------ streaming chat


def tiny_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<｜begin▁of▁sentence｜>", EOS, "<｜User｜>", "<｜Assistant｜>"]
    trainer = trainers.BpeTrainer(vocab_size=96, special_tokens=specials)
    tok.train_from_iterator(["hello world, héllo wörld: 2 + 3 = 5 ✓"] * 4, trainer)
    tok.add_tokens([f"<extra_{i}>" for i in range(96 - tok.get_vocab_size())])  # every model id decodes
    assert tok.get_vocab_size() == 96
    return tok


def test_text_streamer_reassembles_multibyte_characters():
    tok = tiny_tokenizer()
    text = "héllo ✓ wörld"
    ids = tok.encode(text).ids
    s = TextStreamer(tok, skip_ids=[tok.token_to_id(EOS)])
    pieces = [s.push(i) for i in ids + [tok.token_to_id(EOS)]] + [s.flush()]
    assert "".join(pieces) == tok.decode(ids) and "\ufffd" not in "".join(pieces)


def test_chat_turn_streams_what_it_generates(model):
    tok = tiny_tokenizer()
    msgs = [{"role": "user", "content": "hello"}]
    prompt = render_chat(msgs, tok, bos_token_id=0)
    assert (
        prompt[0] == 0 and tok.token_to_id("<｜User｜>") in prompt and prompt[-1] == tok.token_to_id("<｜Assistant｜>")
    )
    buf = io.StringIO()
    reply, res = chat_turn(model, tok, msgs, buf, max_new_tokens=10, temperature=0.0)
    eos = {tok.token_to_id(EOS), model.config.eos_token_id}
    assert buf.getvalue() == reply == tok.decode([t for t in res.tokens[0] if t not in eos])
    assert res.tokens[0] == generate(model, [prompt], max_new_tokens=10, temperature=0.0, stop_token_ids=eos).tokens[0]


# ------------------------------------------------------------------------------------------------ stop strings


def cut_by_regex(text: str, stops: list[str]) -> str:
    """The reference cut: everything before the leftmost match of any stop string."""
    return re.split("|".join(map(re.escape, stops)), text, maxsplit=1)[0]


def first_hit(tokens: list[int], stops: list[str], decode) -> int:
    """Length of the shortest prefix whose full decoding contains a stop string (all tokens when none does)."""
    return next((k for k in range(1, len(tokens) + 1) if any(s in decode(tokens[:k]) for s in stops)), len(tokens))


def spanning_stop(tokens: list[int], decode, near: int) -> str:
    """Three characters of the row's text across a token boundary at or after token `near` (none of them U+FFFD)."""
    text = decode(tokens)
    for k in range(near, len(tokens)):
        head = decode(tokens[:k])
        piece = text[len(head) - 1 : len(head) + 2]
        if text.startswith(head) and len(piece) == 3 and "\ufffd" not in piece:
            return piece
    raise AssertionError(f"no clean token boundary after {near} in {text!r}")


@pytest.mark.parametrize("speculative", [False, True, None])  # None: drafts, then plain decoding from step 8
def test_stop_strings_equal_decoding_everything_then_cutting(model, speculative, monkeypatch):
    """Rows finish at the first step whose text holds a stop string, and report that text cut before it: exactly
    what decoding the unconstrained greedy continuation and cutting it at the leftmost stop string gives. The
    tokenizer is byte-level BPE with multi-byte characters split across tokens, and special tokens in the text."""
    monkeypatch.setattr(model_generate, "drafts_by_default", lambda device: True)  # the GPU default, on CPU
    tok = tiny_tokenizer()

    def decode(ids: list[int]) -> str:
        return tok.decode(ids, skip_special_tokens=False)

    n = 16
    free = generate(model, PROMPTS, max_new_tokens=n, temperature=0.0, speculative=False)
    stops = [spanning_stop(free.tokens[0], decode, 4), spanning_stop(free.tokens[1], decode, 10)]
    out = generate(
        model,
        PROMPTS,
        max_new_tokens=n,
        temperature=0.0,
        speculative=speculative,
        stop_strings=stops,
        decode=decode,
        return_logprobs=True,
    )
    assert out.speculative == (speculative is not False) and out.drafts_stopped == (speculative is None)
    lengths = [first_hit(t, stops, decode) for t in free.tokens]
    assert out.tokens == [t[:k] for t, k in zip(free.tokens, lengths)]
    assert out.texts == [cut_by_regex(decode(t), stops) for t in free.tokens]
    assert len(set(lengths)) > 1 and min(lengths) < n, f"rows must stop at different steps: {lengths}"
    assert [len(lp) for lp in out.logprobs] == [len(t) for t in out.tokens]
    assert out.num_generated_tokens == sum(lengths)


def test_stop_strings_decode_only_the_new_tail(model):
    """Each check decodes the token drawn since the last one plus a lookback of the longest stop string's bytes;
    the whole row is decoded once, for the output's text."""
    tok = tiny_tokenizer()
    windows: list[int] = []

    def decode(ids: list[int]) -> str:
        windows.append(len(ids))
        return tok.decode(ids, skip_special_tokens=False)

    n, stops = 40, ["\ndef", "zz"]
    for speculative in (False, True, None):
        windows.clear()
        kw = dict(max_new_tokens=n, temperature=0.0, speculative=speculative, stop_strings=stops, decode=decode)
        out = generate(model, PROMPTS, **kw)
        assert all(s not in t for t in out.texts for s in stops), "the test wants rows that never stop early"
        checks, final = windows[: -len(PROMPTS)], windows[-len(PROMPTS) :]
        assert len(checks) == n * len(PROMPTS) and max(checks) == len("\ndef") + 1, (speculative, max(checks))
        assert final == [len(t) for t in out.tokens] == [n] * len(PROMPTS)


def test_stop_strings_are_checked(model):
    with pytest.raises(ValueError, match="decode"):
        generate(model, [[1]], max_new_tokens=2, stop_strings=["x"])
    with pytest.raises(ValueError, match="non-empty"):
        generate(model, [[1]], max_new_tokens=2, stop_strings=["x", ""], decode=str)


# ------------------------------------------------------------------------------------------------ EPLB replicas


@pytest.fixture(scope="module")
def skewed_model(model) -> DeepseekV3:
    """The test model with a router bias that favours the low-numbered experts: a few experts run hot."""
    m = DeepseekV3(model.config)
    m.load_state_dict(model.state_dict())
    with torch.no_grad():
        for moe in m.moe_layers():
            moe.gate.e_score_correction_bias.copy_(torch.linspace(0.6, 0.0, moe.n_routed_experts))
    return m.eval()


def test_placement_routes_to_replicas_without_changing_tokens(skewed_model):
    from model.eplb import gpu_loads, imbalance, rebalance_experts

    m, E, gpus = skewed_model, skewed_model.config.n_routed_experts, 4
    X = len(list(m.moe_layers()))
    identity_XP = torch.arange(E).expand(X, E)
    plain = generate(m, PROMPTS, max_new_tokens=10, temperature=0.0)
    seen = []  # the model's own per-forward expert counts, to check the engine's logical loads against
    orig = m.forward

    def recording_forward(*a, **kw):
        out = orig(*a, **kw)
        seen.append(out.expert_load_LE)
        return out

    m.forward = recording_forward
    try:  # plain decoding: the MTP module never runs, so the engine's counts are the main forwards' own
        ident = generate(m, PROMPTS, max_new_tokens=10, temperature=0.0, placement=identity_XP, speculative=False)
    finally:
        del m.forward
    assert ident.tokens == plain.tokens and plain.slot_load_XP is None
    n_main = seen[0].shape[0]  # MTP's MoE does not run while decoding without drafts: its row stays zero
    assert torch.equal(ident.expert_load_XE[:n_main].float(), torch.stack(seen).sum(0))
    assert (ident.expert_load_XE[n_main:] == 0).all() and torch.equal(ident.slot_load_XP, ident.expert_load_XE)
    spec = generate(m, PROMPTS, max_new_tokens=10, temperature=0.0, placement=identity_XP, speculative=True)
    assert spec.speculative and spec.tokens == plain.tokens
    assert (spec.expert_load_XE[n_main:] > 0).any(), "with MTP drafts the MTP layer's requests are counted too"

    # plan on the loads of these prompts, serve OTHER prompts with the placement: 4 redundant slots on 4 GPUs
    phy2log, _, logcnt = rebalance_experts(ident.expert_load_XE.double() + 1, E + 4, 2, 1, gpus)
    others = [[3, 9, 27, 81, 50], [11, 12, 13], [90, 45, 22, 11, 5, 2]]
    plain2 = generate(m, others, max_new_tokens=10, temperature=0.0)
    out = generate(m, others, max_new_tokens=10, temperature=0.0, placement=phy2log)
    assert out.tokens == plain2.tokens, "replicas share their expert's weights: the tokens cannot change"
    by_expert = torch.zeros_like(out.expert_load_XE).scatter_add_(1, phy2log, out.slot_load_XP)
    assert torch.equal(by_expert, out.expert_load_XE), "per-slot loads must sum to the logical loads"
    # round robin per expert: every replica of an expert serves its share, within one request
    share = out.expert_load_XE.double() / logcnt
    assert ((out.slot_load_XP - share.gather(1, phy2log)).abs() < 1).all()
    before = imbalance(out.expert_load_XE[:n_main].view(n_main, gpus, -1).sum(-1))
    after = imbalance(out.slot_load_XP[:n_main].view(n_main, gpus, -1).sum(-1))
    assert before.min() > 1.3, f"the skewed model should load its GPUs unevenly, got {before.tolist()}"
    assert (after < before).all(), f"identity {before.tolist()} vs EPLB {after.tolist()}"
    planned = imbalance(gpu_loads(out.expert_load_XE[:n_main], phy2log[:n_main], logcnt[:n_main], gpus))
    assert torch.allclose(after, planned, atol=0.05), "served loads match EPLB's equal-share model"


def test_placement_rejects_wrong_shape(model):
    with pytest.raises(ValueError, match="placement must be phy2log"):
        generate(model, PROMPTS, max_new_tokens=2, placement=torch.arange(8)[None])
    with pytest.raises(ValueError, match="at least one physical slot"):
        generate(model, PROMPTS, max_new_tokens=2, placement=torch.zeros(2, 8, dtype=torch.long))
