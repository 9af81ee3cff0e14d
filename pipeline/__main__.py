"""`python -m pipeline`: every stage in order, into `outputs/<run>/`, resumable.

    python -m pipeline                         # CPU default (make pipeline)
    python -m pipeline experiment=smoke        # the whole chain at micro scale (part of make test)
    python -m pipeline run.name=exp1 precision=fp8 pipeline.stages=[data,pretrain]

This is the only place that knows the order of the stages. Each stage runs in its own process (`python -m
<module>` with the same overrides), so a stage's peak memory is its own and a crash in one stage leaves the
finished ones intact. A stage whose manifest matches its config and inputs is skipped; a killed pipeline
re-run picks up at the stage it was in (and pretraining from its newest checkpoint). Wall time and peak memory
of every stage are written to `outputs/<run>/pipeline.json`.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from pipeline.config import to_config
from pipeline.io import atomic_write_json
from pipeline.stage import MANIFEST

log = logging.getLogger(__name__)

# stage name -> module with `run(cfg)` and a Hydra `main`
STAGES: dict[str, str] = {
    "data": "data.prepare",
    "pretrain": "train.pretrain",
    "sft": "train.sft",
    "rl": "train.grpo",
    "distill": "distill.run",
    "eval": "eval.run",
    "report": "eval.report",
}


def run_stage(module: str, overrides: list[str]) -> dict:
    """Run one stage in a child process; return its exit code, wall time and peak resident memory."""
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-m", module, *overrides])
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"returncode": proc.returncode, "wall_s": round(time.time() - t0, 2), "peak_rss_mb": usage.ru_maxrss / 1024}


def run(cfg, overrides: list[str]) -> dict:
    unknown = [s for s in cfg.pipeline.stages if s not in STAGES]
    if unknown:
        raise ValueError(f"pipeline.stages: unknown stage(s) {unknown}; known: {list(STAGES)}")
    run_dir = Path(cfg.run.root) / cfg.run.name
    record_path = run_dir / "pipeline.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {"stages": {}}
    for name in cfg.pipeline.stages:
        log.info("=== stage %s (%s) ===", name, STAGES[name])
        t0 = time.time()
        res = run_stage(STAGES[name], overrides)
        manifest = run_dir / name / MANIFEST
        # a stage that found its manifest up to date leaves it untouched: older than this invocation
        res["skipped"] = res["returncode"] == 0 and manifest.is_file() and manifest.stat().st_mtime < t0
        if res["skipped"]:
            record["stages"].setdefault(name, {}).update(skipped_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        else:
            record["stages"][name] = res
        atomic_write_json(record_path, record)
        if res["returncode"] != 0:
            raise SystemExit(f"stage {name} failed with exit code {res['returncode']}; re-run to resume from it")
    return record


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(dcfg: DictConfig) -> None:
    cfg = to_config(dcfg)
    overrides = list(HydraConfig.get().overrides.task)
    record = run(cfg, overrides)
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
