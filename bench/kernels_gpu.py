"""TFLOPS of our FP8 GEMMs against torch's bf16 matmul and torch._scaled_mm (row-wise FP8) at DeepSeek-V3 shapes.

    python -m bench.kernels_gpu              # M = 4096 tokens, every shape, appends bench/results/kernels_gpu.csv
    python -m bench.kernels_gpu --m 8192 --iters 50 --no-csv

NEEDS A CUDA GPU WITH FP8 TENSOR CORES (Ada / Hopper or newer). It has never run on the machines this
repository is developed on (CPU only), so no figure from it is checked in; without CUDA it exits with a
message and writes nothing. Users with a GPU: run it and the rows land in bench/results/kernels_gpu.csv with
machine, commit and date.

What is timed (CUDA events, median of --iters after --warmup, inputs already quantized unless stated):

- ``bf16``: ``a_bf16 @ w_bf16.T`` (cuBLAS), the high-precision baseline;
- ``scaled_mm_rowwise``: ``torch._scaled_mm`` on e4m3 with one scale per row of A and per row of W (cuBLASLt);
  coarser scaling than DeepSeek-V3's, the fastest FP8 GEMM torch ships;
- ``ours_fp8_blockwise``: ``kernels.fp8_gemm.fp8_gemm_nt``: 1x128 activation tiles, 128x128 weight blocks,
  FP32 promotion every 128 of K (the DeepSeek-V3 recipe; tiles fixed at 128x128x128, no autotuning);
- ``ours_fp8_with_quant``: the same plus the activation's quantization (``kernels.quant.act_quant``);
- for the routed experts, ``ours_grouped_fp8`` (``grouped_fp8_gemm_nt`` over --experts local experts with
  M tokens spread evenly) against ``bf16_grouped`` (``torch._grouped_mm`` when torch has it, else a loop).

Each row also records the relative error of the FP8 result against the bf16 one, as a sanity check.
Shapes (N, K) are those of the released DeepSeek-V3 (hidden 7168, q_lora 1536, kv_lora 512, 128 heads,
dense MLP 18432, expert MLP 2048).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import platform
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CSV_PATH = ROOT / "bench" / "results" / "kernels_gpu.csv"
FIELDS = ["date", "commit", "machine", "gpu", "layer", "M", "N", "K", "impl", "ms", "tflops", "rel_err_vs_bf16"]

# name -> (N, K) of y = x W^T, from DeepSeek-V3's config.json
SHAPES = {
    "q_a_proj": (1536, 7168),
    "q_b_proj": (128 * 192, 1536),
    "kv_a_proj_with_mqa": (512 + 64, 7168),
    "kv_b_proj": (128 * (128 + 128), 512),
    "o_proj": (7168, 128 * 128),
    "dense_gate_up": (18432, 7168),
    "dense_down": (7168, 18432),
    "expert_gate_up": (2048, 7168),
    "expert_down": (7168, 2048),
}


def time_ms(fn: Callable[[], torch.Tensor], warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def bench_linear(name: str, M: int, N: int, K: int, warmup: int, iters: int) -> list[dict]:
    from kernels import fp8_gemm, quant

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(M, K, device="cuda", generator=g, dtype=torch.bfloat16)
    w = torch.randn(N, K, device="cuda", generator=g, dtype=torch.bfloat16) * K**-0.5
    y_bf16 = x @ w.T
    x_q, x_s = quant.act_quant(x)
    w_q, w_s = quant.weight_quant(w)
    # row-wise FP8 for torch._scaled_mm: B must be column-major, i.e. a transposed row-major [N, K]
    xr_s = x.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 448.0
    wr_s = w.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 448.0
    xr_q = (x.float() / xr_s).clamp(-448, 448).to(torch.float8_e4m3fn)
    wr_q = (w.float() / wr_s).clamp(-448, 448).to(torch.float8_e4m3fn)

    impls: dict[str, Callable[[], torch.Tensor]] = {
        "bf16": lambda: x @ w.T,
        "scaled_mm_rowwise": lambda: torch._scaled_mm(
            xr_q, wr_q.T, scale_a=xr_s, scale_b=wr_s.T.contiguous(), out_dtype=torch.bfloat16
        ),
        "ours_fp8_blockwise": lambda: fp8_gemm.fp8_gemm_nt(
            x_q, x_s, w_q, w_s, b_blockwise=True, out_dtype=torch.bfloat16
        ),
        "ours_fp8_with_quant": lambda: fp8_gemm.fp8_gemm_nt(
            *quant.act_quant(x), w_q, w_s, b_blockwise=True, out_dtype=torch.bfloat16
        ),
    }
    rows = []
    for impl, fn in impls.items():
        try:
            err = rel_err(fn(), y_bf16)
            ms = time_ms(fn, warmup, iters)
        except RuntimeError as e:  # e.g. _scaled_mm row-wise unsupported on this GPU/torch build
            print(f"{name:20s} {impl:22s} skipped: {e}", file=sys.stderr)
            continue
        rows.append(
            dict(
                layer=name,
                M=M,
                N=N,
                K=K,
                impl=impl,
                ms=f"{ms:.4f}",
                tflops=f"{2 * M * N * K / ms / 1e9:.1f}",
                rel_err_vs_bf16=f"{err:.2e}",
            )
        )
    return rows


def bench_grouped(name: str, M: int, N: int, K: int, E: int, warmup: int, iters: int) -> list[dict]:
    from kernels import grouped_gemm, quant

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(M, K, device="cuda", generator=g, dtype=torch.bfloat16)
    w = torch.randn(E, N, K, device="cuda", generator=g, dtype=torch.bfloat16) * K**-0.5
    offsets = torch.linspace(0, M, E + 1, device="cuda").round().long()
    x_q, x_s = quant.act_quant(x)
    w_q, w_s = quant.weight_quant(w)
    bounds = offsets.tolist()

    def bf16_grouped() -> torch.Tensor:
        if hasattr(torch, "_grouped_mm"):
            return torch._grouped_mm(x, w.transpose(1, 2), offs=offsets[1:].int())
        return torch.cat([x[bounds[e] : bounds[e + 1]] @ w[e].T for e in range(E)])

    y_ref = torch.cat([x[bounds[e] : bounds[e + 1]] @ w[e].T for e in range(E)])
    impls = {
        "bf16_grouped": bf16_grouped,
        "ours_grouped_fp8": lambda: grouped_gemm.grouped_fp8_gemm_nt(x_q, x_s, w_q, w_s, offsets, torch.bfloat16),
    }
    rows = []
    for impl, fn in impls.items():
        try:
            err = rel_err(fn(), y_ref)
            ms = time_ms(fn, warmup, iters)
        except RuntimeError as e:  # e.g. torch._grouped_mm unsupported on this GPU
            print(f"{name:20s} {impl:22s} skipped: {e}", file=sys.stderr)
            continue
        rows.append(
            dict(
                layer=f"{name}_x{E}",
                M=M,
                N=N,
                K=K,
                impl=impl,
                ms=f"{ms:.4f}",
                tflops=f"{2 * M * N * K / ms / 1e9:.1f}",
                rel_err_vs_bf16=f"{err:.2e}",
            )
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--m", type=int, default=4096, help="tokens (rows of the activation)")
    p.add_argument("--experts", type=int, default=8, help="local experts for the grouped GEMM")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--only", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--no-csv", action="store_true")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/kernels_gpu.py needs a CUDA GPU with FP8 tensor cores; none is visible, nothing was measured.")
    if torch.cuda.get_device_capability() < (8, 9):
        sys.exit(f"FP8 tensor cores need compute capability >= 8.9, this GPU has {torch.cuda.get_device_capability()}")

    rows = []
    for name in args.only:
        N, K = SHAPES[name]
        rows += bench_linear(name, args.m, N, K, args.warmup, args.iters)
        if name.startswith("expert"):
            rows += bench_grouped(name, args.m, N, K, args.experts, args.warmup, args.iters)
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    stamp = dict(
        date=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        commit=sha.stdout.strip() or "unknown",
        machine=platform.node(),
        gpu=torch.cuda.get_device_name(),
    )
    for r in rows:
        r.update(stamp)
        print(
            f"{r['layer']:22s} M={r['M']} N={r['N']:6d} K={r['K']:6d} {r['impl']:22s} "
            f"{r['ms']:>9s} ms {r['tflops']:>7s} TFLOPS  rel err {r['rel_err_vs_bf16']}"
        )
    if not args.no_csv:
        CSV_PATH.parent.mkdir(parents=True, exist_ok=True)
        new = not CSV_PATH.exists()
        with CSV_PATH.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS)
            if new:
                writer.writeheader()
            writer.writerows(rows)
        print(f"appended {len(rows)} rows to {CSV_PATH}")


if __name__ == "__main__":
    main()
