"""Rule-based rewards: each grader on hand-made right and wrong cases, adversarial answers, the registry, and
score_safely's error counting and per-completion time limit."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rewards.graders import (
    REWARDS,
    answer_reward,
    answers_match,
    arithmetic_steps_valid,
    code_program,
    code_reward,
    extract_answer,
    extract_code,
    format_reward,
    get_reward,
    length_penalty,
    score_safely,
    shows_thinking,
    task_reward,
)
from rewards.math_answers import too_costly
from rewards.sandbox import Limits

# ---------------------------------------------------------------- format


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("<think>2+2 is 4</think><answer>4</answer>", 1.0),
        ("  <think>\nmulti\nline\n</think>\n\n<answer>\n4\n</answer>\n", 1.0),
        ("<think></think><answer></answer>", 1.0),
        ("<answer>4</answer>", 0.0),  # no think
        ("<think>x</think>", 0.0),  # no answer
        ("<answer>4</answer><think>x</think>", 0.0),  # wrong order
        ("<think>x</think><answer>4</answer><answer>5</answer>", 0.0),  # answer twice
        ("<think>a</think><think>b</think><answer>4</answer>", 0.0),  # think twice
        ("<think>x<answer>4</answer></think>", 0.0),  # answer nested in think
        ("The answer: <think>x</think><answer>4</answer>", 0.0),  # text before
        ("<think>x</think><answer>4</answer> done", 0.0),  # text after
        ("<think>x</think> middle <answer>4</answer>", 0.0),  # text between
        ("<think>x</think><answer>4", 0.0),  # unclosed
        ("", 0.0),
    ],
)
def test_format_reward(completion, expected):
    assert format_reward([completion]) == [expected]


@given(st.text(), st.text())
def test_format_reward_accepts_any_tag_free_content(think, answer):
    tags = ("<think>", "</think>", "<answer>", "</answer>")
    if any(t in think or t in answer for t in tags):
        return
    assert format_reward([f"<think>{think}</think><answer>{answer}</answer>"]) == [1.0]


# ---------------------------------------------------------------- answers


def test_extract_answer_takes_the_last_block():
    assert extract_answer("<answer> 3 </answer> then <answer>4</answer>") == "4"
    assert extract_answer("no tags") is None
    assert extract_answer("<answer>\n\n</answer>") == ""


@pytest.mark.parametrize(
    "predicted, reference, match",
    [
        ("1000", "1,000", True),
        ("0.5", "1/2", True),
        ("\\frac{1}{2}", "0.5", True),
        ("3.0", "3", True),
        ("\\boxed{42}", "42", True),
        ("$42$", "42", True),
        ("x = 5", "5", True),
        ("0.3333333333", "1/3", True),  # math-verify rounds decimals to 6 places
        ("0.333", "1/3", False),
        ("1000001", "1000000", False),  # integers compare exactly
        ("12345678901234567891", "12345678901234567890", False),
        ("12345678901234567890", "12345678901234567890", True),
        ("50%", "50", True),
        ("1250 dollars", "1250", True),
        ("-2", "2", False),
        ("2", "3", False),
        ("two", "2", False),
        ("", "2", False),
        ("Paris", "paris", True),  # not mathematics: compared as text
        ("  New   York. ", "new york", True),
        ("London", "Paris", False),
    ],
)
def test_answers_match(predicted, reference, match):
    assert answers_match(predicted, reference) is match


@settings(max_examples=30, deadline=None)
@given(st.fractions(max_denominator=10**6))
def test_answers_match_a_number_written_two_ways(x):
    assert answers_match(f"{x.numerator}/{x.denominator}", str(x))
    assert answers_match(str(x), f"\\frac{{{x.numerator}}}{{{x.denominator}}}")


def test_answer_reward():
    completions = [
        "<think>..</think><answer>4</answer>",
        "<think>..</think><answer>5</answer>",
        "4",  # right number, but not inside <answer>
        "<answer>1,000</answer>",
    ]
    assert answer_reward(completions, answers=["4", "4", "4", "1000"]) == [1.0, 0.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="answers has 1 entries for 4"):
        answer_reward(completions, answers=["4"])


# ---------------------------------------------------------------- length


def test_length_penalty_follows_dapo_soft_overlong_punishment():
    # max 100, cache 20: free up to 80, linear to -1 at 100, -1 beyond
    got = length_penalty(["x"] * 6, max_length=100, cache_length=20, lengths=[0, 80, 81, 90, 100, 101])
    assert got == [0.0, 0.0, -1 / 20, -0.5, -1.0, -1.0]
    assert length_penalty(["a" * 90], max_length=100, cache_length=20) == [-0.5]  # characters by default
    with pytest.raises(ValueError, match="cache_length"):
        length_penalty(["a"], max_length=10, cache_length=20)
    with pytest.raises(ValueError, match="lengths has 2 entries"):
        length_penalty(["a"], lengths=[1, 2])


# ---------------------------------------------------------------- code

ADD_TEST = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"


def test_extract_code():
    fenced = "Here:\n```python\ndef f():\n    return 1\n```\nand better:\n```python\ndef f():\n    return 2\n```"
    assert extract_code(fenced) == "def f():\n    return 2\n"
    assert extract_code("<think>x</think><answer>```py\nx = 1\n```</answer>") == "x = 1\n"
    assert extract_code("<answer>x = 1</answer>") == "x = 1"
    assert extract_code("x = 1") == "x = 1"


def test_code_program_and_reward():
    assert code_program("def add(a, b): return a + b", ADD_TEST, "add").endswith("\ncheck(add)")
    completions = [
        "<think>easy</think><answer>```python\ndef add(a, b):\n    return a + b\n```</answer>",
        "```python\ndef add(a, b):\n    return a - b\n```",  # wrong
        "def add(a, b):\n    return a + b",  # bare code
        "def add(a, b):\n    while True: pass",  # hangs
        "import os\ndef add(a, b):\n    os.system('rm -rf /')\n    return a + b",  # hostile
        "def add(a, b) return",  # syntax error
    ]
    scores = code_reward(completions, tests=[ADD_TEST] * 6, entry_points=["add"] * 6, limits=Limits(wall_s=2.0))
    assert scores == [1.0, 0.0, 1.0, 0.0, 0.0, 0.0]


def test_code_reward_with_a_prefix_continues_the_prompt():
    prompt = "def add(a, b):\n    '''Add two numbers.'''\n"
    scores = code_reward(
        ["    return a + b\n", "    return a * b\n"],
        tests=[ADD_TEST] * 2,
        entry_points=["add"] * 2,
        code_prefixes=[prompt] * 2,
        extract=False,
    )
    assert scores == [1.0, 0.0]
    with pytest.raises(ValueError, match="tests has 1 entries for 2"):
        code_reward(["a", "b"], tests=[ADD_TEST])


def test_code_reward_without_entry_point_runs_plain_asserts():
    assert code_reward(["x = 3"], tests=["assert x == 3"]) == [1.0]
    assert code_reward(["x = 4"], tests=["assert x == 3"]) == [0.0]


# ---------------------------------------------------------------- registry and score_safely


def test_registry():
    assert set(REWARDS) == {"answer", "format", "length", "code", "task"}
    for name, fn in REWARDS.items():
        assert get_reward(name) is fn
    with pytest.raises(ValueError, match="unknown reward 'acuracy'.*answer, code, format, length, task"):
        get_reward("acuracy")


def _flaky(completions, answers, **kw):
    return [float("nan") if a == "bad" else 1.0 for a in answers]


def _stuck_in_c_on_b(completions, **kw):
    """A grader stuck in C code holding the GIL (no signal or thread can interrupt it) on the completion "b"."""
    if completions[0] == "b":
        sum(range(10**11))
    return [1.0]


@pytest.mark.parametrize("time_limit_s", [None, 5.0], ids=["in-process", "worker"])
def test_score_safely_scores_a_failing_sample_zero_and_counts_it(time_limit_s):
    completions = ["<answer>4</answer>", None, "<answer>5</answer>"]  # None: a broken sample
    scores, n_errors = score_safely(
        answer_reward, completions, time_limit_s=time_limit_s, answers=["4", "4", "5"], prompts="unused"
    )
    assert scores == [1.0, 0.0, 1.0] and n_errors == 1
    assert score_safely(_flaky, ["a", "b"], time_limit_s=time_limit_s, answers=["ok", "bad"]) == ([1.0, 0.0], 1)


def test_score_safely_in_process_falls_back_to_one_sample_at_a_time():
    def wrong_length(completions, **kw):
        return [1.0]

    assert score_safely(wrong_length, ["a", "b"], time_limit_s=None) == ([1.0, 1.0], 0)  # one call per sample
    seen = []

    def grader(completions, answers, scale, **kw):
        if len(completions) > 1:
            raise RuntimeError("batch failure")
        seen.append((completions[0], answers[0], scale))
        if completions[0] == "boom":
            raise KeyError("x")
        return [scale]

    scores, n_errors = score_safely(grader, ["a", "boom", "c"], time_limit_s=None, answers=["A", "B", "C"], scale=0.5)
    assert scores == [0.5, 0.0, 0.5] and n_errors == 1
    assert seen == [("a", "A", 0.5), ("boom", "B", 0.5), ("c", "C", 0.5)]
    assert all(math.isfinite(s) for s in scores)
    with pytest.raises(TypeError, match="picklable"):
        score_safely(grader, ["a"], answers=["A"], scale=0.5)  # a local function cannot reach the worker


def test_score_safely_kills_a_grader_past_its_time_limit_and_grades_the_rest():
    scores, n_errors = score_safely(_stuck_in_c_on_b, ["a", "b", "c", "d"], time_limit_s=1.0)
    assert scores == [1.0, 0.0, 1.0, 1.0] and n_errors == 1
    with pytest.raises(ValueError, match="time_limit_s"):
        score_safely(_flaky, ["a"], time_limit_s=0, answers=["ok"])


# adversarial answers: each must be graded (wrong) well inside a 1 s per-completion limit
ADVERSARIAL = [
    "1e10000000",  # Fraction() would build 10**10000000; math-verify alone reads it as 1
    "9" * 100_000,  # 10^5 digits
    "1," + ",".join(["000"] * 30_000),  # 10^5 characters of thousands separators
    "(" * 5000 + "1" + ")" * 5000,  # deep nesting
    "\\frac{" * 3000 + "1" + "}" * 3000,
    "10^{10000000}",
    "2**100000000",  # sympy evaluates this for seconds
    "10^{10^{10}}",
    "100000!",
    "1" + "0" * 60 + "^2",  # sympy took 0.8 s on a 100-digit base
]


def test_adversarial_answers_are_bounded_before_parsing():
    for text in ADVERSARIAL:
        assert too_costly(text), text[:30]
        assert not answers_match(text, "1")
    assert not too_costly("\\frac{1}{2}") and not too_costly("1,000,000") and not too_costly("2^{10}")


def test_adversarial_completions_are_each_graded_within_a_1s_limit():
    completions = [f"<think>x</think><answer>{a}</answer>" for a in ADVERSARIAL]
    completions += ["<answer>" * 50_000 + "1", "<think>" + "1 + " * 30_000 + "</think><answer>1</answer>"]
    n = len(completions)
    for fn, kw in (
        (answer_reward, {"answers": ["7"] * n}),
        (task_reward, {"kinds": ["arith", "gsm8k"] * (n // 2), "answers": ["7"] * n, "metas": ["{}"] * n}),
        (format_reward, {}),
    ):
        scores, n_errors = score_safely(fn, completions, time_limit_s=1.0, **kw)
        assert n_errors == 0, fn.__name__  # none timed out
        if fn is not format_reward:
            assert scores == [0.0] * n, fn.__name__
    digits = "<think>" + "9" * 100_000 + " + 1 = 2. " * 10  # a 10^5-digit number is not read as a step
    scores, n_errors = score_safely(
        _steps_valid, [digits + "2 + 2 = 5.</think>", digits + "</think>"], time_limit_s=1.0
    )
    assert n_errors == 0 and scores == [0.0, 1.0]


def _steps_valid(completions, **kw):
    return [float(arithmetic_steps_valid(c)) for c in completions]


def test_task_reward_is_strict_for_generated_sets_and_lenient_for_gsm8k():
    for submitted, arith, gsm8k in [("1,250", 1, 1), ("x = 1250", 0, 1), ("\\boxed{1250}", 0, 1), ("1250.0", 1, 1)]:
        c = f"<answer>{submitted}</answer>"
        assert task_reward([c], kinds=["arith"], answers=["1250"], metas=["{}"]) == [arith], submitted
        assert task_reward([c], kinds=["gsm8k"], answers=["1250"], metas=["{}"]) == [gsm8k], submitted
    assert task_reward(
        ["<answer>1000001</answer>"] * 2, kinds=["arith", "gsm8k"], answers=["1000000"] * 2, metas=["{}"] * 2
    ) == [0, 0]


def test_task_reward_dispatches_on_the_task_kind():
    import json

    task = get_reward("task")
    meta = json.dumps({"numbers": [3, 5, 7], "target": 22, "solution": "3*5+7"})
    completions = [
        "<think>7 + 5 = 12</think><answer>12</answer>",  # arithmetic, right
        "<think>7 + 5 = 13</think><answer>13</answer>",  # arithmetic, wrong
        "<think>3*5=15, 15+7=22</think><answer>3*5+7</answer>",  # countdown, right expression
        "<think>reuse</think><answer>3*5+7+7-7</answer>",  # countdown, a number used twice
        "<think>no tags at the end",  # no answer at all
    ]
    kinds = ["arith", "arith", "countdown", "countdown", "arith"]
    answers = ["12", "12", "22", "22", "12"]
    metas = ["{}", "{}", meta, meta, "{}"]
    assert task(completions, kinds=kinds, answers=answers, metas=metas) == [1.0, 0.0, 1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="kinds has 1 entries for 2 completions"):
        task(["a", "b"], kinds=["arith"], answers=["1", "2"], metas=["{}", "{}"])


@pytest.mark.parametrize(
    "completion, valid",
    [
        ("<think>Ben has 13 + 1 = 14. Mia has 14 - 1 = 13.</think><answer>13</answer>", True),
        ("<think>Ben has 13 + 1 = 15. Mia has 15 - 1 = 14.</think><answer>14</answer>", False),
        ("<think>6 * 7 = 42. 42 / 6 = 7.</think><answer>7</answer>", True),
        ("<think>9 / 2 = 9/2.</think><answer>4.5</answer>", True),
        ("<think>3 - 5 = -2.</think><answer>-2</answer>", True),
        ("<think>4 / 0 = 0.</think><answer>0</answer>", False),
        ("<think>no arithmetic here</think><answer>5</answer>", True),
        ("<think>1 + 1 = 2.</think><answer>1 + 1 = 3</answer>", True),  # only the <think> is checked
    ],
)
def test_arithmetic_steps_valid(completion, valid):
    assert arithmetic_steps_valid(completion) is valid


@pytest.mark.parametrize(
    ("completion", "thinks"),
    [
        ("<think>3 + 4 = 7.</think><answer>7</answer>", True),
        ("<think></think><answer>7</answer>", False),
        ("<think> \n </think><answer>7</answer>", False),
        ("<answer>7</answer>", False),
        ("<think>3 + 4 = 7. 7 - 1", True),  # truncated mid-thought
        ("<think></think><answer>7</answer><think>late</think>", False),  # only the first <think> counts
    ],
)
def test_shows_thinking(completion, thinks):
    assert shows_thinking(completion) is thinks
