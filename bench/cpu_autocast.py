"""Does bf16 autocast learn more per CPU minute than fp32 here? The tiny preset trained for the same CPU time in each.

    .venv/bin/python -m bench.cpu_autocast                      # 60 CPU seconds per precision, 1 thread
    .venv/bin/python -m bench.cpu_autocast --cpu-seconds 300 --no-csv

Both runs train the tiny preset (conf/model/tiny.yaml, MTP included) from the same initialization on the same
batches: byte-level sequences of Python source from the standard library (vocabulary 256 + the preset's specials,
no tokenizer needed), AdamW as in the pretraining config, fp32 master weights. `precision=bf16` is what
`train.runtime.autocast` does: `torch.autocast("cpu", dtype=torch.bfloat16)` around forward and loss. Each run stops
after --cpu-seconds of process CPU time; the held-out loss (fp32, next-byte cross-entropy on files not trained on)
is measured at the end and at every quarter of the budget, so the two curves compare at equal CPU time.
Whether bf16 pays depends on the CPU: with AMX or AVX-512 bf16 instructions its matmuls beat fp32; without them
torch falls back to slow bf16 kernels. The CPU's flags and torch's CPU capability are written with each row.
Rows go to bench/results/cpu_autocast.csv (`bench.common.append_result`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sysconfig
import time
from pathlib import Path

import torch

from bench.common import append_result
from train.runtime import cpu_flags

FILES = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))


def byte_corpus(files: list[Path]) -> torch.Tensor:
    return torch.tensor(list(b"".join(f.read_bytes() for f in files)), dtype=torch.long) + 2  # 0, 1: BOS, EOS


def run(precision: str, args: argparse.Namespace, train_ids: torch.Tensor, val_ids: torch.Tensor) -> list[dict]:
    from model.config import load_preset
    from model.transformer import DeepseekV3

    torch.manual_seed(0)
    cfg = dataclasses.replace(load_preset("tiny"), vocab_size=258).validate()
    model = DeepseekV3(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    g = torch.Generator().manual_seed(1)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    B, T = args.batch, args.seq

    def val_loss() -> float:
        model.eval()
        with torch.no_grad():
            n = (val_ids.numel() - 1) // T
            x = val_ids[: n * T + 1]
            ids_NT, tgt_NT = x[:-1].view(n, T)[: args.val_batches * B], x[1:].view(n, T)[: args.val_batches * B]
            loss = float(model(ids_NT, targets_BT=tgt_NT).ce_loss)
        model.train()
        return loss

    rows, step, used = [], 0, 0.0
    marks = [args.cpu_seconds * q / 4 for q in (1, 2, 3, 4)]
    while marks:
        starts = torch.randint(0, train_ids.numel() - T - 1, (B,), generator=g)
        batch = torch.stack([train_ids[s : s + T + 1] for s in starts.tolist()])
        c0 = time.process_time()
        with ctx:
            loss = model(batch[:, :-1], targets_BT=batch[:, 1:]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        used += time.process_time() - c0
        step += 1
        if used >= marks[0]:
            marks.pop(0)
            rows.append({"precision": precision, "cpu_s": round(used, 1), "steps": step, "val_loss": val_loss()})
            print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.cpu_autocast", description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-seconds", type=float, default=60.0, help="CPU-time budget of each precision")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--val-batches", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-csv", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    held_out = len(FILES) // 10
    train_ids, val_ids = byte_corpus(FILES[held_out:]), byte_corpus(FILES[:held_out])
    results = {prec: run(prec, args, train_ids, val_ids) for prec in ("fp32", "bf16")}
    for fp32_row, bf16_row in zip(results["fp32"], results["bf16"]):
        row = {
            "fp32_cpu_s": fp32_row["cpu_s"],
            "bf16_cpu_s": bf16_row["cpu_s"],
            "fp32_steps": fp32_row["steps"],
            "bf16_steps": bf16_row["steps"],
            "fp32_val_loss": round(fp32_row["val_loss"], 4),
            "bf16_val_loss": round(bf16_row["val_loss"], 4),
            "bf16_steps_per_fp32_step": round(bf16_row["steps"] / fp32_row["steps"], 3),
            "threads": args.threads,
            "batch": f"{args.batch} x {args.seq} bytes",
            "cpu_flags": " ".join(cpu_flags()),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "load_avg_1m": round(os.getloadavg()[0], 2),
        }
        print(row)
        if not args.no_csv:
            append_result("cpu_autocast", row)


if __name__ == "__main__":
    main()
