"""MTP speculative decoding: greedy output equals plain decoding token for token; sampled output follows the target.

References: plain decoding (`speculative=False`, itself held to full recomputation in test_generate.py); for sampling,
the exact distributions of the generated tokens, computed by enumerating every prefix with uncached full forwards,
and scipy's chi-square test. The statistical tests use fixed seeds (deterministic) and a significance level of 1e-3;
each also shows it has the power to fail: the draft distribution alone is rejected by the same test.
"""

from __future__ import annotations

import logging

import pytest
import torch
from scipy.stats import chisquare

import model.generate
from model.config import ModelConfig
from model.generate import RowOutputs, drafts_by_default, generate
from model.sampling import SamplingParams, sampling_probs, verify_draft
from model.transformer import DeepseekV3
from tests.kernels.tiny_model import tiny_config as shared_tiny_config

ALPHA = 1e-3


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def small_config(**kw) -> ModelConfig:
    """The kernel tests' micro model (shared_tiny_config) with vocab_size=32, max_position_embeddings=256."""
    return shared_tiny_config(**({"vocab_size": 32, "max_position_embeddings": 256} | kw))


def progressions(n: int, T: int, g: torch.Generator) -> torch.Tensor:
    """Arithmetic progressions mod 30 over tokens 2..31 (random start and stride 1..3): predictable from 2 tokens."""
    start, stride = torch.randint(0, 30, (n, 1), generator=g), torch.randint(1, 4, (n, 1), generator=g)
    return 2 + (start + stride * torch.arange(T)) % 30


@pytest.fixture(autouse=True)
def drafts_as_on_a_gpu(monkeypatch):
    """`speculative=None` drafts only on a GPU (`drafts_by_default`); these tests run that default on the CPU."""
    monkeypatch.setattr(model.generate, "drafts_by_default", lambda device: True)


def test_the_default_drafts_on_a_gpu_only(monkeypatch):
    monkeypatch.undo()
    assert drafts_by_default(torch.device("cuda")) and not drafts_by_default(torch.device("cpu"))
    torch.manual_seed(0)
    m = DeepseekV3(small_config()).eval()
    out = generate(m, prompts_of([3, 5], seed=1), max_new_tokens=6, temperature=0.0)
    assert not out.speculative and out.draft_tokens == 0


@pytest.fixture(scope="module")
def trained() -> DeepseekV3:
    """Briefly trained (main + MTP loss) on progressions: its MTP drafts are mostly, not always, right."""
    torch.manual_seed(0)
    model = DeepseekV3(small_config())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        x = progressions(16, 24, g)
        loss = model(x[:, :-1], targets_BT=x[:, 1:]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def prompts_of(lengths: list[int], seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [progressions(1, n, g)[0].tolist() for n in lengths]


def test_greedy_equals_plain_decoding_token_for_token(trained):
    prompts = prompts_of([5, 1, 8, 2], seed=1)  # left padding, and a one-token prompt (no MTP prefill)
    kw = dict(n_samples=2, max_new_tokens=13, temperature=0.0, return_logprobs=True)
    plain = generate(trained, prompts, speculative=False, **kw)
    stop = plain.tokens[2][4]  # rows stop at different steps, some right after an accepted draft
    plain = generate(trained, prompts, speculative=False, stop_token_ids=[stop], **kw)
    spec = generate(trained, prompts, stop_token_ids=[stop], **kw)
    assert spec.speculative and not plain.speculative
    assert spec.tokens == plain.tokens
    assert 0 < spec.accepted_tokens < spec.draft_tokens, "both accepted and rejected drafts must be exercised"
    for a, b in zip(spec.logprobs, plain.logprobs):
        assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-4, rtol=0), (a, b)
    # fewer main-model forwards: each accepted draft saves one
    assert spec.draft_tokens < plain.num_generated_tokens - len(plain.tokens)


def test_streams_the_tokens_it_returns(trained):
    prompts = prompts_of([4, 6], seed=2)
    seen: dict[int, list[int]] = {}
    out = generate(
        trained,
        prompts,
        n_samples=2,
        max_new_tokens=9,
        temperature=0.8,
        seed=3,
        stream=lambda r, t: seen.setdefault(r, []).append(t),
    )
    assert [seen[r] for r in range(4)] == out.tokens


# a decoding of the 32-token vocabulary: pieces of 1-3 characters, some starting with a newline
LETTERS = "abcdefghijklmnopqrstuvwxyz0123"
PIECES = ["<s>", "</s>"] + [("\n" if i % 4 == 0 else "") + LETTERS[i - 2] * (1 + i % 3) for i in range(2, 32)]


def decode_pieces(ids: list[int]) -> str:
    return "".join(PIECES[i] for i in ids)


def test_stop_strings_end_rows_on_the_token_plain_decoding_ends_on(trained, monkeypatch):
    """Stop strings that complete on the first token of a verify step (its bonus token must then be dropped) and on
    a bonus token: speculative output equals plain output, and both equal the unconstrained greedy continuation cut
    at the first step whose text holds a stop string."""
    prompts = prompts_of([5, 1, 8, 2], seed=1)
    kw = dict(n_samples=2, max_new_tokens=13, temperature=0.0, return_logprobs=True)
    free = generate(trained, prompts, speculative=False, **kw)
    texts = [decode_pieces(t) for t in free.tokens]
    # two characters across the boundary of tokens k-1 and k of rows 0, 2 and 4
    stops = sorted({texts[r][len(decode_pieces(free.tokens[r][:k])) - 1 :][:2] for r, k in ((0, 3), (2, 4), (4, 5))})
    plain = generate(trained, prompts, speculative=False, stop_strings=stops, decode=decode_pieces, **kw)
    last_kind: dict[int, str] = {}  # output row -> how its latest token came: "first" of a step or "bonus"
    emit = RowOutputs.emit

    def spy(self, rows_A, tok_A, logits_AV, params, take_A=None):
        emit(self, rows_A, tok_A, logits_AV, params, take_A)
        takes = [True] * len(rows_A) if take_A is None else take_A.tolist()
        last_kind.update({r: "first" if take_A is None else "bonus" for r, k in zip(rows_A.tolist(), takes) if k})

    monkeypatch.setattr(RowOutputs, "emit", spy)
    spec = generate(trained, prompts, speculative=True, stop_strings=stops, decode=decode_pieces, **kw)
    lengths = [
        next((k for k in range(1, len(t) + 1) if any(s in decode_pieces(t[:k]) for s in stops)), len(t))
        for t in free.tokens
    ]
    assert spec.tokens == plain.tokens == [t[:k] for t, k in zip(free.tokens, lengths)]
    assert spec.texts == plain.texts == [cut_at_first(x, stops) for x in texts]
    stopped = [r for r, k in enumerate(lengths) if k < kw["max_new_tokens"]]
    assert {last_kind[r] for r in stopped} == {"first", "bonus"}, (stops, lengths, last_kind)
    assert spec.accepted_tokens > 0  # (this model's drafts hold: a row that stopped on a "first" dropped its bonus)
    for a, b in zip(spec.logprobs, plain.logprobs):
        assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-4, rtol=0), (a, b)


def cut_at_first(text: str, stops: list[str]) -> str:
    return text[: min((i for s in stops if (i := text.find(s)) >= 0), default=len(text))]


def chi_square_p(samples: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of samples (token ids) drawn from probs [V]; bins expecting fewer than 5 draws are merged."""
    n = samples.numel()
    observed = torch.bincount(samples, minlength=probs.numel()).double()
    expected = probs.double() * n
    if observed[expected == 0].sum() > 0:  # a token of probability zero was drawn: impossible under the target
        return 0.0
    small = expected < 5
    obs = torch.cat([observed[~small], observed[small].sum()[None]]) if small.any() else observed
    exp = torch.cat([expected[~small], expected[small].sum()[None]]) if small.any() else expected
    keep = exp > 0
    return float(chisquare(obs[keep].numpy(), exp[keep].numpy() * obs.sum().item() / exp[keep].sum().item()).pvalue)


@pytest.mark.parametrize("params", [SamplingParams(1.0), SamplingParams(0.7, top_p=0.9), SamplingParams(1.2, top_k=4)])
def test_verify_draft_keeps_the_target_distribution(params):
    torch.manual_seed(0)
    V, N = 8, 100_000
    target_V, draft_V = torch.randn(V) * 1.5, torch.randn(V) * 1.5
    target_NV, draft_NV = target_V.expand(N, V), draft_V.expand(N, V)
    g = torch.Generator().manual_seed(1)
    q_NV = sampling_probs(draft_NV, params)
    d_N = torch.multinomial(q_NV, 1, generator=g).squeeze(-1)
    accepted_N, fallback_N = verify_draft(target_NV, d_N, q_NV, params, g)
    out_N = torch.where(accepted_N, d_N, fallback_N)
    p_V = sampling_probs(target_V[None], params)[0]
    assert chi_square_p(out_N, p_V) > ALPHA
    assert 0.05 < accepted_N.float().mean() < 0.95
    assert chi_square_p(d_N, p_V) < 1e-10, "the test must be able to tell the draft's distribution apart"


def test_verify_draft_greedy_accepts_only_the_argmax():
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 1.0]])
    accepted, fallback = verify_draft(logits, torch.tensor([1, 2]), None, SamplingParams(0.0))
    assert accepted.tolist() == [True, False] and fallback.tolist() == [1, 0]


def exact_marginals(model: DeepseekV3, prompt: list[int], n_tokens: int) -> list[torch.Tensor]:
    """The exact distribution of each of the first n_tokens sampled tokens (temperature 1), by enumeration."""
    V = model.config.vocab_size
    prefixes, weights = torch.tensor([prompt]), torch.ones(1, dtype=torch.float64)
    marginals = []
    with torch.no_grad():
        for _ in range(n_tokens):
            p_PV = model(prefixes).logits_BTV[:, -1].double().softmax(-1) * weights[:, None]
            marginals.append(p_PV.sum(0))
            P = prefixes.shape[0]
            prefixes = torch.cat([prefixes.repeat_interleave(V, 0), torch.arange(V).repeat(P)[:, None]], dim=1)
            weights = p_PV.reshape(-1)
    return marginals


def test_sampled_tokens_follow_the_target_distribution():
    """Tokens 2 and 3 of a speculative run pass through verify steps (accepted drafts, bonus draws, replacements)."""
    torch.manual_seed(0)
    model = DeepseekV3(small_config(vocab_size=12)).eval()
    with torch.no_grad():  # peaked but not degenerate distributions, and an MTP module that often disagrees
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
    prompt, N = [3, 7, 1, 9], 6000
    out = generate(model, [prompt], n_samples=N, max_new_tokens=3, temperature=1.0, seed=0)
    assert 0.1 < out.acceptance_rate < 0.9, out.acceptance_rate
    exact = exact_marginals(model, prompt, 3)
    samples = torch.tensor(out.tokens)
    for k in (0, 1, 2):
        assert chi_square_p(samples[:, k], exact[k]) > ALPHA, f"token {k + 1}"
    # power: token 2 as the MTP module alone would draw it (averaged over token 1) is rejected by the same test
    V, L = model.config.vocab_size, len(prompt)
    with torch.no_grad():
        h_1LD = model(torch.tensor([prompt])).hidden_BTD
        next_VL = torch.cat([torch.tensor(prompt[1:]).expand(V, L - 1), torch.arange(V)[:, None]], dim=1)
        pos_VL = torch.arange(L).expand(V, L)
        q_VV = model.mtp_forward(h_1LD.expand(V, L, -1), next_VL, position_ids_BT=pos_VL)[:, -1].double().softmax(-1)
    draft_marginal = (exact[0][:, None] * q_VV).sum(0)
    assert chi_square_p(samples[:, 1], draft_marginal) < 1e-10


def test_speculative_needs_an_mtp_module():
    torch.manual_seed(0)
    dense = DeepseekV3(small_config(num_nextn_predict_layers=0)).eval()
    out = generate(dense, [[2, 3, 4]], max_new_tokens=4, temperature=0.0)
    assert not out.speculative and out.draft_tokens == 0
    with pytest.raises(ValueError, match="needs a model with an MTP module"):
        generate(dense, [[2, 3, 4]], max_new_tokens=4, speculative=True)


def test_acceptance_rate_is_returned_and_logged(trained, caplog):
    with caplog.at_level(logging.INFO, logger="model.generate"):
        out = generate(trained, prompts_of([5], seed=4), max_new_tokens=8, temperature=0.0)
    assert out.acceptance_rate == out.accepted_tokens / out.draft_tokens
    assert f"{out.accepted_tokens}/{out.draft_tokens} MTP drafts accepted" in caplog.text


def test_the_default_stops_drafting_when_drafts_do_not_pay():
    """Random weights: the MTP module's drafts are nearly always rejected. The default reads the acceptance after
    CHECK_AFTER_STEPS verify steps and decodes the rest plainly; the tokens (and log-probabilities) are unchanged."""
    from model.speculative import CHECK_AFTER_STEPS, break_even_acceptance

    torch.manual_seed(0)
    model = DeepseekV3(small_config()).eval()
    prompts = prompts_of([5, 2, 7], seed=5)
    kw = dict(n_samples=2, max_new_tokens=20, temperature=0.0, return_logprobs=True)
    plain = generate(model, prompts, speculative=False, **kw)
    auto = generate(model, prompts, **kw)
    forced = generate(model, prompts, speculative=True, **kw)
    assert forced.acceptance_rate < break_even_acceptance(model.config) and not forced.drafts_stopped
    assert auto.drafts_stopped and auto.draft_tokens == CHECK_AFTER_STEPS * len(auto.tokens)
    assert auto.tokens == plain.tokens == forced.tokens
    with torch.no_grad():  # the plain continuation after the handoff sees the right positions and cache
        for prompt, toks, lps in zip([p for p in prompts for _ in range(2)], auto.tokens, auto.logprobs):
            logits_TV = model(torch.tensor([prompt + toks])).logits_BTV[0]
            want = logits_TV[len(prompt) - 1 : -1].log_softmax(-1).gather(-1, torch.tensor(toks)[:, None]).flatten()
            assert torch.allclose(torch.tensor(lps), want, atol=1e-4, rtol=0)
