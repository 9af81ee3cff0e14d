"""Corpus sources: where raw documents come from, as one stream of plain dicts.

Every source yields *records* `{"text", "path", "lang", "source", "reason"}`. A record whose `reason` is not empty
is an item that could not be used (unreadable, not UTF-8, a symlink, a truncated JSON line, too large to read...):
it travels through the pipeline with empty text so that every skipped item is counted with its reason in
`stats.json`, the manifest and W&B, instead of vanishing or crashing the stage.

Three kinds, composable in `data.sources` (see `data/config.py`):

- `python_env`: the default, embedded corpus. The running interpreter's standard library and installed packages
  hold hundreds of MB of real Python code and reStructuredText/Markdown documentation, so `make pipeline` needs no
  network. Files are listed deterministically and a seed-hashed order picks the sample under `max_files` /
  `max_bytes`, so the same seed gives the same corpus on the same machine.
- `files`: local `.jsonl` / `.json` lines and `.parquet` files with a text column (the schema of `hub` sets).
- `hub`: `datasets.load_dataset(..., streaming=True)` for users who are online, e.g. `bigcode/the-stack-smol`
  (column `content`, `lang`) or `HuggingFaceFW/fineweb-edu` (column `text`). Rows go through the same mapping as
  `files`, which is what the unit tests exercise on local files of the same schema.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path

from data.config import SourceConfig

# Language of a file by extension. Prose languages are not FIM-transformed and get prose checks.
EXTENSION_LANG = {
    ".py": "python",
    ".pyi": "python",
    ".md": "markdown",
    ".rst": "rst",
    ".txt": "text",
    ".json": "json",
    ".js": "javascript",
    ".ts": "typescript",
    ".c": "c",
    ".h": "c",
    ".cpp": "cpp",
    ".cc": "cpp",
    ".hpp": "cpp",
    ".java": "java",
    ".go": "go",
    ".rs": "rust",
    ".sol": "solidity",
    ".sh": "shell",
    ".yaml": "yaml",
    ".yml": "yaml",
    ".toml": "toml",
    ".html": "html",
}
PROSE_LANGS = frozenset({"markdown", "rst", "text"})
JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)


def record(text: str = "", path: str = "", lang: str = "text", source: str = "", reason: str = "") -> dict:
    """One corpus item; `reason` non-empty marks an item skipped before filtering."""
    return {"text": text, "path": path, "lang": lang, "source": source, "reason": reason}


def normalize_lang(lang: str | None, path: str | None, default: str) -> str:
    """Lower-cased language name from an explicit field, else from the path's extension, else `default`."""
    if lang:
        return str(lang).strip().lower().replace(" ", "-")
    if path:
        return EXTENSION_LANG.get(Path(str(path)).suffix.lower(), default)
    return default


def _sample_key(seed: int, name: str) -> bytes:
    return hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()


def _python_env_roots(roots: list[str]) -> list[Path]:
    paths = sysconfig.get_paths()
    out: list[Path] = []
    for r in roots:
        p = Path(paths[r]) if r in ("stdlib", "purelib", "platlib") else Path(r)
        if not p.is_dir():
            raise ValueError(f"python_env source root {r!r} is not a directory: {p}")
        out.append(p.resolve())
    return out


_PACKAGE_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


def list_files(roots: list[Path], extensions: list[str]) -> tuple[list[tuple[str, Path, int]], list[dict]]:
    """Walk `roots` in sorted order without following directory symlinks (no loops); return (files, skipped).

    `site-packages` / `dist-packages` directories below a root are skipped: the base interpreter's stdlib directory
    holds its own site-packages, which is not the standard library (installed packages come from the "purelib" root).

    files: (relative name, path, size) of regular files with a wanted extension, each real file once.
    skipped: records for symlinks and unreadable entries.
    """
    exts = {e.lower() for e in extensions}
    files: list[tuple[str, Path, int]] = []
    skipped: list[dict] = []
    seen: set[Path] = set()
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            dirnames.sort()
            # a site-packages below a root is not that root's content (the base interpreter's stdlib directory holds
            # its own site-packages; installed packages come from the "purelib" root, the running environment's)
            dirnames[:] = [d for d in dirnames if d not in _PACKAGE_DIRS and Path(dirpath, d) not in roots]
            for fn in sorted(filenames):
                p = Path(dirpath, fn)
                if p.suffix.lower() not in exts:
                    continue
                if p in seen:
                    continue
                seen.add(p)
                name = f"{root.name}/{p.relative_to(root)}"
                try:
                    st = p.lstat()
                except OSError:
                    skipped.append(record(path=name, reason="unreadable"))
                    continue
                if stat.S_ISLNK(st.st_mode):
                    skipped.append(record(path=name, reason="symlink"))
                elif not stat.S_ISREG(st.st_mode):  # a FIFO or device named *.py would block or never end
                    skipped.append(record(path=name, reason="not_a_file"))
                else:
                    files.append((name, p, st.st_size))
    return files, skipped


def sample_files(files: list[tuple[str, Path, int]], seed: int, max_files: int, max_bytes: int) -> list:
    """Deterministic sample: order by hash(seed, name), take while under both caps (0 = no cap)."""
    order = sorted(files, key=lambda f: _sample_key(seed, f[0]))
    out, total = [], 0
    for f in order:
        if max_files and len(out) >= max_files:
            break
        if max_bytes and total + f[2] > max_bytes:
            continue  # a smaller file may still fit
        out.append(f)
        total += f[2]
    return sorted(out, key=lambda f: f[0])


def read_text_file(path: Path, max_doc_bytes: int) -> tuple[str, str]:
    """(text, reason): UTF-8 text of a file or an empty text with why it could not be used."""
    try:
        if path.stat().st_size > max_doc_bytes:
            return "", "too_large"
        data = path.read_bytes()
    except OSError:  # permission, a symlink loop (ELOOP), a file gone since listing
        return "", "unreadable"
    if b"\x00" in data:
        return "", "binary"
    try:
        return data.decode("utf-8"), ""
    except UnicodeDecodeError:
        return "", "non_utf8"


def iter_python_env(spec: SourceConfig, seed: int, max_doc_bytes: int) -> Iterator[dict]:
    label = spec.name or spec.kind
    files, skipped = list_files(_python_env_roots(spec.roots), spec.extensions)
    for r in skipped:
        yield {**r, "source": label}
    for name, path, _ in sample_files(files, seed, spec.max_files, spec.max_bytes):
        text, reason = read_text_file(path, max_doc_bytes)
        lang = normalize_lang(None, name, "text")
        yield record(text=text, path=name, lang=lang, source=label, reason=reason)


def _expand_paths(paths: list[str]) -> list[Path]:
    out: list[Path] = []
    for s in paths:
        p = Path(s).expanduser()
        if not p.exists():
            raise ValueError(f"data source path does not exist: {p}")
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.suffix.lower() in JSONL_SUFFIXES + PARQUET_SUFFIXES)
            if not found:
                raise ValueError(f"data source directory holds no .jsonl/.json/.parquet file: {p}")
            out.extend(found)
        elif p.suffix.lower() in JSONL_SUFFIXES + PARQUET_SUFFIXES:
            out.append(p)
        else:
            raise ValueError(f"data source file must be .jsonl, .json or .parquet: {p}")
    return out


def iter_jsonl_rows(path: Path) -> Iterator[dict | None]:
    """Rows of a JSON-lines file; None for a line that is not a JSON object (truncated, corrupt)."""
    with open(path, "rb") as f:
        for raw in f:
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                yield None
                continue
            yield row if isinstance(row, dict) else None


def iter_parquet_rows(path: Path, columns: list[str]) -> Iterator[dict]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    cols = [c for c in columns if c in pf.schema_arrow.names]
    for batch in pf.iter_batches(batch_size=1024, columns=cols):
        yield from batch.to_pylist()


def rows_to_records(rows: Iterable[tuple[str, dict | None]], spec: SourceConfig, max_doc_bytes: int) -> Iterator[dict]:
    """Map (where, row) pairs of a files/hub source to records (one code path for both), honoring the caps."""
    label = spec.name or spec.kind
    n, total = 0, 0
    for where, row in rows:
        if (spec.max_files and n >= spec.max_files) or (spec.max_bytes and total >= spec.max_bytes):
            return
        if row is None:
            yield record(path=where, source=label, reason="bad_json_line")
            continue
        text = row.get(spec.text_field)
        if not isinstance(text, str):
            yield record(path=where, source=label, reason="missing_text_field")
            continue
        row_path = row.get(spec.path_field) if spec.path_field else None
        if row_path:
            where = f"{where}:{row_path}"
        lang = normalize_lang(row.get(spec.lang_field) if spec.lang_field else None, row_path, spec.default_lang)
        if len(text) > max_doc_bytes:  # characters <= bytes; the exact byte bound is applied by the filters
            yield record(path=where, lang=lang, source=label, reason="too_large")
            continue
        n += 1
        total += len(text)
        yield record(text=text, path=where, lang=lang, source=label)


def iter_files(spec: SourceConfig, max_doc_bytes: int) -> Iterator[dict]:
    columns = [c for c in (spec.text_field, spec.lang_field, spec.path_field) if c]

    def rows() -> Iterator[tuple[str, dict | None]]:
        for p in _expand_paths(spec.paths):
            it = iter_jsonl_rows(p) if p.suffix.lower() in JSONL_SUFFIXES else iter_parquet_rows(p, columns)
            for i, row in enumerate(it):
                yield f"{p.name}#{i}", row

    yield from rows_to_records(rows(), spec, max_doc_bytes)


def iter_hub(spec: SourceConfig, max_doc_bytes: int) -> Iterator[dict]:
    import datasets

    kwargs = {"split": spec.split, "streaming": True}
    if spec.hub_data_dir:
        kwargs["data_dir"] = spec.hub_data_dir
    ds = datasets.load_dataset(spec.hub_path, spec.hub_name, **kwargs)
    yield from rows_to_records(((f"{spec.hub_path}#{i}", row) for i, row in enumerate(ds)), spec, max_doc_bytes)


def iter_source(spec: SourceConfig, seed: int, max_doc_bytes: int) -> Iterator[dict]:
    """All records of one configured source."""
    if spec.kind == "python_env":
        return iter_python_env(spec, seed, max_doc_bytes)
    if spec.kind == "files":
        return iter_files(spec, max_doc_bytes)
    if spec.kind == "hub":
        return iter_hub(spec, max_doc_bytes)
    raise ValueError(f"unknown data source kind {spec.kind!r}")


def iter_sources(specs: list[SourceConfig], seed: int, max_doc_bytes: int) -> Iterator[dict]:
    for spec in specs:
        yield from iter_source(spec, seed, max_doc_bytes)


def check_sources(specs: list[SourceConfig]) -> None:
    """Fail early, naming the path, when a local source does not exist (hub sources are checked when read)."""
    for spec in specs:
        if spec.kind == "python_env":
            _python_env_roots(spec.roots)
        elif spec.kind == "files":
            _expand_paths(spec.paths)
