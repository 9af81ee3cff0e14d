"""Wall time and peak memory of each stage of a finished pipeline run, appended to bench/results/pipeline_stages.csv.

    python -m bench.pipeline_stages --run outputs/default        # after `make pipeline`

Two wall times: `wall_s`, the stage's child process as `python -m pipeline` ran it (`pipeline.json`: start-up,
imports and sub-stages included, e.g. the distillation stage's student base pretraining), which is what adds up to
the pipeline's duration; and `stage_wall_s`, the stage's own (manifest.json `wall_time_s`). Peak resident memory
comes from `pipeline.json` too. Both `pipeline.json` columns are empty for a stage the pipeline found up to date or
that was run on its own; the last row of a run is the total. `--note` says what else the machine ran meanwhile
(a shared 2-core machine stretches every stage), and the README shows it beside the total.
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
    ap.add_argument("--note", default="", help="what else ran on the machine meanwhile (kept in every row)")
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
            "wall_s": child.get("wall_s", ""),
            "peak_rss_mb": round(child["peak_rss_mb"]) if "peak_rss_mb" in child else "",
            "finished_at": m.get("finished_at", ""),
            "stage_wall_s": m["wall_time_s"],
            "note": args.note,
        }
        rows.append(row)
    if rows:
        ran = [r["wall_s"] for r in rows if r["wall_s"] != ""]
        rows.append(
            {
                "run": args.run.name,
                "stage": "total",
                "wall_s": round(sum(ran), 2) if ran else "",
                "peak_rss_mb": max((r["peak_rss_mb"] for r in rows if r["peak_rss_mb"] != ""), default=""),
                "finished_at": rows[-1]["finished_at"],
                "stage_wall_s": round(sum(r["stage_wall_s"] for r in rows), 2),
                "note": args.note,
            }
        )
    for row in rows:
        append_result("pipeline_stages", row)
        print(row)
    return rows


if __name__ == "__main__":
    main()
