"""`make wandb-sync`: upload the offline W&B runs under a directory and draw their lineage online.

    python -m pipeline.wandb_sync outputs/             # upload (needs the network and `wandb login`)
    python -m pipeline.wandb_sync outputs/ --dry-run   # the plan, checked by `wandb sync --dry-run`; no network

wandb refuses `use_artifact` offline, so an offline stage records the artifacts it consumed (name, type, digest) in
its `wandb_run.json`. Syncing is two passes over the stage runs, producers before consumers: first `wandb sync` of
each run's newest offline segment (a resumed stage writes one segment per launch under one run id, and the newest
holds every step: see `pipeline.tracking`), which uploads the run and the artifacts it logged; then each run with
consumed artifacts is resumed (`resume="must"`) and uses them by name and digest (`pipeline.lineage.find_version`),
which draws the edges data -> pretrain -> sft -> rl -> distill -> eval. Online runs whose live `use_artifact` failed
get the second pass only. Runs under `superseded/` are left out unless `--superseded`.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from pathlib import Path

from pipeline.lineage import find_version, reference_artifact
from pipeline.tracking import list_runs
from pipeline.wandb_records import run_files

log = logging.getLogger(__name__)


def plan(root: Path, include_superseded: bool = False) -> list[dict]:
    """The stage runs to sync, each with `segment` (its newest offline segment, None for online runs) and
    `replay` (the consumed artifacts to use online), producers before consumers."""
    runs = []
    for r in list_runs(root, include_superseded):
        if r["mode"] == "offline":
            segments = run_files(Path(r["stage_dir"]), r["id"])
            if not segments:
                continue
            runs.append(r | {"segment": segments[-1], "replay": r.get("consumed", [])})
        elif r["mode"] == "online":
            missing = [e for e in r.get("consumed", []) if not e.get("used_online")]
            if missing:
                runs.append(r | {"segment": None, "replay": missing})
    return producers_first(runs)


def producers_first(runs: list[dict]) -> list[dict]:
    """Order runs so that each one comes after the runs that produced what it consumed (a stable topological
    sort; a run consuming what no listed run produced keeps its place)."""
    producer = {p["name"]: i for i, r in enumerate(runs) for p in r.get("produced", [])}
    done: list[int] = []

    def visit(i: int, path: tuple[int, ...]) -> None:
        if i in done or i in path:
            return
        for e in runs[i]["replay"]:
            j = producer.get(e["name"])
            if j is not None and j != i:
                visit(j, (*path, i))
        done.append(i)

    for i in range(len(runs)):
        visit(i, ())
    return [runs[i] for i in done]


def _wandb_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "wandb", "sync", *args], capture_output=True, text=True)


def replay(run: dict) -> None:
    """Resume the uploaded `run` and use its consumed artifacts by name and digest."""
    import wandb  # deferred: wandb is imported lazily

    resumed = wandb.init(
        id=run["id"],
        project=run["project"],
        entity=run["entity"],
        resume="must",
        dir=run["stage_dir"],
        settings=wandb.Settings(console="off", silent=True, x_disable_stats=True),
    )
    try:
        api = wandb.Api()
        for entry in run["replay"]:
            if entry["external"]:
                if Path(entry["path"]).exists():
                    resumed.use_artifact(reference_artifact(wandb, entry))
                else:
                    log.warning("%s: %s is gone; edge left out", entry["name"], entry["path"])
                continue
            if not entry.get("digest"):
                log.warning("%s: no digest recorded (producer ran without W&B); edge left out", entry["name"])
                continue
            resumed.use_artifact(find_version(api, resumed.entity, resumed.project, entry))
    finally:
        resumed.finish()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("root", nargs="?", default="outputs", type=Path)
    ap.add_argument("--dry-run", action="store_true", help="print the plan and check it with `wandb sync --dry-run`")
    ap.add_argument("--superseded", action="store_true", help="also the runs set aside under superseded/")
    args = ap.parse_args(argv)
    runs = plan(args.root, args.superseded)
    for r in runs:
        edges = ", ".join(e["name"] for e in r["replay"]) or "-"
        print(f"{r['name']:<40} {r['id']}  {r['segment'] or '(online)'}\n  uses: {edges}")
    segments = [str(r["segment"]) for r in runs if r["segment"] is not None]
    if args.dry_run:
        check = _wandb_cli("--dry-run", *segments) if segments else None
        if check is not None:
            print(check.stdout + check.stderr, end="")
        return 0 if check is None or check.returncode == 0 else check.returncode
    for r in runs:
        if r["segment"] is not None:
            done = _wandb_cli(str(r["segment"]))  # a segment already uploaded is skipped by wandb
            if done.returncode != 0:
                print(done.stdout + done.stderr, end="")
                return done.returncode
    for r in runs:
        if r["replay"]:
            replay(r)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
