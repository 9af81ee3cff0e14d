"""Reasoning suite: held-out accuracy with the graders GRPO trains on, pass@1 over k samples.

(a) prompts: the data stage's held-out reasoning `test` split (`outputs/<run>/data/reasoning`, arithmetic and
    Countdown, disjoint from the train split by construction), first `n` rows; and GSM8K's test split when a local
    copy is configured (`eval.reasoning.gsm8k_path`; nothing is downloaded: without it the GSM8K part is skipped and
    the reason recorded in the metrics). Each prompt goes through the chat template, as in SFT and RL.
(b) k samples per prompt at the stated temperature and top-p (DeepSeek-R1 reports pass@1 as the mean correctness of
    k samples at temperature 0.6, top-p 0.95: less noisy than one greedy answer, and what the model does when
    sampled).
(c) `train.policy.score_completions`: the RL reward's own graders (`rewards/graders.py` answer match, Countdown through
    `data.reasoning.verify`, the `<think>/<answer>` format), so the number RL optimizes is the number reported.
    pass@1 = mean correctness over the n x k samples; pass@k = the unbiased estimator (`rewards.humaneval.pass_at_k`);
    think rate = the share of samples whose `<think>` holds any reasoning (`rewards.graders.shows_thinking`).
(d) intervals over prompts (Wilson for one sample per prompt, else the bootstrap of the per-prompt means); floors,
    scored by the same graders: `empty` (no completion) and `copy_prompt` (the prompt's last number given as the
    answer, in the right format: what echoing the question earns).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from data.gsm8k import load_gsm8k
from eval.config import ReasoningEvalConfig
from eval.generation import GenerateFn, Prompt, Sampling, SuiteResult, check_completions
from eval.stats import problem_interval
from rewards.graders import shows_thinking
from rewards.humaneval import mean_pass_at_k, pass_at_k
from train.policy import score_completions

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def load_test_rows(reasoning_dir: Path, n: int = 0) -> list[dict]:
    """The first `n` rows (0 = all) of the held-out reasoning test split written by the data stage."""
    from datasets import load_from_disk  # deferred: datasets is a heavy import, needed only here

    test = load_from_disk(str(reasoning_dir))["test"]
    if n > 0:
        test = test.select(range(min(n, len(test))))
    return [dict(r) for r in test]


def load_gsm8k_rows(path: str | None, n: int = 0) -> tuple[list[dict], str | None]:
    """(rows, None), or ([], reason) when no local GSM8K copy is configured or found."""
    if not path:
        return [], "eval.reasoning.gsm8k_path is not set (no GSM8K data ships with this machine)"
    if not Path(path).exists():
        return [], f"GSM8K path {path} does not exist"
    ds = load_gsm8k(path, split="test")
    if n > 0:
        ds = ds.select(range(min(n, len(ds))))
    return [dict(r) for r in ds], None


def score_reasoning(
    rows: Sequence[dict], completions: list[list[str]], count_tokens: Callable[[str], int] | None = None
) -> tuple[dict, list[float], dict]:
    """pass@1 (mean correctness), pass@k, format rate, response length and grader errors; per-sample correctness
    in prompt-major order; the 95% interval over prompts of pass@1, pass@k, format and think rates."""
    flat_rows = [r for r, cs in zip(rows, completions, strict=True) for _ in cs]
    flat = [c for cs in completions for c in cs]
    s = score_completions(flat, flat_rows, format_weight=0.0)
    k = len(completions[0]) if completions else 1
    n = max(1, len(flat))
    corrects = [int(sum(s.correct[i * k : (i + 1) * k])) for i in range(len(rows))]
    metrics = {
        "pass@1": sum(s.correct) / n,
        **{k_: v for k_, v in mean_pass_at_k([k] * len(rows), corrects, [k]).items() if k > 1},
        "format_rate": sum(s.format) / n,
        "think_rate": sum(map(shows_thinking, flat)) / n,
        "response_chars": sum(len(c) for c in flat) / n,
        "grader_errors": s.errors,
        "n_prompts": len(rows),
        "k": k,
    }
    if count_tokens is not None:
        metrics["response_tokens"] = sum(count_tokens(c) for c in flat) / n
    intervals = {}
    if rows:
        per_prompt = {
            "pass@1": s.correct,
            "format_rate": s.format,
            "think_rate": [float(shows_thinking(c)) for c in flat],
        }
        intervals = {m: problem_interval(np.reshape(v, (len(rows), k)).mean(1)) for m, v in per_prompt.items()}
        if k > 1:
            intervals[f"pass@{k}"] = problem_interval([pass_at_k(k, c, k) for c in corrects])
    return metrics, s.correct, intervals


def copy_prompt_answer(prompt: str) -> str:
    """The floor that echoes the question: its last number as the answer, in the trained format."""
    numbers = _NUMBER.findall(prompt)
    return f"<think></think><answer>{numbers[-1] if numbers else ''}</answer>"


def reasoning_floors(rows: Sequence[dict], k: int) -> dict[str, dict[str, float]]:
    """pass@1 / pass@k and format rate of the empty and the copy-the-prompt completions on the same prompts."""
    floors: dict[str, dict[str, float]] = {}
    for name, answer in (("empty", lambda r: ""), ("copy_prompt", lambda r: copy_prompt_answer(r["prompt"]))):
        m, _, _ = score_reasoning(rows, [[answer(r)] for r in rows])
        for metric in ("pass@1", "format_rate") + ((f"pass@{k}",) if k > 1 else ()):
            floors.setdefault(metric, {})[name] = m["pass@1" if metric.startswith("pass@") else metric]
    return floors


def _evaluate_rows(
    generate_fn: GenerateFn, rows: list[dict], sampling: Sampling, count_tokens, table_rows: int, tag: str
) -> tuple[dict, list[dict], dict, dict]:
    prompts = [Prompt(r["prompt"], chat=True) for r in rows]
    completions = generate_fn(prompts, sampling)
    check_completions(prompts, sampling, completions)
    metrics, correct, intervals = score_reasoning(rows, completions, count_tokens)
    flat = [(r, c) for r, cs in zip(rows, completions) for c in cs]
    table = [
        {"set": tag, "prompt": r["prompt"], "completion": c, "answer": r["answer"], "correct": ok}
        for (r, c), ok in zip(flat, correct)
    ]
    floors = reasoning_floors(rows, sampling.n)
    return metrics, table[:: max(1, len(table) // max(1, table_rows))][:table_rows], intervals, floors


def run_reasoning(
    generate_fn: GenerateFn,
    rows: list[dict],
    cfg: ReasoningEvalConfig,
    gsm8k: tuple[list[dict], str | None] = ([], "not requested"),
    count_tokens: Callable[[str], int] | None = None,
    table_rows: int = 8,
) -> SuiteResult:
    sampling = Sampling(n=cfg.k, temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens)
    metrics: dict = {"temperature": cfg.temperature, "top_p": cfg.top_p}
    samples: list[dict] = []
    intervals: dict = {}
    floors: dict = {}
    if rows:
        m, t, intervals, floors = _evaluate_rows(generate_fn, rows, sampling, count_tokens, table_rows, "heldout")
        metrics |= m
        samples += t
    else:
        metrics["skipped"] = "the reasoning test split is empty"
    gsm_rows, reason = gsm8k
    if gsm_rows:
        m, t, i, f = _evaluate_rows(generate_fn, gsm_rows, sampling, count_tokens, table_rows, "gsm8k")
        metrics |= {f"gsm8k/{k}": v for k, v in m.items()}
        intervals |= {f"gsm8k/{k}": v for k, v in i.items()}
        floors |= {f"gsm8k/{k}": v for k, v in f.items()}
        samples += t
    else:
        metrics["gsm8k/skipped"] = reason or "no GSM8K rows"
    return SuiteResult(metrics, samples, intervals, floors)
