"""The Triton compiler (not the interpreter) accepts our kernels for sm_90, with IEEE division and FP8 wgmma.

Runs ``kernels.compile_check`` in a subprocess without TRITON_INTERPRET (this test process decorated its
kernels for the interpreter). A subset keeps it short: the full set (``python -m kernels.compile_check``) takes
minutes because the transposed quantization kernel is slow to compile.
"""

import os
import subprocess
import sys

import pytest

SUBSET = ["act_quant bf16", "gemm blockwise", "grouped wgrad"]


@pytest.mark.slow
def test_kernels_compile_for_hopper(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton 3.9's default, stated to silence its warning
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile for real every time, and keep $HOME clean
    proc = subprocess.run(
        [sys.executable, "-m", "kernels.compile_check", "--arch", "90", "--only", *SUBSET],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("ok  sm_90") == len(SUBSET), proc.stdout
