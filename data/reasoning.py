"""Reasoning task sets for post-training: procedurally generated, verifiable by rule, split train/test.

Two kinds of task (see their modules for the templates and difficulty knobs):

- ``arith`` (``data/tasks_arith.py``): multi-step arithmetic word problems; the answer is a number.
- ``countdown`` (``data/tasks_countdown.py``): reach a target from given numbers; the answer is an expression.

Every task is a pure function of ``(kind, seed, index, difficulty)``: the random stream is seeded from that tuple,
so any row can be regenerated anywhere. A ``Task`` carries the prompt (the bare question; chat templates are the
trainer's business), a reference answer, a chain-of-thought that derives it, and ``meta`` with whatever the
verifier needs.

Used by three stages:

- cold-start SFT trains on ``format_completion(task)``: ``<think>{cot}</think><answer>{...}</answer>``;
- GRPO samples completions for ``prompt`` and rewards them with ``verify(kind, extract_answer(text), answer, meta)``;
- eval scores the held-out ``test`` split the same way, and the data stage removes ``held_out_texts(...)`` from the
  pretraining corpus.

What goes inside ``<answer>``: for ``arith`` (and GSM8K) the number, which equals ``Task.answer``. For ``countdown``
the *expression* (``meta["solution"]`` in the reference trace); ``Task.answer`` holds the target, and the verifier
checks that the submitted expression reaches it using the given numbers. ``answer_text(task)`` returns the right one.

Cold-start traces may mix two styles (``cot_fraction``): a fraction of the train completions show their
chain-of-thought, the rest answer directly, ``<think></think><answer>...</answer>`` (same format, nothing thought).
Which rows answer directly is a stable coin per task id. The point is the experiment R1 is about: a base policy that
sometimes reasons and sometimes guesses, and RL, rewarded for correct answers only, finding out that reasoning pays
(R1-Zero's growing responses; Gandhi et al. 2025, "Cognitive Behaviors that Enable Self-Improving Reasoners", show
RL amplifies a behaviour only when the starting policy already shows it sometimes). Test completions always show
the reasoning: they are references, never trained on.

The split is disjoint by construction and checked: the test set is drawn first from its own index range, then the
train set from another, skipping any task whose normalized prompt is already taken, so no test prompt (and no
duplicate) ever appears in train.

    python -c "from data.reasoning import write_reasoning_sets; print(write_reasoning_sets('outputs/reasoning'))"
"""

import json
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from itertools import chain, zip_longest
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # datasets is imported lazily: graders and rewards use the pure functions alone
    import datasets

from data.tasks_arith import ARITH_LEVELS, generate_arith
from data.tasks_countdown import COUNTDOWN_LEVELS, generate_countdown
from data.tokenizer import ANSWER_CLOSE, ANSWER_OPEN, THINK_CLOSE, THINK_OPEN  # noqa: F401 (one definition)
from rewards.tasks import extract_answer, parse_number, verify, verify_number  # noqa: F401 (re-exported)

KINDS: tuple[str, ...] = ("arith", "countdown")
COLUMNS: tuple[str, ...] = ("id", "kind", "prompt", "answer", "cot", "completion", "difficulty", "meta")
TRAIN_INDEX_OFFSET = 1_000_000_000  # train indices start here, test indices at 0: two disjoint streams per seed


@dataclass
class Task:
    """One problem. ``answer`` is canonical (``"42"``); for countdown it is the target, see the module docstring."""

    id: str
    kind: str
    prompt: str
    answer: str
    cot: str
    difficulty: int
    meta: dict = field(default_factory=dict)


def generate_task(kind: str, seed: int, index: int, difficulty: int = 1) -> Task:
    """The ``index``-th task of ``kind`` for ``seed`` at ``difficulty`` (1 easy .. 3 hard); deterministic."""
    levels = {"arith": ARITH_LEVELS, "countdown": COUNTDOWN_LEVELS}
    if kind not in levels:
        raise ValueError(f"unknown task kind {kind!r}; expected one of {KINDS}")
    if difficulty not in levels[kind]:
        raise ValueError(f"unknown difficulty {difficulty!r} for {kind}; expected one of {sorted(levels[kind])}")
    rng = random.Random(f"{kind}:{seed}:{index}:{difficulty}")  # str seeds hash with sha512: stable across runs
    make = generate_arith if kind == "arith" else generate_countdown
    prompt, answer, cot, meta = make(rng, levels[kind][difficulty])
    return Task(f"{kind}-d{difficulty}-s{seed}-{index}", kind, prompt, answer, cot, difficulty, meta)


def answer_text(task: Task) -> str:
    """What the reference completion puts inside ``<answer>``: the expression for countdown, else the answer."""
    return task.meta["solution"] if task.kind == "countdown" else task.answer


def format_completion(task: Task, think: bool = True) -> str:
    """The SFT target: ``<think>{cot}</think><answer>{answer_text(task)}</answer>``; with ``think=False`` the
    direct answer ``<think></think><answer>...</answer>`` (same format, no reasoning shown)."""
    cot = task.cot if think else ""
    return f"{THINK_OPEN}{cot}{THINK_CLOSE}{ANSWER_OPEN}{answer_text(task)}{ANSWER_CLOSE}"


def trace_shows_cot(task_id: str, cot_fraction: float) -> bool:
    """Whether the train trace of task ``task_id`` shows its chain-of-thought: a stable coin of bias
    ``cot_fraction`` seeded by the id, so a row's style never depends on which other rows were drawn."""
    return cot_fraction >= 1.0 or random.Random(f"style:{task_id}").random() < cot_fraction


def normalize_prompt(text: str) -> str:
    """Lower-case, whitespace-collapsed prompt: the key for dedup and train/test disjointness."""
    return " ".join(text.lower().split())


def task_row(task: Task, think: bool = True) -> dict:
    """A dataset row with the columns ``COLUMNS`` (``meta`` as a JSON string, so every kind shares one schema)."""
    row = asdict(task)
    row["meta"] = json.dumps(task.meta, sort_keys=True)
    row["completion"] = format_completion(task, think)
    return {c: row[c] for c in COLUMNS}


def row_features() -> "datasets.Features":
    """The schema every reasoning split shares (generated tasks and GSM8K alike)."""
    from datasets import Features, Value  # deferred: datasets is a heavy import, needed only to write the splits

    return Features({c: Value("int64" if c == "difficulty" else "string") for c in COLUMNS})


def _levels(difficulty: int | Sequence[int]) -> list[int]:
    levels = [difficulty] if isinstance(difficulty, int) else list(difficulty)
    if not levels:
        raise ValueError("difficulty must be a level or a non-empty sequence of levels")
    return levels


def _draw(kinds: Sequence[str], n: int, seed: int, levels: list[int], start: int, taken: set[str]) -> list[Task]:
    """``n`` tasks cycling over kinds and levels, from indices ``start, start+1, ...``, skipping taken prompts."""
    per_kind = [n // len(kinds) + (i < n % len(kinds)) for i in range(len(kinds))]
    drawn: list[list[Task]] = []
    for kind, want in zip(kinds, per_kind):
        tasks: list[Task] = []
        budget = 20 * want + 1000
        index = start
        while len(tasks) < want:
            if index - start >= budget:
                raise ValueError(
                    f"only {len(tasks)} distinct {kind} prompts in {budget} draws at difficulty {levels}; "
                    f"ask for fewer than {want} or raise the difficulty"
                )
            task = generate_task(kind, seed, index, levels[len(tasks) % len(levels)])
            index += 1
            key = normalize_prompt(task.prompt)
            if key not in taken:
                taken.add(key)
                tasks.append(task)
        drawn.append(tasks)
    # interleave kinds so any prefix of the split keeps the mixture
    return [t for t in chain.from_iterable(zip_longest(*drawn)) if t is not None]


def _check_kinds(kinds: Sequence[str]) -> list[str]:
    kinds = [kinds] if isinstance(kinds, str) else list(kinds)
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {kinds}")
    return kinds


def build_test_tasks(
    kinds: Sequence[str] = KINDS, n_test: int = 200, seed: int = 0, difficulty: int | Sequence[int] = 1
) -> list[Task]:
    """The held-out tasks alone (they depend on nothing but these arguments, not on the train size)."""
    return _draw(_check_kinds(kinds), n_test, seed, _levels(difficulty), 0, set())


def build_splits(
    kinds: Sequence[str] = KINDS,
    n_train: int = 2000,
    n_test: int = 200,
    seed: int = 0,
    difficulty: int | Sequence[int] = 1,
    cot_fraction: float = 1.0,
) -> "datasets.DatasetDict":
    """A ``datasets.DatasetDict`` with ``train`` and ``test`` splits, disjoint on normalized prompt text.

    ``n_train``/``n_test`` are totals, shared evenly over ``kinds``; a sequence of difficulties cycles levels.
    ``cot_fraction`` of the train completions show their chain-of-thought, the others answer directly (see the
    module docstring); test completions always show it (they are references, never trained on).
    """
    from datasets import Dataset, DatasetDict  # deferred: datasets is a heavy import, needed only to write the splits

    if n_train < 0 or n_test < 0:
        raise ValueError(f"n_train and n_test must be >= 0, got {n_train} and {n_test}")
    if not 0.0 <= cot_fraction <= 1.0:
        raise ValueError(f"cot_fraction must be in [0, 1], got {cot_fraction}")
    kinds = _check_kinds(kinds)
    levels = _levels(difficulty)
    taken: set[str] = set()
    test = _draw(kinds, n_test, seed, levels, 0, taken)
    train = _draw(kinds, n_train, seed, levels, TRAIN_INDEX_OFFSET, taken)
    test_keys = {normalize_prompt(t.prompt) for t in test}
    assert not test_keys & {normalize_prompt(t.prompt) for t in train}, "train/test overlap"

    def to_dataset(tasks: list[Task], fraction: float) -> Dataset:  # columnar, so an empty split keeps the schema
        rows = [task_row(t, trace_shows_cot(t.id, fraction)) for t in tasks]
        return Dataset.from_dict({c: [r[c] for r in rows] for c in COLUMNS}, features=row_features())

    return DatasetDict(train=to_dataset(train, cot_fraction), test=to_dataset(test, 1.0))


def held_out_texts(
    kinds: Sequence[str] = KINDS, n_test: int = 200, seed: int = 0, difficulty: int | Sequence[int] = 1
) -> list[str]:
    """The test prompts, for decontaminating the pretraining corpus (same arguments as ``build_splits``)."""
    return [t.prompt for t in build_test_tasks(kinds, n_test, seed, difficulty)]


def write_reasoning_sets(
    out_dir: str | Path,
    kinds: Sequence[str] = KINDS,
    n_train: int = 2000,
    n_test: int = 200,
    seed: int = 0,
    difficulty: int | Sequence[int] = 1,
    cot_fraction: float = 1.0,
) -> dict[str, Path]:
    """Build the splits and ``save_to_disk`` them under ``out_dir``; returns the dataset and per-split paths."""
    out = Path(out_dir)
    splits = build_splits(kinds, n_train, n_test, seed, difficulty, cot_fraction)
    splits.save_to_disk(str(out))
    return {"dataset": out, "train": out / "train", "test": out / "test"}
