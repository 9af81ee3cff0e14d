"""The data stage's own datatrove steps: the pieces datatrove has no step for (data/engine.py chains them with
datatrove's readers, writers and dedup stages).

    Unusable, Quality, Decontaminate   datatrove filters: drop a document with a named reason, recorded by their
                                       `RejectWriter` (one line per removed document: path, source, reason, bytes)
    TokenizerSample                    pass-through: keeps a uniform, byte-bounded sample of the train documents
    TrainTokenizer                     one task: trains the BPE tokenizer on the samples, fixes the split rule
    TokenizePack                       FIM + tokenize + pack this task's documents into its part of train/ and val/
    MergeParts                         one task: parts -> the split directories, and stats.json from the ledgers
    MemoryProbe                        records each task's peak resident memory
"""

from __future__ import annotations

import hashlib
import heapq
import json
import os
import random
import resource
from collections import Counter
from pathlib import Path

import numpy as np
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter

from data.config import FilterConfig, FimConfig, PackConfig
from data.dedup import Contamination, is_contaminated
from data.filters import TextRules
from data.pack import PART, PartWriter, encode_documents, merge_parts, split_hash
from data.tokenizer import (
    load_tokenizer,
    save_tokenizer,
    token_bytes,
    token_dtype,
    tokenizer_threads,
    train_tokenizer,
)


class RejectWriter(JsonlWriter):
    """Exclusion writer of a filter: one JSON line {path, source, reason, bytes} per removed document."""

    def __init__(self, folder: str, step: str, reason: str = "") -> None:
        super().__init__(folder, output_filename=f"{step}_${{rank}}.jsonl", compression=None)
        self.reason = reason

    def _default_adapter(self, document) -> dict:
        m = document.metadata
        return {
            "path": m.get("path", document.id),
            "source": m.get("source", ""),
            "reason": m.get("filter_reason") or self.reason or m.get("reason") or "removed",
            "bytes": len(document.text.encode("utf-8", "surrogatepass")),
        }


class Unusable(BaseFilter):
    """Drops the records the reader could not use (their reason is set), so they are counted like any removal."""

    name = "🚫 unusable inputs"

    def filter(self, doc) -> bool | tuple[bool, str]:
        reason = doc.metadata.get("reason")
        return (False, reason) if reason else True


class Quality(BaseFilter):
    """data/filters.py's rules: code rules for code, Gopher/FineWeb rules for prose."""

    name = "🧹 quality rules"

    def __init__(self, cfg: FilterConfig, exclusion_writer=None) -> None:
        super().__init__(exclusion_writer)
        self.rules = TextRules(cfg)

    def filter(self, doc) -> bool | tuple[bool, str]:
        reason = self.rules.reason(doc.text, doc.metadata.get("lang", "text"), doc.metadata.get("path", ""))
        return (False, reason) if reason else True


class Decontaminate(BaseFilter):
    """Drops documents sharing a word n-gram with an evaluation text (data/dedup.py)."""

    name = "🧪 decontamination"

    def __init__(self, contamination: Contamination, exclusion_writer=None) -> None:
        super().__init__(exclusion_writer)
        self.contamination = contamination

    def filter(self, doc) -> bool | tuple[bool, str]:
        return (False, "contaminated") if is_contaminated(doc.text, self.contamination) else True


class RankFileReader(JsonlReader):
    """Reads exactly `{rank:05d}.jsonl` of its folder: the documents an earlier stage's task `rank` wrote, in the
    order its dedup signatures were computed (the dedup filters find documents by that position)."""

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        name = f"{rank:05d}.jsonl"
        if self.data_folder.isfile(name):
            yield from self.read_file(name)


class TokenizerSample(PipelineStep):
    """Pass-through that keeps the documents with the smallest sample keys (a hash of the text independent of the
    split hash) within `budget` bytes: a uniform sample, the same whatever the task layout, written to
    `{folder}/{rank}.jsonl` with each text's split hash and its position in this task's stream. Every document's
    split hash goes to `{rank}.hashes` (float64, in stream order), so that TrainTokenizer can keep both splits
    non-empty whatever near-dedup removes after this step."""

    name = "🎲 tokenizer sample"

    def __init__(self, folder: str, budget: int) -> None:
        super().__init__()
        self.folder, self.budget = folder, budget

    def run(self, data, rank: int = 0, world_size: int = 1):
        os.makedirs(self.folder, exist_ok=True)
        heap: list[tuple[int, float, int, int, str]] = []  # (-key, split hash, position, bytes, text)
        total = 0
        with open(os.path.join(self.folder, f"{rank:05d}.hashes"), "wb") as hashes:
            for idx, doc in enumerate(data):
                h = split_hash(doc.text)
                hashes.write(np.float64(h).tobytes())
                n = len(doc.text.encode("utf-8"))
                digest = hashlib.blake2b(doc.text.encode("utf-8"), digest_size=8, person=b"bpesample").digest()
                heapq.heappush(heap, (-int.from_bytes(digest), h, idx, n, doc.text))
                total += n
                while total > self.budget and heap:
                    total -= heapq.heappop(heap)[3]
                yield doc
        with open(os.path.join(self.folder, f"{rank:05d}.jsonl"), "w", encoding="utf-8") as f:
            for _, h, idx, _, text in sorted(heap, reverse=True):
                f.write(json.dumps({"hash": h, "idx": idx, "text": text}) + "\n")


def _removed_positions(folder: Path | None, rank: int):
    """Positions in task `rank`'s stream that near-dedup removes (datatrove's `{rank:06d}.remove`: uint32s)."""
    if folder is None or not (folder / f"{rank:06d}.remove").is_file():
        return np.zeros(0, dtype=np.int64)
    return np.fromfile(folder / f"{rank:06d}.remove", dtype="<u4").astype(np.int64)


def surviving_hash_range(folder: Path, removed: Path | None) -> tuple[float, float] | None:
    """(smallest, largest) split hash of the documents that survive near-dedup, or None when none does."""
    lo, hi = None, None
    for p in sorted(folder.glob("*.hashes")):
        h = np.memmap(p, dtype=np.float64, mode="r") if p.stat().st_size else np.zeros(0)
        keep = np.ones(len(h), dtype=bool)
        keep[_removed_positions(removed, int(p.name[:5]))] = False
        if keep.any():
            lo = min(lo if lo is not None else 1.0, float(h[keep].min()))
            hi = max(hi if hi is not None else 0.0, float(h[keep].max()))
    return None if lo is None else (lo, hi)


class TrainTokenizer(PipelineStep):
    """One task, after near-dedup has decided: BPE on every task's sample (at most max_train_bytes in all, train
    documents that survive dedup) -> `{work}/tokenizer.json`; and the split rule `{work}/split.json`: val = text
    hash below val_fraction, except that the surviving document with the smallest hash goes to val when no surviving
    hash is below it, and the one with the largest to train when every surviving hash is."""

    name = "🔤 train tokenizer"

    def __init__(self, work: str, vocab_size: int, min_frequency: int, val_fraction: float, removed: str = "") -> None:
        super().__init__()
        self.work, self.vocab_size, self.min_frequency = work, vocab_size, min_frequency
        self.val_fraction, self.removed = val_fraction, removed

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        folder = Path(self.work, "sample")
        removed_dir = Path(self.removed) if self.removed else None
        span = surviving_hash_range(folder, removed_dir)
        if span is None:
            removed = read_ledger(Path(self.work, "rejects"), 0)[0]
            top = max(removed, key=removed.get) if removed else "none"
            raise ValueError(
                f"every document was removed (by reason: {dict(sorted(removed.items()))}); most by {top!r}: relax "
                "that filter or check the sources"
            )
        lo, hi = span
        rule = {
            "val_fraction": self.val_fraction,
            "force_val": lo if lo >= self.val_fraction else None,
            "force_train": hi if hi < self.val_fraction else None,
        }

        def batches():
            for p in sorted(folder.glob("*.jsonl")):
                skip = set(_removed_positions(removed_dir, int(p.name[:5])).tolist())
                with open(p, encoding="utf-8") as f:
                    batch = []
                    for line in f:
                        row = json.loads(line)
                        if row["idx"] not in skip and not is_val(row["hash"], rule):
                            batch.append(row["text"])
                        if len(batch) == 256:
                            yield batch
                            batch = []
                    if batch:
                        yield batch

        with tokenizer_threads(0):  # the one task of its stage: every core of its machine
            tok = train_tokenizer(batches(), self.vocab_size, self.min_frequency)
        save_tokenizer(tok, Path(self.work, "tokenizer.json"))
        Path(self.work, "split.json").write_text(json.dumps(rule))


def is_val(h: float, rule: dict) -> bool:
    if h == rule["force_val"]:
        return True
    if h == rule["force_train"]:
        return False
    return h < rule["val_fraction"]


class TokenizePack(PipelineStep):
    """FIM + tokenize + pack: this task's documents into `{work}/parts/{split}/{rank:05d}/`, plus counts in its
    part.json. Train documents are shuffled through a buffer of at most `shuffle_tokens` tokens (seeded by task) so
    that neighbouring files do not fill whole sequences; the loader shuffles sequences on top."""

    name = "📦 tokenize + pack"

    def __init__(
        self, work: str, fim: FimConfig, pack: PackConfig, seed: int, shuffle_tokens: int = 4_000_000, threads: int = 0
    ) -> None:
        super().__init__()
        self.work, self.fim, self.pack, self.seed, self.shuffle_tokens = work, fim, pack, seed, shuffle_tokens
        self.threads = threads  # encoding threads per task (0: the tokenizer's default, every core)

    def run(self, data, rank: int = 0, world_size: int = 1):
        with tokenizer_threads(self.threads):
            self._pack(data, rank)

    def _pack(self, data, rank: int) -> None:
        tok = load_tokenizer(Path(self.work, "tokenizer.json"))
        tok.encode_special_tokens = True  # document text is text: "<think>" in a file is not the special token
        table = token_bytes(tok)
        rule = json.loads(Path(self.work, "split.json").read_text())
        window = self.fim.level == "window"
        window_fim = {"rate": self.fim.rate, "spm_rate": self.fim.spm_rate, "seed": [self.seed, rank]}
        writers = {
            split: PartWriter(
                Path(self.work, "parts", split, f"{rank:05d}"),
                tok,
                self.pack.tokens_per_shard,
                self.pack.seq_len,
                window_fim | {"seed": [self.seed, rank, i]} if window else None,
            )
            for i, split in enumerate(("train", "val"))
        }
        dtype = token_dtype(tok.get_vocab_size())
        rng, buffer, buffered = random.Random(f"{self.seed}:{rank}"), [], 0
        counts: dict[str, Counter] = {s: Counter() for s in writers}
        samples = []

        def emit(split: str, ids: list[int]) -> None:
            writers[split].add(ids)

        def flush(batch) -> None:
            nonlocal buffered
            fim_rate = 0.0 if window else self.fim.rate
            texts, langs = [d.text for d in batch], [d.metadata.get("lang", "text") for d in batch]
            fim = (self.seed, fim_rate, self.fim.spm_rate, self.fim.languages)
            for doc, (ids, mode, ok) in zip(batch, encode_documents(texts, langs, tok, *fim, table)):
                split = "val" if is_val(split_hash(doc.text), rule) else "train"
                c = counts[split]
                c["bytes_in"] += len(doc.text.encode("utf-8"))
                if not ok:
                    c["roundtrip_failure"] += 1
                    continue
                c["docs"] += 1
                c["bytes"] += len(doc.text.encode("utf-8"))
                c[f"fim_{mode or 'none'}"] += 1
                if len(samples) < 8 and rank == 0:
                    head = tok.decode(ids[:64], skip_special_tokens=False)
                    meta = doc.metadata
                    samples.append([meta.get("path", doc.id), meta.get("lang", ""), mode, len(ids), head])
                if split == "val":
                    emit("val", ids)
                    continue
                buffer.append(np.asarray(ids, dtype=dtype))
                buffered += len(ids)
                while buffered > self.shuffle_tokens:
                    k = rng.randrange(len(buffer))
                    buffer[k], buffer[-1] = buffer[-1], buffer[k]
                    buffered -= len(buffer[-1])
                    emit("train", buffer.pop())

        batch, batch_chars = [], 0
        for doc in data:  # batches of at most 256 documents or 1M characters: bounded transient memory
            batch.append(doc)
            batch_chars += len(doc.text)
            if len(batch) == 256 or batch_chars >= 1_000_000:
                flush(batch)
                batch, batch_chars = [], 0
        if batch:
            flush(batch)
        rng.shuffle(buffer)
        for ids in buffer:
            emit("train", ids)
        for split, w in writers.items():
            index = w.close()
            part = {"counts": dict(counts[split]), "samples": samples if split == "train" else [], "index": index}
            Path(w.writer.out_dir, PART).write_text(json.dumps(part))


class MemoryProbe(PipelineStep):
    """Last step of every stage: forwards documents, then records the task's process: its peak resident memory
    (MB) and the CPU seconds it has used so far (both since the process started; see `stage_resources`)."""

    name = "📏 memory"

    def __init__(self, folder: str, stage: str) -> None:
        super().__init__()
        self.folder, self.stage = folder, stage

    def run(self, data, rank: int = 0, world_size: int = 1):
        if data:
            yield from data
        use = resource.getrusage(resource.RUSAGE_SELF)
        record = {"stage": self.stage, "rank": rank, "pid": os.getpid(), "host": os.uname().nodename}
        record |= {"peak_rss_mb": round(use.ru_maxrss / 1024, 1), "cpu_s": round(use.ru_utime + use.ru_stime, 3)}
        os.makedirs(self.folder, exist_ok=True)
        with open(os.path.join(self.folder, f"{self.stage}_{rank:05d}.json"), "w") as f:
            json.dump(record, f)


def stage_resources(folder: Path, stages: list[str]) -> tuple[dict[str, float], dict[str, float]]:
    """(peak resident MB of any process, CPU seconds of all processes) per stage, from the MemoryProbe records.

    A process's counters run from its start: a worker process serves one stage, so its last record is that
    stage's; a process that ran several stages (the driver, when a stage runs in it) is charged the difference
    from its record in the stage before."""
    records: dict[str, list[dict]] = {}
    for p in Path(folder).glob("*.json"):
        r = json.loads(p.read_text())
        records.setdefault(r["stage"], []).append(r)
    peak, cpu, seen = {}, {}, {}
    for stage in stages:
        rs = records.get(stage, [])
        if not rs:
            continue
        peak[stage] = max(r["peak_rss_mb"] for r in rs)
        last: dict[tuple, float] = {}
        for r in rs:
            key = (r.get("host"), r["pid"])
            last[key] = max(last.get(key, 0.0), r["cpu_s"])
        cpu[stage] = round(sum(v - seen.get(k, 0.0) for k, v in last.items()), 3)
        seen |= last
    return peak, cpu


def read_ledger(folder: Path, examples: int) -> tuple[Counter, dict[str, Counter], dict[str, list], int]:
    """(count by reason, count by source and reason, up to `examples` paths per reason, bytes) of the reject files."""
    overall: Counter = Counter()
    per_source: dict[str, Counter] = {}
    listed: dict[str, list] = {}
    total_bytes = 0
    for p in sorted(Path(folder).glob("*.jsonl")):
        with open(p, encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                r = row["reason"]
                overall[r] += 1
                per_source.setdefault(row["source"], Counter())[r] += 1
                total_bytes += row["bytes"]
                if len(listed.setdefault(r, [])) < examples:
                    listed[r].append(row["path"])
    return overall, per_source, listed, total_bytes


class MergeParts(PipelineStep):
    """One task: every task's parts -> `{work}/out/train`, `{work}/out/val` (data.pack.merge_parts), the tokenizer
    beside them, and `{work}/out/stats.json`: every input counted by reason, overall and per source, with up to
    `examples` listed per reason."""

    name = "🧾 merge + stats"

    def __init__(self, work: str, seq_len: int, examples: int) -> None:
        super().__init__()
        self.work, self.seq_len, self.examples = work, seq_len, examples

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        work, out = Path(self.work), Path(self.work, "out")
        out.mkdir(parents=True, exist_ok=True)
        index, counts, samples = {}, {}, []
        for split in ("train", "val"):
            parts = sorted(p for p in (work / "parts" / split).iterdir() if (p / PART).is_file())
            infos = [json.loads((p / PART).read_text()) for p in parts]
            counts[split] = sum((Counter(i["counts"]) for i in infos), Counter())
            samples += [s for i in infos for s in i["samples"]]
            index[split] = merge_parts(parts, out / split, self.seq_len)
        overall, per_source, listed, rejected_bytes = read_ledger(work / "rejects", self.examples)
        kept = counts["train"] + counts["val"]
        if kept["roundtrip_failure"]:
            overall["roundtrip_failure"] = kept["roundtrip_failure"]
        fim = {m: kept[f"fim_{m}"] for m in ("none", "psm", "spm")}
        if index["train"].get("fim_level") == "window":
            fim = {"level": "window"} | {m: index["train"]["window_fim_modes"][m] for m in ("psm", "spm")}
        rss = [json.loads(p.read_text()) for p in sorted((work / "memory").glob("*.json"))]
        peak = {}
        for r in rss:
            peak[r["stage"]] = max(peak.get(r["stage"], 0.0), r["peak_rss_mb"])
        stats = {
            "documents_in": sum(overall.values()) + kept["docs"],  # roundtrip failures are in both: counted once below
            "documents_kept": kept["docs"],
            "bytes_in": rejected_bytes + kept["bytes_in"],
            "bytes_kept": kept["bytes"],
            "removed": dict(sorted(overall.items())),
            "removed_examples": {r: listed[r] for r in sorted(listed)},
            "per_source": {s: dict(sorted(c.items())) for s, c in sorted(per_source.items())},
            "roundtrip_failures": kept["roundtrip_failure"],
            "fim": fim,
            "vocab_size": index["train"]["vocab_size"],
            "tokens": {s: index[s]["n_tokens"] for s in index},
            "sequences": {s: index[s]["n_sequences"] for s in index},
            "documents": {s: index[s]["n_docs"] for s in index},
            "bytes_per_token": round(kept["bytes"] / max(1, sum(index[s]["n_tokens"] for s in index)), 4),
            "peak_rss_mb": peak,
            "samples": samples[:8],
        }
        tok = load_tokenizer(work / "tokenizer.json")
        save_tokenizer(tok, out / "tokenizer.json")
        (out / "stats.json").write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n")
