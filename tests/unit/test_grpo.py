"""GRPO: advantages, the clipped surrogate, k3 KL and the aggregation modes on hand-computed tensors; a toy policy
learning from a fake reward; graders that fail; the stage end to end with resume."""

import json
import math
from pathlib import Path

import pytest
import torch

from model.generate import generate
from model.transformer import DeepseekV3
from pipeline.config import compose
from tests.unit.micro import make_micro_run, micro_config, micro_overrides
from train.grpo import (
    aggregate,
    clipped_surrogate,
    group_advantages,
    grpo_update,
    k3_kl,
    pack_sequences,
    prompt_indices,
    score_completions,
    token_logprobs,
)
from train.grpo import run as run_grpo
from train.optim import build_optimizer
from train.post_config import GRPOConfig
from train.sft import run as run_sft

pytestmark = pytest.mark.usefixtures("one_thread")


def test_group_advantages_normalize_within_groups_and_flag_degenerate_ones():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [2.0, 0.0, 1.0, 1.0]])
    adv, deg = group_advantages(r, "std")
    s = math.sqrt(1 / 3)  # unbiased std of (1, 0, 0, 1)
    want0 = torch.tensor([0.5, -0.5, -0.5, 0.5]) / s
    assert torch.allclose(adv[0], want0, atol=1e-5), adv[0]
    assert deg.tolist() == [False, True, False]
    assert torch.equal(adv[1], torch.zeros(4))  # all rewards equal: no signal
    assert torch.allclose(adv[2], torch.tensor([1.0, -1.0, 0.0, 0.0]) / math.sqrt(2 / 3), atol=1e-5)
    adv_dr, _ = group_advantages(r, "none")  # Dr. GRPO: no std division
    assert torch.allclose(adv_dr[2], torch.tensor([1.0, -1.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="adv_norm"):
        group_advantages(r, "rank")


def test_k3_kl_hand_values_and_monte_carlo_against_torch_kl():
    logp = torch.log(torch.tensor([[0.5, 0.25]]))
    ref = torch.log(torch.tensor([[0.25, 0.25]]))
    # d = log(0.25/0.5): exp(d) - d - 1 = 0.5 + log 2 - 1
    assert torch.allclose(k3_kl(logp, ref), torch.tensor([[0.5 + math.log(2) - 1, 0.0]]), atol=1e-6)
    # unbiased: the mean over samples of pi approaches KL(pi || ref) computed by torch.distributions
    g = torch.Generator().manual_seed(0)
    p_logits, q_logits = torch.randn(6, generator=g), torch.randn(6, generator=g)
    pi, rf = torch.distributions.Categorical(logits=p_logits), torch.distributions.Categorical(logits=q_logits)
    x = torch.multinomial(pi.probs, 200_000, replacement=True, generator=g)
    est = k3_kl(pi.log_prob(x), rf.log_prob(x))
    true = torch.distributions.kl_divergence(pi, rf).item()
    se = est.std().item() / math.sqrt(len(x))
    assert abs(est.mean().item() - true) < 4 * se, f"k3 mean {est.mean().item():.5f} vs KL {true:.5f} (se {se:.5f})"


def test_clipped_surrogate_hand_values_and_zero_gradient_when_clipped():
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.5, 1.5, 0.5, 0.5]])).requires_grad_()
    adv = torch.tensor([1.0])
    loss, clipped = clipped_surrogate(logp, old, adv, clip_eps=0.2, clip_eps_high=0.28)
    assert torch.allclose(loss, torch.tensor([[-1.28, -1.28, -0.5, -0.5]]), atol=1e-6)
    assert clipped.tolist() == [[True, True, False, False]]
    loss_n, clipped_n = clipped_surrogate(logp, old, -adv, clip_eps=0.2, clip_eps_high=0.28)
    # negative advantage: min(-rho, -clip(rho)) -> rho=1.5 unclipped (1.5), rho=0.5 clipped at 0.8
    assert torch.allclose(loss_n, torch.tensor([[1.5, 1.5, 0.8, 0.8]]), atol=1e-6)
    assert clipped_n.tolist() == [[False, False, True, True]]
    loss.sum().backward()
    # d(-rho A)/dlogp = -rho A on unclipped tokens, 0 where the clipped branch is taken
    assert torch.allclose(logp.grad, torch.tensor([[0.0, 0.0, -0.5, -0.5]]), atol=1e-6)


def test_aggregation_modes_match_their_formulas_and_split_over_micro_batches():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0], [2.0, 2.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0]], dtype=torch.bool)
    n_seqs, n_tok, L = 3, 6, 5
    # DAPO: all tokens equal: (1+2+3 + 4 + 2+2) / 6
    assert aggregate(loss, mask, "token_mean", n_seqs, n_tok, L).item() == pytest.approx(14 / 6)
    # GRPO: mean over sequences of per-sequence token means: (2 + 4 + 2) / 3
    assert aggregate(loss, mask, "seq_mean", n_seqs, n_tok, L).item() == pytest.approx(8 / 3)
    # Dr. GRPO: token sum over a constant: 14 / (3 * 5)
    assert aggregate(loss, mask, "seq_sum_norm", n_seqs, n_tok, L).item() == pytest.approx(14 / 15)
    for mode in ("token_mean", "seq_mean", "seq_sum_norm"):
        full = aggregate(loss, mask, mode, n_seqs, n_tok, L)
        parts = aggregate(loss[:2], mask[:2], mode, n_seqs, n_tok, L) + aggregate(
            loss[2:], mask[2:], mode, n_seqs, n_tok, L
        )
        assert torch.allclose(full, parts), mode
    with pytest.raises(ValueError, match="loss_agg"):
        aggregate(loss, mask, "sum", n_seqs, n_tok, L)


def test_pack_sequences_masks_completion_targets():
    ids, mask = pack_sequences([[5, 6, 7], [5]], [[8, 9], [4, 4, 1]], pad_id=1)
    assert ids.tolist() == [[5, 6, 7, 8, 9], [5, 4, 4, 1, 1]]
    # position t predicts token t+1: completion tokens are predicted from positions len(p)-1 .. len(p)+len(c)-2
    assert mask.tolist() == [[False, False, True, True], [True, True, True, False]]


def test_grader_exception_scores_zero_and_is_counted():
    good = {"kind": "arith", "answer": "12", "meta": "{}", "prompt": "p"}
    broken = {"kind": "countdown", "answer": "10", "meta": "{}", "prompt": "p"}  # no numbers: the verifier raises
    done = "<think>5 + 7 = 12.</think><answer>12</answer>"
    s = score_completions([done, "<think>x</think><answer>2 * 5</answer>", done], [good, broken, good], 0.5)
    assert s.correct == [1.0, 0.0, 1.0]
    assert s.format == [1.0, 1.0, 1.0]
    assert s.reward == [1.5, 0.5, 1.5]
    assert s.errors == 1


def test_countdown_expression_and_arith_number_are_graded_by_kind():
    cd = {"kind": "countdown", "answer": "13", "meta": json.dumps({"numbers": [1, 1, 11], "target": 13})}
    ar = {"kind": "arith", "answer": "13", "meta": "{}"}
    texts = [
        "<think>.</think><answer>11 + 1 + 1</answer>",
        "<think>.</think><answer>13</answer>",
        "<think>.</think><answer>11 + 2</answer>",
        "<think>.</think><answer>13.0</answer>",
    ]
    s = score_completions(texts, [cd, cd, cd, ar], 0.0)
    assert s.correct == [1.0, 0.0, 0.0, 1.0]  # "13" does not reach 13 from the numbers; 2 is not given
    assert s.errors == 0


def test_prompt_indices_are_resumable_epoch_permutations():
    idx = [i for s in range(6) for i in prompt_indices(9, 3, s, seed=4)]
    assert sorted(idx[:9]) == list(range(9)) and sorted(idx[9:]) == list(range(9))
    assert prompt_indices(9, 3, 4, seed=4) == idx[12:15]


def test_token_logprobs_are_those_of_the_tempered_policy_that_sampled():
    """With temperature tau the log-probabilities are log softmax(logits / tau) of the next token, and generation at
    tau samples from exactly that distribution (its first token's empirical frequencies match)."""
    torch.manual_seed(0)
    model = DeepseekV3(micro_config(16, max_position_embeddings=32)).eval()
    ids = torch.tensor([[0, 3, 5, 7, 2]])
    logits = model(ids[:, :-1]).logits_BTV.float()
    for tau in (1.0, 0.5):
        logp, ent = token_logprobs(model, ids, "fp32", with_entropy=True, temperature=tau)
        want = torch.log_softmax(logits / tau, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        torch.testing.assert_close(logp, want)
        assert ent.shape == logp.shape
    n = 4000
    gen = generate(model, [[0, 3, 5, 7]], n_samples=n, max_new_tokens=1, temperature=0.5, seed=1)
    freq = torch.bincount(torch.tensor([t[0] for t in gen.tokens]), minlength=16).float() / n
    p = torch.softmax(logits[0, -1] / 0.5, -1)
    assert (freq - p).abs().max() < 0.03


def test_grpo_update_moves_a_toy_policy_toward_higher_reward():
    """Fake reward: 1 when the first sampled token is in the 'good' half of the vocabulary. With a KL weight,
    a few GRPO batches must raise the policy's probability of a good first token."""
    torch.manual_seed(0)
    model = DeepseekV3(micro_config(16, max_position_embeddings=32))
    ref = DeepseekV3(micro_config(16, max_position_embeddings=32))
    ref.load_state_dict(model.state_dict())
    ref.requires_grad_(False)
    r = GRPOConfig(group_size=16, max_new_tokens=2, updates_per_batch=2, micro_batch_size=8, kl_coef=0.05)
    r.optim.lr = 1e-2
    opt = build_optimizer(model, r.optim)
    prompt = [0, 3, 5, 7]

    def p_good() -> float:
        with torch.no_grad():
            return model(torch.tensor([prompt])).logits_BTV[0, -1].softmax(-1)[:8].sum().item()

    before = p_good()
    for it in range(6):
        gen = generate(model, [prompt], n_samples=r.group_size, max_new_tokens=2, seed=it)
        rewards = torch.tensor([[float(t[0] < 8) for t in gen.tokens]])
        adv, deg = group_advantages(rewards)
        if deg.all():
            continue
        ids, mask = pack_sequences([prompt] * r.group_size, gen.tokens, pad_id=1)
        stats, bad = grpo_update(model, ref, opt, ids, mask, adv.flatten(), r)
        assert bad is None
        assert stats["kl"] >= 0.0 and 0.0 <= stats["clip_frac"] <= 1.0 and stats["entropy"] > 0.0
    after = p_good()
    assert after > before + 0.15, f"P(good first token) {before:.3f} -> {after:.3f}"


def test_grpo_stage_runs_counts_and_resumes(tmp_path):
    run = make_micro_run(tmp_path)
    run_sft(compose(micro_overrides(tmp_path) + ["sft.steps=2", "sft.eval_n=0", "sft.table_every=0"]))
    over = micro_overrides(tmp_path)
    res = run_grpo(compose(over + ["rl.steps=2"]))
    assert Path(res["checkpoint"]).name == "step_000002"
    for key in ("degenerate_groups", "grader_errors", "skipped_batches", "eval_accuracy", "eval_accuracy_initial"):
        assert key in res, key
    rows = [json.loads(line) for line in (run / "rl" / "metrics.jsonl").read_text().splitlines()]
    per_step = [r for r in rows if "reward_mean" in r]
    for key in (
        "reward_std",
        "accuracy",
        "format_rate",
        "response_len",
        "kl",
        "clip_frac",
        "entropy",
        "rollout_tokens_per_s",
        "gen_time_s",
        "learn_time_s",
    ):
        assert key in per_step[0], key
    # the counter equals the per-step degenerate fractions summed
    n_deg = sum(round(r["degenerate_frac"] * 2) for r in per_step)
    assert res["degenerate_groups"] == n_deg
    assert (run / "rl" / "samples.jsonl").is_file() and (run / "rl" / "curves.png").is_file()
    assert run_grpo(compose(over + ["rl.steps=2"]))["skipped"] is True
    res = run_grpo(compose(over + ["rl.steps=3"]))  # another config: starts over, the 2-step attempt set aside
    assert Path(res["checkpoint"]).name == "step_000003" and (run / "rl" / "superseded").is_dir()
    rows = [json.loads(line) for line in (run / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "reward_mean" in r] == [1, 2, 3]
    ckpt = run / "rl" / "checkpoints" / "step_000003"
    res = run_grpo(compose(over + ["rl.steps=4", f"rl.resume={ckpt}"]))  # extended on purpose: resumes at step 3
    assert Path(res["checkpoint"]).name == "step_000004"
    rows = [json.loads(line) for line in (run / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "reward_mean" in r] == [1, 2, 3, 4]
