"""Peak memory of the data stage's processes vs corpus size: it should stay flat, not grow with the corpus.

    .venv/bin/python -m bench.data_memory                        # 4, 8, 16, 32 MB of this environment's files
    .venv/bin/python -m bench.data_memory --mb 2 4 --no-csv

Each size runs the whole stage (`data.prepare.build`, data.num_proc=2, reasoning sets off) in a fresh process and
records that driver process's peak resident memory and every datatrove stage's peak per worker process (the
MemoryProbe step, stats.json `peak_rss_mb`). What is bounded by configuration rather than by the corpus is set small
here so that the runs show the corpus-size dependence alone: `tokenizer.max_train_bytes` (the BPE sample; the
trainer's memory follows it) = `--train-mb`. One row per size to bench/results/data_memory.csv; compare rows of one
run (the machine's other jobs do not change memory, but package updates change the corpus).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = """
import json, resource, sys, tempfile
from pathlib import Path
from bench.data_throughput import corpus_config
from data.prepare import build
dcfg = corpus_config(float(sys.argv[1]), 2)
dcfg.tokenizer.max_train_bytes = int(float(sys.argv[2]) * 1e6)
with tempfile.TemporaryDirectory() as d:
    _, metrics = build(dcfg, Path(d))
    stats = json.loads((Path(d) / "stats.json").read_text())
print(json.dumps({"driver_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "stats": stats}))
"""


def main(argv: list[str] | None = None) -> list[dict]:
    from bench.common import append_result

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=float, nargs="+", default=[4, 8, 16, 32])
    ap.add_argument("--train-mb", type=float, default=2.0, help="data.tokenizer.max_train_bytes, in MB")
    ap.add_argument("--no-csv", action="store_true")
    args = ap.parse_args(argv)
    rows = []
    for mb in args.mb:
        out = (
            subprocess.run(
                [sys.executable, "-c", CHILD, str(mb), str(args.train_mb)], capture_output=True, text=True, check=True
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        res = json.loads(out)
        stats = res["stats"]
        peak = stats["peak_rss_mb"]
        row = {
            "corpus_mb": round(stats["bytes_in"] / 1e6, 2),
            "docs_in": stats["documents_in"],
            "train_sample_mb": args.train_mb,
            "driver_peak_mb": round(res["driver_mb"], 1),
            "worker_peak_mb": max(peak.values()),
            "worker_peak_stage": max(peak, key=peak.get),
            **{f"peak_{k}_mb": v for k, v in sorted(peak.items())},
        }
        rows.append(row)
        print(json.dumps(row))
        if not args.no_csv:
            append_result("data_memory", row)
    return rows


if __name__ == "__main__":
    main()
