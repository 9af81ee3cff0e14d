"""The run-directory contract: `outputs/<run>/<stage>/manifest.json`, skip-if-unchanged, and the stage's tracker.

A stage does:

    stage = StageRun(cfg, "pretrain", config=asdict(cfg.train), inputs={"shards": data_dir / "train"})
    if stage.up_to_date():
        return stage.previous_metrics()          # same config, same inputs, outputs intact: nothing to do
    with stage:                                   # opens the W&B run, starts the clock
        stage.tracker.log({"loss": 2.3}, step=1)
        return stage.finish(outputs={"ckpt": ckpt_dir}, metrics={"val_loss": 2.1})

The manifest holds the stage name, the resolved config, the code version (git sha + dirty flag), the content hash of
every input and output, the wall time and the key metrics. It is written last and atomically, so a stage killed
half-way has no manifest and runs again; `up_to_date` also re-checks that each output still has its recorded hash.

Resuming only continues the same work. Entering a stage records the key of the work in progress (config hash and
input hashes) in `in_progress.json`. With the trainers' `resume=auto`, a `checkpoints/` folder left by work under
another key (a changed schedule, new data, or a folder from before this record existed) is moved, with the `*.jsonl`
logs of that attempt, to `superseded/<time>-<key>/` rather than resumed under the new config, and the stage starts
over; a stage killed and re-run with the same config and inputs finds its checkpoints where they were. Sections
that only lay the work out on processes (`layout=("parallel",)` for pretraining) are not part of the key: a run
saved on N ranks resumes on M. `resume=none` sets any old folder aside. An explicit `resume=<checkpoint>` inside
this stage's folder keeps it: that is how a finished run is extended on purpose (more steps from its last
checkpoint), knowing that its schedule changes.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.io import atomic_write_json, clean_temporaries, hash_config, hash_path
from pipeline.tracking import Tracker

MANIFEST = "manifest.json"
IN_PROGRESS = "in_progress.json"


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


def _barrier() -> None:
    """A barrier across the job's processes when torch.distributed is running (torch imported only then)."""
    if "torch" in sys.modules:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()


class StageRun:
    """One execution of one stage inside a pipeline run directory."""

    def __init__(
        self,
        cfg: Any,
        stage: str,
        *,
        config: dict,
        inputs: dict[str, Path] | None = None,
        rank: int = 0,
        resume: str = "auto",
        layout: tuple[str, ...] = (),
    ) -> None:
        self.cfg = cfg
        self.resume = resume  # the trainer's resume setting: auto | none | a checkpoint path
        # config sections that say how the work is spread over processes, not what it computes (e.g. "parallel"):
        # they stay out of the work key, so a checkpoint saved on N ranks resumes on M under resume=auto
        self.layout = tuple(layout)
        self.stage = stage
        self.config = config
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
        self._input_hashes = {k: hash_path(v) for k, v in self.inputs.items()}
        self._config_hash = hash_config(config)
        # what checkpoints belong to: the config less the sections that only lay the work out, and the inputs
        work = {k: v for k, v in config.items() if k not in self.layout}
        self.work_key = {"config_hash": hash_config(work), "inputs": self._input_hashes}
        self._t0: float | None = None
        self.tracker: Tracker | None = None

    # ---- skip logic -------------------------------------------------------------------------------------------
    def up_to_date(self) -> bool:
        """True when a previous execution finished with the same config and inputs and its outputs are intact."""
        m = read_manifest(self.dir)
        if m is None or m.get("config_hash") != self._config_hash:
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
    def _set_aside_stale_work(self) -> None:
        """Unless this execution resumes the stage's `checkpoints/` (see the module docstring), move them and the
        logs of the attempt that wrote them (`*.jsonl`) to `superseded/`, so a fresh start neither resumes foreign
        weights nor appends to old curves; then record this execution's work key."""
        marker, ckpts = self.dir / IN_PROGRESS, self.dir / "checkpoints"
        try:
            previous = json.loads(marker.read_text()) if marker.is_file() else None
        except (json.JSONDecodeError, OSError):
            previous = None
        if self.resume == "none":
            keep = False
        elif self.resume == "auto":
            keep = previous == self.work_key
        else:  # an explicit checkpoint: keep the folder when it is the one named
            keep = ckpts.resolve() in Path(self.resume).resolve().parents
        stale = [] if keep and ckpts.is_dir() else [p for p in [ckpts, *self.dir.glob("*.jsonl")] if p.exists()]
        if stale:
            old = (previous or {}).get("config_hash", "unknown")[:12]
            moved = self.dir / "superseded" / f"{time.strftime('%Y%m%dT%H%M%S')}-{old}"
            moved.mkdir(parents=True, exist_ok=True)
            for p in stale:
                p.rename(moved / p.name)
            if ckpts in stale:
                why = "resume=none" if self.resume == "none" else "written under another config or other inputs"
                print(f"stage {self.stage!r}: starting over; checkpoints/ ({why}) moved to {moved}")
        atomic_write_json(marker, self.work_key)

    def __enter__(self) -> StageRun:
        if self.rank == 0:
            clean_temporaries(self.dir)
            # a re-run invalidates the old manifest before anything is overwritten
            (self.dir / MANIFEST).unlink(missing_ok=True)
            self._set_aside_stale_work()
        _barrier()  # other ranks look for checkpoints only once rank 0 has set foreign ones aside
        self._t0 = time.time()
        self.tracker = Tracker(
            self.dir,
            run_group=getattr(self.cfg.wandb, "group", None) or self.run_name,
            stage=self.stage,
            config=self.config,
            mode=self.cfg.wandb.mode,
            project=self.cfg.wandb.project,
            entity=self.cfg.wandb.entity,
            enabled=self.rank == 0,
            name=f"{self.run_name}/{self.stage}",
        )
        for name, path in self.inputs.items():
            self.tracker.use_artifact(path, name=f"{self.run_name}-{name}", type=name)
        return self

    def __exit__(self, *exc) -> None:
        if self.tracker is not None:
            self.tracker.finish()

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
        wall = time.time() - self._t0
        metrics = {**metrics, "wall_time_s": round(wall, 3)}
        out_entries = {}
        for name, path in outputs.items():
            path = Path(path)
            out_entries[name] = {"path": str(path), "sha256": hash_path(path)}
        if self.rank == 0:
            for name, path in outputs.items():
                self.tracker.log_artifact(path, name=f"{self.run_name}-{name}", type=name)
            self.tracker.summary(metrics)
            manifest = {
                "stage": self.stage,
                "run": self.run_name,
                "config": self.config,
                "config_hash": self._config_hash,
                "code": git_version(),
                "inputs": {k: {"path": str(v), "sha256": self._input_hashes[k]} for k, v in self.inputs.items()},
                "outputs": out_entries,
                "metrics": metrics,
                "wall_time_s": round(wall, 3),
                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "host": {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count()},
            }
            atomic_write_json(self.dir / MANIFEST, manifest)
        return metrics
