"""The model side of evaluation: the model-backed generator, the forward-pass suites, checkpoint discovery and
loading, and the whole stage on a synthetic run directory (micro model, micro tokenizer, a few sandbox programs)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict

import numpy as np
import pytest
import torch

from data.pack import ShardWriter
from data.reasoning import write_reasoning_sets
from data.tokenizer import EOS, FIM_BEGIN, save_tokenizer, train_tokenizer
from eval.checkpoints import discover_checkpoints, label_of, load_checkpoint, newest_step_dir, run_dir_of
from eval.config import BpbEvalConfig, MoEEvalConfig
from eval.generation import ModelGenerator, Prompt, Sampling
from eval.run import _ckpt_shorthand
from eval.suite_lm import code_documents, document_batches, rolling_windows, run_bpb, run_moe
from model.config import ModelConfig
from model.generate import generate
from model.transformer import DeepseekV3
from rewards.humaneval import STOP_SEQUENCES, load_problems, truncate_completion
from train.chat import render_prompt
from train.checkpoint import CheckpointManager

VOCAB = 320


def micro_config(**kw) -> ModelConfig:
    base = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        n_shared_experts=1,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=1,
        kv_lora_rank=16,
        q_lora_rank=24,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
        max_position_embeddings=512,
        rope_scaling=None,
        num_nextn_predict_layers=1,
        bos_token_id=0,
        eos_token_id=1,
    )
    base.update(kw)
    return ModelConfig(**base).validate()


def micro_model(seed: int = 0, **kw) -> DeepseekV3:
    torch.manual_seed(seed)
    return DeepseekV3(micro_config(**kw)).eval()


@pytest.fixture(scope="module")
def problems():
    return load_problems()


@pytest.fixture(scope="module")
def tokenizer(problems):
    texts = [p.prompt + p.canonical_solution for p in problems[:40]] + ["What is 2 + 3? The answer is 5."] * 20
    return train_tokenizer(texts, vocab_size=VOCAB)


# ---------------------------------------------------------------- the generator


def test_generator_encodes_prompts_as_training_saw_them(tokenizer):
    gen = ModelGenerator(micro_model(), tokenizer)
    eos, fim = tokenizer.token_to_id(EOS), tokenizer.token_to_id(FIM_BEGIN)
    assert gen.encode(Prompt("hello", chat=True)) == render_prompt(tokenizer, "hello")
    raw = gen.encode(Prompt(FIM_BEGIN + "def f():"))
    assert raw[:2] == [eos, fim]  # a document start, then the sentinel as its single id
    assert tokenizer.decode(raw[2:]) == "def f():"


def test_generator_matches_generate_and_stops_at_newlines(tokenizer):
    model = micro_model()
    gen = ModelGenerator(model, tokenizer, batch_size=2)
    prompts = [Prompt("def add(a, b):\n"), Prompt("x = 1"), Prompt("What is 2 + 3?", chat=True)]
    out = gen(prompts, Sampling(n=2, temperature=0.0, max_new_tokens=12))
    assert [len(c) for c in out] == [2, 2, 2] and out[0][0] == out[0][1]  # greedy: the n samples agree
    ids = [gen.encode(p) for p in prompts]
    ref = generate(model, ids, max_new_tokens=12, temperature=0.0, stop_token_ids=[gen.eos])
    assert [c[0] for c in out] == [gen.decode(t) for t in ref.tokens]
    lines = gen(prompts, Sampling(n=1, temperature=1.0, max_new_tokens=40, stop_strings=("\n",)))
    assert all("\n" not in c for (c,) in lines), lines
    assert gen.stats["prompts"] == 6 and gen.stats["generated_tokens"] > 0


def test_generator_stop_strings_equal_decoding_everything_then_cutting(tokenizer, problems):
    """The generator's completions under stop strings are its unconstrained greedy completions cut at the first
    stop string (`rewards.humaneval.truncate_completion`, the scorer's cut), for fewer generated tokens."""
    gen = ModelGenerator(micro_model(), tokenizer, batch_size=2)
    prompts = [Prompt(p.prompt) for p in problems[:3]]
    free = [c for (c,) in gen(prompts, Sampling(n=1, temperature=0.0, max_new_tokens=24))]
    tokens_free, early_free = gen.stats["generated_tokens"], gen.stats["finished_early"]
    stops = (free[0][10:13], free[1][20:23], *STOP_SEQUENCES)  # two that occur in the random model's text
    out = gen(prompts, Sampling(n=1, temperature=0.0, max_new_tokens=24, stop_strings=stops))
    assert [c for (c,) in out] == [truncate_completion(c, stops) for c in free]
    assert gen.stats["generated_tokens"] - tokens_free < tokens_free
    assert gen.stats["finished_early"] - early_free >= 2  # at least the rows the two stop strings ended


def test_generator_truncates_long_prompts_to_the_context(tokenizer):
    gen = ModelGenerator(micro_model(max_position_embeddings=64), tokenizer)
    out = gen([Prompt("x = 1\n" * 100)], Sampling(n=1, max_new_tokens=8))
    assert len(out) == 1 and gen.stats["truncated_prompts"] == 1
    with pytest.raises(ValueError, match="max_new_tokens"):
        gen([Prompt("x")], Sampling(n=1, max_new_tokens=64))


# ---------------------------------------------------------------- forward-pass suites


def test_document_batches_shift_and_mask_padding():
    (batch,), owners = document_batches([[1, 5, 6, 1], [1, 7, 1]], batch_size=2, pad_id=1)
    x, y = batch
    assert x.tolist() == [[1, 5, 6], [1, 7, 1]] and y.tolist() == [[5, 6, 1], [7, 1, -100]]
    assert owners == [[0, 1]]


def test_rolling_windows_score_every_token_once_with_full_context():
    """A document longer than the context: disjoint predicted spans, each token conditioned on up to `context`
    tokens before it (lm-eval's rolling windows), the first on the EOS the document follows."""
    ids = list(range(100, 111))  # ids[0] is the EOS-like prefix; 10 tokens to score
    windows = rolling_windows(ids, context=4)
    scored = [t for _, y in windows for t in y if t >= 0]
    assert scored == ids[1:]
    for x, y in windows:
        assert len(x) == len(y) <= 4
        for pos, t in enumerate(y):
            if t >= 0:  # the input at pos is the token just before t
                assert x[pos] == t - 1
    assert windows[0] == (ids[0:4], ids[1:5]) and windows[1] == (ids[4:8], ids[5:9])
    assert windows[2] == (ids[6:10], [-100, -100, ids[9], ids[10]])  # the tail keeps a full context
    assert rolling_windows(ids[:3], context=8) == [(ids[0:2], ids[1:3])]


def test_code_bpb_equals_a_hand_computation(tokenizer, problems):
    """bpb = sum of next-token CE (nats) over the program's tokens / (UTF-8 bytes x ln 2), computed here with plain
    torch per document; EOS targets are not scored (the packed windows below end documents with one)."""
    model = micro_model()
    chosen = problems[:3]
    docs = code_documents(chosen, tokenizer)
    eos = tokenizer.token_to_id(EOS)
    nats, n_bytes = 0.0, 0
    with torch.no_grad():
        for d in docs:
            ids = torch.tensor(d)[None]
            logits = model(ids[:, :-1]).logits_BTV[0]
            nats += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            n_bytes += len(tokenizer.decode(d[1:]).encode("utf-8"))
    # the same programs as validation windows, each followed by an EOS target that must not count
    val, _ = document_batches([d + [eos] for d in docs], 2, eos)
    res = run_bpb(model, tokenizer, val, chosen, BpbEvalConfig(batch_size=2, code_problems=3))
    want = nats / (n_bytes * math.log(2))
    assert res.metrics["code/bpb"] == pytest.approx(want, rel=1e-5), (res.metrics["code/bpb"], want)
    assert res.metrics["val/bpb"] == pytest.approx(want, rel=1e-5)  # same text, EOS targets excluded: same figure
    assert res.metrics["code/documents"] == 3 and "mixed" in res.metrics["val/mix"]
    lo, hi = res.intervals["code/bpb"]
    assert lo <= res.metrics["code/bpb"] <= hi
    n_tokens = sum(len(d) - 1 for d in docs)
    uniform = n_tokens * math.log2(VOCAB) / n_bytes  # log2 V bits for every scored token
    assert res.floors["code/bpb"]["uniform"] == pytest.approx(uniform, rel=1e-9)
    assert "unigram" not in res.floors["code/bpb"]  # no train split given


def test_unigram_floor_from_the_train_split(tmp_path, tokenizer, problems):
    """The unigram floor is the cross entropy of the scored targets under the train split's token frequencies."""
    eos = tokenizer.token_to_id(EOS)
    train = [t for p in problems[50:60] for t in tokenizer.encode(p.prompt).ids + [eos]]
    w = ShardWriter(tmp_path / "train", VOCAB, eos, tokens_per_shard=4096)
    w.add(train)
    w.close(seq_len=32)
    counts = np.bincount(np.array(train), minlength=VOCAB) + 1.0
    logp = np.log(counts / counts.sum())
    docs = code_documents(problems[:2], tokenizer)
    targets = np.array([t for d in docs for t in d[1:]])
    want = -logp[targets].sum() / (sum(len(tokenizer.decode(d[1:]).encode()) for d in docs) * math.log(2))
    val, _ = document_batches(docs, 2, eos)
    cfg = BpbEvalConfig(code_problems=2)
    res = run_bpb(micro_model(), tokenizer, val, problems[:2], cfg, train_dir=tmp_path / "train")
    assert res.floors["code/bpb"]["unigram"] == pytest.approx(want, rel=1e-9)


def test_moe_load_and_maxvio(tokenizer):
    model = micro_model()
    x = torch.randint(0, VOCAB, (2, 16))
    batches = [(x, x), (x.flip(1), x)]
    m = run_moe(model, batches, MoEEvalConfig(batches=2)).metrics
    (load,) = m["expert_load"]  # one MoE layer (layer 0 is dense)
    assert sum(load) == pytest.approx(2 * 32 * 2)  # tokens x experts per token
    mean = sum(load) / len(load)
    assert m["maxvio/layer1"] == pytest.approx((max(load) - mean) / mean) and m["maxvio"] == m["maxvio/layer1"]
    # adversarial router: every token to experts 0 and 1 -> MaxVio = E/K - 1 = 3
    with torch.no_grad():
        for moe in model.moe_layers():
            moe.gate.weight.zero_()
            moe.gate.e_score_correction_bias.copy_(torch.tensor([5.0, 5.0, 0, 0, 0, 0, 0, 0]))
    collapsed = run_moe(model, batches, MoEEvalConfig(batches=2)).metrics
    assert collapsed["maxvio"] == pytest.approx(3.0) and collapsed["maxvio_batch"] == pytest.approx(3.0)
    bounds = run_moe(model, batches, MoEEvalConfig(batches=2)).floors["maxvio"]
    assert bounds == {"balanced": 0.0, "collapsed": 3.0}  # E/K - 1 with 8 experts, 2 per token
    dense = micro_model(first_k_dense_replace=2)
    assert "dense" in run_moe(dense, batches, MoEEvalConfig()).metrics["skipped"]


# ---------------------------------------------------------------- checkpoints


def test_discovery_picks_the_newest_complete_checkpoint_of_each_stage(tmp_path):
    for d in (
        "pretrain/checkpoints/step_000002",
        "pretrain/checkpoints/step_000010",
        "pretrain/checkpoints/.tmp-step_000020",
        "sft/checkpoints/step_000005",
        "distill/checkpoints/step_000003",
        "data",
    ):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "rl" / "hf").mkdir(parents=True)
    (tmp_path / "rl" / "hf" / "config.json").write_text("{}")
    (tmp_path / "data" / "tokenizer.json").write_text("{}")
    found = discover_checkpoints(tmp_path)
    assert list(found) == ["pretrain", "sft", "rl", "student"]
    assert found["pretrain"].name == "step_000010" and found["rl"].name == "hf"
    assert newest_step_dir(tmp_path / "missing") is None
    assert run_dir_of(found["sft"]) == tmp_path.resolve()
    assert label_of(found["student"], tmp_path.resolve()) == "student" and label_of(tmp_path, None) == "ckpt"
    assert _ckpt_shorthand(["ckpt=a/b", "run.name=x"]) == ["eval.ckpt=a/b", "run.name=x"]


def test_load_checkpoint_from_dcp_and_hf_gives_the_same_model(tmp_path, tokenizer):
    from model.hf import export_hf

    model = micro_model(seed=3)
    ckpt = CheckpointManager(tmp_path / "ckpts").save(7, model, None, {}, asdict(model.config))
    tok_path = tmp_path / "tokenizer.json"
    save_tokenizer(tokenizer, tok_path)
    export_hf(model, tmp_path / "hf", tokenizer_path=tok_path)
    x = torch.randint(0, VOCAB, (1, 12))
    want = model(x).logits_BTV
    for path in (ckpt, tmp_path / "hf"):
        got = load_checkpoint(path)(x).logits_BTV
        assert torch.allclose(got, want, atol=1e-5), f"{path}: max err {(got - want).abs().max():.2e}"
    with pytest.raises(ValueError, match="neither"):
        load_checkpoint(tmp_path)


# ---------------------------------------------------------------- the stage, end to end


@pytest.fixture(scope="module")
def run_root(tmp_path_factory, tokenizer, problems):
    """outputs/<run>/ with data (tokenizer, val shards, reasoning sets), a pretrained MoE and a dense student."""
    root = tmp_path_factory.mktemp("outputs")
    data = root / "r" / "data"
    save_tokenizer(tokenizer, data / "tokenizer.json")
    eos = tokenizer.token_to_id(EOS)
    w = ShardWriter(data / "val", VOCAB, eos, tokens_per_shard=4096)
    for p in problems[100:110]:
        w.add(tokenizer.encode(p.prompt).ids + [eos])
    w.close(seq_len=32)
    write_reasoning_sets(data / "reasoning", n_train=4, n_test=4)
    for stage, model in (("pretrain", micro_model(1)), ("distill", micro_model(2, first_k_dense_replace=2))):
        CheckpointManager(root / "r" / stage / "checkpoints").save(4, model, None, {}, asdict(model.config))
    from model.hf import export_hf

    export_hf(micro_model(1), root / "r" / "pretrain" / "hf", tokenizer_path=data / "tokenizer.json")
    return root


def test_eval_stage_on_a_synthetic_run(run_root):
    from eval.run import run
    from pipeline.config import compose

    overrides = [
        f"run.root={run_root}",
        "run.name=r",
        "eval=smoke",
        "wandb.mode=disabled",
        "eval.fim.max_tasks=2",
        "eval.fim.modes=[psm]",
        "eval.humaneval.max_problems=1",
        "eval.bpb.code_problems=2",
    ]
    metrics = run(compose(overrides))
    results = json.loads((run_root / "r" / "eval" / "eval.json").read_text())
    assert list(results) == ["pretrain", "student"]
    for label, suites in results.items():
        assert {"bpb", "fim", "humaneval", "reasoning", "moe", "generation"} <= set(suites), label
        assert 0 < suites["bpb"]["val/bpb"] < 20 and suites["humaneval"]["n_samples"] == 1
        assert 0 <= suites["reasoning"]["pass@1"] <= 1 and suites["reasoning"]["n_prompts"] == 4
        # every score carries its interval and its floors
        for suite, metric in (
            ("bpb", "code/bpb"),
            ("fim", "psm/pass@1"),
            ("humaneval", "pass@1"),
            ("reasoning", "pass@1"),
        ):
            lo, hi = suites[suite]["ci"][metric]
            assert lo <= suites[suite][metric] <= hi, (label, suite)
            assert suites[suite]["floor"][metric], (label, suite)
    assert results["pretrain"]["fim"]["floor"] == results["student"]["fim"]["floor"]  # model-free, computed once
    assert len(results["pretrain"]["moe"]["expert_load"]) == 1 and "skipped" in results["student"]["moe"]
    assert metrics["pretrain/fim/n_tasks"] == 2 and "pretrain/moe/expert_load" not in metrics
    assert "pretrain/humaneval/pass@1/ci_high" in metrics and "pretrain/humaneval/pass@1/floor_empty" in metrics
    assert (run_root / "r" / "eval" / "manifest.json").is_file()
    assert list((run_root / "r" / "eval").glob("samples_pretrain_*.jsonl"))
    assert run(compose(overrides)).get("skipped") is True  # same config and inputs: nothing to do


def test_eval_stage_on_one_hf_checkpoint_finds_its_run(run_root):
    """`ckpt=<run>/pretrain/hf` without run.name: the run directory, its data and the label come from the path."""
    from eval.run import run
    from pipeline.config import compose

    hf = run_root / "r" / "pretrain" / "hf"
    off = [f"eval.{s}.enabled=false" for s in ("fim", "humaneval", "reasoning")]
    metrics = run(compose([f"eval.ckpt={hf}", "wandb.mode=disabled", "eval=smoke", *off]))
    results = json.loads((run_root / "r" / "eval" / "eval.json").read_text())
    assert list(results) == ["pretrain"] and results["pretrain"]["checkpoint"]["path"] == str(hf)
    assert set(results["pretrain"]) == {"bpb", "moe", "generation", "checkpoint"}
    assert metrics["pretrain/bpb/val/bpb"] > 0 and "pretrain/moe/maxvio" in metrics


def test_config_defaults_and_validation():
    from eval.config import EvalConfig
    from pipeline.config import compose

    assert compose([]).eval == EvalConfig()  # conf/eval/default.yaml restates the dataclass defaults
    bad = EvalConfig()
    bad.fim.modes = ["pms"]
    with pytest.raises(ValueError, match="pms"):
        bad.validate()
    bad = EvalConfig()
    bad.humaneval.ks = [1, 10]
    with pytest.raises(ValueError, match="ks"):
        bad.validate()
    bad = EvalConfig()
    bad.humaneval.n_samples = 4
    with pytest.raises(ValueError, match="greedy"):
        bad.validate()
    bad = EvalConfig()
    bad.humaneval.max_new_tokens = 0
    with pytest.raises(ValueError, match="humaneval.max_new_tokens"):
        bad.validate()
    bad = EvalConfig()
    bad.bpb.code_problems = -2
    with pytest.raises(ValueError, match="code_problems"):
        bad.validate()
    assert EvalConfig().humaneval.max_problems == 0  # all 164 problems by default
