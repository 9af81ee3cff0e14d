"""Multi-step arithmetic word problems, generated procedurally and checked by rule.

A problem is a short story in which a quantity changes one integer operation at a time. Two template families:

- ``sequence``: one person's count changes through events.
  "Ana has 7 apples. She buys 5 more. Then she gives 3 away. How many apples does she have now?"
- ``chain``: people are defined relative to the one before.
  "Ben has 6 cards. Ivy has 4 more than Ben. Leo has half as many as Ivy. How many cards does Leo have?"

The chain-of-thought states each step's arithmetic and nothing else ("7 + 5 = 12. 12 - 3 = 9."), so the last number
of the trace is the answer and a small model learns one fixed, checkable pattern. Every intermediate value stays a
positive integer below ``max_value`` (subtractions never reach zero, divisions are exact), so problems read naturally
and no fractions appear.

Difficulty knobs (``ArithLevel``): the number of steps, the range of the starting amount and of the added/removed
amounts, the operators allowed, the multiply/divide factors and the ceiling on any value. ``ARITH_LEVELS`` holds the
presets: level 1 is two additions/subtractions with one-digit amounts, which a few-million-parameter model can
learn in minutes; levels 2 and 3 add steps, larger numbers, then multiplication and division.
"""

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class ArithLevel:
    """The knobs of one difficulty level. Ranges are inclusive ``(lo, hi)``."""

    steps: int  # integer operations per problem
    start_range: tuple[int, int]  # the first quantity
    operand_range: tuple[int, int]  # amounts added or removed
    ops: str  # subset of "+-*/"
    factor_range: tuple[int, int] = (2, 4)  # multipliers and divisors
    max_value: int = 100  # no intermediate value exceeds this


ARITH_LEVELS: dict[int, ArithLevel] = {
    1: ArithLevel(steps=2, start_range=(2, 20), operand_range=(1, 9), ops="+-", max_value=40),
    2: ArithLevel(steps=3, start_range=(2, 30), operand_range=(1, 20), ops="+-*", factor_range=(2, 4), max_value=200),
    3: ArithLevel(
        steps=4, start_range=(10, 100), operand_range=(1, 50), ops="+-*/", factor_range=(2, 6), max_value=1000
    ),
}

NAMES: tuple[tuple[str, str], ...] = (
    ("Ana", "she"), ("Ben", "he"), ("Cara", "she"), ("Dan", "he"), ("Eva", "she"), ("Finn", "he"),
    ("Gia", "she"), ("Hugo", "he"), ("Ivy", "she"), ("Jack", "he"), ("Kim", "she"), ("Leo", "he"),
    ("Mia", "she"), ("Noah", "he"), ("Rosa", "she"), ("Sam", "he"),
)  # fmt: skip
OBJECTS: tuple[str, ...] = (
    "apples", "pencils", "marbles", "stickers", "books", "cookies", "coins", "shells", "cards", "flowers",
)  # fmt: skip

# Sequence-family events: the pronoun is the subject; ``{n}`` is the amount, ``{k}`` the factor.
_EVENTS: dict[str, tuple[str, ...]] = {
    "+": ("{p} buys {n} more.", "{p} finds {n} more.", "{p} gets {n} more from a friend."),
    "-": ("{p} gives {n} away.", "{p} loses {n}.", "{p} sells {n}."),
    "*": ("{p} gets more until {p} has {k} times as many.",),
    "/": ("{p} splits them into {k} equal groups and keeps one.",),
}
_FRACTION_WORDS = {2: "half", 3: "a third", 4: "a quarter"}


def _capitalize(s: str) -> str:
    return s[0].upper() + s[1:]


def _relation(op: str, amount: int, subject: str, ref: str) -> str:
    """One chain-family sentence: how ``subject``'s count relates to ``ref``'s."""
    if op == "+":
        return f"{subject} has {amount} more than {ref}."
    if op == "-":
        return f"{subject} has {amount} fewer than {ref}."
    if op == "*":
        times = "twice" if amount == 2 else f"{amount} times"
        return f"{subject} has {times} as many as {ref}."
    return f"{subject} has {_FRACTION_WORDS.get(amount, f'1/{amount}')} as many as {ref}."


def _choose_step(rng: random.Random, value: int, level: ArithLevel) -> tuple[str, int, int]:
    """Pick a valid ``(op, amount, new_value)`` for the current value, keeping every result in ``[1, max_value]``."""
    lo, hi = level.operand_range
    f_lo, f_hi = level.factor_range
    options: list[tuple[str, list[int]]] = []
    for op in level.ops:
        if op == "+":
            amounts = list(range(lo, min(hi, level.max_value - value) + 1))
        elif op == "-":
            amounts = list(range(lo, min(hi, value - 1) + 1))
        elif op == "*":
            amounts = [k for k in range(f_lo, f_hi + 1) if value * k <= level.max_value]
        else:
            amounts = [k for k in range(f_lo, f_hi + 1) if value % k == 0 and value // k >= 1]
        if amounts:
            options.append((op, amounts))
    if not options:
        raise ValueError(f"no valid step from value {value} at {level}: widen the ranges or allow '+' and '-'")
    op, amounts = rng.choice(options)
    n = rng.choice(amounts)
    if op == "+":
        return op, n, value + n
    if op == "-":
        return op, n, value - n
    if op == "*":
        return op, n, value * n
    return op, n, value // n


def generate_arith(rng: random.Random, level: ArithLevel) -> tuple[str, str, str, dict]:
    """One word problem drawn from ``rng``: returns ``(prompt, answer, cot, meta)``."""
    if level.steps < 1:
        raise ValueError(f"ArithLevel.steps must be >= 1, got {level.steps}")
    if set(level.ops) - set("+-*/") or not level.ops:
        raise ValueError(f"ArithLevel.ops must be a non-empty subset of '+-*/', got {level.ops!r}")
    family = rng.choice(("sequence", "chain"))
    obj = rng.choice(OBJECTS)
    value = rng.randint(*level.start_range)
    people = rng.sample(NAMES, level.steps + 1 if family == "chain" else 1)
    name, pronoun = people[0]
    sentences = [f"{name} has {value} {obj}."]
    cot_steps, ops = [], []
    for i in range(level.steps):
        op, n, new = _choose_step(rng, value, level)
        equation = f"{value} {op} {n} = {new}."
        if family == "sequence":
            event = rng.choice(_EVENTS[op]).format(p=pronoun, n=n, k=n)
            sentences.append("Then " + event if i > 0 else _capitalize(event))
            cot_steps.append(equation)
        else:
            subject = people[i + 1][0]
            sentences.append(_relation(op, n, subject, people[i][0]))
            cot_steps.append(f"{subject} has {equation}")
        ops.append(op)
        value = new
    if family == "sequence":
        sentences.append(f"How many {obj} does {pronoun} have now?")
    else:
        sentences.append(f"How many {obj} does {people[-1][0]} have?")
    meta = {"family": family, "ops": "".join(ops)}
    return " ".join(sentences), str(value), " ".join(cot_steps), meta
