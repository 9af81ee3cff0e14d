"""A reader of W&B's offline run files (`run-<id>.wandb`): what an offline run holds, without W&B's servers.

wandb 0.31 writes each run as a LevelDB-style log and ships no public reader for it. The format: a 7-byte header
(`:W&B`, the magic number 0xBEE1 as little-endian u16, version 0), then 32 KiB blocks of chunks, each chunk a
header (crc32 u32, payload length u16, type u8: 1 full, 2 first, 3 middle, 4 last) and its payload; a block whose
remaining space cannot hold a chunk header is zero-padded. The checksum is zlib's crc32 of the type byte followed
by the payload. Chunks join into records, each a serialized `wandb.proto.wandb_internal_pb2.Record`.

`read_run` condenses one run file into `RunContents` (its id, group, history steps, tables, images, artifacts,
summary), which the tests use to check what each stage logged and `python -m pipeline.tracking` prints. A file cut
short (a process killed before W&B flushed its last block) reads up to the last whole record, with `complete` False.
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
BLOCK = 32 * 1024
CHUNK_HEADER = 7  # crc32 u32, length u16, type u8
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4
TABLE_TYPES = ("table-file", "table", "partitioned-table", "joined-table")


class CorruptRunFile(ValueError):
    """A `.wandb` file that is not a W&B run log (bad header)."""


def raw_records(path: Path) -> tuple[list[bytes], bool]:
    """Every whole record payload of the log at `path`, and whether the log ended cleanly (no torn or bad chunk)."""
    data = Path(path).read_bytes()
    if data[: len(HEADER)] != HEADER:
        raise CorruptRunFile(f"{path}: not a W&B run log (header {data[:7]!r})")
    out, parts, pos = [], None, len(HEADER)
    while pos < len(data):
        left = BLOCK - pos % BLOCK
        if left < CHUNK_HEADER:  # the block's zero padding
            pos += left
            continue
        if pos + CHUNK_HEADER > len(data):
            return out, False
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + CHUNK_HEADER])
        payload = data[pos + CHUNK_HEADER : pos + CHUNK_HEADER + length]
        if kind not in (FULL, FIRST, MIDDLE, LAST) or len(payload) < length:
            return out, False
        if zlib.crc32(payload, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != crc:
            return out, False
        pos += CHUNK_HEADER + length
        if kind == FULL:
            out.append(payload)
        elif kind == FIRST:
            parts = [payload]
        elif parts is not None:
            parts.append(payload)
            if kind == LAST:
                out.append(b"".join(parts))
                parts = None
    return out, parts is None


def records(path: Path) -> Iterator:
    """The `Record` messages of one run file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb  # deferred: wandb is imported lazily

    payloads, _ = raw_records(path)
    for raw in payloads:
        rec = pb.Record()
        rec.ParseFromString(raw)
        yield rec


def _item_key(item) -> str:
    return item.key or "/".join(item.nested_key)


@dataclass
class RunContents:
    """What one offline run file holds."""

    path: str
    run_id: str = ""
    name: str = ""
    group: str = ""
    job_type: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    history_steps: list[int] = field(default_factory=list)  # one entry per history row, in order
    history_keys: set[str] = field(default_factory=set)
    history: list[dict] = field(default_factory=list)  # each row's scalars, with its "step"
    tables: dict[str, list[int]] = field(default_factory=dict)  # key -> steps it was logged at
    images: dict[str, list[int]] = field(default_factory=dict)
    artifacts: list[dict] = field(default_factory=list)  # logged outputs: name, type, digest, metadata
    summary: dict = field(default_factory=dict)
    system_metrics_rows: int = 0
    exited: bool = False  # W&B wrote the run's exit record (finish() ran)
    complete: bool = True  # the log ends on a whole record

    @property
    def rows(self) -> int:
        return len(self.history_steps)


def _value(item) -> object:
    try:
        return json.loads(item.value_json)
    except json.JSONDecodeError:
        return item.value_json


def _history(contents: RunContents, rec) -> None:
    """One history row: its step, its scalar keys, and the media (tables, images) logged in it."""
    step = int(rec.history.step.num)
    items = {_item_key(i): _value(i) for i in rec.history.item}
    media = {k[: -len("/_type")]: v for k, v in items.items() if k.endswith("/_type")}
    for name, kind in media.items():
        (contents.tables if kind in TABLE_TYPES else contents.images).setdefault(name, []).append(step)
    contents.history_steps.append(step)
    row = {k: v for k, v in items.items() if not k.startswith("_") and not any(k.startswith(m + "/") for m in media)}
    contents.history_keys |= set(row)
    contents.history.append({"step": step, **row})


def read_run(path: Path) -> RunContents:
    """Condense the run file at `path` (a `.wandb` file or an `offline-run-*` directory holding one)."""
    path = Path(path)
    if path.is_dir():
        (path,) = path.glob("*.wandb")
    contents = RunContents(path=str(path))
    _, contents.complete = raw_records(path)
    for rec in records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            r = rec.run
            contents.run_id, contents.name, contents.group, contents.job_type = (
                r.run_id,
                r.display_name,
                r.run_group,
                r.job_type,
            )
            contents.tags = list(r.tags)
            contents.config |= {_item_key(i): _value(i) for i in r.config.update}
        elif kind == "config":
            contents.config |= {_item_key(i): _value(i) for i in rec.config.update}
        elif kind == "history":
            _history(contents, rec)
        elif kind == "summary":
            contents.summary |= {_item_key(i): _value(i) for i in rec.summary.update}
        elif kind == "artifact" and rec.artifact.type != "run_table":  # tables' own artifacts are media, not outputs
            a = rec.artifact
            meta = json.loads(a.metadata) if a.metadata else {}
            contents.artifacts.append({"name": a.name, "type": a.type, "digest": a.digest, "metadata": meta})
        elif kind == "stats":
            contents.system_metrics_rows += 1
        elif kind == "exit":
            contents.exited = True
    media = {k[: -len("/_type")] for k in contents.summary if k.endswith("/_type")}
    contents.summary = {
        k: v for k, v in contents.summary.items() if not k.startswith("_") and k.split("/")[0] not in media
    }
    return contents


def wait_exited(path: Path, timeout_s: float = 30.0) -> bool:
    """Wait until W&B has written the run file's exit record (wandb-core writes the file after `finish()`
    returns); True when it did within `timeout_s`."""
    deadline, size = time.monotonic() + timeout_s, -1
    while time.monotonic() < deadline:
        now = path.stat().st_size if path.is_file() else -1
        if now != size and now > len(HEADER):
            size = now
            if any(r.WhichOneof("record_type") == "exit" for r in records(path)):
                return True
        time.sleep(0.05)
    return False


def run_files(stage_dir: Path, run_id: str | None = None) -> list[Path]:
    """The offline run directories (segments) under `<stage_dir>/wandb/`, oldest first; only `run_id`'s if given.
    A resumed stage has one segment per launch, all with the same id."""
    dirs = sorted(Path(stage_dir).glob("wandb/offline-run-*"))
    return [d for d in dirs if run_id is None or d.name.endswith(f"-{run_id}")]
