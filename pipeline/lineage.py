"""Artifact names and lineage edges: which W&B artifact each stage produced, and which ones a stage consumed.

Every output a stage publishes is one W&B artifact named `<run>-<stage>-<output>` (`smoke-data-train`,
`smoke-pretrain-checkpoint`), of type dataset, tokenizer, model or eval (`artifact_type`). A stage's inputs are
paths; `consumed` finds the upstream stage that published each one (the nearest directory above it with a
`manifest.json`) and names the artifact it logged, with the digest it recorded — so the names a stage consumes are,
by construction, names produced upstream. An input that is a stage's `manifest.json` (the report reads those)
stands for every output of that stage. An input no stage published (the data stage's source files) is an
external artifact named after the consuming stage, `<run>-<stage>-<input>`, logged by reference when used online.

Online, a stage uses its inputs at once (`use_online`); offline, wandb cannot, so the tracker records the entries in
`wandb_run.json` and `make wandb-sync` (`pipeline.wandb_sync`) replays them after uploading the runs. An artifact is
found by name and digest: the version of that name whose digest matches (`latest` first).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
# output name -> W&B artifact type; every other output is a dataset
ARTIFACT_TYPES = {"tokenizer": "tokenizer", "checkpoint": "model", "hf": "model", "eval": "eval", "report": "eval"}


def artifact_type(output: str) -> str:
    return ARTIFACT_TYPES.get(output, "dataset")


def artifact_name(run: str, stage: str, output: str) -> str:
    """`<run>-<stage>-<output>`, with characters W&B refuses in names (e.g. `/`) replaced by `-`."""
    return re.sub(r"[^\w.-]", "-", f"{run}-{stage}-{output}")


def _producer(path: Path) -> Path | None:
    """The stage directory that holds `path`: the nearest directory (itself or above) with a manifest."""
    path = path.resolve()
    if path.name == MANIFEST:
        return path.parent
    for d in [path, *path.parents][:5]:
        if (d / MANIFEST).is_file():
            return d
    return None


def consumed(path: Path, input_name: str, sha256: str, run: str, stage: str) -> list[dict[str, Any]]:
    """The artifact entries (name, type, digest, path, external) that input `input_name` at `path` stands for."""
    path = Path(path)
    stage_dir = _producer(path)
    manifest = json.loads((stage_dir / MANIFEST).read_text()) if stage_dir is not None else None
    if manifest is not None and manifest.get("stage") != stage:
        outputs = manifest.get("outputs", {})
        if path.name == MANIFEST:
            chosen = list(outputs)
        else:
            chosen = [k for k, o in outputs.items() if Path(o["path"]).resolve() == path.resolve()]
        entries = []
        for out in chosen:
            o = outputs[out]
            same = path.name == MANIFEST or o.get("sha256") == sha256  # the bytes the producer published
            entries.append(
                {
                    "name": artifact_name(manifest["run"], manifest["stage"], out),
                    "type": artifact_type(out),
                    "digest": o.get("wandb_digest") if same else None,
                    "path": o["path"],
                    "external": False,
                }
            )
        if entries:
            return entries
    return [
        {
            "name": artifact_name(run, stage, input_name),
            "type": "dataset",
            "digest": None,
            "path": str(path.resolve()),
            "external": True,
        }
    ]


def find_version(api: Any, entity: str, project: str, entry: dict) -> Any:
    """The artifact version named `entry["name"]` whose digest is `entry["digest"]` (`latest` if no digest)."""
    base = f"{entity}/{project}/{entry['name']}"
    latest = api.artifact(f"{base}:latest", type=entry["type"])
    if entry.get("digest") in (None, latest.digest):
        return latest
    for version in api.artifacts(entry["type"], base):
        if version.digest == entry["digest"]:
            return version
    raise LookupError(f"{base}: no version with digest {entry['digest']} (was its producing run synced?)")


def reference_artifact(wandb: Any, entry: dict) -> Any:
    """An external input as a reference artifact (its bytes stay where they are)."""
    art = wandb.Artifact(name=entry["name"], type=entry["type"])
    art.add_reference(Path(entry["path"]).resolve().as_uri(), checksum=True)
    return art


def use_online(run: Any, entry: dict) -> bool:
    """Declare `entry` as an input of the live online `run`; True when W&B accepted it."""
    import wandb  # deferred: wandb is imported lazily (online runs only)

    if entry["external"]:
        if not Path(entry["path"]).exists():
            raise FileNotFoundError(f"external input {entry['name']}: {entry['path']} no longer exists")
        run.use_artifact(reference_artifact(wandb, entry))
        return True
    api = wandb.Api()
    run.use_artifact(find_version(api, run.entity, run.project, entry))
    return True
