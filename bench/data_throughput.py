"""The data stage end to end (reading to packed shards) on 1 and 2 processes vs raw `tokenizers` encode, one run.

    .venv/bin/python -m bench.data_throughput                   # 16 MB of this environment's code and docs
    .venv/bin/python -m bench.data_throughput --mb 4 --procs 1 --no-csv

The corpus is the stage's default source (this interpreter's standard library and installed packages: .py, .md,
.rst, .txt) capped at `--mb` MB. Both sides get the same bytes:

- pipeline: `data.prepare.build` with `data.num_proc = data.tasks = P`: listing, reading, quality filters
  (including `ast.parse` of every Python file), decontamination, exact and MinHash dedup (datatrove's stages),
  BPE training on the sample, FIM, tokenization with the round-trip check, packing and merging the shards: the
  whole stage but the reasoning sets (generated, not read). MB/s = input bytes / wall seconds.
- raw: `tokenizer.encode_batch_fast(texts)` of every readable document with the tokenizer the run trained, in
  one process (Rust, all cores): what a user would otherwise run to tokenize the corpus, and nothing else.

The goal is a pipeline at no less than half the raw encode rate. Rows (one per P, with the raw rate measured in the
same run, after it) go to bench/results/data_throughput.csv with the 1-minute load average: on a shared machine
compare rows of one run only.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from bench.common import append_result


def corpus_config(mb: float, procs: int):
    from pipeline.config import compose

    cfg = compose([f"data.sources.0.max_bytes={int(mb * 1e6)}", f"data.num_proc={procs}", f"data.tasks={procs}"])
    cfg.data.reasoning.enabled = False
    return cfg.data


def readable_texts(dcfg) -> list[str]:
    """The text of every input the stage reads (as its first step reads them)."""
    from data.readers import ItemReader
    from data.sources import list_items

    items, _ = list_items(dcfg.sources, dcfg.seed)
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        f.write("".join(json.dumps(i) + "\n" for i in items))
    try:
        return [d.text for d in ItemReader(f.name, dcfg.sources, dcfg.filters.max_bytes).run() if d.text]
    finally:
        os.unlink(f.name)


def main(argv: list[str] | None = None) -> list[dict]:
    from data.prepare import build
    from data.tokenizer import load_tokenizer

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=float, default=16.0, help="MB of source files")
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--no-csv", action="store_true")
    args = ap.parse_args(argv)

    rows = []
    for procs in args.procs:
        dcfg = corpus_config(args.mb, procs)
        with tempfile.TemporaryDirectory() as d:
            t = time.perf_counter()
            _, metrics = build(dcfg, Path(d))
            wall = time.perf_counter() - t
            tok = load_tokenizer(Path(d) / "tokenizer.json")
        texts = readable_texts(dcfg)
        mb = sum(len(x.encode("utf-8", "surrogatepass")) for x in texts) / 1e6
        t = time.perf_counter()
        tok.encode_batch_fast(texts)
        raw = time.perf_counter() - t
        row = {
            "scope": "end_to_end",  # rows without it measured the per-document steps only (before datatrove)
            "procs": procs,
            "mb_in": round(metrics["bytes_in"] / 1e6, 2),
            "docs_in": metrics["documents_in"],
            "docs_kept": metrics["documents_kept"],
            "tokens": metrics["tokens/train"] + metrics["tokens/val"],
            "pipeline_s": round(wall, 2),
            "pipeline_mb_s": round(metrics["bytes_in"] / 1e6 / wall, 3),
            "raw_mb": round(mb, 2),
            "raw_s": round(raw, 2),
            "raw_mb_s": round(mb / raw, 3),
            "ratio": round((metrics["bytes_in"] / 1e6 / wall) / (mb / raw), 3),
            "load_avg_1m": round(os.getloadavg()[0], 2),
        }
        rows.append(row)
        print(json.dumps(row))
        if not args.no_csv:
            append_result("data_throughput", row)
    return rows


if __name__ == "__main__":
    main()
