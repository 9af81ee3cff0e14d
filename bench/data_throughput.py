"""The data stage end to end (reading to packed shards) on 1 and 2 processes vs raw `tokenizers` encode, one run.

    .venv/bin/python -m bench.data_throughput                   # 16 MB of this environment's code and docs
    .venv/bin/python -m bench.data_throughput --mb 4 --procs 1 --no-csv
    .venv/bin/python -m bench.data_throughput --bpe-mb 100 1.6   # the default BPE cap, and a cap at 1/10 of the corpus

The corpus is the stage's default source (this interpreter's standard library and installed packages: .py, .md,
.rst, .txt) capped at `--mb` MB. Both sides get the same bytes:

- pipeline: `data.prepare.build` with `data.num_proc = data.tasks = P`: listing, reading, quality filters
  (including `compile` of every Python file), decontamination, exact and MinHash dedup (datatrove's stages),
  BPE training on the sample, FIM, tokenization with the round-trip check, packing and merging the shards: the
  whole stage but the reasoning sets (generated, not read). MB/s = input bytes / wall seconds.
- raw: `tokenizer.encode_batch_fast(texts)` of every readable document with the tokenizer the run trained, in
  one process (Rust, all cores, whatever TOKENIZERS_PARALLELISM says, as the stage's own tokenizer steps): what a
  user would otherwise run to tokenize the corpus, and nothing else.

BPE training reads its whole sample once more, about as much work as encoding it. Below the sample cap
(data.tokenizer.max_train_bytes, 100 MB) that is the whole corpus, a fixed cost that a 16 MB run pays in full and
a 100 GB corpus pays on 0.1% of its bytes. `--bpe-mb` runs the same corpus under other caps (the rows record
`bpe_cap_mb`): a cap at a tenth of the corpus is the per-byte rate of a corpus ten times the default cap.

The goal is a pipeline at no less than half the raw encode rate. Both rates are given per wall second and per CPU
second (all processes of the run, sampled from /proc: on a loaded machine the CPU figure is the fair one). Rows (one
per P, with the raw rate measured in the same run, after it) go to bench/results/data_throughput.csv with the
1-minute load average: on a shared machine compare rows of one run only. Each datatrove stage's wall and CPU
seconds (stats.json's timings) are printed too, not recorded.

    .venv/bin/python -m bench.data_throughput --vs-checkout ../main --repeats 2

also runs `python -m data.prepare` (default config, the same --mb) of another checkout of this repository and of
this one, interleaved, and records each one's wall and CPU seconds (scope "stage_vs_checkout").
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.common import append_result


class TreeCpu:
    """CPU seconds (user + system) of a process and all its descendants, sampled from /proc every `interval`:
    worker processes of process pools are grandchildren (forkserver), which `os.times` never sees."""

    def __init__(self, root: int, interval: float = 0.1) -> None:
        self.root, self.interval = root, interval
        self.last: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._tick = os.sysconf("SC_CLK_TCK")

    def _sample(self) -> None:
        parent, cpu = {}, {}
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                fields = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parent[int(d)], cpu[int(d)] = int(fields[1]), (int(fields[11]) + int(fields[12])) / self._tick
        for pid in cpu:
            p = pid
            while p in parent and p != self.root and p > 1:
                p = parent[p]
            if p == self.root:
                self.last[pid] = cpu[pid]

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.interval)

    def __enter__(self) -> TreeCpu:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._sample()
        self._stop.set()
        self._thread.join()

    @property
    def seconds(self) -> float:
        return sum(self.last.values())


def corpus_config(mb: float, procs: int, bpe_mb: float | None = None):
    from pipeline.config import compose

    overrides = [f"data.sources.0.max_bytes={int(mb * 1e6)}", f"data.num_proc={procs}", f"data.tasks={procs}"]
    if bpe_mb is not None:
        overrides.append(f"data.tokenizer.max_train_bytes={int(bpe_mb * 1e6)}")
    cfg = compose(overrides)
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
    from data.tokenizer import load_tokenizer, tokenizer_threads

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=float, default=16.0, help="MB of source files")
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    ap.add_argument(
        "--bpe-mb",
        type=float,
        nargs="+",
        default=[None],
        help="BPE sample caps to run (MB; data.tokenizer.max_train_bytes), default: the config's",
    )
    ap.add_argument("--vs-checkout", type=Path, help="also time the data stage of this checkout against ours")
    ap.add_argument("--repeats", type=int, default=1, help="--vs-checkout runs per checkout, interleaved")
    ap.add_argument("--no-csv", action="store_true")
    args = ap.parse_args(argv)
    if args.vs_checkout:
        return versus_checkout(args)

    # read once before any build: the first build would otherwise also pay for the disk (a cold page cache), and
    # the text is the same for every row (the sources do not depend on the processes or the BPE cap)
    texts = readable_texts(corpus_config(args.mb, 1))
    mb = sum(len(x.encode("utf-8", "surrogatepass")) for x in texts) / 1e6
    rows = []
    for procs, bpe_mb in itertools.product(args.procs, args.bpe_mb):
        dcfg = corpus_config(args.mb, procs, bpe_mb)
        with tempfile.TemporaryDirectory() as d:
            cpu0 = TreeCpu(os.getpid())
            with cpu0:
                base = cpu0.seconds
                t = time.perf_counter()
                _, metrics = build(dcfg, Path(d))
                wall = time.perf_counter() - t
            cpu = cpu0.seconds - base
            tok = load_tokenizer(Path(d) / "tokenizer.json")
            stats = json.loads((Path(d) / "stats.json").read_text())
            print(json.dumps({"procs": procs, "stage_wall_s": stats["timings_s"], "stage_cpu_s": stats["cpu_s"]}))
        c = time.process_time()
        t = time.perf_counter()
        with tokenizer_threads(0):
            tok.encode_batch_fast(texts)
        raw = time.perf_counter() - t
        raw_cpu = time.process_time() - c
        row = {
            "scope": "end_to_end",  # rows without it measured the per-document steps only (before datatrove)
            "procs": procs,
            "bpe_cap_mb": dcfg.tokenizer.max_train_bytes / 1e6,
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
            "pipeline_cpu_s": round(cpu, 2),
            "pipeline_mb_cpu_s": round(metrics["bytes_in"] / 1e6 / cpu, 3),
            "raw_mb_cpu_s": round(mb / raw_cpu, 3),
            "cpu_ratio": round((metrics["bytes_in"] / cpu) / (mb * 1e6 / raw_cpu), 3),
            "load_avg_1m": round(os.getloadavg()[0], 2),
        }
        rows.append(row)
        print(json.dumps(row))
        if not args.no_csv:
            append_result("data_throughput", row)
    return rows


def versus_checkout(args) -> list[dict]:
    """`python -m data.prepare` of another checkout and of this one, interleaved: wall and CPU seconds each."""
    here = Path(__file__).resolve().parents[1]
    rows = []
    for _ in range(args.repeats):
        for name, repo in (("other", args.vs_checkout.resolve()), ("this", here)):
            with tempfile.TemporaryDirectory() as d:
                cmd = [sys.executable, "-m", "data.prepare", f"run.root={d}", "run.name=x", "wandb.mode=disabled"]
                cmd.append(f"data.sources.0.max_bytes={int(args.mb * 1e6)}")
                env = {**os.environ, "PYTHONPATH": str(repo)}
                t = time.perf_counter()
                proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                with TreeCpu(proc.pid) as cpu:
                    proc.wait()
                wall = time.perf_counter() - t
                stats = json.loads((Path(d) / "x" / "data" / "stats.json").read_text())
            row = {
                "scope": "stage_vs_checkout",
                "checkout": name,
                "checkout_path": str(repo),
                "mb_in": round(stats["bytes_in"] / 1e6, 2),
                "docs_kept": stats["documents_kept"],
                "stage_wall_s": round(wall, 2),
                "stage_cpu_s": round(cpu.seconds, 2),
                "returncode": proc.returncode,
                "load_avg_1m": round(os.getloadavg()[0], 2),
            }
            rows.append(row)
            print(json.dumps(row))
            if not args.no_csv:
                append_result("data_throughput", row)
    return rows


if __name__ == "__main__":
    main()
