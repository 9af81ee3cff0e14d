"""The data stage as a chain of datatrove pipelines, run by datatrove's local or Slurm executor.

    stage            tasks      steps
    filter           N          ItemReader -> Unusable -> Quality -> Decontaminate -> ExactSignatures
                                -> JsonlWriter(filtered/)
    exact_find       1          datatrove ExactFindDedups
    unique           N          RankFileReader(filtered/) -> datatrove ExactDedupFilter -> TokenizerSample
                                -> JsonlWriter(unique/) -> MinhashSignatures
    minhash_buckets  bands      datatrove MinhashDedupBuckets -> VerifyPairs (estimated Jaccard >= threshold)
    minhash_cluster  1          datatrove MinhashDedupCluster
    tokenizer        1          TrainTokenizer (bounded sample of the surviving train documents -> tokenizer.json,
                                the split rule)
    pack             N          RankFileReader(unique/) -> datatrove MinhashDedupFilter -> TokenizePack
    merge            1          MergeParts (parts -> train/, val/, stats.json)

N = `data.tasks` (default `data.num_proc`). Every stage ends with a MemoryProbe. Each filter and dedup filter
writes the documents it removes (path, source, reason, bytes) to `rejects/`; MergeParts counts them. A stage's
tasks communicate only through files in the work directory, so the same chain runs as processes on this machine
(`data.executor=local`, `data.num_proc` at a time) or as Slurm job arrays chained by dependencies
(`data.executor=slurm`, the work directory on a shared filesystem), and a killed run resumes from the tasks that
completed (datatrove's completion markers), since the work directory's name is fixed by the config.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import multiprocess
from datatrove.executor import LocalPipelineExecutor, SlurmPipelineExecutor
from datatrove.pipeline.dedup import MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter
from datatrove.pipeline.dedup.exact_dedup import ExactDedupFilter, ExactFindDedups
from datatrove.pipeline.writers import JsonlWriter
from multiprocess import forkserver
from tqdm.auto import tqdm

from data.config import DataConfig
from data.dedup import Contamination, ExactSignatures, MinhashSignatures, VerifyPairs, exact_config, minhash_config
from data.readers import ItemReader
from data.steps import (
    Decontaminate,
    MemoryProbe,
    MergeParts,
    Quality,
    RankFileReader,
    RejectWriter,
    TokenizePack,
    TokenizerSample,
    TrainTokenizer,
    Unusable,
)


@dataclass
class Stage:
    name: str
    pipeline: list
    tasks: int


def build_stages(dcfg: DataConfig, work: Path, contamination: Contamination | None) -> list[Stage]:
    """The stages of the table above for this config (exact / near dedup and decontamination as configured)."""
    w = str(work)
    n = dcfg.n_tasks
    rejects = f"{w}/rejects"
    exact, near = dcfg.dedup.exact, dcfg.dedup.near
    xcfg, mcfg = exact_config(), minhash_config(dcfg.dedup)

    def probe(stage: str) -> MemoryProbe:
        return MemoryProbe(f"{w}/memory", stage)

    filt = [
        ItemReader(f"{w}/items.jsonl", dcfg.sources, dcfg.filters.max_bytes),
        Unusable(exclusion_writer=RejectWriter(rejects, "unusable")),
        Quality(dcfg.filters, exclusion_writer=RejectWriter(rejects, "quality")),
    ]
    if contamination is not None:
        filt.append(Decontaminate(contamination, exclusion_writer=RejectWriter(rejects, "decontam")))
    if exact:
        filt.append(ExactSignatures(f"{w}/exact/sigs", config=xcfg))
    filt += [JsonlWriter(f"{w}/filtered", compression=None), probe("filter")]
    stages = [Stage("filter", filt, n)]
    if exact:
        stages.append(Stage("exact_find", [ExactFindDedups(f"{w}/exact/sigs", f"{w}/exact/dups", xcfg)], 1))

    unique = [RankFileReader(f"{w}/filtered")]
    if exact:
        writer = RejectWriter(rejects, "exact", "exact_duplicate")
        unique.append(ExactDedupFilter(f"{w}/exact/dups", xcfg, exclusion_writer=writer))
    budget = -(-dcfg.tokenizer.max_train_bytes // n)
    unique += [TokenizerSample(f"{w}/sample", budget), JsonlWriter(f"{w}/unique", compression=None)]
    if near:
        unique.append(MinhashSignatures(f"{w}/minhash/sigs", mcfg))
    stages.append(Stage("unique", unique, n))

    pack = [RankFileReader(f"{w}/unique")]
    if near:
        m = f"{w}/minhash"
        buckets = MinhashDedupBuckets(f"{m}/sigs", f"{m}/buckets", config=mcfg)
        verify = VerifyPairs(f"{m}/buckets", f"{m}/sigs", f"{m}/verified", mcfg, dcfg.dedup.threshold)
        stages += [
            Stage("minhash_buckets", [buckets, verify], mcfg.num_buckets),
            Stage("minhash_cluster", [MinhashDedupCluster(f"{m}/verified", f"{m}/remove", config=mcfg)], 1),
        ]
        writer = RejectWriter(rejects, "near", "near_duplicate")
        pack.append(MinhashDedupFilter(f"{m}/remove", exclusion_writer=writer))
    tok = dcfg.tokenizer
    removed = f"{w}/minhash/remove" if near else ""
    train = TrainTokenizer(w, tok.vocab_size, tok.min_frequency, dcfg.pack.val_fraction, removed=removed)
    stages.append(Stage("tokenizer", [train], 1))
    # tasks running side by side on this machine share its cores (Slurm gives each task its own)
    side_by_side = min(dcfg.num_proc, n) if dcfg.executor == "local" else 1
    threads = max(1, (os.cpu_count() or 1) // side_by_side) if side_by_side > 1 else 0
    pack.append(TokenizePack(w, dcfg.fim, dcfg.pack, dcfg.seed, threads=threads))
    stages.append(Stage("pack", pack, n))
    stages.append(Stage("merge", [MergeParts(w, dcfg.pack.seq_len, dcfg.report_examples)], 1))
    for s in stages:
        if not isinstance(s.pipeline[-1], MemoryProbe):
            s.pipeline.append(probe(s.name))
    return stages


def start_fork_server(dcfg: DataConfig) -> None:
    """Start the process datatrove's local executor forks its workers from, when there will be workers.

    datatrove starts each stage's worker processes from a fork server (one clean process, forked for each worker:
    safe whatever threads this process runs). The fork server imports the main module (as every worker would: the
    CLI's imports bring torch) and the steps' modules once, before its first fork, so that a worker starts with
    them loaded instead of importing them again for every stage. Started before the inputs are listed, it imports
    them while this process lists. Starting it again is a no-op."""
    if dcfg.executor != "local" or min(dcfg.num_proc, dcfg.n_tasks) < 2:
        return
    main = getattr(sys.modules["__main__"], "__spec__", None)  # `python -m data.prepare`: a module, not a path
    name = main.name if main and main.name else ""
    # a package's __main__ is never imported under its own name (as multiprocessing's workers do not): it may run
    # its program unguarded
    modules = ["__main__", *([name] if name and not name.endswith("__main__") else []), __name__]
    multiprocess.get_context("forkserver").set_forkserver_preload(modules)
    forkserver.ensure_running()


def run_local(stages: list[Stage], work: Path, workers: int) -> dict[str, float]:
    """Each stage in turn on this machine, `workers` tasks at a time (in this process when 1); seconds per stage."""
    timings = {}
    for s in tqdm(stages, desc="data stage (datatrove)", unit="stage"):
        t = time.time()
        ex = LocalPipelineExecutor(
            s.pipeline, tasks=s.tasks, workers=min(workers, s.tasks), logging_dir=str(work / "logs" / s.name)
        )
        ex.run()
        if missing := ex.get_incomplete_ranks():
            raise RuntimeError(f"data stage {s.name!r}: tasks {missing} did not complete; see {work}/logs/{s.name}")
        timings[s.name] = round(time.time() - t, 3)
    return timings


def _queued(job_ids: list[str]) -> bool:
    """Whether any of the Slurm jobs is still pending or running (squeue forgets finished jobs)."""
    r = subprocess.run(["squeue", "-h", "-o", "%i", "-j", ",".join(job_ids)], capture_output=True, text=True)
    return r.returncode == 0 and bool(r.stdout.strip())


def run_slurm(stages: list[Stage], work: Path, dcfg: DataConfig) -> dict[str, float | None]:
    """Submit the chain as Slurm job arrays (each stage depends on the one before) and wait for the last; the
    stages' names (no time of their own) and the seconds in all."""
    t0 = time.time()
    s_cfg = dcfg.slurm
    executors, previous = [], None
    for s in stages:
        previous = SlurmPipelineExecutor(
            s.pipeline,
            tasks=s.tasks,
            time=s_cfg.time,
            partition=s_cfg.partition,
            cpus_per_task=s_cfg.cpus_per_task,
            mem_per_cpu_gb=s_cfg.mem_per_cpu_gb,
            qos=s_cfg.qos,
            env_command=s_cfg.env_command or None,
            job_name=f"data_{s.name}",
            logging_dir=str(work / "logs" / s.name),
            depends=previous,
        )
        executors.append(previous)
    executors[-1].run()  # launches the dependencies first, then returns
    deadline = time.time() + s_cfg.timeout_h * 3600
    while executors[-1].get_incomplete_ranks():
        ids = [str(e.job_id) for e in executors if e.job_id not in (None, -1)]
        if time.time() > deadline:
            raise TimeoutError(f"data stage: Slurm jobs {ids} not done after {s_cfg.timeout_h} h; see {work}/logs")
        if not _queued(ids) and executors[-1].get_incomplete_ranks():
            failed = next(s.name for s, e in zip(stages, executors) if e.get_incomplete_ranks())
            raise RuntimeError(f"data stage: Slurm jobs ended but stage {failed!r} is incomplete; see {work}/logs")
        time.sleep(s_cfg.poll_s)
    return {s.name: None for s in stages} | {"slurm": round(time.time() - t0, 3)}


def run_stages(dcfg: DataConfig, work: Path, contamination: Contamination | None) -> dict[str, float | None]:
    """Build the stages for `dcfg` and run them on its executor; seconds per stage (in all, for Slurm)."""
    (work / "exact" / "dups").mkdir(parents=True, exist_ok=True)
    stages = build_stages(dcfg, work, contamination)
    if dcfg.executor == "slurm":
        return run_slurm(stages, work, dcfg)
    start_fork_server(dcfg)
    return run_local(stages, work, dcfg.num_proc)
