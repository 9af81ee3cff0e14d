"""Where the data stage's artifacts lie inside `outputs/<run>/data/`: the one place later stages look them up.

A library module (no stage logic), so train/, distill/ and eval/ read the data stage's output contract without
importing the stage module `data.prepare` (its docstring describes each artifact).
"""

from __future__ import annotations

from pathlib import Path


def stage_outputs(data_dir: Path) -> dict[str, Path]:
    """Paths of the data stage's artifacts inside `outputs/<run>/data/`."""
    d = Path(data_dir)
    return {
        "tokenizer": d / "tokenizer.json",
        "train": d / "train",
        "val": d / "val",
        "reasoning": d / "reasoning",
        "stats": d / "stats.json",
    }
