"""Task graders: the rule-based checks of the reasoning task sets (data/reasoning.py), strict by design.

Two kinds of answer checking live in rewards/, and they are told apart on purpose:

- strict, here, for the generated sets, whose references this repository writes: an arithmetic answer is exactly
  one number (``"1,234"``, ``"$5"``, ``"-3.50"``, ``"7."`` are numbers; ``"x = 5"``, ``"5 apples"``,
  ``"\\boxed{5}"`` are not) and must equal the reference exactly (``Fraction``, never a tolerance: 1000001 is not
  1000000); a Countdown answer is an expression checked by walking its syntax tree;
- lenient, in rewards/math_answers.py, for GSM8K/MATH-style answers written by people: math-verify's parsing of
  LaTeX, boxed answers, units and equivalent forms. ``verify("gsm8k", ...)`` uses it.

Countdown (``verify_countdown``) parses the expression with ``ast`` and walks the tree itself (never ``eval``): only
integer literals, the four binary operators and parentheses are accepted, each given number may be used at most
once (a multiset check), and arithmetic is exact (``fractions.Fraction``), so ``/`` may make fractional
intermediates as long as the final value equals the target. Division by zero, ``**``, ``//``, unary minus, floats,
hex or underscore literals, names, calls and over-long inputs are all rejected by construction.

Every input is bounded before it is parsed (``MAX_NUMBER_CHARS``, ``MAX_EXPRESSION_CHARS``) and ``extract_answer`` is
linear in the completion's length, so no answer a policy writes makes grading slow.
"""

import ast
import json
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from fractions import Fraction

ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"  # the tags of data/tokenizer.py
MAX_NUMBER_CHARS = 100  # a longer "number" is not an answer
MAX_EXPRESSION_CHARS = 200  # anything longer is rejected before parsing
_NUMBER = re.compile(r"-?(\d+(\.\d*)?|\.\d+)")
_ALLOWED_CHARS = re.compile(r"[0-9+\-*/()\s]*")


def extract_answer(completion: str) -> str | None:
    """The stripped text of the last ``<answer>...</answer>`` in a completion, or None when there is none.

    Found from the end (``str.rfind``), so the cost is linear however many tags a completion repeats."""
    end = completion.rfind(ANSWER_CLOSE)
    if end < 0:
        return None
    start = completion.rfind(ANSWER_OPEN, 0, end)
    return None if start < 0 else completion[start + len(ANSWER_OPEN) : end].strip()


def parse_number(text: str) -> Fraction | None:
    """``"1,234"``, ``"$5"``, ``"-3.50"``, ``"7."`` -> exact value; None unless the whole text is one number."""
    if len(text) > MAX_NUMBER_CHARS:
        return None
    cleaned = text.strip().replace(",", "").removeprefix("$").rstrip(".").strip()
    if cleaned.endswith(".") or not _NUMBER.fullmatch(cleaned):
        return None
    return Fraction(cleaned)


def verify_number(submitted: str, answer: str) -> bool:
    """Exact numeric equality: ``"12.0"`` matches ``"12"``; text around the number makes it wrong."""
    got, want = parse_number(submitted), parse_number(answer)
    return got is not None and want is not None and got == want


def verify(kind: str, submitted: str | None, answer: str, meta: Mapping | str | None = None) -> bool:
    """Rule-based check of a submitted ``<answer>`` content against a task row (``meta`` may be its JSON string):
    Countdown by its expression, arithmetic strictly (``verify_number``), GSM8K leniently (math-verify)."""
    if submitted is None:
        return False
    if kind == "countdown":
        meta = json.loads(meta) if isinstance(meta, str) else meta
        if not meta or "numbers" not in meta:
            raise ValueError("countdown verification needs meta with 'numbers' (and 'target')")
        return verify_countdown(submitted, meta["numbers"], int(meta.get("target", answer)))
    if kind == "arith":
        return verify_number(submitted, answer)
    if kind == "gsm8k":
        from rewards.math_answers import answers_match  # math-verify (sympy) only where it is needed

        return answers_match(submitted, answer)
    raise ValueError(f"unknown task kind {kind!r}")


# ---------------------------------------------------------------- Countdown


class _Rejected(Exception):
    """The submitted expression is not a valid Countdown expression."""


def _evaluate(node: ast.AST, literals: list[int]) -> Fraction:
    """Exact value of an allowed expression tree; records each integer literal met in ``literals``."""
    if isinstance(node, ast.Constant):
        if type(node.value) is not int:  # bool is a subclass of int; floats/complex/str are refused
            raise _Rejected(f"literal {node.value!r} is not an integer")
        literals.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add | ast.Sub | ast.Mult | ast.Div):
        left, right = _evaluate(node.left, literals), _evaluate(node.right, literals)
        if isinstance(node.op, ast.Add):
            return left + right
        if isinstance(node.op, ast.Sub):
            return left - right
        if isinstance(node.op, ast.Mult):
            return left * right
        if right == 0:
            raise _Rejected("division by zero")
        return left / right
    what = type(node.op).__name__ if isinstance(node, ast.BinOp | ast.UnaryOp) else type(node).__name__
    raise _Rejected(f"{what} is not allowed (only integers, + - * / and parentheses)")


def evaluate_countdown(expression: str) -> tuple[Fraction, list[int]]:
    """Parse and evaluate a Countdown expression exactly; returns ``(value, literals used)``.

    Raises ``ValueError`` naming the problem for anything outside integers, ``+ - * /`` and parentheses.
    """
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    if not _ALLOWED_CHARS.fullmatch(expression):
        raise ValueError(f"expression {expression!r} has characters outside digits, + - * / ( ) and spaces")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
        literals: list[int] = []
        return _evaluate(tree.body, literals), literals
    except (SyntaxError, _Rejected, RecursionError, MemoryError) as e:
        raise ValueError(f"invalid Countdown expression {expression!r}: {e}") from None


def verify_countdown(expression_or_answer: str, numbers: Sequence[int], target: int) -> bool:
    """True iff the expression uses each of ``numbers`` at most once and evaluates exactly to ``target``.

    Accepts ``"expr"`` or ``"expr = target"`` (the right side must then be the target itself). Never raises on
    malformed input: any string that is not a valid expression is simply wrong.
    """
    if not isinstance(expression_or_answer, str) or len(expression_or_answer) > 2 * MAX_EXPRESSION_CHARS:
        return False
    expression, _, rhs = expression_or_answer.partition("=")
    if rhs and rhs.strip() != str(target):
        return False
    if not expression.strip():
        return False
    try:
        value, literals = evaluate_countdown(expression)
    except ValueError:
        return False
    if Counter(literals) - Counter(numbers):  # some literal used more often than it was given
        return False
    return value == target
