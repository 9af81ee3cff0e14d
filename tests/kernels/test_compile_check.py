"""The Triton compiler (not the interpreter) accepts our kernels for sm_90 as they run, and the check has teeth.

Both tests run in a subprocess without TRITON_INTERPRET (this test process decorated its kernels for the
interpreter), each with a fresh Triton cache so that the compiler really runs.

- A subset of ``kernels.compile_check`` (the full set, ``python -m kernels.compile_check``, takes about a
  minute): IEEE division and the native cast in the quantizer, FP8 wgmma and 16-byte ``cp.async`` operand
  copies in the GEMMs (the grouped Wgrad included), at DeepSeek-V3 shapes with the JIT's specialisation.
- A GEMM that masks its K-major operands along the contiguous axis (what the grouped Wgrad used to do at expert
  boundaries) compiles to byte-wise loads without ``cp.async``: the check must reject it.
"""

import os
import subprocess
import sys
import textwrap

import pytest

SUBSET = ["act_quant bf16", "gemm fprop", "grouped wgrad"]

BAD_KERNEL = """
import torch
import triton
import triton.language as tl

from kernels import compile_check as cc


@triton.jit
def bad_gemm_kernel(a_ptr, b_ptr, c_ptr, M, N, K, start, end, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr):
    rm, rn, rk = tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        in_seg = (k0 + rk >= start) & (k0 + rk < end)  # a run-time boundary along the contiguous axis
        a = tl.load(a_ptr + rm[:, None] * K + (k0 + rk)[None, :], mask=in_seg[None, :], other=0.0)
        b = tl.load(b_ptr + rn[None, :] * K + (k0 + rk)[:, None], mask=in_seg[:, None], other=0.0)
        acc += tl.dot(a, b)
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], acc)


M = N = 128
K = 4096
args = (cc.meta(M, K), cc.meta(N, K), cc.meta(M, N, dtype=torch.float32), M, N, K, 5, 4000)
kwargs = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=3)
ptx = cc.compile_launch(bad_gemm_kernel, args, kwargs, 90).asm["ptx"]
try:
    cc.check_operand_copies("bad gemm", kwargs, ptx)
except AssertionError as e:
    print("rejected:", e)
else:
    print("accepted")
"""


def compiler_env(tmp_path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton 3.9's default, stated to silence its warning
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton")  # compile for real every time, and keep $HOME clean
    return env


@pytest.mark.slow
def test_kernels_compile_for_hopper(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "kernels.compile_check", "--arch", "90", "--only", *SUBSET],
        env=compiler_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    for label in SUBSET:  # every autotuning config of each case compiled and passed
        assert sum(label in line and line.startswith("ok  sm_90") for line in lines) >= 1, proc.stdout
    assert sum("gemm fprop" in line for line in lines) == 4, proc.stdout  # the four configs of the dense GEMM


@pytest.mark.slow
def test_check_rejects_bytewise_operand_loads(tmp_path):
    script = tmp_path / "bad_kernel.py"
    script.write_text(textwrap.dedent(BAD_KERNEL))
    proc = subprocess.run(
        [sys.executable, str(script)], env=compiler_env(tmp_path), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "rejected:" in proc.stdout and "cp.async" in proc.stdout, proc.stdout
