"""Kernel tests run the Triton kernels in the CPU interpreter (or compiled, on a CUDA machine).

``@triton.jit`` picks interpreter or GPU compiler when a kernel is *defined*, so TRITON_INTERPRET must be set
before ``kernels.quant`` / ``kernels.fp8_gemm`` / ``kernels.grouped_gemm`` are imported. pytest loads this file
before the test modules of this folder, and nothing else imports those modules eagerly (``kernels.fp8_linear``
imports them lazily, once a backend is resolved), so setting the variable here is early enough even when the
whole suite runs in one process. With CUDA the variable is left alone and the same tests run compiled kernels
on the GPU (the ``device`` fixture).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
