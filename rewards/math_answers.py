"""Lenient answer equivalence for GSM8K/MATH-style answers: math-verify, behind bounds that keep every answer cheap.

Answers written by people (GSM8K's "#### 1,250", MATH's "\\frac{1}{2}", "\\boxed{42}", "x = 5", "50%") are compared
by math-verify (Hugging Face's parser and checker, the one open-r1 rewards with): it extracts the answer from LaTeX
or plain expressions and decides equivalence with sympy. Integers compare exactly (1000001 is not 1000000);
decimals against fractions up to its default rounding (6 places: "0.3333333333" is "1/3", "0.333" is not). A
reference that math-verify cannot read as mathematics (a word, a name) is compared as text, case- and
space-insensitively.

Parsing is bounded before math-verify sees anything, because sympy will happily evaluate `2**100000000` or
`10^{10^{9}}` (and math-verify reads "1e10000000" as 1): an answer longer than `MAX_ANSWER_CHARS`, with a run of
more than `MAX_DIGITS` digits, an exponent above `MAX_EXPONENT`, more than one exponentiation, a factorial above
`MAX_FACTORIAL` or brackets nested deeper than `MAX_NESTING` is wrong, whatever it says. math-verify's own timeouts
(signal-based, so only in a main thread) are on as well; the caller's per-completion time limit
(`rewards.scoring.score_safely`) is the last resort.

The strict checks of the generated task sets are in rewards/tasks.py; see its docstring for why there are two.
"""

import re
import threading

from math_verify import parse, verify

MAX_ANSWER_CHARS = 300
MAX_DIGITS = 50
MAX_EXPONENT = 300
MAX_FACTORIAL = 100
MAX_NESTING = 20
TIMEOUT_S = 1  # math-verify's timeouts take whole seconds

_DIGITS = re.compile(rf"\d{{{MAX_DIGITS + 1},}}")
_EXPONENT = re.compile(r"(?:\^|\*\*|(?<=\d)[eE])\s*[{(]?\s*[+-]?\s*(\d+)")
_POWER = re.compile(r"\^|\*\*")
_FACTORIAL = re.compile(r"(\d+)\s*!")


def too_costly(text: str) -> bool:
    """True for an answer that could make parsing or comparison slow (see the module docstring)."""
    if len(text) > MAX_ANSWER_CHARS or _DIGITS.search(text):
        return True
    if len(_POWER.findall(text)) > 1 or any(int(e) > MAX_EXPONENT for e in _EXPONENT.findall(text)):
        return True
    if any(int(n) > MAX_FACTORIAL for n in _FACTORIAL.findall(text)):
        return True
    depth = deepest = 0
    for ch in text:
        if ch in "({[":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in ")}]":
            depth -= 1
    return deepest > MAX_NESTING


def _as_text(answer: str) -> str:
    return " ".join(answer.strip().strip("$").rstrip(".").split()).casefold()


def answers_match(predicted: str, reference: str) -> bool:
    """Whether `predicted` states the same answer as `reference` (math-verify; text for non-mathematical ones)."""
    if too_costly(predicted) or too_costly(reference):
        return False
    main = threading.current_thread() is threading.main_thread()
    timeout = TIMEOUT_S if main else None  # math-verify's alarm() works in the main thread only
    gold = parse(reference, parsing_timeout=timeout)
    if not gold:
        return _as_text(predicted) == _as_text(reference)
    return verify(gold, parse(predicted, parsing_timeout=timeout), timeout_seconds=timeout)
