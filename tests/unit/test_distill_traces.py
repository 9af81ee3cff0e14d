"""Rejection sampling with an oracle teacher (known right, duplicate, wrong and unfinished answers) through the same
code path as the real teacher, provenance on disk, the top-k cache aligned with the student's targets, and the
generation-engine sampler's shapes on a micro model."""

import json

import pytest
import torch

from data.reasoning import build_splits
from data.tokenizer import train_tokenizer
from distill.config import TraceConfig
from distill.traces import (
    build_traces,
    load_traces,
    model_sampler,
    read_provenance,
    rejection_sample,
    trace_key,
)
from model.transformer import DeepseekV3
from tests.unit.micro import micro_config, oracle
from train.chat import encode_chat, eos_id, render_prompt
from train.sft import make_batch

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok_rows():
    ds = build_splits(n_train=10, n_test=0, seed=3)
    rows = ds["train"].to_list()
    tok = train_tokenizer([r["prompt"] + " " + r["completion"] for r in rows] * 4, vocab_size=300)
    return tok, rows


def test_rejection_sampling_keeps_correct_finished_distinct(tok_rows):
    tok, rows = tok_rows
    t = TraceConfig(samples_per_prompt=4, prompt_batch_size=3, max_per_prompt=4, dedup=True)
    traces, stats = rejection_sample(rows, oracle(tok, rows), tok, t, seed=0)
    n = len(rows)
    assert (stats.samples, stats.correct, stats.wrong, stats.unfinished) == (4 * n, 2 * n, n, n)
    assert (stats.duplicates, stats.accepted, stats.prompts_covered) == (n, n, n)
    assert stats.acceptance_rate == pytest.approx(0.5)
    assert [tr["source_id"] for tr in traces] == [r["id"] for r in rows]
    for tr, r in zip(traces, rows):
        assert tr["completion"] == r["completion"] and tr["sample"] == 0 and tr["prompt"] == r["prompt"]


def test_dedup_off_and_per_prompt_cap(tok_rows):
    tok, rows = tok_rows
    t = TraceConfig(samples_per_prompt=4, prompt_batch_size=4, max_per_prompt=0, dedup=False)
    traces, stats = rejection_sample(rows, oracle(tok, rows), tok, t)
    assert stats.accepted == 2 * len(rows) and stats.duplicates == 0
    t = TraceConfig(samples_per_prompt=8, prompt_batch_size=4, max_per_prompt=1, dedup=False)
    traces, stats = rejection_sample(rows, oracle(tok, rows), tok, t)
    assert stats.accepted == len(rows) and stats.capped == 3 * len(rows)  # 4 correct per prompt, 1 kept


def test_sampler_seeds_differ_per_batch_and_a_short_sampler_is_refused(tok_rows):
    tok, rows = tok_rows
    s = oracle(tok, rows)
    rejection_sample(rows, s, tok, TraceConfig(samples_per_prompt=2, prompt_batch_size=4), seed=5)
    assert len(set(s.calls)) == len(s.calls) == 3

    def short(prompts, n, seed):
        return [[eos_id(tok)]] * len(prompts)

    with pytest.raises(ValueError, match="sampler returned"):
        rejection_sample(rows, short, tok, TraceConfig(samples_per_prompt=2))


def test_build_traces_saves_dataset_with_provenance_and_aligned_topk(tok_rows, tmp_path):
    tok, rows = tok_rows
    torch.manual_seed(0)
    teacher = DeepseekV3(micro_config(tok.get_vocab_size(with_added_tokens=True))).eval()
    t = TraceConfig(samples_per_prompt=4, prompt_batch_size=5, cache_topk=5)
    ident = {"teacher_checkpoint": "x", "teacher_hash": "abc", "tokenizer_hash": "t", "reasoning_hash": "r"}
    traces, prov = build_traces(
        teacher, tok, rows, t, provenance=ident, out_dir=tmp_path / "traces", seed=7, sampler=oracle(tok, rows)
    )
    assert prov["stats"]["acceptance_rate"] == pytest.approx(0.5)
    assert prov["sampling"]["samples_per_prompt"] == 4 and prov["sampling"]["seed"] == 7
    loaded, prov2 = load_traces(tmp_path / "traces")
    assert prov2 == json.loads(json.dumps(prov)) and len(loaded) == len(rows)
    assert read_provenance(tmp_path / "traces")["teacher_hash"] == "abc"
    assert trace_key(prov2) == trace_key(prov)
    from datasets import load_from_disk

    assert json.loads(load_from_disk(str(tmp_path / "traces" / "dataset")).info.description)["teacher_hash"] == "abc"
    # cached top-k: one row per response target, equal to the teacher's logits there
    r0 = loaded[0]
    ids, mask = encode_chat(tok, r0["prompt"], r0["completion"])
    x, y = make_batch([(ids, mask)], eos_id(tok))
    with torch.no_grad():
        logits_TV = teacher(x).logits_BTV[0]
    resp = y[0] != -100
    assert len(r0["topk_ids"]) == int(resp.sum()) and len(r0["topk_ids"][0]) == 5
    want_vals, want_ids = logits_TV[resp].topk(5, dim=-1)
    torch.testing.assert_close(torch.tensor(r0["topk_logits"]), want_vals, atol=1e-5, rtol=1e-5)
    assert torch.tensor(r0["topk_ids"])[:, 0].tolist() == want_ids[:, 0].tolist()


def test_no_accepted_trace_is_a_clear_error(tok_rows, tmp_path):
    tok, rows = tok_rows

    def always_wrong(prompts, n, seed):
        return [tok.encode("<answer>nope</answer>", add_special_tokens=False).ids + [eos_id(tok)]] * (len(prompts) * n)

    with pytest.raises(ValueError, match="accepted no trace"):
        build_traces(
            None,
            tok,
            rows,
            TraceConfig(samples_per_prompt=2),
            provenance={},
            out_dir=tmp_path / "tr",
            seed=0,
            sampler=always_wrong,
        )
    assert not (tmp_path / "tr").exists()


def test_model_sampler_runs_the_generation_engine(tok_rows):
    tok, rows = tok_rows
    torch.manual_seed(0)
    teacher = DeepseekV3(micro_config(tok.get_vocab_size(with_added_tokens=True)))
    t = TraceConfig(samples_per_prompt=3, max_new_tokens=6, prompt_batch_size=2)
    sampler = model_sampler(teacher, t, [eos_id(tok)])
    prompts = [render_prompt(tok, r["prompt"]) for r in rows[:2]]
    out = sampler(prompts, 3, seed=1)
    assert len(out) == 6 and all(1 <= len(o) <= 6 for o in out)
    assert out == sampler(prompts, 3, seed=1)  # seeded
    traces, stats = rejection_sample(rows[:2], sampler, tok, t)
    assert stats.samples == 6 and stats.accepted == len(traces)


def test_fallback_to_reference_when_nothing_is_accepted(tok_rows, tmp_path):
    tok, rows = tok_rows

    def always_wrong(prompts, n, seed):
        return [tok.encode("<answer>nope</answer>", add_special_tokens=False).ids + [eos_id(tok)]] * (len(prompts) * n)

    t = TraceConfig(samples_per_prompt=2, fallback_to_reference=True)
    traces, prov = build_traces(
        None, tok, rows, t, provenance={}, out_dir=tmp_path / "tr", seed=0, sampler=always_wrong
    )
    assert prov["fallback"] == "reference" and prov["stats"]["acceptance_rate"] == 0.0
    assert [tr["completion"] for tr in traces] == [r["completion"] for r in rows]
    assert load_traces(tmp_path / "tr")[1]["fallback"] == "reference"


def test_a_right_answer_reached_through_a_false_step_is_rejected(tok_rows):
    """verify_steps drops a trace whose final answer is right but one of its `a op b = c` steps is false; off, the
    same trace is kept."""
    tok, rows = tok_rows
    rows = [r for r in rows if r["kind"] == "arith"][:3]
    eos = eos_id(tok)
    by_prompt = {tuple(render_prompt(tok, r["prompt"])): r for r in rows}

    def bad_step_teacher(prompts, n, seed):
        out = []
        for p in prompts:
            r = by_prompt[tuple(p)]
            text = f"<think>1 + 1 = 3. {r['answer']} + 0 = {r['answer']}.</think><answer>{r['answer']}</answer>"
            out += [tok.encode(text, add_special_tokens=False).ids + [eos]] * n
        return out

    on = TraceConfig(samples_per_prompt=1)
    traces, stats = rejection_sample(rows, bad_step_teacher, tok, on)
    assert (stats.correct, stats.wrong_steps, stats.accepted) == (3, 3, 0)
    off = TraceConfig(samples_per_prompt=1, verify_steps=False)
    traces, stats = rejection_sample(rows, bad_step_teacher, tok, off)
    assert (stats.wrong_steps, stats.accepted) == (0, 3)
