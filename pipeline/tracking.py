"""The tracking layer: `metrics.jsonl` always, Weights & Biases beside it, one W&B run per stage.

A stage's W&B run has `group=<pipeline run>` (a sweep's members share one), `job_type=<stage>`, the resolved
config, per-step history, sample tables, figures, summary metrics and artifacts. It runs offline by default and
never needs a login or the network: every W&B file (run files, cache, artifact staging, settings) lives inside
the stage directory, nothing under $HOME; the `WANDB_*` variables that say so are set around each W&B call and
restored after it, so two stages in one process (a Hydra multirun, a test) keep their files apart.
`wandb.mode=online` uploads live, `disabled` (or `WANDB_MODE=disabled` in the environment) turns W&B off;
`make wandb-sync` uploads offline runs later. System metrics (CPU, memory, GPU) are sampled when
`wandb.system_metrics` says so, by default when CUDA is present.

A failed W&B call loses that call only: it is logged once as a warning, counted, and named in `metrics.jsonl`
(`{"wandb_failure": "log_table:samples", ...}`) and in the summary (`wandb_failures`, `wandb_failed_calls`).
Only a failed `init` loses the run. Only rank 0 tracks; other ranks get a tracker that writes nothing.

Resume: the stage contract gives a resumed stage the W&B id of the run it continues (`resume="allow"`). W&B
writes each launch as a new offline segment, and a killed process leaves W&B's unflushed tail unwritten, so
`resume_at(step)` makes the newest segment whole: it drops what the dead attempt logged after the checkpoint (from
`metrics.jsonl`, the tables' `*.jsonl` and the figures) and logs the rows up to it again, so the newest segment holds
every step once; `make wandb-sync` uploads that one. Online, the server keeps what it has and only the rows it
lacks are sent again.

Lineage: outputs are logged as reference artifacts (the bytes stay in the run directory) named
`<run>-<stage>-<output>` (see `pipeline.lineage`); wandb refuses `use_artifact` offline, so the consumed artifacts
(name, type, digest) are recorded in `<stage_dir>/wandb_run.json`, which `make wandb-sync` replays online.
`python -m pipeline.tracking outputs/` lists the runs by group with what each holds (read from W&B's own files).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import secrets
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.io import atomic_write_json, scoped_env
from pipeline.lineage import use_online
from pipeline.wandb_records import read_run, run_files, wait_exited

log = logging.getLogger(__name__)
RUN_RECORD = "wandb_run.json"
FIGURES = "figures"
CURVE_KEYS = ("loss", "val_loss", "reward_mean", "accuracy", "eval_accuracy", "lr", "grad_norm", "tokens_per_s")


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item") and getattr(v, "numel", lambda: 1)() == 1:
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if hasattr(v, "tolist"):
        return v.tolist()
    return v


def _numbers(row: dict) -> dict:
    """The W&B history part of a metrics row: its numbers (nested lists and strings stay in metrics.jsonl)."""
    return {k: v for k, v in row.items() if isinstance(v, int | float) and k not in ("step", "time")}


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


def new_run_id() -> str:
    return secrets.token_hex(4)


def cuda_present() -> bool:
    """Whether this process can use CUDA (torch is not imported just to ask: a process without it uses no GPU)."""
    torch = sys.modules.get("torch")
    return torch is not None and torch.cuda.is_available()


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _count_rows(path: Path) -> int:
    with open(path, encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


class Tracker:
    """Writes metrics to `<stage_dir>/metrics.jsonl` and mirrors them to the stage's W&B run."""

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
        tags: list[str] | tuple[str, ...] = (),
        run_id: str | None = None,
        system_metrics: bool | None = None,
        system_metrics_interval_s: float = 15.0,
    ) -> None:
        if mode not in ("offline", "online", "disabled"):
            raise ValueError(f"wandb.mode must be offline, online or disabled, got {mode!r}")
        self.stage_dir = Path(stage_dir)
        self.enabled = enabled
        self.metrics_path = self.stage_dir / "metrics.jsonl"
        self.failures: dict[str, int] = {}
        self.consumed: list[dict] = []
        self.produced: list[dict] = []
        self._file = None
        self._wandb = None
        self._run = None
        self._step = -1  # the last step given to W&B (W&B drops steps below it)
        if not enabled:
            return
        self.stage_dir.mkdir(parents=True, exist_ok=True)
        # the lines each log file held before this launch: what `resume_at` may keep of an earlier attempt
        self._earlier = {p.name: _count_rows(p) for p in self.stage_dir.glob("*.jsonl")}
        self._file = open(self.metrics_path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 (open for the tracker's lifetime)
        self.mode = "disabled" if os.environ.get("WANDB_MODE") == "disabled" else mode
        self._record = {
            "id": run_id or new_run_id(),
            "name": name or f"{run_group}/{stage}",
            "group": run_group,
            "job_type": stage,
            "tags": list(tags),
            "project": project,
            "entity": entity,
            "mode": self.mode,
        }
        if self.mode == "disabled":
            return
        self._env = wandb_env(self.stage_dir)
        for k in ("WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
            Path(self._env[k]).mkdir(parents=True, exist_ok=True)
        stats = cuda_present() if system_metrics is None else system_metrics
        try:
            with scoped_env(self._env):
                import wandb  # deferred: wandb is imported lazily, once a run starts

                self._wandb = wandb
                self._run = wandb.init(
                    project=project,
                    entity=entity,
                    group=run_group,
                    job_type=stage,
                    name=self._record["name"],
                    tags=list(tags) or None,
                    config=config or {},
                    dir=str(self.stage_dir.resolve()),
                    mode=self.mode,
                    id=self._record["id"],
                    resume="allow",
                    reinit="create_new",
                    settings=wandb.Settings(
                        console="off",
                        silent=True,
                        x_disable_stats=not stats,
                        x_stats_sampling_interval=system_metrics_interval_s,
                    ),
                )
            self._record |= {"dir": str(Path(self._run.dir).parent), "system_metrics": stats}
            self._write_record()
        except Exception as e:  # W&B must never stop a stage
            self._failed("init", e)
            self._run = None

    # ---- failure accounting ---------------------------------------------------------------------------------
    def _failed(self, what: str, e: BaseException) -> None:
        first = what not in self.failures
        self.failures[what] = self.failures.get(what, 0) + 1
        if first:
            log.warning("W&B %s failed (%s: %s); this call is lost, the stage goes on", what, type(e).__name__, e)
        if self._file is not None:
            row = {"wandb_failure": what, "error": f"{type(e).__name__}: {e}"[:500], "time": time.time()}
            self._file.write(json.dumps(row) + "\n")

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        """`fn()` against the W&B run, inside the stage's W&B environment; a failure loses this call only."""
        if self._run is None:
            return None
        try:
            with scoped_env(self._env):
                return fn()
        except Exception as e:
            self._failed(what, e)
            return None

    @property
    def failure_count(self) -> int:
        return sum(self.failures.values())

    @property
    def wandb_run(self):
        return self._run

    @property
    def run_id(self) -> str | None:
        return self._record["id"] if self.enabled else None

    def _write_record(self) -> None:
        record = self._record | {"consumed": self.consumed, "produced": self.produced, "failures": self.failures}
        atomic_write_json(self.stage_dir / RUN_RECORD, record)

    # ---- history ----------------------------------------------------------------------------------------------
    def _wandb_step(self, step: int | None) -> int:
        """Rows without a step join the current W&B row (step 0 before any), so W&B's steps only ever grow."""
        self._step = max(self._step, 0) if step is None else max(self._step, step)
        return self._step

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if not self.enabled:
            return
        row = {k: _jsonable(v) for k, v in metrics.items()}
        if step is not None:
            row = {"step": step, **row}
        row.setdefault("time", time.time())
        self._file.write(json.dumps(row) + "\n")
        if self._run is not None:
            wb_step = self._wandb_step(step)
            self._call("log", lambda: self._run.log(_numbers(row), step=wb_step))

    def summary(self, metrics: dict[str, Any]) -> None:
        def update() -> None:
            for k, v in metrics.items():
                self._run.summary[k] = _jsonable(v)

        self._call("summary", update)

    def log_table(self, name: str, columns: list[str], rows: list[list[Any]], step: int | None = None) -> None:
        """A sample table (prompt, completion, reward, ...); also kept as `<name>.jsonl` in the stage directory."""
        if not self.enabled:
            return
        with open(self.stage_dir / f"{name}.jsonl", "a", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps({"step": step, **dict(zip(columns, map(_jsonable, r)))}) + "\n")
        self._table_to_wandb(name, columns, rows, step)

    def _table_to_wandb(self, name: str, columns: list[str], rows: list[list[Any]], step: int | None) -> None:
        if self._run is not None:
            wb_step = self._wandb_step(step)
            table = lambda: self._wandb.Table(columns=columns, data=[list(map(_jsonable, r)) for r in rows])  # noqa: E731
            self._call(f"log_table:{name}", lambda: self._run.log({name: table()}, step=wb_step))

    def log_figure(self, name: str, png_path: Path, step: int | None = None) -> None:
        """A PNG already on disk (the report's plots, a stage's curves)."""
        if self._run is not None:
            wb_step = self._wandb_step(step)
            image = lambda: self._wandb.Image(str(png_path))  # noqa: E731
            self._call(f"log_figure:{name}", lambda: self._run.log({name: image()}, step=wb_step))

    def log_heatmap(self, name: str, matrix: Any, step: int, xlabel: str = "expert", ylabel: str = "layer") -> None:
        """A matrix as a heatmap figure at `step` (W&B shows the steps as a slider: the expert load per layer as it
        evolves); the PNG is kept under `<stage_dir>/figures/<name>/`."""
        if not self.enabled:
            return
        png = self.stage_dir / FIGURES / name / f"step_{step:07d}.png"
        try:
            draw_heatmap(matrix, png, title=f"{name}, step {step}", xlabel=xlabel, ylabel=ylabel)
        except Exception as e:  # a figure must not stop a stage either
            self._failed(f"draw:{name}", e)
            return
        self.log_figure(name, png, step=step)

    def log_curves(self, name: str = "curves", keys: tuple[str, ...] = CURVE_KEYS) -> None:
        """Line plots of `keys` (those with two or more points) from `metrics.jsonl`, as one figure."""
        if not self.enabled:
            return
        rows = [r for r in _read_jsonl(self.metrics_path) if "step" in r]
        series = {k: [(r["step"], r[k]) for r in rows if isinstance(r.get(k), int | float)] for k in keys}
        series = {k: v for k, v in series.items() if len(v) >= 2}
        if not series:
            return
        png = self.stage_dir / FIGURES / f"{name}.png"
        try:
            draw_curves(series, png)
        except Exception as e:
            self._failed(f"draw:{name}", e)
            return
        self.log_figure(name, png)

    # ---- lineage ----------------------------------------------------------------------------------------------
    def log_artifact(self, path: Path, name: str, type: str, metadata: dict | None = None) -> str | None:
        """Record an output for lineage, by reference (the bytes stay in the run directory); returns its digest."""

        def log_it() -> str:
            art = self._wandb.Artifact(name=name, type=type, metadata=metadata or {})
            art.add_reference(Path(path).resolve().as_uri(), checksum=True)
            self._run.log_artifact(art)
            return art.digest

        digest = self._call(f"log_artifact:{name}", log_it)
        if digest is not None:
            self.produced.append({"name": name, "type": type, "digest": digest, "path": str(path)})
            self._write_record()
        return digest

    def use_artifact(self, entry: dict) -> None:
        """Declare a consumed artifact (`pipeline.lineage.consumed` entry: name, type, digest, path, external).
        Online it is used at once; offline it is recorded for `make wandb-sync` to replay."""
        if not self.enabled or self.mode == "disabled":
            return
        self.consumed.append(entry)
        if self._run is not None and self.mode == "online":
            used = self._call(f"use_artifact:{entry['name']}", lambda: use_online(self._run, entry))
            entry["used_online"] = bool(used)
        if self._run is not None:
            self._write_record()

    # ---- resume -----------------------------------------------------------------------------------------------
    def resume_at(self, step: int) -> None:
        """The stage resumed from its checkpoint at `step`: drop what the dead attempt logged after it, keep what it
        logged up to it (unless this launch logged that step again), and log the kept rows to this W&B segment."""
        if not self.enabled:
            return
        self._file.close()
        kept: dict[str, list[dict]] = {}
        for path in sorted(self.stage_dir.glob("*.jsonl")):
            rows = _read_jsonl(path)
            earlier, now = rows[: self._earlier.get(path.name, 0)], rows[self._earlier.get(path.name, 0) :]
            relogged = {r.get("step") for r in now}
            keep = [r for r in earlier if r.get("step") is None or r["step"] <= step and r["step"] not in relogged]
            kept[path.stem] = keep
            _write_jsonl(path, keep + now)
        self._file = open(self.metrics_path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115
        for png in self.stage_dir.glob(f"{FIGURES}/*/step_*.png"):
            if int(png.stem.removeprefix("step_")) > step:
                png.unlink()
        if self._run is not None:
            self._replay(kept, step)

    def _replay(self, kept: dict[str, list[dict]], step: int) -> None:
        """Log the kept rows, tables and heatmaps up to `step` to W&B, in step order (online: only those the server
        lacks, from its `starting_step`)."""
        first = max(self._step + 1, getattr(self._run, "starting_step", 0) or 0)
        by_step: dict[int, list[tuple[str, Any]]] = {}
        for name, rows in kept.items():
            for r in rows:
                s = r.get("step")
                if s is not None and first <= s <= step:
                    by_step.setdefault(s, []).append((name, r))
        for png in self.stage_dir.glob(f"{FIGURES}/*/step_*.png"):
            s = int(png.stem.removeprefix("step_"))
            if first <= s <= step:
                by_step.setdefault(s, []).append(("figure:" + png.parent.name, png))
        for s in sorted(by_step):
            tables: dict[str, list[dict]] = {}
            for name, item in by_step[s]:
                if name == "metrics":
                    self._step = s
                    self._call("log", lambda item=item, s=s: self._run.log(_numbers(item), step=s))
                elif name.startswith("figure:"):
                    self.log_figure(name.removeprefix("figure:"), item, step=s)
                elif "wandb_failure" not in item:
                    tables.setdefault(name, []).append(item)
            for name, rows in tables.items():
                columns = [c for c in rows[0] if c != "step"]
                self._table_to_wandb(name, columns, [[r.get(c) for c in columns] for r in rows], s)

    def finish(self) -> None:
        if self._run is not None:
            if self.failures:
                self.summary({"wandb_failures": self.failure_count, "wandb_failed_calls": sorted(self.failures)})
            self._write_record()
            self._call("finish", self._run.finish)
            self._call("finish:wait", self._wait_written)
        self._run = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def _wait_written(self) -> None:
        """`finish()` returns before wandb-core has written the run file: wait for it, so that a finished stage's
        offline run can be read (and synced) at once."""
        path = Path(self._record["dir"]) / f"run-{self._record['id']}.wandb"
        if not wait_exited(path):
            raise TimeoutError(f"W&B did not finish writing {path} within 30 s")


# ---- figures ------------------------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib  # deferred: matplotlib only when figures are drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def draw_heatmap(matrix: Any, png: Path, title: str, xlabel: str, ylabel: str) -> Path:
    plt = _pyplot()
    m = np.asarray(matrix, dtype=float)
    if m.ndim != 2:
        raise ValueError(f"a heatmap needs a 2-D matrix, got shape {m.shape}")
    fig, ax = plt.subplots(figsize=(max(4, m.shape[1] * 0.3), max(2.5, m.shape[0] * 0.4)))
    im = ax.imshow(m, aspect="auto", cmap="viridis")
    fig.colorbar(im, ax=ax)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(png, dpi=80)
    plt.close(fig)
    return png


def draw_curves(series: dict[str, list[tuple[int, float]]], png: Path) -> Path:
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(series), figsize=(3.6 * len(series), 3), squeeze=False)
    for ax, (key, points) in zip(axes[0], series.items()):
        ax.plot([p[0] for p in points], [p[1] for p in points])
        ax.set(title=key, xlabel="step")
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(png, dpi=80)
    plt.close(fig)
    return png


# ---- sweeps -------------------------------------------------------------------------------------------------------
def sweep_overrides() -> list[str]:
    """Under a Hydra multirun, this job's values of the swept keys (`precision=fp8`, ...); else []."""
    try:
        # deferred: hydra only under a Hydra job; pipeline.tracking stays light
        from hydra.core.hydra_config import HydraConfig
        from hydra.core.override_parser.overrides_parser import OverridesParser
        from hydra.types import RunMode
    except ImportError:
        return []
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return []
    parsed = OverridesParser.create().parse_overrides([a for a in sys.argv[1:] if not a.startswith("-")])
    swept = {o.key_or_group for o in parsed if o.is_sweep_override()}
    return [o for o in HydraConfig.get().overrides.task if o.split("=", 1)[0].lstrip("+~") in swept]


def sweep_group() -> str | None:
    """The W&B group shared by the members of one Hydra multirun: `sweep-<its sweep directory's name>`."""
    try:
        # deferred: hydra only under a Hydra job; pipeline.tracking stays light
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
    except ImportError:
        return None
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return f"sweep-{Path(HydraConfig.get().sweep.dir).name}"


# ---- listing ------------------------------------------------------------------------------------------------------
def list_runs(root: Path, include_superseded: bool = False) -> list[dict]:
    """Every `wandb_run.json` under `root`, sorted by group then name (superseded attempts left out by default)."""
    runs = []
    for p in Path(root).rglob(RUN_RECORD):
        if include_superseded or "superseded" not in p.relative_to(root).parts:
            runs.append(json.loads(p.read_text()) | {"stage_dir": str(p.parent)})
    return sorted(runs, key=lambda r: (r["group"] or "", r["name"]))


def describe(run: dict) -> str:
    """What the run holds, read from its newest offline segment: rows, tables, figures, artifacts."""
    segments = run_files(Path(run["stage_dir"]), run["id"])
    if not segments:
        return "online: see the W&B app" if run["mode"] == "online" else "no offline segment"
    c = read_run(segments[-1])
    parts = [
        f"{c.rows} rows",
        f"{len(c.tables)} tables",
        f"{len(c.images)} figures",
        f"{len(c.artifacts)} artifacts out",
        f"{len(run.get('consumed', []))} in",
    ]
    if len(segments) > 1:
        parts.append(f"{len(segments)} segments")
    if run.get("failures"):
        parts.append(f"{sum(run['failures'].values())} W&B failures")
    if not c.exited:
        parts.append("unfinished")
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> None:
    """`python -m pipeline.tracking [ROOT]`: the offline W&B runs under ROOT (default outputs/), by group."""
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("root", nargs="?", default="outputs", type=Path)
    ap.add_argument("--superseded", action="store_true", help="also list runs set aside under superseded/")
    args = ap.parse_args(argv)
    group = None
    for r in list_runs(args.root, args.superseded):
        if r["group"] != group:
            group = r["group"]
            print(f"group {group}")
        print(f"  {r['name']:<40} {r['job_type']:<13} {r['mode']:<8} {r['id']}  {describe(r)}")
        if r.get("tags"):
            print(f"  {'':<40} tags: {', '.join(r['tags'])}")


if __name__ == "__main__":
    main()
