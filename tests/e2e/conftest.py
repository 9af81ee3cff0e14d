import os
import shutil
from pathlib import Path

import pytest

from tests.e2e.corpus import write_corpus

# one thread per process: the suite may run several processes at once on 2 cores (OpenMP oversubscription
# slows torch's CPU kernels by 10-30x)
os.environ.setdefault("OMP_NUM_THREADS", "1")


def data_overrides(corpus: Path) -> list[str]:
    return [
        "data=smoke",
        f"data.sources=[{{kind: files, paths: ['{corpus}'], path_field: path}}]",
        "data.decontam.enabled=false",
        "data.tokenizer.vocab_size=512",
    ]


@pytest.fixture(scope="session")
def data_run(tmp_path_factory) -> tuple[Path, list[str]]:
    """A finished data stage on the synthetic corpus: (runs root, overrides that reproduce it)."""
    from data.prepare import run as prepare
    from pipeline.config import compose

    root = tmp_path_factory.mktemp("runs")
    corpus = write_corpus(root / "corpus.jsonl")
    overrides = [f"run.root={root}", "run.name=base", "wandb.mode=disabled", *data_overrides(corpus)]
    prepare(compose(overrides))
    return root, overrides


def clone_run(root: Path, name: str) -> None:
    """Copy the base run's data stage into a new run directory."""
    shutil.copytree(root / "base" / "data", root / name / "data")
