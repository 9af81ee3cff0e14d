"""Compile every Triton kernel of this package for an NVIDIA GPU target, on a machine without a GPU.

    python -m kernels.compile_check              # sm_90 (H100/H800), through ptxas to a cubin
    python -m kernels.compile_check --arch 89    # sm_89 (L4/Ada)

The CPU tests run the kernels in the Triton interpreter, which is lenient where the compiler is not (types,
layouts, what ``tl.dot`` accepts on fp8). This check runs the real compiler pipeline (Triton IR -> PTX ->
cubin with the ptxas that ships in the triton wheel) for each kernel at the dtypes and constants the
launchers use, and verifies two properties of the generated code that the numerics rely on:

- the quantization kernels divide with ``div.rn.f32`` (IEEE, as torch does) and contain no conversion *to*
  fp8 (the e4m3 byte is assembled on the bit pattern; reading fp8 may convert from it, which is exact);
- on sm_90 the GEMMs run on FP8 Tensor Cores (``wgmma ... e4m3.e4m3``).

It must run in a process where ``TRITON_INTERPRET`` is unset (``@triton.jit`` would otherwise build
interpreter kernels); ``main`` refuses to run otherwise.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

FP8, I32 = "*fp8e4nv", "i32"
GEMM_NUM_WARPS, GEMM_NUM_STAGES = 8, 3


def kernel_specs() -> list[tuple[str, object, dict[str, str], dict[str, object], int]]:
    """(label, kernel, signature of the runtime arguments, constexprs, num_warps) for every launch variant."""
    from kernels import fp8_gemm, grouped_gemm, quant

    quant_sig = dict(x_ptr="*bf16", q_ptr=FP8, s_ptr="*fp32", M=I32, K=I32, stride_xm=I32, stride_sm=I32)
    quant_t_sig = dict(
        x_ptr=FP8,
        xs_ptr="*fp32",
        q_ptr=FP8,
        s_ptr="*fp32",
        M=I32,
        K=I32,
        stride_xm=I32,
        stride_xsm=I32,
        stride_qk=I32,
        stride_sk=I32,
    )
    gemm_sig = dict(
        a_ptr=FP8,
        b_ptr=FP8,
        c_ptr="*bf16",
        as_ptr="*fp32",
        bs_ptr="*fp32",
        M=I32,
        N=I32,
        K=I32,
        stride_am=I32,
        stride_ak=I32,
        stride_bn=I32,
        stride_bk=I32,
        stride_cm=I32,
        stride_cn=I32,
        stride_asm=I32,
        stride_ask=I32,
        stride_bsn=I32,
        stride_bsk=I32,
    )
    grouped_sig = dict(
        a_ptr=FP8,
        b_ptr=FP8,
        c_ptr="*bf16",
        as_ptr="*fp32",
        bs_ptr="*fp32",
        tile_expert_ptr="*i32",
        tile_row_ptr="*i32",
        offsets_ptr="*i64",
        E=I32,
        N=I32,
        K=I32,
        stride_am=I32,
        stride_ak=I32,
        stride_be=I32,
        stride_bn=I32,
        stride_bk=I32,
        stride_cm=I32,
        stride_asm=I32,
        stride_bse=I32,
        stride_bsn=I32,
        stride_bsk=I32,
    )
    wgrad_sig = dict(
        a_ptr=FP8,
        b_ptr=FP8,
        c_ptr="*fp32",
        as_ptr="*fp32",
        bs_ptr="*fp32",
        offsets_ptr="*i64",
        N=I32,
        K=I32,
        stride_an=I32,
        stride_bk=I32,
        stride_ce=I32,
        stride_cn=I32,
        stride_asn=I32,
        stride_bsk=I32,
    )
    tiles = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128)
    return [
        ("act_quant bf16", quant._act_quant_kernel, quant_sig, dict(POW2=False, BLOCK_M=64, TILE_K=128), 4),
        (
            "act_quant fp32 pow2",
            quant._act_quant_kernel,
            {**quant_sig, "x_ptr": "*fp32"},
            dict(POW2=True, BLOCK_M=64, TILE_K=128),
            4,
        ),
        (
            "act_quant_t from fp8",
            quant._act_quant_t_kernel,
            quant_t_sig,
            dict(HAS_IN_SCALE=True, POW2=False, TILE_M=128, BLOCK_K=128),
            4,
        ),
        (
            "act_quant_t bf16",
            quant._act_quant_t_kernel,
            {**quant_t_sig, "x_ptr": "*bf16"},
            dict(HAS_IN_SCALE=False, POW2=False, TILE_M=128, BLOCK_K=128),
            4,
        ),
        (
            "weight_quant fp32",
            quant._weight_quant_kernel,
            dict(
                w_ptr="*fp32",
                q_ptr=FP8,
                s_ptr="*fp32",
                N=I32,
                K=I32,
                stride_we=I32,
                stride_wn=I32,
                stride_se=I32,
                stride_sn=I32,
            ),
            dict(POW2=False, TILE_=128),
            4,
        ),
        (
            "gemm blockwise bf16",
            fp8_gemm._fp8_gemm_nt_kernel,
            gemm_sig,
            dict(B_BLOCKWISE=True, OUT_KIND=1, **tiles),
            GEMM_NUM_WARPS,
        ),
        (
            "gemm rowwise fp32",
            fp8_gemm._fp8_gemm_nt_kernel,
            {**gemm_sig, "c_ptr": "*fp32"},
            dict(B_BLOCKWISE=False, OUT_KIND=0, **tiles),
            GEMM_NUM_WARPS,
        ),
        (
            "grouped gemm bf16",
            grouped_gemm._grouped_gemm_nt_kernel,
            grouped_sig,
            dict(OUT_KIND=1, **tiles),
            GEMM_NUM_WARPS,
        ),
        (
            "grouped wgrad",
            grouped_gemm._grouped_wgrad_kernel,
            wgrad_sig,
            dict(BLOCK_N=128, BLOCK_K=128, TILE_M=128),
            GEMM_NUM_WARPS,
        ),
    ]


def compile_all(arch: int = 90, only: list[str] | None = None) -> list[str]:
    """Compile the kernels for sm_<arch>; returns one line per kernel; raises AssertionError on a bad property."""
    import triton
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", arch, 32)
    lines = []
    for label, fn, sig, consts, num_warps in kernel_specs():
        if only and not any(o in label for o in only):
            continue
        signature = {**sig, **dict.fromkeys(consts, "constexpr")}
        src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=consts)
        t0 = time.time()
        stages = GEMM_NUM_STAGES if num_warps == GEMM_NUM_WARPS else 2
        compiled = triton.compile(src, target=target, options={"num_warps": num_warps, "num_stages": stages})
        ptx = compiled.asm["ptx"]
        if label.startswith(("act_quant", "weight_quant")):
            divs = set(re.findall(r"div\.[a-z0-9.]+f32", ptx))
            assert divs <= {"div.rn.f32"}, f"{label}: non-IEEE division {divs}"
            to_fp8 = re.search(r"cvt\.[a-z.]*e4m3x2\.(f16|f32|bf16)", ptx)  # dst type comes first in PTX cvt
            assert not to_fp8, f"{label}: converts to fp8 with {to_fp8.group(0)} instead of the bit-pattern path"
        if arch >= 90 and ("gemm" in label or "wgrad" in label):
            assert re.search(r"wgmma\.mma_async\S*e4m3\.e4m3", ptx), f"{label}: no FP8 wgmma in the PTX"
        lines.append(f"ok  sm_{arch}  {label:22s} {time.time() - t0:5.1f}s  shared memory {compiled.metadata.shared} B")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (Hopper), 89 (Ada)")
    p.add_argument("--only", nargs="*", help="substrings of kernel labels to compile")
    args = p.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("kernels.compile_check needs TRITON_INTERPRET unset (it compiles for a GPU target)")
    for line in compile_all(args.arch, args.only):
        print(line, flush=True)


if __name__ == "__main__":
    main()
