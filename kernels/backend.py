"""Which implementation of the FP8 kernels runs: the Triton kernels or their pure-PyTorch references.

`kernels.backend=auto|triton|torch|torchao`:

- ``auto``: Triton when CUDA is available, else the PyTorch reference (the CPU default).
- ``triton``: the Triton kernels. Without CUDA they only run under the Triton interpreter, which Triton
  picks when a kernel is *decorated* (``@triton.jit`` reads ``TRITON_INTERPRET`` at import time of the
  module that defines the kernel). So ``TRITON_INTERPRET=1`` must be in the environment before
  ``kernels.quant`` / ``kernels.fp8_gemm`` / ``kernels.grouped_gemm`` are imported. Every other module of
  this package imports them lazily, only once this check has passed.
- ``torch``: the references in ``kernels/reference.py``; same quantization bits, FP32 accumulation.
- ``torchao``: not ours: the linear layers run torchao's float8 training with row-wise scales (what torchtitan's
  float8 converter uses), the comparison a GPU user would otherwise pick (``kernels/comparison.py``); the routed
  experts keep our kernels (``auto``). Only ``convert_to_fp8`` takes it.
"""

from __future__ import annotations

import os
import sys

BACKENDS = ("auto", "triton", "torch", "torchao")
_TRITON_MODULES = ("kernels.quant", "kernels.fp8_gemm", "kernels.grouped_gemm")


def interpreting() -> bool:
    """True when Triton kernels decorated from now on run in the CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def resolve_backend(name: str) -> str:
    """Map ``auto|triton|torch|torchao`` to the backend that will run: ``"triton"``, ``"torch"`` or ``"torchao"``.

    Raises ValueError for an unknown name, and RuntimeError when Triton is asked for on a machine without
    CUDA and the interpreter is not (or was not, when the kernels were imported) switched on.
    """
    if name not in BACKENDS:
        raise ValueError(f"kernels.backend must be one of {BACKENDS}, got {name!r}")
    if name in ("torch", "torchao"):
        return name
    import torch  # here, not at the top: the config (pipeline/config.py) reads BACKENDS without loading torch

    if name == "auto":
        return "triton" if torch.cuda.is_available() else "torch"
    if torch.cuda.is_available():
        return "triton"
    if not interpreting():
        raise RuntimeError(
            "kernels.backend=triton without CUDA needs the Triton interpreter: set TRITON_INTERPRET=1 in the "
            "environment before the process imports kernels.quant/fp8_gemm/grouped_gemm (or use backend=torch)"
        )
    for mod_name in _TRITON_MODULES:
        mod = sys.modules.get(mod_name)
        if mod is not None and not getattr(mod, "INTERPRETED", True):
            raise RuntimeError(
                f"{mod_name} was imported before TRITON_INTERPRET=1 was set, so its kernels were compiled for a "
                "GPU; set the variable before anything imports the Triton kernels"
            )
    return "triton"
