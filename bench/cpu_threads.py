"""Wall seconds per training step of the tiny preset by intra-op threads and precision, interleaved, one process.

    .venv/bin/python -m bench.cpu_threads                  # threads 1 and 2, fp32 and bf16 autocast, 3 rounds
    .venv/bin/python -m bench.cpu_threads --threads 1 2 4 --rounds 5 --no-csv

One model (conf/model/tiny.yaml, MTP included, vocabulary 4096, random tokens: the step's cost does not depend on
the data), one AdamW step per micro-batch of `--batch` x `--seq` tokens, as pretraining's micro-batches. Every
round runs each (threads, precision) pair after 2 warm-up steps, in the same order, so a machine that drifts
moves all pairs alike; rows give each pair's median and range over the rounds. `torch.set_num_threads` switches
the threads; OMP_WAIT_POLICY is whatever the environment says (the Makefile exports PASSIVE). Rows go to
bench/results/cpu_threads.csv with the CPU's flags and the 1-minute load average.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import os
import statistics
import time

import torch

from bench.common import append_result
from train.runtime import cpu_flags


def step_seconds(model, opt, batch: torch.Tensor, precision: str, n: int) -> float:
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    t = time.perf_counter()
    for _ in range(n):
        with ctx:
            loss = model(batch[:, :-1], targets_BT=batch[:, 1:]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return (time.perf_counter() - t) / n


def main(argv: list[str] | None = None) -> list[dict]:
    from model.config import load_preset
    from model.transformer import DeepseekV3

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=12, help="timed steps per pair and round")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--no-csv", action="store_true")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    cfg = dataclasses.replace(load_preset("tiny"), vocab_size=4096).validate()
    model = DeepseekV3(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1))
    pairs = list(itertools.product(args.threads, args.precisions))
    times: dict[tuple[int, str], list[float]] = {p: [] for p in pairs}
    for r in range(args.rounds):
        for threads, precision in pairs:
            torch.set_num_threads(threads)
            step_seconds(model, opt, batch, precision, 2)  # warm-up
            times[(threads, precision)].append(step_seconds(model, opt, batch, precision, args.steps))
            print(f"round {r}: {threads} threads {precision} {times[(threads, precision)][-1]:.3f} s/step", flush=True)
    rows = []
    for (threads, precision), ts in times.items():
        row = {
            "threads": threads,
            "precision": precision,
            "median_s_per_step": round(statistics.median(ts), 4),
            "min_s_per_step": round(min(ts), 4),
            "max_s_per_step": round(max(ts), 4),
            "rounds": args.rounds,
            "batch": f"{args.batch} x {args.seq}",
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
            "cpu_flags": " ".join(cpu_flags()),
            "load_avg_1m": round(os.getloadavg()[0], 2),
        }
        rows.append(row)
        print(row)
        if not args.no_csv:
            append_result("cpu_threads", row)
    return rows


if __name__ == "__main__":
    main()
