"""Why DeepSeek-V3 promotes FP8 GEMM partial sums to FP32 every 128 elements of K: an emulation on the CPU.

    .venv/bin/python -m bench.fp8_accumulation                        # K = 128 .. 8192, CSV + PNG
    .venv/bin/python -m bench.fp8_accumulation --acc-bits 14 --trials 4 --out outputs/bench/fp8_accumulation.png

The DeepSeek-V3 report (section 3.3.2) observes that the FP8 Tensor Cores of the H800 accumulate with only
about 14 bits of precision, and that for K = 4096 "the limited accumulation precision in Tensor Cores results
in a maximum relative error of nearly 2%". Its remedy is to let the Tensor Core accumulate an interval of
N_C = 128 products, then add the partial sum (times the tiles' scales) into an FP32 register on the CUDA cores.

What is emulated, for C = A @ B^T with A, B random (M x K and N x K):

- ``limited``: per-tensor-scaled e4m3 inputs, all K products summed in an accumulator that keeps
  ``--acc-bits`` significant bits (default 14: 13 stored + the implicit one), truncating toward zero after
  every update (the hardware aligns addends by right-shifting them, which drops low bits). ``--group G``
  sums G products exactly before each update. How many products the Tensor Core's adder tree combines per
  accumulator update is not published: G is a free parameter of this emulation. The default G=4 is
  *calibrated*: it lands near the report's ~2% at K=4096 (G=1, one rounding per product, gives ~6-8%);
- ``promoted``: 1x128 / 128x128 tile-scaled e4m3 inputs (our kernels' format); the same limited accumulator
  over each 128-deep slice, then scaled and added into an FP32 accumulator (``kernels/fp8_gemm.py``). This is
  ``kernels.accumulation.emulate_gemm``, the model the kernel tests take their GPU tolerances from;
- ``fp32``: the same tile-scaled inputs with plain FP32 accumulation (the promotion's ideal).

Errors are measured against the exact (float64) product of the *quantized* inputs, so they isolate the
accumulation (quantization error of the inputs is the same for every mode and is reported separately as
``quant_vs_exact``): ``max_rel_err`` = max |C - C_exact| / max |C_exact| and ``norm_rel_err`` =
||C - C_exact|| / ||C_exact||. Inputs are either standard normal (``--dist normal``, the outputs' signs mix and
errors partly cancel) or uniform in [0, 1) (``--dist uniform``, every partial sum grows and truncation bias
accumulates). Both are written by default.

Results are appended to bench/results/fp8_accumulation.csv (with machine, commit and date); the plot goes to
--out (default outputs/bench/fp8_accumulation.png, outside the repository's tracked results).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import platform
from pathlib import Path

import torch

from bench.common import commit as git_commit
from kernels.accumulation import INTERPRETER, AccumulationModel, emulate_gemm, limited_sum
from kernels.reference import act_dequant_ref, act_quant_ref, cast_to_e4m3, weight_dequant_ref, weight_quant_ref

ROOT = Path(__file__).resolve().parents[1]
CSV_PATH = ROOT / "bench" / "results" / "fp8_accumulation.csv"
DEFAULT_PNG = ROOT / "outputs" / "bench" / "fp8_accumulation.png"
KS = [128, 256, 512, 1024, 2048, 4096, 8192]
FIELDS = [
    "date",
    "commit",
    "machine",
    "dist",
    "acc_bits",
    "group",
    "M",
    "N",
    "K",
    "trials",
    "mode",
    "max_rel_err",
    "norm_rel_err",
]


def per_tensor_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s = x.abs().amax() / 448.0
    return cast_to_e4m3(x / s).float(), s


def run_once(
    M: int, N: int, K: int, bits: int, group: int, dist: str, gen: torch.Generator
) -> dict[str, tuple[float, float]]:
    sample = torch.randn if dist == "normal" else torch.rand
    a, b = sample(M, K, generator=gen), sample(N, K, generator=gen)
    out: dict[str, tuple[float, float]] = {}

    def errors(c: torch.Tensor, exact: torch.Tensor) -> tuple[float, float]:
        err = (c.double() - exact).abs()
        return (err.max() / exact.abs().max()).item(), (err.norm() / exact.norm()).item()

    # limited precision over the whole K, per-tensor scales applied once at the end
    (qa, sa), (qb, sb) = per_tensor_quant(a), per_tensor_quant(b)
    exact_pt = (qa.double() @ qb.double().T) * (sa.double() * sb.double())
    out["limited"] = errors(limited_sum(qa, qb, bits, group) * (sa * sb), exact_pt)

    # tile-scaled inputs (our kernels): limited precision inside each 128 slice, promotion to fp32
    (qa_t, sa_t), (qb_t, sb_t) = act_quant_ref(a), weight_quant_ref(b)
    exact = act_dequant_ref(qa_t, sa_t).double() @ weight_dequant_ref(qb_t, sb_t).double().T
    model = AccumulationModel("bench", bits=bits, group=group)
    out["promoted"] = errors(emulate_gemm(qa_t, sa_t, qb_t, sb_t, b_blockwise=True, model=model), exact)
    out["fp32"] = errors(emulate_gemm(qa_t, sa_t, qb_t, sb_t, b_blockwise=True, model=INTERPRETER), exact)
    out["quant_vs_exact"] = errors(exact.float(), a.double() @ b.double().T)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--acc-bits", type=int, default=14, help="significant bits kept by the emulated accumulator")
    p.add_argument("--group", type=int, default=4, help="products summed exactly before each accumulator update")
    p.add_argument("--m", type=int, default=64)
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--ks", type=int, nargs="+", default=KS, help="K values (multiples of 128)")
    p.add_argument("--trials", type=int, default=2, help="random matrices per point; the max error is kept")
    p.add_argument("--dist", nargs="+", default=["normal", "uniform"], choices=["normal", "uniform"])
    p.add_argument("--out", type=Path, default=DEFAULT_PNG, help="PNG plot path")
    p.add_argument("--no-csv", action="store_true")
    args = p.parse_args()
    if any(k % 128 for k in args.ks):
        raise ValueError(f"--ks must be multiples of 128, got {args.ks}")

    stamp = dict(
        date=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        commit=git_commit(),
        machine=f"{platform.node()} {platform.processor() or platform.machine()}",
    )
    rows = []
    for dist in args.dist:
        gen = torch.Generator().manual_seed(0)
        for K in args.ks:
            worst: dict[str, list[float]] = {}
            for _ in range(args.trials):
                for mode, (mx, nr) in run_once(args.m, args.n, K, args.acc_bits, args.group, dist, gen).items():
                    w = worst.setdefault(mode, [0.0, 0.0])
                    w[0], w[1] = max(w[0], mx), max(w[1], nr)
            for mode, (mx, nr) in worst.items():
                rows.append(
                    dict(
                        stamp,
                        dist=dist,
                        acc_bits=args.acc_bits,
                        group=args.group,
                        M=args.m,
                        N=args.n,
                        K=K,
                        trials=args.trials,
                        mode=mode,
                        max_rel_err=f"{mx:.4e}",
                        norm_rel_err=f"{nr:.4e}",
                    )
                )
                print(f"{dist:8s} K={K:5d} {mode:15s} max_rel_err={mx:.3e} norm_rel_err={nr:.3e}")

    for dist in args.dist:
        at = {r["mode"]: float(r["max_rel_err"]) for r in rows if r["dist"] == dist and r["K"] == 4096}
        if at:
            print(
                f"K=4096, {dist}: limited {at['limited']:.2%} vs promoted {at['promoted']:.3%} max relative error "
                f"(DeepSeek-V3 report, H800: 'nearly 2%' without promotion)"
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
    plot(rows, args.out, args.acc_bits, args.group)


def plot(rows: list[dict], out: Path, bits: int, group: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dists = sorted({r["dist"] for r in rows})
    fig, axes = plt.subplots(1, len(dists), figsize=(6 * len(dists), 4.2), squeeze=False)
    for ax, dist in zip(axes[0], dists):
        for mode, style in (("limited", "o-"), ("promoted", "s-"), ("fp32", "^--")):
            pts = [(r["K"], float(r["max_rel_err"])) for r in rows if r["dist"] == dist and r["mode"] == mode]
            if pts:
                ax.plot(
                    *zip(*pts),
                    style,
                    label={
                        "limited": f"{bits}-bit accumulator (group {group}), no promotion",
                        "promoted": "promotion to FP32 every 128",
                        "fp32": "FP32 accumulation",
                    }[mode],
                )
        ax.axhline(0.02, color="grey", lw=0.8, ls=":")
        ax.annotate("report: ~2% at K=4096", (4096, 0.02), textcoords="offset points", xytext=(-60, 6), fontsize=8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("K")
        ax.set_ylabel("max |C - C_exact| / max |C_exact|")
        ax.set_title(f"FP8 GEMM accumulation error ({dist} inputs)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
