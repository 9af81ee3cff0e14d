"""The data stage: sources -> filters -> decontamination -> exact + near dedup -> tokenizer -> FIM -> packed shards.

    python -m data.prepare                               # CPU default (conf/data/default.yaml) -> outputs/default/data
    python -m data.prepare run.name=exp1 data=smoke      # micro scale, seconds
    python -m data.prepare data=hub                      # Hugging Face hub sources (needs network)
    python -m data.prepare data.tokenizer.vocab_size=8192 data.fim.rate=0.1 data.fim.level=window
    python -m data.prepare data.num_proc=8 data.tasks=64                       # 64 datatrove tasks, 8 at a time
    python -m data.prepare data.executor=slurm data.tasks=1000 data.slurm.partition=cpu \
        data.slurm.env_command='source /shared/venv/bin/activate' run.root=/shared/outputs
    make data

The stage is a chain of datatrove pipelines (data/engine.py has the table of stages and steps): this process lists
the inputs, hands the work to datatrove's executor (local processes, or Slurm job arrays on a cluster, no torchrun:
it is not a training job), waits, and publishes the results. Re-running with the same config and the same inputs
is a no-op (the manifest matches): the inputs' fingerprint (every listed file's name, size and modification time,
and content hashes of `files` sources up to 1 GiB, data/sources.py) is part of the stage's config, so adding,
editing or removing a file re-runs the stage.

Steps (datatrove steps, data/steps.py unless named):
1. list every source's inputs (data/sources.py); anything that cannot be an input is counted with a reason;
2. read them (data/readers.py), quality filters (data/filters.py), decontamination against HumanEval and the
   held-out reasoning sets, exact and MinHash near-duplicate removal (data/dedup.py);
3. train the byte-level BPE tokenizer on a bounded uniform sample of the train documents (data/tokenizer.py);
4. FIM-transform code documents (or windows), tokenize, check that every kept document round-trips exactly
   (failures are counted and dropped), pack into shards (data/fim.py, data/pack.py);
5. write the reasoning train/test sets (data/reasoning.py).

Output contract (`outputs/<run>/data/`; later stages find these through `data.outputs.stage_outputs(data_dir)`):

    tokenizer.json        Hugging Face `tokenizers` file; loads in transformers.PreTrainedTokenizerFast
    train/, val/          shard_XXXXX.npy (1-D token ids, uint16 when vocab < 65536) + doc_starts.npy +
                          index.json {seq_len, dtype, vocab_size, eos_id, n_tokens, n_docs, n_sequences, shards,
                          doc_starts_file, fim_level}; read them with data.loader.PackedDataset / ShardLoader
    reasoning/            datasets.DatasetDict.save_to_disk with splits train/test (data.reasoning columns)
    stats.json            counts: documents and bytes in/kept, removed by reason (overall, per source, and up to
                          data.report_examples paths per reason), FIM modes, round-trip failures, tokens per split,
                          bytes per token, peak memory per datatrove stage, timings
    manifest.json         written last by pipeline.stage.StageRun

Crash safety: datatrove works in `work-<key>/` (the key is the hash of the config and the inputs' fingerprint), so a
killed run started again with the same config resumes from the tasks that completed; train/, val/ and reasoning/
are then built in temporary directories beside their final names and renamed into place only when everything
succeeded; tokenizer.json and stats.json are written atomically after them, and the work directory is removed. A
killed run leaves no manifest, so it simply runs again.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

from data.config import DataConfig
from data.dedup import build_contamination_set, humaneval_texts
from data.engine import run_stages, start_fork_server
from data.outputs import stage_outputs
from data.reasoning import held_out_texts, write_reasoning_sets
from data.sources import check_sources, list_items
from data.steps import MemoryProbe, stage_resources
from pipeline.config import Config, as_dict, to_config
from pipeline.io import atomic_dir, atomic_write_json, atomic_write_text, hash_config
from pipeline.stage import StageRun

STAGE = "data"


def eval_texts(dcfg: DataConfig) -> list[str]:
    """The evaluation texts the corpus is decontaminated against."""
    texts: list[str] = []
    if dcfg.decontam.humaneval:
        texts += humaneval_texts()
    if dcfg.decontam.reasoning and dcfg.reasoning.enabled:
        r = dcfg.reasoning
        texts += held_out_texts(kinds=r.kinds, n_test=r.n_test, seed=dcfg.seed, difficulty=r.difficulty)
    return texts


def stage_config(dcfg: DataConfig, fingerprint: str) -> dict:
    """What the work directory (`work-<key>/`, resumable datatrove tasks) is keyed on: the config and the corpus."""
    return {**as_dict(dcfg), "inputs_fingerprint": fingerprint}


def _work_dir(out_dir: Path, key: str) -> Path:
    """`work-<key>/` for this config and these inputs; work directories of other keys are stale and removed."""
    for old in out_dir.glob("work-*"):
        if old.name != f"work-{key}":
            shutil.rmtree(old, ignore_errors=True)
    work = out_dir / f"work-{key}"
    work.mkdir(parents=True, exist_ok=True)
    return work


def _move_contents(src: Path, dst: Path) -> None:
    for p in src.iterdir():
        os.replace(p, dst / p.name)


def build(dcfg: DataConfig, out_dir: Path, tracker=None, listing: tuple[list, str] | None = None):
    """Run the whole data pipeline into `out_dir`; return (outputs, metrics). Artifacts appear only on success."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    outs = stage_outputs(out_dir)
    t0, cpu0 = time.time(), time.process_time()  # setup's CPU counts from here (a caller may have run builds before)
    check_sources(dcfg.sources)
    start_fork_server(dcfg)  # its imports overlap the listing
    items, fingerprint = listing or list_items(dcfg.sources, dcfg.seed)
    work = _work_dir(out_dir, hash_config(stage_config(dcfg, fingerprint))[:16])
    atomic_write_text(work / "items.jsonl", "".join(json.dumps(it) + "\n" for it in items))
    contamination = build_contamination_set(eval_texts(dcfg), dcfg.decontam.ngram) if dcfg.decontam.enabled else None
    t_list = time.time() - t0
    list(MemoryProbe(str(work / "memory"), "setup").run(None))  # this process's resources so far: listing, setup
    timings = run_stages(dcfg, work, contamination)
    timings = {"list": round(t_list, 3), **timings}
    stats = json.loads((work / "out" / "stats.json").read_text())

    with contextlib.ExitStack() as stack:
        tmp = {k: stack.enter_context(atomic_dir(outs[k])) for k in ("train", "val")}
        for k in ("train", "val"):
            _move_contents(work / "out" / k, tmp[k])
        if dcfg.reasoning.enabled:
            t = time.time()
            r = dcfg.reasoning
            write_reasoning_sets(
                stack.enter_context(atomic_dir(outs["reasoning"])),
                kinds=r.kinds,
                n_train=r.n_train,
                n_test=r.n_test,
                seed=dcfg.seed,
                difficulty=r.difficulty,
                cot_fraction=r.cot_fraction,
            )
            timings["reasoning"] = round(time.time() - t, 3)
    # every directory above is now in place; the single files follow
    os.replace(work / "out" / "tokenizer.json", outs["tokenizer"])
    stages = ["setup", *(s for s in timings if s not in ("list", "reasoning", "slurm"))]
    peak, cpu = stage_resources(work / "memory", stages)
    cpu["setup"] = round(cpu["setup"] - cpu0, 3)  # the probe counts from the process's start
    samples = stats.pop("samples")
    stats |= {
        "contamination_ngrams": len(contamination) if contamination else 0,
        "peak_rss_mb": peak,
        "cpu_s": cpu,
        "timings_s": timings,
        "tasks": dcfg.n_tasks,
    }
    atomic_write_json(outs["stats"], stats)
    shutil.rmtree(work, ignore_errors=True)

    metrics = flat_metrics(stats)
    if tracker is not None:
        tracker.log(metrics)
        tracker.log_table("filter_counts", ["reason", "count"], [[k, v] for k, v in sorted(stats["removed"].items())])
        tracker.log_table("samples", ["path", "lang", "fim", "n_tokens", "first_64_tokens"], samples)
    outputs = {k: p for k, p in outs.items() if p.exists()}
    return outputs, metrics


def flat_metrics(stats: dict) -> dict:
    """The stats as one flat dict of numbers (manifest metrics, W&B summary)."""
    m = {k: v for k, v in stats.items() if isinstance(v, int | float)}
    for group in ("removed", "fim", "tokens", "sequences", "documents"):
        m.update({f"{group}/{k}": v for k, v in stats[group].items() if isinstance(v, int | float)})
    return m


def run(cfg: Config) -> dict:
    """Build the data stage's outputs for `cfg` under outputs/<run>/data/ (skipped when up to date)."""
    check_sources(cfg.data.sources)  # a missing path is a user error, named before anything starts
    listing = list_items(cfg.data.sources, cfg.data.seed)
    stage = StageRun(cfg, STAGE, digests={"corpus": listing[1]})
    if stage.up_to_date():
        return stage.previous_metrics()
    with stage:
        outputs, metrics = build(cfg.data, stage.dir, tracker=stage.tracker, listing=listing)
        return stage.finish(outputs, metrics)


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(dcfg: DictConfig) -> None:
    metrics = run(to_config(dcfg))
    print(json.dumps(metrics, indent=1))


if __name__ == "__main__":
    main()
