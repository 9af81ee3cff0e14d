"""Wall time and peak memory of each stage of a finished pipeline run, appended to bench/results/pipeline_stages.csv.

    python -m bench.pipeline_stages --run outputs/default        # after `make pipeline`

Wall time is the stage's own (manifest.json `wall_time_s`); peak resident memory comes from `pipeline.json`, which
`python -m pipeline` writes when it runs the stage in a child process (empty for a stage it found up to date).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.common import append_result

STAGES = ("data", "pretrain", "sft", "rl", "distill", "eval", "report")


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="the run directory, e.g. outputs/default")
    args = ap.parse_args(argv)
    record = json.loads((args.run / "pipeline.json").read_text()) if (args.run / "pipeline.json").is_file() else {}
    rows = []
    for stage in STAGES:
        manifest = args.run / stage / "manifest.json"
        if not manifest.is_file():
            print(f"{stage}: no manifest, not run")
            continue
        m = json.loads(manifest.read_text())
        child = record.get("stages", {}).get(stage, {})
        row = {
            "run": args.run.name,
            "stage": stage,
            "wall_s": m["wall_time_s"],
            "peak_rss_mb": round(child["peak_rss_mb"]) if "peak_rss_mb" in child else "",
            "finished_at": m.get("finished_at", ""),
        }
        append_result("pipeline_stages", row)
        rows.append(row)
        print(row)
    return rows


if __name__ == "__main__":
    main()
