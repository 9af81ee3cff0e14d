"""The tracking layer: `metrics.jsonl` always, Weights & Biases when it works.

One stage is one W&B run, `group=<pipeline run>` and `job_type=<stage>`, with the resolved config, per-step metrics,
summary metrics, sample tables and artifacts. W&B runs offline by default and never needs a login or the network:
every W&B file (run files, cache, artifacts staging, settings) lives inside the stage directory, nothing under $HOME.
`wandb.mode=online` uploads live, `disabled` turns it off; `make wandb-sync` uploads offline runs later.

A W&B failure — import, init, a log call — logs one warning and turns W&B off for the stage; the stage goes on and
`metrics.jsonl` still gets every metric. Only rank 0 tracks; other ranks get a tracker that writes nothing.
Each stage's W&B run is also described in `<stage_dir>/wandb_run.json` (id, name, group, job type, local dir), so
offline runs and their grouping can be listed without W&B: `python -m pipeline.tracking outputs/`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item") and getattr(v, "numel", lambda: 1)() == 1:
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if hasattr(v, "tolist"):
        return v.tolist()
    return v


def wandb_env(stage_dir: Path) -> dict[str, str]:
    """Environment that keeps every W&B file inside the stage directory."""
    root = Path(stage_dir).resolve()
    return {
        "WANDB_DIR": str(root),
        "WANDB_CACHE_DIR": str(root / "wandb" / ".cache"),
        "WANDB_DATA_DIR": str(root / "wandb" / ".data"),
        "WANDB_CONFIG_DIR": str(root / "wandb" / ".config"),
        "WANDB_ARTIFACT_DIR": str(root / "wandb" / ".artifacts"),
        "WANDB_SILENT": "true",
        "WANDB_CONSOLE": "off",
    }


class Tracker:
    """Writes metrics to `<stage_dir>/metrics.jsonl` and mirrors them to a W&B run (if enabled and healthy)."""

    def __init__(
        self,
        stage_dir: Path,
        *,
        run_group: str,
        stage: str,
        config: dict | None = None,
        mode: str = "offline",
        project: str = "deepseek-repro",
        entity: str | None = None,
        enabled: bool = True,
        name: str | None = None,
    ) -> None:
        if mode not in ("offline", "online", "disabled"):
            raise ValueError(f"wandb.mode must be offline, online or disabled, got {mode!r}")
        self.stage_dir = Path(stage_dir)
        self.enabled = enabled
        self.metrics_path = self.stage_dir / "metrics.jsonl"
        self._file = None
        self._wandb = None
        self._run = None
        if not enabled:
            return
        self.stage_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.metrics_path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 (open for the tracker's lifetime)
        if mode == "disabled" or os.environ.get("WANDB_MODE") == "disabled":
            return
        env = wandb_env(self.stage_dir)
        for k in ("WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
            Path(env[k]).mkdir(parents=True, exist_ok=True)
        os.environ.update(env)
        try:
            import wandb

            self._wandb = wandb
            self._run = wandb.init(
                project=project,
                entity=entity,
                group=run_group,
                job_type=stage,
                name=name or f"{run_group}/{stage}",
                config=config or {},
                dir=str(self.stage_dir.resolve()),
                mode=mode,
                reinit="create_new",
                settings=wandb.Settings(console="off", silent=True, x_disable_stats=True),
            )
            # what `make wandb-sync` will upload, readable without W&B: which run, in which group (sweeps share one)
            record = {
                "id": self._run.id,
                "name": self._run.name,
                "group": run_group,
                "job_type": stage,
                "project": project,
                "mode": mode,
                "dir": str(Path(self._run.dir).parent),
            }
            (self.stage_dir / "wandb_run.json").write_text(json.dumps(record, indent=2) + "\n")
        except Exception as e:  # W&B must never stop a stage
            self._warn("init", e)

    def _warn(self, what: str, e: BaseException) -> None:
        log.warning("W&B %s failed (%s: %s); continuing with metrics.jsonl only", what, type(e).__name__, e)
        self._run = None

    @property
    def wandb_run(self):
        return self._run

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if not self.enabled:
            return
        row = {k: _jsonable(v) for k, v in metrics.items()}
        if step is not None:
            row = {"step": step, **row}
        row.setdefault("time", time.time())
        self._file.write(json.dumps(row) + "\n")
        if self._run is not None:
            try:
                flat = {k: v for k, v in row.items() if isinstance(v, int | float) and k not in ("step", "time")}
                self._run.log(flat, step=step)
            except Exception as e:
                self._warn("log", e)

    def summary(self, metrics: dict[str, Any]) -> None:
        if self._run is not None:
            try:
                for k, v in metrics.items():
                    self._run.summary[k] = _jsonable(v)
            except Exception as e:
                self._warn("summary", e)

    def log_table(self, name: str, columns: list[str], rows: list[list[Any]], step: int | None = None) -> None:
        """A sample table (prompt, completion, reward, ...); also kept as `<name>.jsonl` in the stage directory."""
        if not self.enabled:
            return
        with open(self.stage_dir / f"{name}.jsonl", "a", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps({"step": step, **dict(zip(columns, map(_jsonable, r)))}) + "\n")
        if self._run is not None:
            try:
                self._run.log({name: self._wandb.Table(columns=columns, data=rows)}, step=step)
            except Exception as e:
                self._warn("log_table", e)

    def log_figure(self, name: str, png_path: Path) -> None:
        if self._run is not None:
            try:
                self._run.log({name: self._wandb.Image(str(png_path))})
            except Exception as e:
                self._warn("log_figure", e)

    def log_artifact(self, path: Path, name: str, type: str, metadata: dict | None = None) -> None:
        """Record an output for lineage (by reference: the bytes stay in the run directory)."""
        if self._run is not None:
            try:
                art = self._wandb.Artifact(name=name, type=type, metadata=metadata or {})
                art.add_reference(Path(path).resolve().as_uri(), checksum=True)
                self._run.log_artifact(art)
            except Exception as e:
                self._warn("log_artifact", e)

    def use_artifact(self, path: Path, name: str, type: str) -> None:
        """Declare an input (an upstream stage's output) so W&B draws the lineage graph data -> ... -> report."""
        if self._run is not None:
            try:
                art = self._wandb.Artifact(name=name, type=type)
                art.add_reference(Path(path).resolve().as_uri(), checksum=True)
                self._run.use_artifact(art)
            except Exception as e:
                self._warn("use_artifact", e)

    def finish(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._run is not None:
            try:
                self._run.finish()
            except Exception as e:
                self._warn("finish", e)
        self._run = None


def list_runs(root: Path) -> list[dict]:
    """Every `wandb_run.json` under `root`, sorted by group then name."""
    runs = [json.loads(p.read_text()) | {"stage_dir": str(p.parent)} for p in Path(root).rglob("wandb_run.json")]
    return sorted(runs, key=lambda r: (r["group"], r["name"]))


def main(argv: list[str] | None = None) -> None:
    """`python -m pipeline.tracking [ROOT]`: the offline W&B runs under ROOT (default outputs/), by group."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("root", nargs="?", default="outputs", type=Path)
    args = ap.parse_args(argv)
    group = None
    for r in list_runs(args.root):
        if r["group"] != group:
            group = r["group"]
            print(f"group {group}")
        print(f"  {r['name']:<40} {r['job_type']:<13} {r['mode']:<8} {r['id']}  {r['dir']}")


if __name__ == "__main__":
    main()
