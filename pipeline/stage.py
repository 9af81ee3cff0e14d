"""The run-directory contract: `outputs/<run>/<stage>/manifest.json`, skip-if-unchanged, and the stage's tracker.

A stage does:

    stage = StageRun(cfg, "pretrain", inputs={"shards": data_dir / "train"})
    if stage.up_to_date():
        return stage.previous_metrics()          # same work, same inputs, outputs intact: nothing to do
    with stage:                                   # takes the stage's lock, opens the W&B run, starts the clock
        loss = work(stage.cfg)                    # every config field read from here on is part of the work key
        stage.tracker.log({"loss": loss}, step=1)
        return stage.finish(outputs={"ckpt": ckpt_dir}, metrics={"val_loss": 2.1})

The work key is derived, not listed: inside `with stage:` every field read on the stage's `Config` tree (by the
stage or by library code it hands a section to) is recorded with its value (`pipeline.config_reads`), less the
fields in `NOT_WORK` that cannot change a result (the run's name and root, W&B, the stage list). The next launch
re-evaluates those paths on its own config: the same values and inputs skip the stage (or resume it), a changed
one re-runs it, and a setting the stage never read changes nothing.

The manifest holds the stage name, the config it read (`config`, nested; `reads`, by path), the code version (git
sha + dirty flag), the content hash of every input and output (with the W&B artifact each output was logged as),
the wall time and the key metrics. It is written last and atomically, so a stage killed half-way has no manifest
and runs again; `up_to_date` also re-checks that each output still has its recorded hash.

Resuming only continues the same work. Entering a stage records the work in progress (the reads so far, updated as
the stage reads more, the input hashes and the W&B run id) in `in_progress.json`. With the trainers' `resume=auto`,
a `checkpoints/` folder left by work under another key (a changed schedule, new data, or a folder from before this
record existed) is moved, with the logs, figures and W&B runs of that attempt, to `superseded/<time>-<key>/` rather
than resumed under the new config, and the stage starts over under a new W&B run; a stage killed and re-run with
the same config and inputs finds its checkpoints where they were and continues the same W&B run. Sections that
only lay the work out on processes (`layout=("parallel",)` for pretraining) are not part of the resume key: a run
saved on N ranks resumes on M. `resume=none` sets any old folder aside. An explicit `resume=<checkpoint>` inside
this stage's folder keeps it: that is how a finished run is extended on purpose (more steps from its last
checkpoint), knowing that its schedule changes.

One launch at a time: `with stage:` takes an OS lock on `<stage>/.lock` (fcntl, released by the kernel when the
process ends, so a `kill -9` leaves no stale lock); a second launch of the same stage of the same run is refused at
once, naming the process that holds it.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.config_reads import ConfigReads, lookup, plain
from pipeline.io import atomic_write_json, clean_temporaries, hash_config, hash_path
from pipeline.lineage import artifact_name, artifact_type, consumed
from pipeline.tracking import FIGURES, RUN_RECORD, Tracker, new_run_id, sweep_group, sweep_overrides

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
IN_PROGRESS = "in_progress.json"
LOCK = ".lock"
# config fields that never change what a stage computes: reading them is not part of any work key
NOT_WORK = ("run.name", "run.root", "run.data_from", "wandb", "pipeline")


class StageBusyError(RuntimeError):
    """Another process is running this stage of this run."""


def git_version(cwd: Path | None = None) -> dict[str, Any]:
    """Code version of the repository holding this file: sha and whether the tree has uncommitted changes."""
    cwd = cwd or Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        status = ["git", "status", "--porcelain", "--untracked-files=no"]
        dirty = subprocess.run(status, cwd=cwd, capture_output=True, text=True, timeout=10).stdout.strip()
        return {"sha": sha or None, "dirty": bool(dirty)}
    except (OSError, subprocess.SubprocessError):
        return {"sha": None, "dirty": None}


def read_manifest(stage_dir: Path) -> dict | None:
    path = Path(stage_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, OSError):
        return None


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (json.JSONDecodeError, OSError):
        return None


def _barrier() -> None:
    """A barrier across the job's processes when torch.distributed is running (torch imported only then)."""
    if "torch" in sys.modules:
        import torch.distributed as dist  # deferred: torch only when the job already imported it

        if dist.is_available() and dist.is_initialized():
            dist.barrier()


def _within(path: str, sections: tuple[str, ...]) -> bool:
    return any(path == s or path.startswith(s + ".") for s in sections)


def nested(reads: dict[str, Any]) -> dict:
    """{"train.optim.lr": 0.1} -> {"train": {"optim": {"lr": 0.1}}} (the manifest's readable `config`)."""
    out: dict = {}
    for path, value in sorted(reads.items()):
        *parents, leaf = path.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def lock_stage(stage_dir: Path, stage: str, run: str) -> int:
    """Hold `<stage_dir>/.lock` (an exclusive, non-blocking flock) and write our pid into it; the open descriptor
    is returned, and closing it (or the process ending) releases the lock."""
    path = Path(stage_dir) / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        os.close(fd)
        raise StageBusyError(
            f"stage {stage!r} of run {run!r} is already running ({holder or 'pid unknown'}); wait for it to end, "
            f"or stop that process, before launching it again (lock: {path})"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {platform.node()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0)
    return fd


class StageRun:
    """One execution of one stage inside a pipeline run directory."""

    def __init__(
        self,
        cfg: Any,
        stage: str,
        *,
        inputs: dict[str, Path] | None = None,
        digests: dict[str, str] | None = None,
        rank: int = 0,
        resume: str = "auto",
        layout: tuple[str, ...] = (),
    ) -> None:
        self.cfg = cfg
        self.resume = resume  # the trainer's resume setting: auto | none | a checkpoint path
        # config sections that say how the work is spread over processes, not what it computes (e.g. "parallel"):
        # they stay out of the resume key, so a checkpoint saved on N ranks resumes on M under resume=auto
        self.layout = tuple(layout)
        self.stage = stage
        self.run_name = cfg.run.name
        self.dir = Path(cfg.run.root) / cfg.run.name / stage
        self.rank = rank
        self.inputs = {k: Path(v) for k, v in (inputs or {}).items()}
        for name, path in self.inputs.items():
            if not path.exists():
                raise FileNotFoundError(
                    f"stage {stage!r}: input {name!r} not found at {path} (run the upstream stage first)"
                )
        self.dir.mkdir(parents=True, exist_ok=True)
        # inputs that are no path of the run: name -> digest (e.g. the fingerprint of a corpus listing)
        self.digests = dict(digests or {})
        self._input_hashes = {k: hash_path(v) for k, v in self.inputs.items()} | self.digests
        self.reads = ConfigReads(cfg, on_new=self._persist_progress)
        self.wandb_id: str | None = None
        self._t0: float | None = None
        self._lock: int | None = None
        self.tracker: Tracker | None = None

    # ---- the work key -----------------------------------------------------------------------------------------
    def work_reads(self, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
        """The fields read so far that decide the result: {path: value}, less NOT_WORK and `exclude`."""
        return {p: v for p, v in self.reads.reads.items() if not _within(p, NOT_WORK + exclude)}

    def _same_values(self, reads: dict[str, Any] | None, exclude: tuple[str, ...] = ()) -> bool:
        """Whether this launch's config has the recorded values at the recorded paths."""
        if not isinstance(reads, dict):
            return False
        return all(lookup(self.cfg, p) == v for p, v in reads.items() if not _within(p, NOT_WORK + exclude))

    # ---- skip logic -------------------------------------------------------------------------------------------
    def up_to_date(self) -> bool:
        """True when a previous execution finished with the same work and inputs and its outputs are intact."""
        m = read_manifest(self.dir)
        if m is None or not self._same_values(m.get("reads")):
            return False
        if {k: v["sha256"] for k, v in m.get("inputs", {}).items()} != self._input_hashes:
            return False
        for out in m.get("outputs", {}).values():
            p = Path(out["path"])
            if not p.exists() or hash_path(p) != out["sha256"]:
                return False
        return True

    def previous_metrics(self) -> dict:
        m = read_manifest(self.dir) or {}
        return {**m.get("metrics", {}), "skipped": True}

    # ---- lifecycle --------------------------------------------------------------------------------------------
    def _progress_record(self) -> dict:
        return {"reads": self.work_reads(), "inputs": self._input_hashes, "wandb_id": self.wandb_id}

    def _persist_progress(self, _path: str = "") -> None:
        """`in_progress.json` as the reads grow (no fsync: it must survive a killed process, not a power cut)."""
        if self.rank != 0 or self._t0 is None:
            return
        marker = self.dir / IN_PROGRESS
        tmp = marker.with_name(f".tmp-{IN_PROGRESS}")
        tmp.write_text(json.dumps(self._progress_record(), sort_keys=True, default=str))
        os.replace(tmp, marker)

    def _set_aside_stale_work(self) -> bool:
        """Unless this execution resumes the stage's `checkpoints/` (see the module docstring), move them and the
        logs, figures and W&B runs of the attempt that wrote them to `superseded/`, so a fresh start neither resumes
        foreign weights nor appends to old curves. Returns whether the checkpoints are resumed."""
        ckpts = self.dir / "checkpoints"
        previous = _read_json(self.dir / IN_PROGRESS)
        same_work = (
            previous is not None
            and previous.get("inputs") == self._input_hashes
            and self._same_values(previous.get("reads"), exclude=self.layout)
        )
        if self.resume == "none":
            keep = False
        elif self.resume == "auto":
            keep = same_work
        else:  # an explicit checkpoint: keep the folder when it is the one named
            keep = ckpts.resolve() in Path(self.resume).resolve().parents
        resumed = keep and ckpts.is_dir()
        attempt = [ckpts, *self.dir.glob("*.jsonl"), self.dir / FIGURES, self.dir / "wandb", self.dir / RUN_RECORD]
        stale = [] if resumed else [p for p in attempt if p.exists()]
        if stale:
            old = hash_config((previous or {}).get("reads"))[:12] if previous else "unknown"
            moved = self.dir / "superseded" / f"{time.strftime('%Y%m%dT%H%M%S')}-{old}"
            moved.mkdir(parents=True, exist_ok=True)
            for p in stale:
                p.rename(moved / p.name)
            if ckpts in stale:
                why = "resume=none" if self.resume == "none" else "written under another config or other inputs"
                log.info("stage %r: starting over; checkpoints/ (%s) moved to %s", self.stage, why, moved)
        if resumed and previous is not None:
            self.wandb_id = previous.get("wandb_id")
            if same_work:  # the dead attempt's reads are this work's too (it may have read more before dying)
                prev = previous.get("reads") or {}
                self.reads.reads.update({p: v for p, v in prev.items() if not _within(p, self.layout)})
        return resumed

    def __enter__(self) -> StageRun:
        if self.rank == 0:
            self._lock = lock_stage(self.dir, self.stage, self.run_name)
        try:
            self._enter()
        except BaseException:
            self._release()
            raise
        return self

    def _enter(self) -> None:
        resumed = False
        if self.rank == 0:
            clean_temporaries(self.dir)
            # a re-run invalidates the old manifest before anything is overwritten
            (self.dir / MANIFEST).unlink(missing_ok=True)
            resumed = self._set_aside_stale_work()
        _barrier()  # other ranks look for checkpoints only once rank 0 has set foreign ones aside
        self.wandb_id = self.wandb_id or new_run_id()
        self._t0 = time.time()
        self._persist_progress()
        w = self.cfg.wandb
        tags = sweep_overrides()
        name = f"{self.run_name}/{self.stage}" + (f" [{', '.join(tags)}]" if tags else "")
        self.tracker = Tracker(
            self.dir,
            run_group=w.group or sweep_group() or self.run_name,
            stage=self.stage,
            config=plain(self.cfg),
            mode=w.mode,
            project=w.project,
            entity=w.entity,
            enabled=self.rank == 0,
            name=name,
            tags=tags,
            run_id=self.wandb_id,
            system_metrics=w.system_metrics,
            system_metrics_interval_s=w.system_metrics_interval_s,
        )
        if resumed:
            log.info("stage %r: continuing W&B run %s", self.stage, self.wandb_id)
        for input_name, path in self.inputs.items():
            for entry in consumed(path, input_name, self._input_hashes[input_name], self.run_name, self.stage):
                if entry["name"] not in {e["name"] for e in self.tracker.consumed}:
                    self.tracker.use_artifact(entry)
        self.reads.start()  # from here on, every config read is part of the work

    def _release(self) -> None:
        if self.reads.recording:
            self.reads.stop()
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def __exit__(self, *exc) -> None:
        try:
            if self.tracker is not None:
                self.tracker.finish()
        finally:
            self._release()

    def run_checkpointed(self, train: Callable[[StageRun], dict]) -> dict:
        """The training stages' shape (pretrain, sft, rl, the student base): the previous metrics when up to date;
        else `train(self)` inside the stage, publishing its `result["checkpoint"]` (and `hf/` when it was exported)."""
        if self.up_to_date():
            return self.previous_metrics()
        with self:
            result = train(self)
            outputs = {"checkpoint": Path(result["checkpoint"])}
            if (self.dir / "hf").is_dir():
                outputs["hf"] = self.dir / "hf"
            return self.finish(outputs=outputs, metrics=result)

    def finish(self, outputs: dict[str, Path], metrics: dict[str, Any]) -> dict:
        """Hash outputs, log them as artifacts and the metrics as the W&B summary, write the manifest last."""
        assert self._t0 is not None, "finish() must be called inside `with stage:`"
        self.reads.stop()  # what the stage read is now fixed; the bookkeeping below reads the config freely
        wall = time.time() - self._t0
        metrics = {**metrics, "wall_time_s": round(wall, 3)}
        out_entries = {}
        for name, path in outputs.items():
            path = Path(path)
            out_entries[name] = {"path": str(path), "sha256": hash_path(path)}
        if self.rank == 0:
            t = self.tracker
            t.log_curves()
            for name, path in outputs.items():
                art = artifact_name(self.run_name, self.stage, name)
                digest = t.log_artifact(path, name=art, type=artifact_type(name))
                out_entries[name] |= {"wandb_artifact": art, "wandb_digest": digest}
            if t.mode != "disabled":  # a lost W&B call is counted and named where the stage's results are
                metrics |= {"wandb_failures": t.failure_count, "wandb_failed_calls": sorted(t.failures)}
            t.summary(metrics)
            reads = self.work_reads()
            manifest = {
                "stage": self.stage,
                "run": self.run_name,
                "config": nested(reads),
                "reads": reads,
                "config_hash": hash_config(reads),
                "code": git_version(),
                "inputs": {
                    k: {"path": str(self.inputs[k]) if k in self.inputs else None, "sha256": h}
                    for k, h in self._input_hashes.items()
                },
                "outputs": out_entries,
                "metrics": metrics,
                "wandb_run": t.run_id,
                "wall_time_s": round(wall, 3),
                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "host": {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count()},
            }
            atomic_write_json(self.dir / MANIFEST, manifest)
        return metrics
