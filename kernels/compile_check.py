"""Compile the Triton kernels of this package for an NVIDIA GPU, on a machine without one, as they really run.

    python -m kernels.compile_check              # sm_90 (H100/H800), every case, through ptxas to a cubin
    python -m kernels.compile_check --arch 89    # sm_89 (L4/Ada)
    python -m kernels.compile_check --only gemm  # cases whose label contains "gemm"

The CPU tests run the kernels in the Triton interpreter, which is lenient where the compiler is not (types,
layouts, what ``tl.dot`` accepts on fp8) and says nothing about speed. This check runs the real compiler for
each *launch*: a case calls a public launcher (``act_quant``, ``fp8_gemm_nt``, ...) on meta tensors of a real
shape (DeepSeek-V3's, and awkward ones), a stand-in for the GPU launch records the arguments, and Triton's own
JIT binder turns them into the signature and run-time specialisation the JIT would compile: ints equal to 1
become constexprs, ints and pointers divisible by 16 are marked divisible (which decides vector widths). Every
autotuning config the launch could pick is compiled (Triton IR -> PTX -> cubin, with the wheel's ptxas), and
the PTX is checked for what the numerics and the speed rely on:

- quantization: IEEE division only (``div.rn.f32``); the native cast ``cvt.rn.satfinite.e4m3x2.f32`` on the
  native path (round to nearest even, as torch), no conversion to fp8 at all on the bit-built path;
- GEMMs (sm_90): FP8 Tensor Cores (``wgmma ... e4m3.e4m3``); for the shapes marked ``fast``, operands copied
  to shared memory by 16-byte ``cp.async`` and no byte-wise global loads of the operands (a mask along the
  contiguous axis, or an unknown alignment, makes the compiler load one byte at a time).

It must run in a process where ``TRITON_INTERPRET`` is unset (``@triton.jit`` would otherwise build interpreter
kernels); ``main`` refuses to run otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

FP8 = torch.float8_e4m3fn


@dataclass
class Launch:
    label: str
    kernel: object  # the decorated object the launcher called (JITFunction, Heuristics or Autotuner)
    args: tuple
    kwargs: dict
    fast: bool  # a production shape: check the hot loop's loads


@contextlib.contextmanager
def recording() -> Iterator[list[tuple[object, tuple, dict]]]:
    """Within the block, launching any Triton kernel records (kernel, args, kwargs) instead of running it."""
    from triton.runtime.autotuner import Autotuner, Heuristics  # deferred: Triton only when kernels are checked
    from triton.runtime.jit import JITFunction

    calls: list[tuple[object, tuple, dict]] = []

    def record(self, *args, grid=None, warmup=False, **kwargs):
        calls.append((self, args, kwargs))

    saved = {cls: cls.run for cls in (JITFunction, Heuristics, Autotuner)}
    try:
        for cls in saved:
            cls.run = record
        yield calls
    finally:
        for cls, run in saved.items():
            cls.run = run


def meta(*shape: int, dtype: torch.dtype = FP8) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def cases() -> list[tuple[str, bool, Callable[[], object]]]:
    """(label, fast, call of a launcher on meta tensors); shapes of DeepSeek-V3 (hidden 7168, expert MLP 2048,
    256 experts, 4096 tokens x 8 routed) and of the tiny CPU model (K = 64: not a production shape)."""
    from kernels import fp8_gemm, grouped_gemm, quant  # deferred: these modules import Triton

    M, D, F, E = 4096, 7168, 2048, 256
    Mr = 8 * M  # routed token copies
    f32, bf16, u8 = torch.float32, torch.bfloat16, torch.uint8
    offsets = meta(E + 1, dtype=torch.int64)

    def t_op(R: int, Mtok: int, dtype=f32):  # act_quant_t's output: [R, Mtok] view of [R, Mp], scales [R, Mt]
        Mp = -(-Mtok // 128) * 128
        return meta(R, Mp)[:, :Mtok], meta(R, Mp // 128, dtype=dtype)

    return [
        ("act_quant bf16", True, lambda: quant.act_quant(meta(M, D, dtype=bf16))),
        ("act_quant fp32 ue8m0", True, lambda: quant.act_quant(meta(M, F, dtype=f32), "ue8m0")),
        ("act_quant bit-built", True, lambda: quant.act_quant(meta(M, D, dtype=bf16), native=False)),
        ("act_quant_t from fp8", True, lambda: quant.act_quant_t(meta(M, D), meta(M, D // 128, dtype=f32))),
        ("act_quant_t bf16 M=4000", True, lambda: quant.act_quant_t(meta(4000, F, dtype=bf16))),
        ("weight_quant fp32 experts", True, lambda: quant.weight_quant(meta(8, F, D, dtype=f32))),
        ("cast bit-built", True, lambda: quant.cast_to_e4m3(meta(1 << 20, dtype=f32), native=False)),
        (
            "gemm fprop bf16",
            True,
            lambda: fp8_gemm.fp8_gemm_nt(
                meta(M, D),
                meta(M, D // 128, dtype=f32),
                meta(F, D),
                meta(F // 128, D // 128, dtype=f32),
                b_blockwise=True,
                out_dtype=bf16,
            ),
        ),
        (
            "gemm dgrad ue8m0",
            True,
            lambda: fp8_gemm.fp8_gemm_nt(
                meta(M, F),
                meta(M, F // 128, dtype=u8),
                meta(D, F),
                meta(D // 128, F // 128, dtype=u8),
                b_blockwise=True,
                out_dtype=bf16,
            ),
        ),
        (
            "gemm wgrad fp32",
            True,
            lambda: fp8_gemm.fp8_gemm_nt(*t_op(F, M), *t_op(D, M), b_blockwise=False, out_dtype=f32),
        ),
        (
            "gemm tiny K=64",
            False,
            lambda: fp8_gemm.fp8_gemm_nt(
                meta(26, 64), meta(26, 1, dtype=f32), meta(96, 64), meta(1, 1, dtype=f32), b_blockwise=True
            ),
        ),
        (
            "grouped fprop bf16",
            True,
            lambda: grouped_gemm.grouped_fp8_gemm_nt(
                meta(Mr, D),
                meta(Mr, D // 128, dtype=f32),
                meta(E, F, D),
                meta(E, F // 128, D // 128, dtype=f32),
                offsets,
                bf16,
            ),
        ),
        (
            "grouped dgrad bf16",
            True,
            lambda: grouped_gemm.grouped_fp8_gemm_nt(
                meta(Mr, F),
                meta(Mr, F // 128, dtype=f32),
                meta(E, D, F),
                meta(E, D // 128, F // 128, dtype=f32),
                offsets,
                bf16,
            ),
        ),
        ("grouped wgrad", True, lambda: grouped_gemm.grouped_fp8_wgrad(*t_op(F, Mr), *t_op(D, Mr), offsets)),
        (
            "grouped wgrad ue8m0",
            True,
            lambda: grouped_gemm.grouped_fp8_wgrad(*t_op(F, Mr, u8), *t_op(D, Mr, u8), offsets),
        ),
    ]


def launches(only: list[str] | None = None) -> list[Launch]:
    """Run the cases' launchers with the launch recorded; one ``Launch`` per kernel launch."""
    found = []
    for label, fast, call in cases():
        if only and not any(o in label for o in only):
            continue
        with recording() as calls:
            call()
        assert calls, f"{label}: the launcher launched nothing"
        found += [Launch(label, k, a, kw, fast) for k, a, kw in calls]
    return found


def variants(launch: Launch) -> list[tuple[object, dict]]:
    """(JITFunction, keyword arguments incl. the config's) for every config the launch could run with."""
    from triton.runtime.autotuner import Autotuner, Heuristics  # deferred: Triton only when kernels are checked

    kernel, kwargs = launch.kernel, launch.kwargs
    configs = [{}]
    if isinstance(kernel, Autotuner):
        kernel.nargs = dict(zip(kernel.arg_names, launch.args))
        configs = [c.all_kwargs() for c in kernel.prune_configs(kwargs)]
        kernel.nargs = None
        kernel = kernel.fn
    out = []
    for config in configs:
        kw, fn = {**kwargs, **config}, kernel
        if isinstance(fn, Heuristics):
            named = {**dict(zip(fn.arg_names, launch.args)), **kw}
            kw |= {name: rule(named) for name, rule in fn.values.items()}
            fn = fn.fn
        out.append((fn, kw))
    return out


def compile_launch(fn, args: tuple, kwargs: dict, arch: int):
    """Compile one launch as the JIT would: its binder's specialisation, then ``triton.compile``."""
    import triton  # deferred: Triton only when kernels are checked
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)


def check_ptx(launch: Launch, fn, kwargs: dict, ptx: str, arch: int) -> None:
    """Raise AssertionError when the PTX lacks a property the numerics or the speed rely on."""
    name = f"{launch.label} ({fn.__name__}, {kwargs.get('num_warps', 4)} warps)"
    if fn.__name__.startswith(("_act_quant", "_weight_quant", "_cast")):
        divs = set(re.findall(r"div\.[a-z0-9.]+f32", ptx))
        assert divs <= {"div.rn.f32"}, f"{name}: non-IEEE division {divs}"
        to_fp8 = set(re.findall(r"cvt\.[a-z.]*e4m3x2\.(?:f16|f32|bf16)", ptx))  # dst type comes first in PTX cvt
        if kwargs.get("NATIVE"):
            assert to_fp8 == {"cvt.rn.satfinite.e4m3x2.f32"}, f"{name}: native cast is {to_fp8 or 'missing'}"
        else:
            assert not to_fp8, f"{name}: converts to fp8 with {to_fp8} instead of the bit-pattern path"
    if arch >= 90 and ("gemm" in fn.__name__ or "wgrad" in fn.__name__):
        assert re.search(r"wgmma\.mma_async\S*e4m3\.e4m3", ptx), f"{name}: no FP8 wgmma in the PTX"
        if launch.fast:
            check_operand_copies(name, kwargs, ptx)


def check_operand_copies(name: str, kwargs: dict, ptx: str) -> None:
    """Both GEMM operands reach shared memory by 16-byte ``cp.async``, none by byte-wise global loads.

    One pipeline stage copies ``(rows + cols) * 128`` bytes of e4m3 with ``32 * num_warps`` threads, so the PTX
    holds at least ``(rows + cols) * 128 / (threads * 16)`` 16-byte copies (once per unrolled stage); an operand
    loaded any other way leaves it short. Kernels with fp32 scales load no single byte from global memory at all
    (ue8m0 scales are bytes by design).
    """
    if "TILE_M" in kwargs:  # grouped Wgrad: a BLOCK_N x BLOCK_K tile, reduced over 128 tokens
        rows, cols = kwargs["BLOCK_N"], kwargs["BLOCK_K"]
    else:  # BLOCK_M x BLOCK_N, reduced over BLOCK_K = 128
        rows, cols = kwargs["BLOCK_M"], kwargs["BLOCK_N"]
    need = (rows + cols) * 128 // (32 * kwargs.get("num_warps", 4) * 16)
    copies = re.findall(r"cp\.async\.c[ag]\.shared\.global\S*\s+\[[^]]*\],\s*\[[^]]*\],\s*(?:0x10|16)\b", ptx)
    assert len(copies) >= need, f"{name}: {len(copies)} 16-byte cp.async, the operands need {need} per stage"
    if not (kwargs.get("A_UE8M0") or kwargs.get("B_UE8M0")):
        byte_loads = re.findall(r"ld\.global\S*\.[bu]8\b", ptx)
        assert not byte_loads, f"{name}: {len(byte_loads)} byte-wise global loads"


def compile_all(arch: int = 90, only: list[str] | None = None) -> Iterator[str]:
    """Compile every launch of the cases for sm_<arch>, yielding one line per compiled variant; AssertionError on
    a bad one."""
    for launch in launches(only):
        for fn, kwargs in variants(launch):
            t0 = time.time()
            compiled = compile_launch(fn, launch.args, kwargs, arch)
            check_ptx(launch, fn, kwargs, compiled.asm["ptx"], arch)
            tile = "x".join(str(kwargs[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if k in kwargs)
            yield (
                f"ok  sm_{arch}  {launch.label:26s} {tile:12s} w{kwargs.get('num_warps', 4)} "
                f"s{kwargs.get('num_stages', 3)}  {time.time() - t0:5.1f}s  shared {compiled.metadata.shared} B"
            )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (Hopper), 89 (Ada)")
    p.add_argument("--only", nargs="*", help="substrings of case labels to compile")
    args = p.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("kernels.compile_check needs TRITON_INTERPRET unset (it compiles for a GPU target)")
    for line in compile_all(args.arch, args.only):
        print(line, flush=True)


if __name__ == "__main__":
    main()
