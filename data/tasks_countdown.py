"""Countdown: reach a target number from given numbers with + - * / and parentheses.

"Make 42 from the numbers 3, 5, 9 using + - * / and each number at most once." One answer is ``5 * 9 - 3``.

Generation works backwards so every instance is solvable: draw the numbers, pick a subset, combine two values at a
time with a random operator (keeping every intermediate a positive integer: ``a - b`` only with ``a > b``, ``a / b``
only when exact), and call the final value the target. The combination order is the reference solution and, step
by step, the chain-of-thought ("5 * 9 = 45. 45 - 3 = 42."). Instances whose target falls outside the level's
range, or equals one of the numbers (a trivial answer), are redrawn.

The RL answer is an *expression*, not a number: many expressions reach the target, so correctness is checked by
rule rather than by string match: ``verify_countdown`` (in rewards/tasks.py with the other graders, re-exported
here) parses the expression with ``ast`` and walks the tree itself, never ``eval``; see its module for the rules.

Difficulty knobs (``CountdownLevel``): how many numbers, their range, the target range, the operators used to build
the reference, and the least number of values the reference combines. Level 1 is three numbers up to 15 with
+ - * and a target up to 80 (about 6,500 distinct instances: enough for a few thousand deduplicated rows).
"""

import random
from dataclasses import dataclass

from rewards.tasks import MAX_EXPRESSION_CHARS, evaluate_countdown, verify_countdown  # noqa: F401 (re-exported)


@dataclass(frozen=True)
class CountdownLevel:
    """The knobs of one difficulty level. Ranges are inclusive ``(lo, hi)``."""

    n_numbers: int  # numbers given in the prompt
    number_range: tuple[int, int]
    target_range: tuple[int, int]
    ops: str = "+-*/"  # operators the reference solution may use (the verifier accepts all four)
    min_used: int = 2  # the reference combines at least this many of the numbers


COUNTDOWN_LEVELS: dict[int, CountdownLevel] = {
    1: CountdownLevel(n_numbers=3, number_range=(1, 15), target_range=(10, 80), ops="+-*", min_used=2),
    2: CountdownLevel(n_numbers=4, number_range=(1, 20), target_range=(10, 100), ops="+-*/", min_used=3),
    3: CountdownLevel(n_numbers=5, number_range=(1, 50), target_range=(50, 500), ops="+-*/", min_used=4),
}

_MAX_ATTEMPTS = 1000


def _wrap(expr: str, is_leaf: bool) -> str:
    return expr if is_leaf else f"({expr})"


def generate_countdown(rng: random.Random, level: CountdownLevel) -> tuple[str, str, str, dict]:
    """One solvable instance drawn from ``rng``: returns ``(prompt, answer, cot, meta)``.

    ``answer`` is the target as a string; ``meta`` holds ``numbers`` (sorted), ``target`` and ``solution`` (the
    reference expression, which is what a completion's ``<answer>`` tag should contain).
    """
    if not 2 <= level.min_used <= level.n_numbers:
        raise ValueError(f"need 2 <= min_used <= n_numbers, got {level}")
    if not level.ops or set(level.ops) - set("+-*/"):
        raise ValueError(f"CountdownLevel.ops must be a non-empty subset of '+-*/', got {level.ops!r}")
    t_lo, t_hi = level.target_range
    for _ in range(_MAX_ATTEMPTS):
        numbers = sorted(rng.randint(*level.number_range) for _ in range(level.n_numbers))
        used = rng.sample(numbers, rng.randint(level.min_used, level.n_numbers))
        items = [(n, str(n), True) for n in used]  # (value, expression, is_leaf)
        steps = []
        while len(items) > 1:
            (a, ea, la), (b, eb, lb) = items.pop(rng.randrange(len(items))), items.pop(rng.randrange(len(items)))
            if a < b:
                (a, ea, la), (b, eb, lb) = (b, eb, lb), (a, ea, la)
            ops = [op for op in level.ops if (op != "-" or a > b) and (op != "/" or (b > 1 and a % b == 0))]
            if not ops:  # only "-"/"/" allowed and neither keeps a positive integer: redraw
                break
            op = rng.choice(ops)
            value = {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]
            steps.append(f"{a} {op} {b} = {value}.")
            items.append((value, f"{_wrap(ea, la)} {op} {_wrap(eb, lb)}", False))
        target, solution, _ = items[-1]
        if len(items) == 1 and t_lo <= target <= t_hi and target not in numbers:
            break
    else:
        raise ValueError(f"could not draw a Countdown instance in {_MAX_ATTEMPTS} tries for {level}")
    listed = ", ".join(map(str, numbers))
    prompt = f"Make {target} from the numbers {listed} using + - * / and each number at most once."
    meta = {"numbers": numbers, "target": target, "solution": solution}
    return prompt, str(target), " ".join(steps), meta
