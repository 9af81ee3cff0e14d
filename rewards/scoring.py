"""`score_safely`: grade completions so that no completion, however it was written, can stall or kill a step.

A trainer calls `score_safely(reward_fn, completions, **kw)` and gets one score per completion and the number of
completions whose grading failed (an exception, a non-finite score, or the time limit): those score 0.0 and are
reported as `grader_errors`, never raised.

The time limit is enforced by the caller, not by the grader's good will: a grader's slow step can be C code that
holds the GIL (a big-integer power, a sympy simplification), which no thread or signal interrupts. So graders run in
a worker process, one completion at a time, and a completion that takes longer than `time_limit_s` gets the worker
killed (and a fresh one for the rest of the batch). Workers are forked from a forkserver, a clean interpreter that
has already imported the graders and math-verify (nothing of the trainer's threads or CUDA state), so a restart costs
a fork, not an import. The function and its arguments must be picklable (the registered rewards are).

Graders that bound themselves (`code_reward`: every program runs in the sandbox under its own wall-clock limit, and
concurrently) set the attribute `limits_itself = True` and are called in-process on the whole batch; so are all
graders when `time_limit_s=None`. In-process, a batch that raises is graded again one sample at a time.
"""

from __future__ import annotations

import functools
import math
import multiprocessing
import pickle
from collections.abc import Callable, Sequence

DEFAULT_TIME_LIMIT_S = 5.0
_START_TIMEOUT_S = 120.0  # a fresh worker receiving its batch (imports included)
_PRELOAD = ["rewards.graders", "rewards.math_answers"]


def _per_sample_kwargs(kw: dict, n: int, i: int) -> dict:
    """Keyword arguments for sample i: every per-sample list (length n) cut down to that sample."""
    return {k: [v[i]] if isinstance(v, list | tuple) and len(v) == n else v for k, v in kw.items()}


def _grade_one(fn: Callable, completion: str, kw: dict) -> float:
    try:
        score = float(fn([completion], **kw)[0])
    except Exception:
        return math.nan
    return score


def _serve(conn) -> None:
    """The worker: grade each (i, fn, completion, kw) it receives and send back (i, score)."""
    while True:
        try:
            job = conn.recv()  # unpickling may import the graders' modules: not counted against any completion
        except EOFError:
            return
        conn.send("started")
        for i, fn, completion, kw in job:
            conn.send((i, _grade_one(fn, completion, kw)))


class _Worker:
    def __init__(self):
        ctx = _context()
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child,), daemon=True, name="grader")
        self.proc.start()
        child.close()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join()
        self.conn.close()


@functools.cache
def _context():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


_workers: list[_Worker] = []  # at most one, started on first use and replaced when it is killed


def _worker() -> _Worker:
    if not _workers or not _workers[0].proc.is_alive():
        _workers[:] = [_Worker()]
    return _workers[0]


def _grade_in_worker(fn: Callable, completions: Sequence[str], kw: dict, time_limit_s: float) -> list[float]:
    n = len(completions)
    scores = [math.nan] * n
    todo = list(range(n))
    while todo:
        worker = _worker()
        try:
            worker.conn.send([(i, fn, completions[i], _per_sample_kwargs(kw, n, i)) for i in todo])
        except (pickle.PicklingError, AttributeError, TypeError) as e:  # a lambda, a local function
            raise TypeError(f"{fn!r} and its arguments must be picklable, or pass time_limit_s=None") from e
        if not worker.conn.poll(_START_TIMEOUT_S) or worker.conn.recv() != "started":
            raise RuntimeError(f"the grading worker did not start within {_START_TIMEOUT_S} s")
        for i in list(todo):
            try:
                if not worker.conn.poll(time_limit_s):
                    raise TimeoutError
                j, score = worker.conn.recv()
            except (TimeoutError, EOFError, OSError):  # too slow, or the worker died: this one stays nan
                worker.kill()
                todo = todo[todo.index(i) + 1 :]  # the rest go to a fresh worker
                break
            assert j == i, (j, i)
            scores[i] = score
        else:
            todo = []
    return scores


def _grade_in_process(fn: Callable, completions: Sequence[str], kw: dict) -> list[float]:
    n = len(completions)
    try:
        scores = [float(s) for s in fn(completions, **kw)]
        if len(scores) != n:
            raise ValueError(f"{getattr(fn, '__name__', fn)} returned {len(scores)} scores for {n} completions")
        return scores
    except Exception:
        return [_grade_one(fn, completions[i], _per_sample_kwargs(kw, n, i)) for i in range(n)]


def score_safely(
    fn: Callable[..., list[float]],
    completions: Sequence[str],
    time_limit_s: float | None = DEFAULT_TIME_LIMIT_S,
    **kw,
) -> tuple[list[float], int]:
    """Scores for all completions and the number whose grading failed or ran past `time_limit_s` (those score 0.0).

    Per-sample keyword arguments are lists aligned with `completions`; other keyword arguments are shared.
    """
    if time_limit_s is not None and not time_limit_s > 0:
        raise ValueError(f"time_limit_s must be positive or None, got {time_limit_s}")
    if not completions:
        return [], 0
    if time_limit_s is None or getattr(fn, "limits_itself", False):
        scores = _grade_in_process(fn, completions, kw)
    else:
        scores = _grade_in_worker(fn, completions, kw, time_limit_s)
    n_errors = sum(not math.isfinite(s) for s in scores)
    return [s if math.isfinite(s) else 0.0 for s in scores], n_errors
