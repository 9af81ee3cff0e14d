"""How many bytes the BPE tokenizer needs to train on: compression of held-out text and training cost per sample size.

    .venv/bin/python -m bench.tokenizer_sample                      # samples of 1-16 MB of the default corpus
    .venv/bin/python -m bench.tokenizer_sample --mb 24 --samples 2 4 8 16 --holdout-mb 4 --no-csv

The corpus is the data stage's default source (this interpreter's standard library and installed packages) capped
at `--mb` MB, read as the stage's first step reads it. Its documents are shuffled (seeded); the last `--holdout-mb`
MB are held out and every sample is a prefix of the rest, so each larger sample contains the smaller ones. For
each sample size, with the stage's own tokenizer (data/tokenizer.py: byte-level BPE, the config's vocabulary size
and min_frequency, every core): training wall and CPU seconds, and bytes per token of the held-out documents
(UTF-8 bytes / tokens, the number that sets how much text a training token carries). One row per sample size goes
to bench/results/tokenizer_sample.csv; `data.tokenizer.max_train_bytes` is the knob these rows are about.
"""

from __future__ import annotations

import argparse
import json
import random
import time

from bench.common import append_result


def split_corpus(texts: list[str], holdout_mb: float, seed: int) -> tuple[list[str], list[str]]:
    """(training pool, held-out documents): the shuffled corpus, its last `holdout_mb` MB held out."""
    texts = sorted(texts)
    random.Random(seed).shuffle(texts)
    held, size = [], 0
    while texts and size < holdout_mb * 1e6:
        held.append(texts.pop())
        size += len(held[-1].encode("utf-8", "surrogatepass"))
    return texts, held


def prefix(texts: list[str], mb: float) -> list[str]:
    """The shortest prefix of `texts` with at least `mb` MB (all of them when the pool is smaller)."""
    out, size = [], 0
    for t in texts:
        if size >= mb * 1e6:
            break
        out.append(t)
        size += len(t.encode("utf-8", "surrogatepass"))
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    from bench.data_throughput import corpus_config, readable_texts
    from data.tokenizer import tokenizer_threads, train_tokenizer

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=float, default=24.0, help="MB of source files read")
    ap.add_argument("--samples", type=float, nargs="+", default=[1, 2, 4, 8, 16], help="sample sizes, MB")
    ap.add_argument("--holdout-mb", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-csv", action="store_true")
    args = ap.parse_args(argv)

    dcfg = corpus_config(args.mb, 1)
    pool, held = split_corpus(readable_texts(dcfg), args.holdout_mb, args.seed)
    held_bytes = sum(len(t.encode("utf-8", "surrogatepass")) for t in held)
    rows = []
    for mb in sorted(args.samples):
        sample = prefix(pool, mb)
        sample_bytes = sum(len(t.encode("utf-8", "surrogatepass")) for t in sample)
        batches = [sample[i : i + 256] for i in range(0, len(sample), 256)]
        with tokenizer_threads(0):
            c, t = time.process_time(), time.perf_counter()  # CPU of every thread
            tok = train_tokenizer(batches, dcfg.tokenizer.vocab_size, dcfg.tokenizer.min_frequency)
            wall, cpu = time.perf_counter() - t, time.process_time() - c
            tok.encode_special_tokens = True  # as the stage encodes documents
            tokens = sum(len(e.ids) for e in tok.encode_batch_fast(held, add_special_tokens=False))
        row = {
            "sample_mb_asked": mb,
            "sample_mb": round(sample_bytes / 1e6, 2),
            "sample_docs": len(sample),
            "pool_mb": round(sum(len(t.encode("utf-8", "surrogatepass")) for t in pool) / 1e6, 2),
            "vocab_size": dcfg.tokenizer.vocab_size,
            "train_wall_s": round(wall, 2),
            "train_cpu_s": round(cpu, 2),
            "heldout_mb": round(held_bytes / 1e6, 2),
            "heldout_docs": len(held),
            "heldout_bytes_per_token": round(held_bytes / tokens, 4),
            "seed": args.seed,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        if not args.no_csv:
            append_result("tokenizer_sample", row)
    return rows


if __name__ == "__main__":
    main()
