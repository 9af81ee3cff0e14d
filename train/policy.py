"""A reasoning policy's checkpoint, the RL reward on its completions and its held-out accuracy: shared by SFT, GRPO,
distillation and the evaluation stage, so that the number training optimizes is the number every stage reports.

- `score_completions`: reward = correct + format_weight * format, with the graders of rewards/graders.py (the
  answer checked by rule: numeric match for arithmetic, the Countdown expression verified; the
  `<think>...</think><answer>...</answer>` layout). A grader that raises scores that sample 0 and is counted.
- `evaluate_accuracy`: greedy (or pass@1 over k samples) held-out accuracy through the generation engine and the
  chat template (train/chat.py), scored by `score_completions`.
- `newest_checkpoint`, `load_policy`: the upstream stage's newest checkpoint, rebuilt from its model_config.json.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from kernels.formats import ScaleFormats
from model.config import ModelConfig
from model.generate import generate
from rewards.graders import get_reward, score_safely, shows_thinking, task_reward
from train.chat import decode_completion, eos_id, render_prompt
from train.checkpoint import CheckpointManager, read_model_config
from train.runtime import autocast, build_model


@dataclass
class Scores:
    reward: list[float]
    correct: list[float]
    format: list[float]
    errors: int  # samples whose grading raised (scored 0)


def score_completions(completions: list[str], rows: list[dict], format_weight: float) -> Scores:
    """reward = correct + format_weight * format for each completion of the matching task row."""
    correct, err_c = score_safely(
        task_reward,
        completions,
        kinds=[r["kind"] for r in rows],
        answers=[r["answer"] for r in rows],
        metas=[r["meta"] for r in rows],
    )
    fmt, err_f = score_safely(get_reward("format"), completions)
    reward = [c + format_weight * f for c, f in zip(correct, fmt)]
    return Scores(reward, correct, fmt, err_c + err_f)


@torch.no_grad()
def evaluate_accuracy(
    model,
    tokenizer,
    rows: list[dict],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    k: int = 1,
    batch_size: int = 64,
    precision: str = "fp32",
    format_weight: float = 0.0,
    seed: int = 0,
) -> dict:
    """Held-out accuracy with the training reward's grader: greedy (temperature 0, k=1) or pass@1 averaged over k
    samples. Returns accuracy, format_rate, mean response length (tokens), grader errors and the scored samples."""
    if temperature == 0 and k != 1:
        raise ValueError(f"greedy evaluation draws one sample per prompt; got k={k}")
    device = next(model.parameters()).device
    eos = eos_id(tokenizer)
    correct, fmt, thinks, lengths, samples, errors = [], [], [], [], [], 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        prompts = [render_prompt(tokenizer, r["prompt"]) for r in chunk]
        with autocast(precision, device):
            out = generate(
                model,
                prompts,
                n_samples=k,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                stop_token_ids=[eos],
                seed=seed + start,
            )
        texts = [decode_completion(tokenizer, t) for t in out.tokens]
        rep = [r for r in chunk for _ in range(k)]
        s = score_completions(texts, rep, format_weight)
        correct += s.correct
        fmt += s.format
        thinks += [shows_thinking(t) for t in texts]
        lengths += [len(t) for t in out.tokens]
        errors += s.errors
        samples += [(r["prompt"], c, sc) for r, c, sc in zip(rep, texts, s.correct)]
    n = max(1, len(correct))
    return {
        "accuracy": sum(correct) / n,
        "format_rate": sum(fmt) / n,
        "think_rate": sum(thinks) / n,
        "response_len": sum(lengths) / n,
        "grader_errors": errors,
        "n": len(rows),
        "samples": samples,
    }


def newest_checkpoint(ckpt_dir: Path) -> Path:
    ckpts = CheckpointManager(ckpt_dir, keep_last=0).checkpoints() if Path(ckpt_dir).is_dir() else []
    if not ckpts:
        raise FileNotFoundError(f"no checkpoint under {ckpt_dir} (run the upstream stage first)")
    return ckpts[-1]


def load_policy(
    path: Path, precision: str, backend: str, device: torch.device, scale_formats: ScaleFormats | str = "fp32"
) -> tuple[torch.nn.Module, ModelConfig]:
    """A model rebuilt from a checkpoint's model_config.json and weights (no optimizer, RNG untouched)."""
    mcfg = ModelConfig(**read_model_config(path))
    model = build_model(mcfg, precision, backend, device, scale_formats)
    CheckpointManager(Path(path).parent, keep_last=0).load(path, model, restore_rng=False)
    return model, mcfg
