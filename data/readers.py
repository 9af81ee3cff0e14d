"""datatrove readers of the stage's input items (listed by data/sources.py), each input counted, none fatal.

`ItemReader` is the first step of the stage's datatrove pipeline: task `rank` of `world_size` reads its share of
the items file, balanced by bytes (`item_tasks`; hub sources: its shard of every stream) and yields one datatrove
`Document` per record, kept or not. A record that cannot be used is a Document with empty text and
`metadata["reason"]` set, so the next step (`data.steps.Rejects`) counts and lists it.

Rows of `files` sources go through datatrove's readers, subclassed so that nothing is skipped uncounted (the base
classes log and skip a bad line, and stop a file at the first undecodable byte):

- `JsonRowsReader` (datatrove's JsonlReader: fsspec opens the file and infers its compression from the name,
  orjson parses): JSON lines, or one JSON array when the first character is `[` (a pretty-printed export); a
  UTF-8 BOM is ignored; a line orjson refuses is parsed again by the standard library, which accepts lone
  surrogate escapes (the filters then name them `non_utf8`); deep nesting is a `bad_json_line`, not a
  RecursionError; a file that breaks mid-way (truncated gzip/zstd) keeps its rows read so far and adds one
  `corrupt_file` record.
- `ParquetRowsReader` (datatrove's ParquetReader): a file pyarrow cannot open or finish is `corrupt_parquet`.
- `HubRowsReader` (datatrove's HuggingFaceDatasetReader): streamed hub rows, the same row mapping.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import os
import stat
from collections.abc import Iterator

import orjson
from datatrove.data import Document
from datatrove.pipeline.readers import HuggingFaceDatasetReader, JsonlReader, ParquetReader
from datatrove.pipeline.readers.base import BaseReader

from data.config import SourceConfig
from data.sources import read_text_file, record, row_record

BOM = b"\xef\xbb\xbf"
ITEM_OVERHEAD_BYTES = 4096  # what opening and listing one input costs a task, counted as this many bytes of text


def item_tasks(items: Iterator[dict], world_size: int) -> Iterator[tuple[dict, int | None]]:
    """(item, task) for each item in order: each local item goes to the task with the fewest bytes so far (ties:
    the lowest task), so that one task does not get the big files while another idles; hub items: None (every task
    reads its shard). Every task computes the same assignment from the same file, one item at a time."""
    loads = [0] * world_size
    for item in items:
        if item["kind"] == "hub":
            yield item, None
            continue
        task = min(range(world_size), key=loads.__getitem__)
        loads[task] += item.get("size", 0) + ITEM_OVERHEAD_BYTES
        yield item, task


def to_document(rec: dict) -> Document:
    """A record (data.sources.record) as a datatrove Document; rejected records keep an empty text."""
    meta = {k: rec[k] for k in ("path", "lang", "source", "reason")}
    return Document(text=rec["text"] if not rec["reason"] else "", id=rec["path"], metadata=meta)


def parse_json(raw: bytes) -> tuple[object, str]:
    """(value, reason) of one JSON text; reason "" when it parsed."""
    try:
        return orjson.loads(raw), ""
    except orjson.JSONDecodeError:
        pass
    try:  # valid JSON that orjson refuses: lone surrogate escapes ("\ud800")
        return json.loads(raw), ""
    except UnicodeDecodeError:
        return None, "non_utf8"
    except (ValueError, RecursionError):  # truncated, not JSON, or nested deeper than the interpreter allows
        return None, "bad_json_line"


def _failure(e: Exception, corrupt: str) -> str:
    """The reason for a file that failed while being opened or read."""
    if isinstance(e, FileNotFoundError):
        return "vanished"
    if isinstance(e, PermissionError):
        return "unreadable"
    return corrupt


class _RowMapping:
    """What the three row readers share: rows become records of one configured source."""

    spec: SourceConfig
    max_doc_bytes: int
    display: str

    def row_document(self, row: object, id_in_file: object, reason: str = "") -> Document:
        where = f"{self.display}#{id_in_file}"
        if reason:
            return to_document(record(path=where, source=self.spec.name or self.spec.kind, reason=reason))
        return to_document(row_record(row, where, self.spec, self.max_doc_bytes))

    def get_document_from_dict(self, data: dict, source_file: str, id_in_file: int | str) -> Document:
        return self.row_document(data, id_in_file)


class JsonRowsReader(_RowMapping, JsonlReader):
    """JSON lines / JSON array rows of one file (see the module docstring)."""

    def __init__(self, folder: str, spec: SourceConfig, max_doc_bytes: int, display: str = "") -> None:
        super().__init__(folder, compression="infer", text_key=spec.text_field)
        self.spec, self.max_doc_bytes, self.display = spec, max_doc_bytes, display

    def read_file(self, filepath: str) -> Iterator[Document]:
        self.display = self.display or filepath
        li = 0
        try:
            with self.data_folder.open(filepath, "rb", compression=self.compression) as f:
                lines = _binary_lines(f)
                first = next(lines, b"")
                while first and not first.strip():
                    first, li = next(lines, b""), li + 1
                if not first:
                    yield self.row_document(None, 0, "empty_file")
                    return
                first = first.removeprefix(BOM)
                if first.lstrip().startswith(b"["):  # one JSON array of rows
                    value, reason = parse_json(first + b"".join(lines))
                    if reason or not isinstance(value, list):
                        yield self.row_document(None, 0, reason or "bad_json_line")
                        return
                    for i, row in enumerate(value):
                        yield self.row_document(row, i)
                    return
                for line in itertools.chain([first], lines):
                    if line.strip():
                        value, reason = parse_json(line)
                        yield self.row_document(value, li, reason)
                    li += 1
        except (OSError, EOFError, ValueError) as e:  # gzip/zstd errors are OSError/ValueError subclasses
            yield self.row_document(None, li, _failure(e, "corrupt_file"))


def _binary_lines(f) -> Iterator[bytes]:
    """Lines of a binary stream; decompressors without `readline` (zstandard's reader) get a buffer around them."""
    try:
        line = f.readline()
    except io.UnsupportedOperation:
        f = io.BufferedReader(f)
        line = f.readline()
    while line:
        yield line
        line = f.readline()


class ParquetRowsReader(_RowMapping, ParquetReader):
    """Rows of one parquet file; the columns the source maps (text, language, path) only."""

    def __init__(self, folder: str, spec: SourceConfig, max_doc_bytes: int, display: str = "") -> None:
        super().__init__(folder, text_key=spec.text_field, read_metadata=False)
        self.spec, self.max_doc_bytes, self.display = spec, max_doc_bytes, display

    def read_file(self, filepath: str) -> Iterator[Document]:
        import pyarrow as pa  # deferred: pyarrow only for parquet sources
        import pyarrow.parquet as pq

        self.display = self.display or filepath
        li = 0
        wanted = [c for c in (self.spec.text_field, self.spec.lang_field, self.spec.path_field) if c]
        try:
            with self.data_folder.open(filepath, "rb") as f, pq.ParquetFile(f) as pqf:
                cols = [c for c in wanted if c in pqf.schema_arrow.names]
                for batch in pqf.iter_batches(batch_size=self.batch_size, columns=cols):
                    for row in batch.to_pylist():
                        yield self.row_document(row, li)
                        li += 1
        except (pa.ArrowException, OSError, ValueError) as e:
            yield self.row_document(None, li, _failure(e, "corrupt_parquet"))


class HubRowsReader(_RowMapping, HuggingFaceDatasetReader):
    """Streamed rows of a hub dataset (this task's shard of the stream)."""

    def __init__(self, spec: SourceConfig, max_doc_bytes: int, limit: int = -1) -> None:
        options = {"name": spec.hub_name, "split": spec.split}
        if spec.hub_data_dir:
            options["data_dir"] = spec.hub_data_dir
        super().__init__(spec.hub_path, dataset_options=options, streaming=True, limit=limit, text_key=spec.text_field)
        self.spec, self.max_doc_bytes, self.display = spec, max_doc_bytes, spec.hub_path


class ItemReader(BaseReader):
    """The stage's first datatrove step: this task's share of the listed items, as Documents (see module doc).

    Row caps of files/hub sources (`max_files`, `max_bytes`) apply per task: ceil(cap / world_size) each."""

    name = "📖 corpus items"

    def __init__(self, items_file: str, specs: list[SourceConfig], max_doc_bytes: int) -> None:
        super().__init__()
        self.items_file, self.specs, self.max_doc_bytes = items_file, specs, max_doc_bytes

    def _rows(self, item: dict, spec: SourceConfig) -> Iterator[Document]:
        path = item["path"]
        try:
            if not stat.S_ISREG(os.stat(path).st_mode):  # replaced by a FIFO or a folder since listing
                yield to_document(record(path=item["name"], source=item["source"], reason="not_a_file"))
                return
        except OSError:
            yield to_document(record(path=item["name"], source=item["source"], reason="vanished"))
            return
        kind = ParquetRowsReader if item["format"] == "parquet" else JsonRowsReader
        reader = kind(os.path.dirname(path) or ".", spec, self.max_doc_bytes, display=item["name"])
        yield from reader.read_file(os.path.basename(path))

    def _item_documents(self, item: dict, rank: int, world_size: int) -> Iterator[Document]:
        spec = self.specs[item["spec"]]
        if item["kind"] == "reject":
            yield to_document(record(path=item["name"], source=item["source"], reason=item["reason"]))
        elif item["kind"] == "text":
            text, reason = read_text_file(item["path"], self.max_doc_bytes, item["lang"])
            yield to_document(record(text, item["name"], item["lang"], item["source"], reason))
        elif item["kind"] == "rows":
            yield from self._rows(item, spec)
        else:
            cap = math.ceil(spec.max_files / world_size) if spec.max_files else -1
            yield from HubRowsReader(spec, self.max_doc_bytes, limit=cap).run(None, rank, world_size)

    def run(self, data=None, rank: int = 0, world_size: int = 1) -> Iterator[Document]:
        if data:
            yield from data
        taken: dict[int, list[int]] = {}  # source index -> [rows, bytes] of kept rows in this task
        with open(self.items_file, encoding="utf-8") as f:
            for item, task in item_tasks(map(json.loads, f), world_size):
                if task is not None and task != rank:
                    continue
                spec = self.specs[item["spec"]]
                rows_cap = math.ceil(spec.max_files / world_size) if spec.max_files else 0
                bytes_cap = math.ceil(spec.max_bytes / world_size) if spec.max_bytes else 0
                counts = taken.setdefault(item["spec"], [0, 0])
                for doc in self._item_documents(item, rank, world_size):
                    capped = spec.kind != "python_env" and (
                        (rows_cap and counts[0] >= rows_cap) or (bytes_cap and counts[1] >= bytes_cap)
                    )
                    if capped:
                        break
                    if not doc.metadata["reason"]:
                        counts[0] += 1
                        counts[1] += len(doc.text)
                    self.stat_update("documents" if not doc.metadata["reason"] else "unusable")
                    yield doc
