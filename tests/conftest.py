"""Shared pytest setup: CPU-only determinism, offline hubs, W&B as configured (offline by default: it never touches
the network or $HOME; a test about something else may turn it off for itself with `wandb.mode=disabled`)."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


# `@triton.jit` chooses between the CPU interpreter and the GPU compiler when a kernel module is first imported, and
# any test folder may import kernels first (tests/dist does, through train/): decide before anything is collected.
if not _cuda_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if _cuda_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def child_env() -> dict[str, str]:
    """The environment for a test's subprocess: this checkout on PYTHONPATH, one torch thread, and no connection to
    this process's W&B service (`WANDB_SERVICE`), so each child runs its own, as a stage launched alone does."""
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    return env | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
