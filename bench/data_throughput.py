"""Data pipeline throughput vs the raw `tokenizers` batch encode, side by side in one process.

    .venv/bin/python -m bench.data_throughput                 # 16 MB of this interpreter's stdlib .py/.rst files
    .venv/bin/python -m bench.data_throughput --mb 4 --repeats 1

Both paths get the same documents (read as the data stage reads them) and the same trained tokenizer:

- raw:      `tokenizer.encode_batch_fast(texts)`: what a user would otherwise run (the fastest batch API, no
            offsets); Rust, all cores.
- pipeline: what the data stage does per document after reading: quality filters (data/filters.py, including
            `ast.parse` of every Python file), FIM (data/fim.py), encode + decode round-trip check
            (data/pack.py `tokenize_batch`), and packing into uint16 shards (`ShardWriter`). Dedup and the datasets
            plumbing are not part of either path.

Rates are MB of source text per second of wall time and per CPU second of this process (both paths run in this one
process, threads included; the CPU figure is the fairer one on a shared, loaded machine). The goal is a pipeline at
no less than half the raw encode rate. Results append to bench/results/data_throughput.csv with machine, commit, date.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import tempfile
import time
from pathlib import Path

from bench.common import commit, machine
from data.config import FilterConfig, SourceConfig
from data.filters import filter_batch
from data.pack import ShardWriter, tokenize_batch
from data.sources import iter_source
from data.tokenizer import EOS, train_tokenizer

RESULTS = Path(__file__).resolve().parent / "results" / "data_throughput.csv"
COLUMNS = [
    "date",
    "machine",
    "commit",
    "mb",
    "docs",
    "vocab",
    "fim_rate",
    "raw_mb_s",
    "pipeline_mb_s",
    "wall_ratio",
    "raw_mb_cpu_s",
    "pipeline_mb_cpu_s",
    "cpu_ratio",
    "load_avg_1m",
]


def load_docs(mb: float, seed: int) -> tuple[list[str], list[str]]:
    """Readable stdlib documents, in the data stage's file order, until `mb` MB of text."""
    spec = SourceConfig(kind="python_env", roots=["stdlib"], extensions=[".py", ".rst"])
    texts, langs, total = [], [], 0
    for r in iter_source(spec, seed, 500_000):  # files are read lazily: this stops early
        if r["reason"] or not r["text"]:
            continue
        texts.append(r["text"])
        langs.append(r["lang"])
        total += len(r["text"].encode("utf-8"))
        if total >= mb * 1e6:
            break
    return texts, langs


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process including all its threads)."""
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def pipeline(texts: list[str], langs: list[str], tok, fim_rate: float, out_dir: Path, batch: int = 64) -> None:
    cfg = FilterConfig()
    writer = ShardWriter(out_dir, tok.get_vocab_size(), tok.token_to_id(EOS), tokens_per_shard=1 << 22)
    for i in range(0, len(texts), batch):
        rows = {"text": texts[i : i + batch], "lang": langs[i : i + batch], "reason": [""] * len(texts[i : i + batch])}
        rows = filter_batch(rows, cfg)
        keep = [j for j, r in enumerate(rows["reason"]) if not r]
        kept = {"text": [rows["text"][j] for j in keep], "lang": [rows["lang"][j] for j in keep]}
        out = tokenize_batch(kept, tok, seed=0, fim_rate=fim_rate, spm_rate=0.5, fim_langs=["python"])
        assert all(out["roundtrip_ok"])
        for ids in out["ids"]:
            writer.add(ids)
    writer.close(seq_len=256)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=16.0, help="MB of source text")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--fim-rate", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=2, help="best of N for each path")
    ap.add_argument("--no-csv", action="store_true")
    args = ap.parse_args()

    texts, langs = load_docs(args.mb, seed=0)
    mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    tok = train_tokenizer(texts[: max(1, len(texts) // 4)], args.vocab)
    print(f"{len(texts)} documents, {mb:.1f} MB, vocab {tok.get_vocab_size()}")

    raw, pipe = [], []
    for _ in range(args.repeats):  # interleaved, so machine load affects both alike
        raw.append(timed(lambda: tok.encode_batch_fast(texts)))
        with tempfile.TemporaryDirectory() as d:
            pipe.append(timed(lambda d=d: pipeline(texts, langs, tok, args.fim_rate, Path(d))))
    (rw, rc), (pw, pc) = min(raw), min(pipe)
    row = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "commit": commit(),
        "mb": round(mb, 2),
        "docs": len(texts),
        "vocab": tok.get_vocab_size(),
        "fim_rate": args.fim_rate,
        "raw_mb_s": round(mb / rw, 3),
        "pipeline_mb_s": round(mb / pw, 3),
        "wall_ratio": round(rw / pw, 3),
        "raw_mb_cpu_s": round(mb / rc, 3),
        "pipeline_mb_cpu_s": round(mb / pc, 3),
        "cpu_ratio": round(rc / pc, 3),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    for k, v in row.items():
        print(f"{k:>18}: {v}")
    if not args.no_csv:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        new = not RESULTS.exists()
        with open(RESULTS, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            if new:
                w.writeheader()
            w.writerow(row)
        print(f"appended to {RESULTS}")


if __name__ == "__main__":
    main()
