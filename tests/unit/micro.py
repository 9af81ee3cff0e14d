"""Micro-scale pieces the post-training tests share: a micro model config, a whole micro run directory, the overrides
that point a stage at it, and an oracle teacher for rejection sampling."""

from dataclasses import asdict
from pathlib import Path

import torch

from data.pack import ShardWriter
from data.reasoning import build_splits
from data.tokenizer import train_tokenizer
from model.config import ModelConfig
from model.transformer import DeepseekV3
from train.chat import eos_id, render_prompt
from train.checkpoint import CheckpointManager


def micro_config(vocab_size: int, **kw) -> ModelConfig:
    base = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        n_shared_experts=1,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=1,
        kv_lora_rank=16,
        q_lora_rank=24,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
        max_position_embeddings=256,
        rope_scaling=None,
        num_nextn_predict_layers=1,
        bos_token_id=0,
        eos_token_id=1,
    )
    base.update(kw)
    return ModelConfig(**base).validate()


REPO = Path(__file__).resolve().parents[2]
SEQ_LEN = 32


def write_code_shards(data: Path, tok) -> Path:
    """<data>/train: windows of SEQ_LEN tokens of the repository's train/*.py, packed as the data stage does (the
    pretraining-LM term of SFT and GRPO reads them)."""
    eos = eos_id(tok)
    writer = ShardWriter(data / "train", tok.get_vocab_size(with_added_tokens=True), eos, tokens_per_shard=4096)
    for path in sorted((REPO / "train").glob("*.py"))[:6]:
        writer.add(tok.encode(path.read_text(), add_special_tokens=False).ids + [eos])
    writer.close(seq_len=SEQ_LEN)
    return data / "train"


def make_micro_run(root: Path, name: str = "micro") -> Path:
    """outputs-like tree: <root>/<name>/data/{tokenizer.json, reasoning/, train/} and
    pretrain/checkpoints/step_000001."""
    run = root / name
    data = run / "data"
    data.mkdir(parents=True)
    ds = build_splits(n_train=24, n_test=8, seed=1)
    texts = [r["prompt"] + " " + r["completion"] for r in ds["train"]] * 4
    tok = train_tokenizer(texts, vocab_size=320)
    tok.save(str(data / "tokenizer.json"))
    ds.save_to_disk(str(data / "reasoning"))
    write_code_shards(data, tok)
    torch.manual_seed(0)
    cfg = micro_config(tok.get_vocab_size(with_added_tokens=True))
    CheckpointManager(run / "pretrain" / "checkpoints").save(1, DeepseekV3(cfg), None, {}, asdict(cfg))
    return run


def micro_overrides(root: Path, name: str = "micro") -> list[str]:
    return [
        "experiment=smoke",
        f"run.root={root}",
        f"run.name={name}",
        "wandb.mode=disabled",
        "sft.export_hf=false",
        "rl.export_hf=false",
    ]


def oracle(tok, rows):
    """A teacher that answers sample j of every prompt: 0 correct, 1 the same correct text again, 2 a wrong answer,
    3 correct but cut off before end-of-sentence. Records the seeds it was called with."""
    by_prompt = {tuple(render_prompt(tok, r["prompt"])): r for r in rows}
    eos = eos_id(tok)
    calls = []

    def enc(text):
        return tok.encode(text, add_special_tokens=False).ids

    def sample(prompts, n, seed):
        calls.append(seed)
        out = []
        for p in prompts:
            r = by_prompt[tuple(p)]
            right = enc(r["completion"])
            wrong = enc("<think>guess</think><answer>-999999</answer>")
            answers = [right + [eos], right + [eos], wrong + [eos], right]
            out += [answers[j % 4] for j in range(n)]
        return out

    sample.calls = calls
    return sample
