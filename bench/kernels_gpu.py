"""Our FP8 kernels on a GPU against what a GPU user would otherwise run, at DeepSeek-V3 shapes.

    python -m bench.kernels_gpu                 # everything below, appends rows to bench/results/kernels_gpu.csv
    python -m bench.kernels_gpu --only dense    # one part: dense | grouped | quant
    python -m bench.kernels_gpu --no-csv --rep 50

NEEDS A CUDA GPU WITH FP8 TENSOR CORES (compute capability 8.9 or newer; written for one H100/H200). Without one
it exits with status 2 and a message, and writes nothing. ``kernels/gpu_check.sh`` runs it after the GPU tests.

What is timed (``triton.testing.do_bench``: L2 flushed between runs, median with the 20th/80th percentiles of
``--rep`` ms of runs; the first call of each of our kernels at a shape includes its autotuning, so it is made
before timing):

- dense GEMM ``y = x W^T``, M = --m tokens (4096), N and K in {7168, 2048, 18432} (DeepSeek-V3's hidden size,
  expert and dense MLP widths): ``bf16`` (``x @ w.T``, cuBLAS); ``scaled_mm_rowwise`` (``torch._scaled_mm``
  with one scale per row, cuBLASLt, the fastest FP8 GEMM torch ships; operands already quantized);
  ``ours_blockwise`` (``kernels.fp8_gemm.fp8_gemm_nt``, 1x128 / 128x128 scales with promotion; operands
  quantized); ``ours_with_act_quant`` (the same plus the activation's quantization, as a forward runs it);
  ``torchao_rowwise_fwd`` (torchao's ``Float8Linear`` forward, the comparison backend, eager: it quantizes x and
  W on every call). ``ratio_vs_scaled_mm`` is scaled_mm's time over ours (goal: >= 0.7).
- grouped GEMMs of the routed experts: --experts experts (256), --topk routed per token (8), M tokens routed
  uniformly at random (counts rounded to multiples of 16, which torch's grouped GEMMs require), for
  gate/up (N=2048, K=7168) and down (N=7168, K=2048): ``ours_fprop``, ``ours_dgrad``, ``ours_wgrad`` against
  ``torch._grouped_mm`` in bf16 (``bf16_fprop``, ``bf16_dgrad``, ``bf16_wgrad``) and
  ``torch._scaled_grouped_mm`` row-wise (``scaled_grouped_mm_rowwise`` Fprop).
- quantization bandwidth (GB/s of bytes read + written, scales included): ``act_quant`` (bf16 [M, 7168]),
  ``act_quant_t`` (the cached e4m3 activation, dequantized, requantized along tokens, written transposed),
  ``weight_quant`` (fp32 [18432, 7168]).

Every GEMM row also records its relative error against the bf16 result (a sanity check, not a claim).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch

from bench.common import append_result

DIMS = (7168, 2048, 18432)
EXPERT_SHAPES = {"experts_gate_up": (2048, 7168), "experts_down": (7168, 2048)}  # (N, K)


def timed(fn: Callable[[], object], rep: int) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds of ``fn`` on the GPU, after one untimed call (compiles, autotunes)."""
    import triton.testing

    fn()
    torch.cuda.synchronize()
    med, lo, hi = triton.testing.do_bench(fn, warmup=max(5, rep // 4), rep=rep, quantiles=[0.5, 0.2, 0.8])
    return med, lo, hi


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)).item()


def row(part: str, impl: str, shape: dict, ms: tuple[float, float, float], **extra) -> dict:
    med, lo, hi = ms
    out = {"part": part, "impl": impl, **shape, "ms": round(med, 4), "ms_p20": round(lo, 4), "ms_p80": round(hi, 4)}
    if "flop" in extra:
        out["tflops"] = round(extra.pop("flop") / med / 1e9, 1)
    if "bytes" in extra:
        out["gb_per_s"] = round(extra.pop("bytes") / med / 1e6, 1)
    return out | extra


Timer = Callable[[Callable[[], object], int], tuple[float, float, float]]


def run_all(impls: dict[str, Callable[[], torch.Tensor]], want: torch.Tensor | None, rep: int, timer: Timer) -> dict:
    """{impl: (ms triple, rel err vs want)}; an impl this GPU or torch build cannot run is reported and skipped."""
    results = {}
    for impl, fn in impls.items():
        try:
            err = rel_err(fn(), want) if want is not None else None
            results[impl] = (timer(fn, rep), err)
        except (RuntimeError, NotImplementedError, AssertionError) as e:
            print(f"  {impl:28s} skipped: {str(e).splitlines()[0][:120]}", file=sys.stderr)
    return results


def bench_dense(M: int, rep: int) -> list[dict]:
    return [r for N in DIMS for K in DIMS for r in dense_shape(M, N, K, rep)]


def dense_shape(M: int, N: int, K: int, rep: int, device: str = "cuda", timer: Timer = timed) -> list[dict]:
    from torch import nn

    from kernels import fp8_gemm, quant
    from kernels.comparison import convert_linears_torchao, rowwise_quant, rowwise_scaled_mm

    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(M, K, device=device, generator=g, dtype=torch.bfloat16)
    w = torch.randn(N, K, device=device, generator=g, dtype=torch.bfloat16) * K**-0.5
    y_bf16 = x @ w.T
    (x_q, x_s), (w_q, w_s) = quant.act_quant(x), quant.weight_quant(w)
    (xr_q, xr_s), (wr_q, wr_s) = rowwise_quant(x), rowwise_quant(w)
    holder = nn.Module()
    holder.o_proj = nn.Linear(K, N, bias=False, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        holder.o_proj.weight.copy_(w)
    ao = convert_linears_torchao(holder, {"o_proj"}).o_proj
    impls = {
        "bf16": lambda: x @ w.T,
        "scaled_mm_rowwise": lambda: rowwise_scaled_mm(xr_q, xr_s, wr_q, wr_s, torch.bfloat16),
        "ours_blockwise": lambda: fp8_gemm.fp8_gemm_nt(x_q, x_s, w_q, w_s, b_blockwise=True, out_dtype=torch.bfloat16),
        "ours_with_act_quant": lambda: fp8_gemm.fp8_gemm_nt(
            *quant.act_quant(x), w_q, w_s, b_blockwise=True, out_dtype=torch.bfloat16
        ),
        "torchao_rowwise_fwd": lambda: ao(x),
    }
    with torch.no_grad():
        results = run_all(impls, y_bf16, rep, timer)
    base = results.get("scaled_mm_rowwise")
    rows = []
    for impl, (ms, err) in results.items():
        extra = {"rel_err_vs_bf16": f"{err:.2e}"}
        if base is not None and impl.startswith("ours"):
            extra["ratio_vs_scaled_mm"] = round(base[0][0] / ms[0], 3)
        rows.append(row("dense", impl, dict(M=M, N=N, K=K), ms, flop=2 * M * N * K, **extra))
    return rows


def routed_counts(M: int, experts: int, topk: int, multiple: int = 16) -> torch.Tensor:
    """Token copies per expert for M tokens each routed to ``topk`` distinct experts uniformly at random, each
    count rounded to a multiple of ``multiple`` (the total stays within a few percent of M * topk)."""
    g = torch.Generator().manual_seed(0)
    choice = torch.rand(M, experts, generator=g).topk(topk, dim=1).indices
    counts = torch.bincount(choice.flatten(), minlength=experts)
    return ((counts + multiple // 2) // multiple * multiple).clamp(min=0)


def bench_grouped(M: int, experts: int, topk: int, rep: int) -> list[dict]:
    counts = routed_counts(M, experts, topk)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]).to("cuda")
    rows = []
    for name, (N, K) in EXPERT_SHAPES.items():
        rows += grouped_shape(name, offsets, N, K, topk, rep)
    return rows


def grouped_shape(
    name: str, offsets: torch.Tensor, N: int, K: int, topk: int, rep: int, timer: Timer = timed
) -> list[dict]:
    from kernels import grouped_gemm, quant
    from kernels.comparison import rowwise_quant

    experts, Mr, device = offsets.numel() - 1, int(offsets[-1]), offsets.device
    offs_end = offsets[1:].to(torch.int32)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(Mr, K, device=device, generator=g, dtype=torch.bfloat16)
    w = torch.randn(experts, N, K, device=device, generator=g, dtype=torch.bfloat16) * K**-0.5
    dy = torch.randn(Mr, N, device=device, generator=g, dtype=torch.bfloat16)
    (x_q, x_s), (w_q, w_s), (dy_q, dy_s) = quant.act_quant(x), quant.weight_quant(w), quant.act_quant(dy)
    wT_q, wT_s = w_q.transpose(1, 2).contiguous(), w_s.transpose(1, 2).contiguous()
    dyT, xT = quant.act_quant_t(dy), quant.act_quant_t(x_q, x_s)
    xr_q, xr_s = rowwise_quant(x)
    wr_q, wr_s = rowwise_quant(w.reshape(-1, K))
    wr_q, wr_s = wr_q.view(experts, N, K), wr_s.view(experts, N)
    parts = {  # GEMM: (bf16 result, {impl: call})
        "fprop": (
            lambda: torch._grouped_mm(x, w.transpose(1, 2), offs=offs_end),
            {
                "scaled_grouped_mm_rowwise": lambda: torch._scaled_grouped_mm(
                    xr_q, wr_q.transpose(1, 2), xr_s.view(-1), wr_s, offs=offs_end, out_dtype=torch.bfloat16
                ),
                "ours_fprop": lambda: grouped_gemm.grouped_fp8_gemm_nt(x_q, x_s, w_q, w_s, offsets, torch.bfloat16),
            },
        ),
        "dgrad": (
            lambda: torch._grouped_mm(dy, w, offs=offs_end),
            {"ours_dgrad": lambda: grouped_gemm.grouped_fp8_gemm_nt(dy_q, dy_s, wT_q, wT_s, offsets, torch.bfloat16)},
        ),
        "wgrad": (
            lambda: torch._grouped_mm(dy.T, x, offs=offs_end),
            {"ours_wgrad": lambda: grouped_gemm.grouped_fp8_wgrad(*dyT, *xT, offsets)},
        ),
    }
    shape = dict(layer=name, M=Mr, N=N, K=K, experts=experts, topk=topk)
    rows = []
    for gemm, (bf16, impls) in parts.items():
        with torch.no_grad():
            try:
                want = bf16()
            except RuntimeError as e:  # torch._grouped_mm needs sm_90 and a recent torch
                print(f"  bf16_{gemm} unavailable, no error column: {str(e).splitlines()[0][:120]}", file=sys.stderr)
                want = None
            results = run_all({f"bf16_{gemm}": bf16, **impls}, want, rep, timer)
        for impl, (ms, err) in results.items():
            err_col = f"{err:.2e}" if err is not None else ""
            rows.append(row(f"grouped_{gemm}", impl, shape, ms, flop=2 * Mr * N * K, rel_err_vs_bf16=err_col))
    return rows


def bench_quant(
    M: int, rep: int, K: int = 7168, N: int = 18432, device: str = "cuda", timer: Timer = timed
) -> list[dict]:
    from kernels import quant

    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(M, K, device=device, generator=g, dtype=torch.bfloat16)
    w = torch.randn(N, K, device=device, generator=g, dtype=torch.float32)
    x_q, x_s = quant.act_quant(x)
    scales_x = M * (K // 128) * 4
    cases = {  # impl: (call, bytes read + written)
        "act_quant": (lambda: quant.act_quant(x), M * K * 2 + M * K + scales_x, (M, K)),
        "act_quant_t": (lambda: quant.act_quant_t(x_q, x_s), 2 * M * K + 2 * scales_x, (M, K)),
        "weight_quant": (lambda: quant.weight_quant(w), N * K * 4 + N * K + (N // 128) * (K // 128) * 4, (N, K)),
    }
    rows = []
    for impl, (fn, nbytes, (R, C)) in cases.items():
        with torch.no_grad():
            ms = timer(fn, rep)
        rows.append(row("quant", impl, dict(M=R, K=C), ms, bytes=nbytes))
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--m", type=int, default=4096, help="tokens (rows of the activation)")
    p.add_argument("--experts", type=int, default=256, help="routed experts on this GPU")
    p.add_argument("--topk", type=int, default=8, help="experts per token")
    p.add_argument("--rep", type=int, default=100, help="milliseconds of timed runs per measurement")
    p.add_argument("--only", nargs="*", default=["dense", "grouped", "quant"], choices=["dense", "grouped", "quant"])
    p.add_argument("--no-csv", action="store_true")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench.kernels_gpu needs a CUDA GPU with FP8 tensor cores; none is visible: nothing was measured.")
        raise SystemExit(2)
    if torch.cuda.get_device_capability() < (8, 9):
        print(f"FP8 tensor cores need compute capability >= 8.9; this GPU has {torch.cuda.get_device_capability()}")
        raise SystemExit(2)
    gpu = torch.cuda.get_device_name()
    rows = []
    if "dense" in args.only:
        rows += bench_dense(args.m, args.rep)
    if "grouped" in args.only:
        rows += bench_grouped(args.m, args.experts, args.topk, args.rep)
    if "quant" in args.only:
        rows += bench_quant(args.m, args.rep)
    for r in rows:
        r["gpu"] = gpu
        rate = f"{r['tflops']:7.1f} TFLOPS" if "tflops" in r else f"{r['gb_per_s']:7.1f} GB/s"
        dims = " ".join(f"{k}={r[k]}" for k in ("layer", "M", "N", "K") if k in r)
        ratio = f"  {r['ratio_vs_scaled_mm']:.2f}x scaled_mm" if "ratio_vs_scaled_mm" in r else ""
        print(f"{r['part']:15s} {dims:42s} {r['impl']:28s} {r['ms']:9.4f} ms {rate}{ratio}", flush=True)
        if not args.no_csv:
            append_result("kernels_gpu", r)
    return rows


if __name__ == "__main__":
    main()
