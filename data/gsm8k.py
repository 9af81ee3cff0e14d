"""GSM8K-format grade-school math, loaded through ``datasets`` into the reasoning-task columns.

GSM8K rows have two fields: ``question`` and ``answer``, where the answer is a worked solution whose last line is
``#### N`` and whose steps carry calculator annotations, e.g.::

    {"question": "...", "answer": "She buys 4 * 6 = <<4*6=24>>24 eggs.\\n#### 24"}

``load_gsm8k`` maps each row onto the columns of ``data/reasoning.py`` (``COLUMNS``) so the SFT, RL and eval stages
treat GSM8K exactly like the generated tasks: ``prompt`` is the question, ``answer`` the final number in canonical
form (thousands separators dropped: ``1,250`` -> ``1250``), ``cot`` the solution without its ``#### N`` line and
without ``<<...>>`` annotations, ``completion`` the ``<think>/<answer>`` trace, ``kind`` = ``"gsm8k"`` (verified
by ``rewards.tasks.verify`` with math-verify) and ``difficulty`` the number of solution lines, a rough count of steps.

Local files go through ``datasets.load_dataset("json", data_files=...)``; a hub name (``openai/gsm8k``) goes through
``datasets.load_dataset(name, "main")`` and needs the network or a warm HF cache. Nothing here downloads by itself:
this machine ships no GSM8K, and the tests use a hand-written fixture in the same schema.
"""

import re
from decimal import Decimal
from pathlib import Path

from data.reasoning import COLUMNS, Task, row_features, task_row
from rewards.tasks import parse_number

GSM8K_HUB_NAME = "openai/gsm8k"
_ANNOTATION = re.compile(r"<<[^<>]*>>")


def canonical_number(text: str) -> str:
    """``"1,250"`` -> ``"1250"``, ``"-4"`` -> ``"-4"``, ``"2.50"`` -> ``"2.5"``; ValueError if not one number."""
    value = parse_number(text)
    if value is None:
        raise ValueError(f"not a number: {text!r}")
    if value.denominator == 1:
        return str(value.numerator)
    return format((Decimal(value.numerator) / Decimal(value.denominator)).normalize(), "f")


def parse_gsm8k_solution(solution: str) -> tuple[str, str]:
    """Split a GSM8K answer field into ``(cot, answer)``: the steps without annotations, and the canonical number."""
    body, sep, final = solution.rpartition("####")
    if not sep:
        raise ValueError(f"GSM8K answer has no '#### N' line: {solution[-80:]!r}")
    lines = [_ANNOTATION.sub("", line).rstrip() for line in body.strip().splitlines()]
    return "\n".join(line for line in lines if line.strip()), canonical_number(final)


def _data_file(path: Path, split: str) -> Path:
    if path.is_file():
        return path
    for name in (f"{split}.jsonl", f"{split}.json"):
        if (path / name).is_file():
            return path / name
    raise ValueError(f"no {split}.jsonl or {split}.json under GSM8K directory {path}")


def load_gsm8k(path_or_name: str | Path = GSM8K_HUB_NAME, split: str = "test", cache_dir: str | None = None):
    """GSM8K as a ``datasets.Dataset`` with the reasoning-task columns.

    ``path_or_name``: a ``.jsonl``/``.json`` file (loaded as ``split``), a directory holding ``{split}.jsonl``, or a
    hub dataset name such as ``"openai/gsm8k"`` (config ``"main"``).
    """
    import datasets  # deferred: datasets is a heavy import, needed only to load GSM8K

    path = Path(path_or_name)
    if path.exists():
        data_file = _data_file(path, split)
        raw = datasets.load_dataset("json", data_files={split: str(data_file)}, split=split, cache_dir=cache_dir)
        source = str(data_file)
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", str(path_or_name)) and path.suffix not in (".json", ".jsonl"):
        raw = datasets.load_dataset(str(path_or_name), "main", split=split, cache_dir=cache_dir)
        source = str(path_or_name)
    else:
        raise ValueError(
            f"GSM8K source {path_or_name!r} is neither an existing file/directory nor a hub name (owner/name)"
        )
    missing = {"question", "answer"} - set(raw.column_names)
    if missing:
        raise ValueError(f"{source} lacks GSM8K column(s) {sorted(missing)}; has {raw.column_names}")
    meta = {"source": source, "split": split}

    def to_row(row: dict, index: int) -> dict:
        cot, answer = parse_gsm8k_solution(row["answer"])
        task = Task(f"gsm8k-{split}-{index}", "gsm8k", row["question"].strip(), answer, cot, cot.count("\n") + 1, meta)
        return task_row(task)

    rows = raw.map(to_row, with_indices=True, remove_columns=raw.column_names, features=row_features())
    return rows.select_columns(list(COLUMNS))
