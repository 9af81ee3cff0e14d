"""Near-dedup recall at known Jaccard similarity: the data stage's MinHash chain vs datasketch's MinHashLSH.

    .venv/bin/python -m bench.dedup_recall                          # 100 pairs per level, 3 seeds
    .venv/bin/python -m bench.dedup_recall --pairs 30 --seeds 1 --no-csv

Synthetic pairs of random-word documents whose word 5-gram sets have a chosen Jaccard similarity J in
{0.7, 0.8, 0.85, 0.9, 0.95} (`synthetic_pairs`: the second document keeps the first one's opening words and then
continues with fresh ones). Each pair is unrelated to every other, so a flagged pair is a true positive when its J
is >= the threshold and a false positive otherwise.

- ours: the stage's chain (data/dedup.py): datatrove's disk-based MinHash stages with bands chosen for recall at
  the threshold (data.dedup.lsh_params) and every candidate checked on the full signature (VerifyPairs);
- datasketch: MinHashLSH(threshold, num_perm) over the same word 5-grams, the bands datasketch picks itself (the
  stage's implementation before; what a user would otherwise pick), in corpus order.

Per level, the fraction of pairs flagged (recall for J >= threshold, false-positive rate below it); mean and
standard deviation over seeds. One row per (method, level) to bench/results/dedup_recall.csv.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
from pathlib import Path

LEVELS = (0.7, 0.8, 0.85, 0.9, 0.95)


def synthetic_pairs(levels, per_level: int, n_words: int = 300, seed: int = 0):
    """Pairs (a, b) of random-word documents whose word 5-gram sets have Jaccard similarity close to each level:
    b keeps a's first p words and continues with fresh ones. Returns (docs, [(level, true J)] per pair)."""
    rng = random.Random(seed)

    def word():
        return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(8))

    docs, truth = [], []
    m = n_words - 4
    for level in levels:
        for _ in range(per_level):
            a = [word() for _ in range(n_words)]
            p = round(2 * m * level / (1 + level)) + 4
            b = a[:p] + [word() for _ in range(n_words - p)]
            sa = {tuple(a[i : i + 5]) for i in range(m)}
            sb = {tuple(b[i : i + 5]) for i in range(m)}
            docs += [" ".join(a), " ".join(b)]
            truth.append((level, len(sa & sb) / len(sa | sb)))
    return docs, truth


def near_duplicates(docs: list[str], work: Path, dedup, tasks: int = 2) -> set[int]:
    """Indices of `docs` removed by the stage's near-dedup chain (signatures, buckets, check, cluster, filter)."""
    from datatrove.data import Document
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter

    from data.dedup import MinhashSignatures, VerifyPairs, minhash_config

    def read(data, rank, world_size):
        for i, t in enumerate(docs):
            if i % world_size == rank:
                yield Document(text=t, id=str(i))

    def run(pipeline, n, name):
        LocalPipelineExecutor(pipeline, tasks=n, workers=1, logging_dir=str(work / "logs" / name)).run()

    cfg = minhash_config(dedup)
    m = work / "minhash"
    run([read, MinhashSignatures(str(m / "sigs"), cfg)], tasks, "sigs")
    verify = VerifyPairs(str(m / "buckets"), str(m / "sigs"), str(m / "verified"), cfg, dedup.threshold)
    run([MinhashDedupBuckets(str(m / "sigs"), str(m / "buckets"), config=cfg), verify], cfg.num_buckets, "buckets")
    run([MinhashDedupCluster(str(m / "verified"), str(m / "remove"), config=cfg)], 1, "cluster")
    removed = set()
    for rank in range(tasks):
        mine = [Document(text=t, id=str(i)) for i, t in enumerate(docs) if i % tasks == rank]
        kept = {d.id for d in MinhashDedupFilter(str(m / "remove")).run(iter(mine), rank, tasks)}
        removed |= {int(d.id) for d in mine if d.id not in kept}
    return removed


def datasketch_duplicates(docs: list[str], threshold: float, num_perm: int) -> set[int]:
    """The previous implementation: datasketch MinHashLSH, a document is a duplicate when a kept one matches."""
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    removed = set()
    for i, t in enumerate(docs):
        w = t.split()
        m = MinHash(num_perm=num_perm, seed=1)
        m.update_batch([" ".join(w[k : k + 5]).encode() for k in range(len(w) - 4)])
        if lsh.query(m):
            removed.add(i)
        else:
            lsh.insert(str(i), m)
    return removed


def flagged_by_level(removed: set[int], truth) -> dict[float, float]:
    out = {}
    for level in sorted({lv for lv, _ in truth}):
        ks = [k for k, (lv, _) in enumerate(truth) if lv == level]
        out[level] = sum((2 * k in removed or 2 * k + 1 in removed) for k in ks) / len(ks)
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    from bench.common import append_result
    from data.config import DedupConfig
    from data.dedup import lsh_params

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=100, help="pairs per similarity level")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threshold", type=float, default=0.85)
    ap.add_argument("--num-perm", type=int, default=128)
    ap.add_argument("--no-csv", action="store_true")
    args = ap.parse_args(argv)
    dedup = DedupConfig(threshold=args.threshold, num_perm=args.num_perm)
    results: dict[str, dict[float, list[float]]] = {"ours": {}, "datasketch": {}}
    for seed in range(args.seeds):
        docs, truth = synthetic_pairs(LEVELS, args.pairs, seed=seed)
        with tempfile.TemporaryDirectory() as d:
            ours = flagged_by_level(near_duplicates(docs, Path(d), dedup), truth)
        theirs = flagged_by_level(datasketch_duplicates(docs, args.threshold, args.num_perm), truth)
        for name, got in (("ours", ours), ("datasketch", theirs)):
            for level, frac in got.items():
                results[name].setdefault(level, []).append(frac)
    bands, rows_ = lsh_params(args.threshold, args.num_perm)
    rows = []
    for name, by_level in results.items():
        for level, fracs in sorted(by_level.items()):
            row = {
                "method": name,
                "threshold": args.threshold,
                "num_perm": args.num_perm,
                "bands_rows": f"{bands}x{rows_}" if name == "ours" else "datasketch",
                "jaccard": level,
                "flagged_mean": round(statistics.mean(fracs), 4),
                "flagged_std": round(statistics.stdev(fracs), 4) if len(fracs) > 1 else 0.0,
                "pairs": args.pairs,
                "seeds": args.seeds,
            }
            rows.append(row)
            print(f"{name:>10}  J={level:.2f}  flagged {row['flagged_mean']:.3f} +- {row['flagged_std']:.3f}")
            if not args.no_csv:
                append_result("dedup_recall", row)
    return rows


if __name__ == "__main__":
    main()
