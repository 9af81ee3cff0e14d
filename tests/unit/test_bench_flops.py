"""The compute accounting of bench/distill_vs_rl.py: what a GRPO step and a trace set cost, pass by pass."""

from __future__ import annotations

import json

import pytest

from bench.distill_vs_rl import grpo_flops, trace_flops


def test_grpo_flops_charge_the_old_policy_only_when_a_batch_is_reused(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 0, "eval_accuracy": 0.1}, {"step": 1, "response_len": 10.0, "degenerate_frac": 0.5}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    N, B, G, P = 1000, 4, 2, 6.0
    rollout = 2 * N * (B * P + B * G * 10)  # prefill once per prompt, decode every sample
    kept = 0.5 * B * G * (P + 10)  # tokens of the non-degenerate groups
    # one update: forward+backward only, plus the frozen reference's forward for the KL term
    assert grpo_flops(path, N, B, G, P, updates=1, with_ref=True) == pytest.approx(rollout + kept * N * (6 + 2))
    assert grpo_flops(path, N, B, G, P, updates=1, with_ref=False) == pytest.approx(rollout + kept * N * 6)
    # mu = 2 updates: two forward+backward passes, and the old policy's forward before them
    assert grpo_flops(path, N, B, G, P, updates=2, with_ref=True) == pytest.approx(rollout + kept * N * (12 + 2 + 2))


def test_trace_flops_count_rejected_samples_at_the_length_cap():
    prov = {"stats": {"prompts": 3, "samples": 12}, "sampling": {"max_new_tokens": 50}}
    traces = [{"n_tokens": 20}, {"n_tokens": 30}]
    assert trace_flops(prov, traces, 100, prompt_len=8.0) == 2 * 100 * (3 * 8.0 + 20 + 30 + 10 * 50)
