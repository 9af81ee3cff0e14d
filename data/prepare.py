"""The data stage: sources -> filters -> dedup/decontamination -> tokenizer -> FIM -> packed token shards.

    python -m data.prepare                               # CPU default (conf/data/default.yaml) -> outputs/default/data
    python -m data.prepare run.name=exp1 data=smoke      # micro scale, seconds
    python -m data.prepare data=hub                      # Hugging Face hub sources (needs network)
    python -m data.prepare data.tokenizer.vocab_size=8192 data.fim.rate=0.1
    make data

The stage runs in one process (no torchrun: it is not a training job); `data.num_proc` worker processes run the
Python-bound per-document steps (filters, MinHash, decontamination) through `datasets.map`; tokenization runs in the
main process, where `tokenizers` already encodes each batch on all cores. Re-running with the same config is a
no-op (the manifest matches).

Steps:
1. read every configured source into one `datasets.Dataset` of records (data/sources.py); unusable items are kept as
   rows with a reason so they are counted;
2. quality filters (data/filters.py), then decontamination against HumanEval and the held-out reasoning sets, exact
   and MinHash-LSH near-duplicate removal (data/dedup.py), in corpus order;
3. split documents into train/val by text hash, train the byte-level BPE tokenizer on the train documents
   (data/tokenizer.py);
4. FIM-transform code documents, tokenize, check that every kept document round-trips exactly (failures are
   counted and dropped), pack into shards (data/fim.py, data/pack.py);
5. write the reasoning train/test sets (data/reasoning.py).

Output contract (`outputs/<run>/data/`; later stages find these through `stage_outputs(data_dir)`):

    tokenizer.json        Hugging Face `tokenizers` file; loads in transformers.PreTrainedTokenizerFast
    train/, val/          shard_XXXXX.npy (1-D token ids, uint16 when vocab < 65536) + doc_starts.npy +
                          index.json {seq_len, dtype, vocab_size, eos_id, n_tokens, n_docs, n_sequences, shards,
                          doc_starts_file}; read them with data.loader.PackedDataset / ShardLoader
    reasoning/            datasets.DatasetDict.save_to_disk with splits train/test (data.reasoning columns)
    stats.json            counts: documents and bytes in/kept, removed by reason (overall and per source), FIM
                          modes, round-trip failures, tokens per split, bytes per token, timings
    manifest.json         written last by pipeline.stage.StageRun

Crash safety: train/, val/ and reasoning/ are built in temporary directories beside their final names and renamed
into place only when everything succeeded; tokenizer.json and stats.json are written atomically after them. A
killed run leaves only `.tmp-*` leftovers (removed on the next run) and no manifest, so it simply runs again.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

import hydra
from omegaconf import DictConfig

from data.config import DataConfig
from data.dedup import NearDuplicateIndex, build_contamination_set, humaneval_texts, signature_batch
from data.filters import filter_batch
from data.pack import ShardWriter, assign_splits, split_hash, tokenize_batch
from data.sources import check_sources, iter_sources
from data.tokenizer import EOS, save_tokenizer, train_tokenizer
from pipeline.config import Config, to_config
from pipeline.io import atomic_dir, atomic_write_json
from pipeline.stage import StageRun

STAGE = "data"


def stage_outputs(data_dir: Path) -> dict[str, Path]:
    """Paths of the data stage's artifacts inside `outputs/<run>/data/`."""
    d = Path(data_dir)
    return {
        "tokenizer": d / "tokenizer.json",
        "train": d / "train",
        "val": d / "val",
        "reasoning": d / "reasoning",
        "stats": d / "stats.json",
    }


def _features():
    from datasets import Features, Value

    return Features({k: Value("string") for k in ("text", "path", "lang", "source", "reason")})


def read_sources(dcfg: DataConfig, cache_dir: Path):
    """All source records as a Dataset (arrow files under `cache_dir`)."""
    from datasets import Dataset

    check_sources(dcfg.sources)
    ds = Dataset.from_generator(
        iter_sources,
        gen_kwargs={"specs": dcfg.sources, "seed": dcfg.seed, "max_doc_bytes": dcfg.filters.max_bytes},
        features=_features(),
        cache_dir=str(cache_dir),
    )
    if len(ds) == 0:
        names = [s.name or s.hub_path or ",".join(s.paths) or ",".join(s.roots) for s in dcfg.sources]
        raise ValueError(f"data sources produced no documents at all: {names}")
    return ds


def eval_texts(dcfg: DataConfig) -> list[str]:
    """The evaluation texts the corpus is decontaminated against."""
    texts: list[str] = []
    if dcfg.decontam.humaneval:
        texts += humaneval_texts()
    if dcfg.decontam.reasoning and dcfg.reasoning.enabled:
        from data.reasoning import held_out_texts

        r = dcfg.reasoning
        texts += held_out_texts(kinds=r.kinds, n_test=r.n_test, seed=dcfg.seed, difficulty=r.difficulty)
    return texts


def filter_and_dedup(ds, dcfg: DataConfig):
    """Set `reason` on every removed row: quality filters, contamination, exact and near duplicates."""
    from tqdm.auto import tqdm

    nproc = dcfg.num_proc if dcfg.num_proc > 1 and len(ds) >= 2 * dcfg.num_proc else None
    ds = ds.map(
        filter_batch, batched=True, batch_size=64, num_proc=nproc, fn_kwargs={"cfg": dcfg.filters}, desc="filters"
    )
    contamination = build_contamination_set(eval_texts(dcfg), dcfg.decontam.ngram) if dcfg.decontam.enabled else None
    ds = ds.map(
        signature_batch,
        batched=True,
        batch_size=64,
        num_proc=nproc,
        fn_kwargs={"dedup": dcfg.dedup, "contamination": contamination},
        desc="decontam + minhash",
    )
    index = NearDuplicateIndex(dcfg.dedup.threshold, dcfg.dedup.num_perm)
    seen: set[str] = set()
    reasons: list[str] = []
    cols = ds.select_columns(["reason", "exact", "minhash"])
    for batch in tqdm(cols.iter(batch_size=1000), total=(len(ds) + 999) // 1000, desc="dedup"):
        for reason, key, sig in zip(batch["reason"], batch["exact"], batch["minhash"]):
            if not reason:
                if dcfg.dedup.exact and key in seen:
                    reason = "exact_duplicate"
                elif dcfg.dedup.near and index.seen_before(sig):
                    reason = "near_duplicate"
                else:
                    seen.add(key)
            reasons.append(reason)
    return ds.remove_columns(["reason", "exact", "minhash"]).add_column("reason", reasons), contamination


def count_reasons(ds) -> tuple[dict, dict]:
    """Removed-document counts by reason, overall and per source."""
    overall: Counter = Counter()
    per_source: dict[str, Counter] = {}
    for src, reason in zip(ds["source"], ds["reason"]):
        overall[reason or "kept"] += 1
        per_source.setdefault(src, Counter())[reason or "kept"] += 1
    return dict(sorted(overall.items())), {s: dict(sorted(c.items())) for s, c in per_source.items()}


def build(dcfg: DataConfig, out_dir: Path, tracker=None) -> tuple[dict[str, Path], dict]:
    """Run the whole data pipeline into `out_dir`; return (outputs, metrics). Artifacts appear only on success."""
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    outs = stage_outputs(out_dir)
    timings: dict[str, float] = {}
    t = time.time()

    def lap(name: str) -> None:
        nonlocal t
        timings[name] = round(time.time() - t, 3)
        t = time.time()

    cache_dir = Path(tempfile.mkdtemp(prefix=".tmp-cache-", dir=out_dir))
    try:
        with contextlib.ExitStack() as stack:
            tmp = {k: stack.enter_context(atomic_dir(outs[k])) for k in ("train", "val")}
            if dcfg.reasoning.enabled:
                tmp["reasoning"] = stack.enter_context(atomic_dir(outs["reasoning"]))
            for d in tmp.values():
                d.chmod(0o755)  # mkdtemp makes 0700 directories; artifacts are meant to be shared

            records = read_sources(dcfg, cache_dir)
            bytes_in = sum(len(x.encode("utf-8", "surrogatepass")) for x in records["text"])
            lap("read")
            ds, contamination = filter_and_dedup(records, dcfg)
            removed, per_source = count_reasons(ds)
            lap("filter_dedup")
            kept = ds.filter(lambda rs: [r == "" for r in rs], batched=True, input_columns=["reason"], desc="kept")
            if len(kept) == 0:
                top = max((r for r in removed if r != "kept"), key=removed.get)
                raise ValueError(
                    f"every document was removed (by reason: {removed}); most by {top!r}: relax that filter or "
                    "check the sources"
                )
            is_val = assign_splits([split_hash(x) for x in kept["text"]], dcfg.pack.val_fraction)
            kept = kept.add_column("split", ["val" if v else "train" for v in is_val])
            train_docs = kept.filter(lambda s: [x == "train" for x in s], batched=True, input_columns=["split"])
            if len(train_docs) == 0:
                raise ValueError("no document left for train/: lower data.pack.val_fraction or add documents")
            lap("split")

            def text_batches():
                fed = 0
                for b in train_docs.select_columns(["text"]).iter(batch_size=256):
                    yield b["text"]
                    fed += sum(map(len, b["text"]))
                    if dcfg.tokenizer.max_train_bytes and fed >= dcfg.tokenizer.max_train_bytes:
                        return

            tok = train_tokenizer(text_batches(), dcfg.tokenizer.vocab_size, dcfg.tokenizer.min_frequency)
            lap("tokenizer")

            # in this process: `tokenizers` encodes a batch on all cores itself (worker processes measured slower)
            tokd = kept.map(
                tokenize_batch,
                batched=True,
                batch_size=512,
                remove_columns=["text"],
                fn_kwargs={
                    "tokenizer": tok,
                    "seed": dcfg.seed,
                    "fim_rate": dcfg.fim.rate,
                    "spm_rate": dcfg.fim.spm_rate,
                    "fim_langs": list(dcfg.fim.languages),
                },
                desc="FIM + tokenize",
            )
            roundtrip_failures = tokd.num_rows - sum(tokd["roundtrip_ok"])
            fim_modes = Counter(tokd["fim"])
            samples = [
                [p, lang, mode, len(ids), tok.decode(ids[:64], skip_special_tokens=False)]
                for p, lang, mode, ids in zip(
                    *(tokd.select(range(min(8, len(tokd))))[c] for c in ("path", "lang", "fim", "ids"))
                )
            ]
            lap("tokenize")

            eos = tok.token_to_id(EOS)
            vocab = tok.get_vocab_size()
            index = {}
            for split in ("train", "val"):
                part = tokd.filter(
                    lambda s, ok, split=split: [x == split and o for x, o in zip(s, ok)],
                    batched=True,
                    input_columns=["split", "roundtrip_ok"],
                )
                if split == "train":
                    part = part.shuffle(seed=dcfg.seed)  # mix documents within sequences; the loader shuffles those
                writer = ShardWriter(tmp[split], vocab, eos, dcfg.pack.tokens_per_shard)
                arrow = part.select_columns(["ids"]).with_format("arrow")
                for batch in tqdm(arrow.iter(batch_size=512), total=(len(part) + 511) // 512, desc=f"pack {split}"):
                    col = batch.column("ids").combine_chunks()
                    values, offsets = col.values.to_numpy(), col.offsets.to_numpy()
                    for a, b in zip(offsets[:-1], offsets[1:]):
                        writer.add(values[a:b])
                index[split] = writer.close(dcfg.pack.seq_len)
            lap("pack")

            if dcfg.reasoning.enabled:
                from data.reasoning import write_reasoning_sets

                r = dcfg.reasoning
                write_reasoning_sets(
                    tmp["reasoning"],
                    kinds=r.kinds,
                    n_train=r.n_train,
                    n_test=r.n_test,
                    seed=dcfg.seed,
                    difficulty=r.difficulty,
                    cot_fraction=r.cot_fraction,
                )
                lap("reasoning")

            kept_bytes = sum(len(x.encode("utf-8")) for x in kept["text"])
            stats = {
                "documents_in": len(records),
                "documents_kept": len(kept) - roundtrip_failures,
                "bytes_in": bytes_in,
                "bytes_kept": kept_bytes,
                "removed": {k: v for k, v in removed.items() if k != "kept"}
                | ({"roundtrip_failure": roundtrip_failures} if roundtrip_failures else {}),
                "per_source": per_source,
                "contamination_ngrams": len(contamination) if contamination else 0,
                "roundtrip_failures": roundtrip_failures,
                "fim": {"none": fim_modes.get("", 0), "psm": fim_modes.get("psm", 0), "spm": fim_modes.get("spm", 0)},
                "vocab_size": vocab,
                "tokens": {s: index[s]["n_tokens"] for s in index},
                "sequences": {s: index[s]["n_sequences"] for s in index},
                "documents": {s: index[s]["n_docs"] for s in index},
                "bytes_per_token": round(kept_bytes / max(1, sum(index[s]["n_tokens"] for s in index)), 4),
                "timings_s": timings,
            }
        # every directory above is now in place; the single files follow
        save_tokenizer(tok, outs["tokenizer"])
        atomic_write_json(outs["stats"], stats)
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)

    metrics = flat_metrics(stats)
    if tracker is not None:
        tracker.log(metrics)
        tracker.log_table("filter_counts", ["reason", "count"], [[k, v] for k, v in sorted(removed.items())])
        tracker.log_table("samples", ["path", "lang", "fim", "n_tokens", "first_64_tokens"], samples)
    outputs = {k: p for k, p in outs.items() if p.exists()}
    return outputs, metrics


def flat_metrics(stats: dict) -> dict:
    """The stats as one flat dict of numbers (manifest metrics, W&B summary)."""
    m = {k: v for k, v in stats.items() if isinstance(v, int | float)}
    for group in ("removed", "fim", "tokens", "sequences", "documents"):
        m.update({f"{group}/{k}": v for k, v in stats[group].items()})
    return m


def stage_inputs(dcfg: DataConfig) -> dict[str, Path]:
    """Local source files as hashed stage inputs (a changed file re-runs the stage)."""
    return {
        f"source{i}_{j}": Path(p)
        for i, s in enumerate(dcfg.sources)
        if s.kind == "files"
        for j, p in enumerate(s.paths)
    }


def run(cfg: Config) -> dict:
    """Build the data stage's outputs for `cfg` under outputs/<run>/data/ (skipped when up to date)."""
    check_sources(cfg.data.sources)  # a missing path is a user error, named before anything starts
    stage = StageRun(cfg, STAGE, inputs=stage_inputs(cfg.data))
    if stage.up_to_date():
        return stage.previous_metrics()
    with stage:
        outputs, metrics = build(cfg.data, stage.dir, tracker=stage.tracker)
        return stage.finish(outputs, metrics)


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(dcfg: DictConfig) -> None:
    metrics = run(to_config(dcfg))
    print(json.dumps(metrics, indent=1))


if __name__ == "__main__":
    main()
