"""Reasoning task sets: determinism, traces that derive their answers, verifiers by rule, disjoint splits."""

import json
import random
import re
import subprocess
import sys
from collections import Counter
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data.reasoning import (
    ANSWER_CLOSE,
    ANSWER_OPEN,
    COLUMNS,
    KINDS,
    THINK_CLOSE,
    THINK_OPEN,
    build_splits,
    extract_answer,
    format_completion,
    generate_task,
    held_out_texts,
    normalize_prompt,
    parse_number,
    trace_shows_cot,
    verify,
    verify_number,
    write_reasoning_sets,
)
from data.tasks_arith import ARITH_LEVELS
from data.tasks_countdown import (
    COUNTDOWN_LEVELS,
    MAX_EXPRESSION_CHARS,
    CountdownLevel,
    evaluate_countdown,
    generate_countdown,
    verify_countdown,
)

EQUATION = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)\.")
N_PER_LEVEL = 300
ROOT = Path(__file__).resolve().parents[2]


def _apply(a: int, op: str, b: int) -> Fraction:
    return {"+": Fraction(a + b), "-": Fraction(a - b), "*": Fraction(a * b), "/": Fraction(a, b)}[op]


def _check_equations(cot: str) -> list[tuple[int, str, int, int]]:
    """Every ``a op b = c.`` in the trace is true arithmetic; returns them in order."""
    equations = [(int(a), op, int(b), int(c)) for a, op, b, c in EQUATION.findall(cot)]
    assert equations, f"no equation in cot {cot!r}"
    for a, op, b, c in equations:
        assert _apply(a, op, b) == c, f"false step {a} {op} {b} = {c} in {cot!r}"
    return equations


# ---------------------------------------------------------------- generation


@pytest.mark.parametrize("kind", KINDS)
def test_generate_task_is_deterministic_per_seed_and_index(kind):
    a = generate_task(kind, seed=3, index=17, difficulty=2)
    assert a == generate_task(kind, seed=3, index=17, difficulty=2)
    others = [generate_task(kind, seed=3, index=i, difficulty=2).prompt for i in range(18, 28)]
    others.append(generate_task(kind, seed=4, index=17, difficulty=2).prompt)
    assert a.prompt not in others
    assert a.id == f"{kind}-d2-s3-17"


def test_generation_does_not_depend_on_the_process_hash_seed():
    code = "from data.reasoning import generate_task as g; print("
    code += "g('arith', 1, 2, 3).prompt, g('countdown', 1, 2, 3).cot)"
    run = {"capture_output": True, "text": True, "check": True, "cwd": ROOT}
    outputs = {
        subprocess.run([sys.executable, "-c", code], env={"PYTHONHASHSEED": hs}, **run).stdout for hs in ("0", "123")
    }
    here = generate_task("arith", 1, 2, 3).prompt + " " + generate_task("countdown", 1, 2, 3).cot + "\n"
    assert outputs == {here}


@pytest.mark.parametrize("difficulty", sorted(ARITH_LEVELS))
def test_arith_cot_derives_the_answer_step_by_step(difficulty):
    level = ARITH_LEVELS[difficulty]
    for i in range(N_PER_LEVEL):
        task = generate_task("arith", 0, i, difficulty)
        equations = _check_equations(task.cot)
        assert len(equations) == level.steps
        assert equations[0][0] == int(re.search(r"has (\d+) ", task.prompt).group(1)), task
        for (_, _, _, prev), (a, _, _, _) in zip(equations, equations[1:]):
            assert a == prev, f"step does not continue from the previous result: {task.cot!r}"
        assert re.findall(r"-?\d+", task.cot)[-1] == task.answer, task
        assert all(1 <= c <= level.max_value for *_, c in equations), task
        assert set(task.meta["ops"]) <= set(level.ops)
        for _, op, b, _ in equations:  # every operand of the trace is stated in the prompt
            amount = str(b)
            if op == "*" and b == 2 and task.meta["family"] == "chain":
                amount = "twice"
            if op == "/" and b in (2, 3, 4) and task.meta["family"] == "chain":
                amount = {2: "half", 3: "a third", 4: "a quarter"}[b]
            assert amount in task.prompt, (amount, task)


@pytest.mark.parametrize("difficulty", sorted(COUNTDOWN_LEVELS))
def test_countdown_instances_are_solvable_and_reference_verifies(difficulty):
    level = COUNTDOWN_LEVELS[difficulty]
    for i in range(N_PER_LEVEL):
        task = generate_task("countdown", 0, i, difficulty)
        numbers, target, solution = task.meta["numbers"], task.meta["target"], task.meta["solution"]
        assert task.answer == str(target)
        assert len(numbers) == level.n_numbers and numbers == sorted(numbers)
        assert all(level.number_range[0] <= n <= level.number_range[1] for n in numbers)
        assert level.target_range[0] <= target <= level.target_range[1] and target not in numbers
        assert verify_countdown(solution, numbers, target), task
        value, literals = evaluate_countdown(solution)
        assert value == target and len(literals) >= level.min_used
        equations = _check_equations(task.cot)
        assert equations[-1][3] == target and len(equations) == len(literals) - 1
        assert all(c > 0 for *_, c in equations) and {op for _, op, _, _ in equations} <= set(level.ops)
        assert ", ".join(map(str, numbers)) in task.prompt and f"Make {target} " in task.prompt


def test_custom_countdown_level_with_only_minus_and_divide():
    level = CountdownLevel(n_numbers=4, number_range=(1, 30), target_range=(1, 30), ops="-/", min_used=2)
    for i in range(50):
        _, answer, cot, meta = generate_countdown(random.Random(i), level)
        assert verify_countdown(meta["solution"], meta["numbers"], int(answer))
        assert {op for _, op, _, _ in _check_equations(cot)} <= {"-", "/"}
    with pytest.raises(ValueError, match="min_used"):
        generate_countdown(random.Random(0), CountdownLevel(3, (1, 9), (1, 9), min_used=4))


def test_easy_level_is_short():
    for kind in KINDS:
        for i in range(200):
            task = generate_task(kind, 0, i, 1)
            assert len(task.prompt) < 150 and len(task.cot) < 300, task


def test_difficulty_knobs_change_the_distribution():
    def arith_stats(d):
        tasks = [generate_task("arith", 0, i, d) for i in range(200)]
        ops = set("".join(t.meta["ops"] for t in tasks))
        return ops, max(int(t.answer) for t in tasks), sum(t.cot.count("=") for t in tasks) / len(tasks)

    (ops1, max1, steps1), (ops2, max2, steps2), (ops3, max3, steps3) = (arith_stats(d) for d in (1, 2, 3))
    assert ops1 == set("+-") and "*" in ops2 and "/" not in ops2 and ops3 == set("+-*/")
    assert steps1 == 2 and steps2 == 3 and steps3 == 4
    assert max1 < max2 < max3

    def countdown_stats(d):
        tasks = [generate_task("countdown", 0, i, d) for i in range(200)]
        return {len(t.meta["numbers"]) for t in tasks}, sum(t.meta["target"] for t in tasks) / len(tasks)

    (n1, t1), (n2, t2), (n3, t3) = (countdown_stats(d) for d in (1, 2, 3))
    assert (n1, n2, n3) == ({3}, {4}, {5}) and t1 < t2 < t3


@pytest.mark.parametrize(("kind", "difficulty"), [("algebra", 1), ("arith", 0), ("countdown", 4)])
def test_generate_task_rejects_unknown_kind_or_level(kind, difficulty):
    with pytest.raises(ValueError, match="unknown"):
        generate_task(kind, 0, 0, difficulty)


# ---------------------------------------------------------------- format and verification


@pytest.mark.parametrize("kind", KINDS)
def test_completion_format_and_round_trip_through_the_verifier(kind):
    for i in range(100):
        task = generate_task(kind, 1, i, 1 + i % 3)
        text = format_completion(task)
        inner = task.meta["solution"] if kind == "countdown" else task.answer
        assert text == f"{THINK_OPEN}{task.cot}{THINK_CLOSE}{ANSWER_OPEN}{inner}{ANSWER_CLOSE}"
        assert extract_answer(text) == inner
        assert verify(kind, extract_answer(text), task.answer, json.dumps(task.meta))
        wrong = str(int(task.answer) + 1)
        assert not verify(kind, wrong if kind == "arith" else f"{wrong} - 1 + 1", task.answer, task.meta)


def test_tag_constants_and_extract_answer():
    assert (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE) == ("<think>", "</think>", "<answer>", "</answer>")
    assert extract_answer("<think>x</think><answer> 7 </answer>") == "7"
    assert extract_answer("<answer>1</answer> then <answer>2\n</answer>") == "2"
    assert extract_answer("<think>no answer</think>") is None
    assert extract_answer("<answer>unterminated") is None


@pytest.mark.parametrize(
    ("submitted", "answer", "ok"),
    [
        ("12", "12", True),
        ("12.0", "12", True),
        (" 1,234 ", "1234", True),
        ("$5", "5", True),
        ("9.", "9", True),
        ("-4", "-4", True),
        ("0.5", "1/2", False),  # the reference must itself be a plain number
        ("13", "12", False),
        ("12 apples", "12", False),
        ("twelve", "12", False),
        ("", "12", False),
        ("1.2.3", "1", False),
    ],
)
def test_verify_number(submitted, answer, ok):
    assert verify_number(submitted, answer) is ok


def test_verifiers_live_in_rewards_and_are_bounded():
    import data.tasks_countdown
    import rewards.tasks

    assert verify is rewards.tasks.verify and verify_countdown is data.tasks_countdown.verify_countdown
    assert parse_number("1" * 100) == int("1" * 100) and parse_number("1" * 101) is None  # no 10^5-digit parse
    assert parse_number("1e10000000") is None  # not a plain number: never expanded
    many = "<answer>" * 100_000 + "7</answer>"  # linear, not quadratic, in the number of tags
    assert extract_answer(many) == "7" and extract_answer("</answer>" * 100_000) is None
    assert not verify("arith", "1000001", "1000000") and verify("arith", "1000000", "1000000")


def test_verify_dispatch():
    assert not verify("arith", None, "3")
    assert parse_number("-.5") == Fraction(-1, 2)
    with pytest.raises(ValueError, match="unknown task kind"):
        verify("poetry", "x", "y")
    with pytest.raises(ValueError, match="numbers"):
        verify("countdown", "1 + 2", "3", {})


# ---------------------------------------------------------------- countdown verifier

NUMBERS, TARGET = [2, 3, 7, 25], 31


@pytest.mark.parametrize(
    "expression",
    [
        "25 + 3 * 2",
        "(25 + 3 * 2)",
        " 7 * 3 + 25 / 2 * 2 - 15 + 0 * 0 ",
        "25 + 3 * 2 = 31",
        "((25)) + (3 * (2))",
        "(" * 90 + "25 + 3 * 2" + ")" * 90,
    ],
)
def test_countdown_accepts_valid_expressions(expression):
    numbers = NUMBERS + ([2, 15, 0, 0] if "15" in expression else [])
    assert verify_countdown(expression, numbers, TARGET)


def test_countdown_allows_fractional_intermediates_and_unused_numbers():
    assert verify_countdown("(2 / 3) * 3 * 7", [2, 3, 3, 7], 14)
    assert verify_countdown("25 + 7", NUMBERS, 32)


@pytest.mark.parametrize(
    ("expression", "why"),
    [
        ("25 + 3 + 3", "reuses 3"),
        ("25 + 6", "6 is not given"),
        ("25 + 3 * 2 = 32", "right side is not the target"),
        ("25 + 3 * 2 = 31 = 31", "two equals signs"),
        ("2 ** 5 - 1", "power"),
        ("9 ** 9 ** 9", "huge exponent"),
        ("25 // 1 + 6", "floor division"),
        ("25 % 7", "modulo"),
        ("25 ^ 6", "xor"),
        ("-2 + 33", "unary minus"),
        ("+25 + 3 * 2", "unary plus"),
        ("25 + 3 * 2.0", "float literal"),
        ("25 + 3e0 * 2", "exponent literal"),
        ("0x19 + 3 * 2", "hex literal for 25"),
        ("2_5 + 3 * 2", "underscore literal"),
        ("025 + 3 * 2", "leading zero"),
        ("25 + 3j", "complex"),
        ("True + 30", "name"),
        ("__import__('os').system('true')", "call"),
        ("(25, 3)", "tuple"),
        ("25 + 3 * 2 / (7 - 7)", "division by zero"),
        ("31", "31 is not given"),
        ("", "empty"),
        ("= 31", "no expression"),
        ("(" * 150 + "25" + ")" * 150, "too long"),
        ("25 + 3 * 2\n" + "# comment", "comment"),
    ],
)
def test_countdown_rejects(expression, why):
    assert not verify_countdown(expression, NUMBERS, TARGET), why


def test_countdown_rejects_non_strings_and_names_the_problem():
    assert not verify_countdown(31, NUMBERS, TARGET)
    assert not verify_countdown(None, NUMBERS, TARGET)
    with pytest.raises(ValueError, match="longer than"):
        evaluate_countdown("1+" * MAX_EXPRESSION_CHARS + "1")
    with pytest.raises(ValueError, match="Pow"):
        evaluate_countdown("2 ** 3")


@st.composite
def _expressions(draw):
    """A random expression tree over some of a random multiset of numbers, with its exact value."""
    numbers = draw(st.lists(st.integers(1, 30), min_size=1, max_size=6))
    used = draw(st.permutations(numbers))[: draw(st.integers(1, len(numbers)))]
    items = [(str(n), Fraction(n)) for n in used]
    while len(items) > 1:
        i = draw(st.integers(0, len(items) - 1))
        left = items.pop(i)
        right = items.pop(draw(st.integers(0, len(items) - 1)))
        op = draw(st.sampled_from("+-*/"))
        if op == "/" and right[1] == 0:
            op = "+"
        value = {"+": left[1] + right[1], "-": left[1] - right[1], "*": left[1] * right[1]}.get(op)
        value = left[1] / right[1] if value is None else value
        items.append((f"({left[0]} {op} {right[0]})", value))
    return numbers, used, items[0][0], items[0][1]


@settings(max_examples=300, deadline=None)
@given(_expressions())
def test_countdown_property_valid_trees_verify_and_reuse_fails(case):
    numbers, used, expression, value = case
    if value.denominator != 1:
        assert not verify_countdown(expression, numbers, int(value))
        return
    target = int(value)
    assert verify_countdown(expression, numbers, target)
    assert not verify_countdown(expression, numbers, target + 1)
    first_uses = Counter(used)[used[0]]
    short = [n for n in numbers if n != used[0]] + [used[0]] * (first_uses - 1)
    assert not verify_countdown(expression, short, target), "using a number more often than given must fail"


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="0123456789+-*/() .=eExj_", max_size=60) | st.text(max_size=40))
def test_countdown_verifier_never_raises(text):
    assert verify_countdown(text, [1, 2, 3, 4, 5, 6, 7, 8, 9], 10) in (True, False)


# ---------------------------------------------------------------- splits


def test_build_splits_are_disjoint_deduplicated_and_complete():
    splits = build_splits(KINDS, n_train=600, n_test=100, seed=5, difficulty=1)
    train, test = splits["train"], splits["test"]
    assert (train.num_rows, test.num_rows) == (600, 100)
    assert tuple(train.column_names) == COLUMNS and tuple(test.column_names) == COLUMNS
    train_keys = [normalize_prompt(p) for p in train["prompt"]]
    test_keys = [normalize_prompt(p) for p in test["prompt"]]
    assert len(set(train_keys)) == 600 and len(set(test_keys)) == 100
    assert not set(train_keys) & set(test_keys)
    assert not set(train["id"]) & set(test["id"])
    assert Counter(train["kind"]) == {"arith": 300, "countdown": 300}
    assert train["kind"][:4] == ["arith", "countdown", "arith", "countdown"]  # interleaved
    for row in list(train.select(range(50))) + list(test.select(range(50))):
        meta = json.loads(row["meta"])
        assert verify(row["kind"], extract_answer(row["completion"]), row["answer"], meta)
        assert row["completion"].startswith(THINK_OPEN + row["cot"] + THINK_CLOSE)


def test_countdown_collisions_are_dropped_not_leaked():
    """The easy Countdown space is small: raw draws repeat, and the split must still be disjoint."""
    raw = [normalize_prompt(generate_task("countdown", 0, i, 1).prompt) for i in range(3000)]
    assert len(set(raw)) < len(raw)  # collisions do happen, so the dedup is exercised
    splits = build_splits(["countdown"], n_train=2000, n_test=300, seed=0, difficulty=1)
    train, test = set(splits["train"]["prompt"]), set(splits["test"]["prompt"])
    assert len(train) == 2000 and len(test) == 300 and not train & test


def test_test_split_is_stable_and_matches_held_out_texts():
    a = build_splits(KINDS, n_train=100, n_test=40, seed=2, difficulty=[1, 2])
    b = build_splits(KINDS, n_train=300, n_test=40, seed=2, difficulty=[1, 2])
    assert a["test"]["prompt"] == b["test"]["prompt"] == held_out_texts(KINDS, n_test=40, seed=2, difficulty=[1, 2])
    assert a["train"]["prompt"] == b["train"]["prompt"][:100]
    assert Counter(a["test"]["difficulty"]) == {1: 20, 2: 20}
    assert build_splits(KINDS, 100, 40, seed=3, difficulty=[1, 2])["test"]["prompt"] != a["test"]["prompt"]


def test_cot_fraction_mixes_direct_answers_into_train_only():
    full = build_splits(KINDS, n_train=600, n_test=60, seed=4)
    mixed = build_splits(KINDS, n_train=600, n_test=60, seed=4, cot_fraction=0.5)
    assert mixed["train"]["prompt"] == full["train"]["prompt"] and mixed["test"].to_list() == full["test"].to_list()
    direct = 0
    for m, f in zip(mixed["train"], full["train"]):
        assert extract_answer(m["completion"]) == extract_answer(f["completion"])
        if m["completion"] != f["completion"]:
            direct += 1
            assert (
                m["completion"]
                == f"{THINK_OPEN}{THINK_CLOSE}{ANSWER_OPEN}{extract_answer(f['completion'])}{ANSWER_CLOSE}"
            )
        assert trace_shows_cot(m["id"], 0.5) == (m["completion"] == f["completion"])
    assert 240 <= direct <= 360  # a fair coin per row: 300 +- 2.5 standard deviations
    # a row's style depends on its id alone: a longer split keeps the shorter one's rows as they were
    assert build_splits(KINDS, 200, 60, seed=4, cot_fraction=0.5)["train"].to_list() == mixed["train"].to_list()[:200]
    none = build_splits(KINDS, n_train=20, n_test=4, seed=4, cot_fraction=0.0)
    assert all(c.startswith(THINK_OPEN + THINK_CLOSE) for c in none["train"]["completion"])
    assert all(not c.startswith(THINK_OPEN + THINK_CLOSE) for c in none["test"]["completion"])


def test_build_splits_rejects_bad_arguments():
    with pytest.raises(ValueError, match="kinds"):
        build_splits(["arith", "chess"], 10, 10)
    with pytest.raises(ValueError, match="difficulty"):
        build_splits(KINDS, 10, 10, difficulty=[])
    with pytest.raises(ValueError, match="n_train"):
        build_splits(KINDS, -1, 10)
    with pytest.raises(ValueError, match="cot_fraction"):
        build_splits(KINDS, 10, 10, cot_fraction=1.5)


def test_empty_split_keeps_the_schema():
    splits = build_splits(["countdown"], n_train=0, n_test=3)
    assert splits["train"].num_rows == 0 and splits["train"].features == splits["test"].features


def test_write_reasoning_sets_round_trips(tmp_path):
    from datasets import load_from_disk

    paths = write_reasoning_sets(tmp_path / "reasoning", n_train=40, n_test=10, seed=1, difficulty=2)
    loaded = load_from_disk(str(paths["dataset"]))
    expected = build_splits(KINDS, 40, 10, seed=1, difficulty=2)
    assert loaded["train"].to_list() == expected["train"].to_list()
    assert load_from_disk(str(paths["test"])).to_list() == expected["test"].to_list()
