"""Corpus sources: every input of the configured sources, listed once, then read item by item.

Two halves, so that the work can be spread over datatrove tasks:

- `list_items` (the stage's driver, once): walks every source and returns one *item* per input file (plus one
  per hub source), in a deterministic order, and a fingerprint of the inputs for the stage's skip decision
  (names, sizes and modification times of every listed file; content hashes for `files` sources up to
  `CONTENT_HASH_LIMIT` bytes). Whatever cannot become an input is an item too, of kind "reject", with a named
  reason: an unreadable sub-folder, a symlink, a FIFO or device, a file that vanished while listing.
- `read_text_item` / `row_record` (the tasks, see data/readers.py): turn an item into *records*
  `{"text", "path", "lang", "source", "reason"}`. A record whose `reason` is not empty could not be used (not
  UTF-8, binary, too large, a broken JSON line...): it is counted with its reason in `stats.json`, the manifest
  and W&B, never dropped silently.

Source kinds (see `data/config.py`):

- `python_env`: the default, embedded corpus. The running interpreter's standard library and installed packages
  hold hundreds of MB of real Python code and reStructuredText/Markdown documentation, so `make pipeline` needs no
  network. Files are listed deterministically and a seed-hashed order picks the sample under `max_files` /
  `max_bytes`. Python files are decoded as Python itself does (PEP 263: a BOM or a `coding:` line).
- `files`: local JSON lines / JSON arrays (optionally `.gz`, `.zst`, `.bz2`, `.xz`) and `.parquet` files.
- `hub`: `datasets.load_dataset(..., streaming=True)`, read through datatrove's HuggingFaceDatasetReader.

File names that are not valid UTF-8 are kept as Python keeps them (surrogate escapes) for opening, and shown with
`printable` (backslash escapes) wherever they are written down.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import stat
import sysconfig
import tokenize
from collections.abc import Iterator
from pathlib import Path

from data.config import SourceConfig
from data.langs import normalize_lang
from pipeline.io import hash_file, hash_stats

ROW_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
COMPRESSION_SUFFIXES = (".gz", ".zst", ".bz2", ".xz")  # what fsspec infers from a name
CONTENT_HASH_LIMIT = 1 << 30  # files sources up to 1 GiB are fingerprinted by content, larger ones by size + mtime
_PACKAGE_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


def record(text: str = "", path: str = "", lang: str = "text", source: str = "", reason: str = "") -> dict:
    """One corpus item; `reason` non-empty marks an item skipped before filtering."""
    return {"text": text, "path": path, "lang": lang, "source": source, "reason": reason}


def printable(name: str) -> str:
    """A file name as valid UTF-8 text: bytes that are not UTF-8 become backslash escapes (`\\xff`)."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def _sample_key(seed: int, name: str) -> bytes:
    return hashlib.blake2b(f"{seed}:{printable(name)}".encode(), digest_size=8).digest()


def label(spec: SourceConfig) -> str:
    return spec.name or spec.kind


def _python_env_roots(roots: list[str]) -> list[Path]:
    paths = sysconfig.get_paths()
    out: list[Path] = []
    for r in roots:
        p = Path(paths[r]) if r in ("stdlib", "purelib", "platlib") else Path(r).expanduser()
        if not p.is_dir():
            raise ValueError(f"python_env source root {r!r} is not a directory: {p}")
        out.append(p.resolve())
    return out


def _why(e: OSError) -> str:
    return "vanished" if e.errno == errno.ENOENT else "unreadable"


def walk(root: Path, want, skip_dir=lambda d: False) -> Iterator[tuple[Path, os.stat_result | None, str]]:
    """(path, lstat, reason) for every file below `root` whose name `want(name)` accepts, in sorted order.

    Directory symlinks are not followed (no loops). reason: "" for a regular file; "symlink", "not_a_file" (FIFO,
    socket, device), "vanished" (gone between listing and stat), "unreadable" for the others, and
    "unreadable_dir" for a sub-folder that cannot be listed (stat None: the whole folder is one item)."""
    errors: list[OSError] = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=errors.append, followlinks=False):
        while errors:
            e = errors.pop()
            yield Path(e.filename), None, "unreadable_dir"
        dirnames[:] = sorted(d for d in dirnames if not skip_dir(Path(dirpath, d)))
        for fn in sorted(filenames):
            if not want(fn):
                continue
            p = Path(dirpath, fn)
            try:
                st = p.lstat()
            except OSError as e:
                yield p, None, _why(e)
                continue
            if stat.S_ISLNK(st.st_mode):
                yield p, st, "symlink"
            elif not stat.S_ISREG(st.st_mode):  # a FIFO or device named *.py would block or never end
                yield p, st, "not_a_file"
            else:
                yield p, st, ""
    while errors:  # the root itself, or the last folder walked
        yield Path(errors.pop().filename), None, "unreadable_dir"


def _relative_name(root: Path, p: Path) -> str:
    """`<root name>/<path below root>` (string operations: this runs once per listed file)."""
    r, s = str(root), str(p)
    return f"{root.name}/{s[len(r) + 1 :]}" if s.startswith(r + os.sep) else s


def list_files(roots: list[Path], extensions: list[str]) -> tuple[list[tuple[str, Path, int]], list[dict]]:
    """Files with a wanted extension below `roots`: (files, skipped).

    `site-packages` / `dist-packages` directories below a root are skipped: the base interpreter's stdlib directory
    holds its own site-packages, which is not the standard library (installed packages come from the "purelib" root).

    files: (relative name, path, size) of regular files, each real file once.
    skipped: records for symlinks, FIFOs, unreadable or vanished entries and unreadable sub-folders.
    """
    exts = {e.lower() for e in extensions}
    files: list[tuple[str, Path, int]] = []
    skipped: list[dict] = []
    seen: set[Path] = set()
    for root in roots:

        def skip_dir(d: Path, root=root) -> bool:
            return d.name in _PACKAGE_DIRS or d in roots

        for p, st, reason in walk(root, lambda fn: os.path.splitext(fn)[1].lower() in exts, skip_dir):
            if p in seen:
                continue
            seen.add(p)
            name = _relative_name(root, p)
            if reason:
                skipped.append(record(path=printable(name), reason=reason))
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


def _base_suffix(name: str) -> str:
    """`.jsonl` for `x.jsonl.gz`: the suffix under a compression suffix."""
    p = Path(name)
    if p.suffix.lower() in COMPRESSION_SUFFIXES:
        p = p.with_suffix("")
    return p.suffix.lower()


def _is_data_file(name: str) -> bool:
    return _base_suffix(name) in ROW_SUFFIXES + PARQUET_SUFFIXES


def _row_format(name: str) -> str:
    return "parquet" if _base_suffix(name) in PARQUET_SUFFIXES else "json"


def _expand_paths(paths: list[str]) -> list[Path]:
    """The `paths` of a files source, checked: each exists and is a directory or a data file."""
    out = []
    for s in paths:
        p = Path(s).expanduser()
        if not os.path.lexists(p):
            raise ValueError(f"data source path does not exist: {p}")
        if not p.is_dir() and not _is_data_file(p.name):
            raise ValueError(f"data source file must be .jsonl, .json, .ndjson or .parquet (or compressed): {p}")
        out.append(p)
    return out


def _list_source_files(spec: SourceConfig) -> Iterator[tuple[str, Path, os.stat_result | None, str]]:
    """(name, path, stat, reason) of every input of a files source. Inside directories, data files are found by
    suffix; other visible files are counted as "unsupported_format"; symlinks to files are followed (the hub
    cache's snapshots are symlinks), to directories not."""
    for top in _expand_paths(spec.paths):
        if not top.is_dir():
            try:
                st = top.stat()
            except OSError as e:
                yield printable(str(top)), top, None, _why(e)
                continue
            yield printable(str(top)), top, st, "" if stat.S_ISREG(st.st_mode) else "not_a_file"
            continue
        for p, st, reason in walk(top, lambda fn: not fn.startswith("."), lambda d: d.name.startswith(".")):
            name = printable(_relative_name(top, p))
            if reason == "symlink":
                try:
                    st = p.stat()
                    reason = "" if stat.S_ISREG(st.st_mode) else "not_a_file"
                except OSError as e:
                    reason = "broken_symlink" if e.errno == errno.ENOENT else "unreadable"
            if not reason and not _is_data_file(p.name):
                reason = "unsupported_format"
            yield name, p, st, reason


def _reject(spec: SourceConfig, index: int, name: str, reason: str) -> dict:
    return {"kind": "reject", "spec": index, "source": label(spec), "name": name, "reason": reason}


def list_items(specs: list[SourceConfig], seed: int) -> tuple[list[dict], str]:
    """(items, fingerprint) of all sources: see the module docstring. Items are JSON-serialisable dicts with
    `kind` in {"text", "rows", "hub", "reject"}, the index of their source in `specs` and a display `name`."""
    items: list[dict] = []
    fp = hashlib.sha256()
    for i, spec in enumerate(specs):
        src = label(spec)
        if spec.kind == "python_env":
            files, skipped = list_files(_python_env_roots(spec.roots), spec.extensions)
            fp.update(hash_stats((n, p) for n, p, _ in files).encode())
            items += [_reject(spec, i, r["path"], r["reason"]) for r in skipped]
            for name, path, size in sample_files(files, seed, spec.max_files, spec.max_bytes):
                lang = normalize_lang(None, name, "text")
                item = {"kind": "text", "spec": i, "source": src, "name": printable(name), "path": str(path)}
                items.append({**item, "size": size, "lang": lang})
        elif spec.kind == "files":
            listed = list(_list_source_files(spec))
            good = [(n, p, st) for n, p, st, r in listed if not r]
            by_content = sum(st.st_size for _, _, st in good) <= CONTENT_HASH_LIMIT
            for name, path, st, reason in listed:
                fp.update(f"{name}\0{reason}\0".encode())
                if reason:
                    items.append(_reject(spec, i, name, reason))
                    continue
                fp.update((hash_file(path) if by_content else hash_stats([(name, path)])).encode())
                item = {"kind": "rows", "spec": i, "source": src, "name": name, "path": str(path)}
                items.append({**item, "size": st.st_size, "format": _row_format(path.name)})
        else:  # hub: the config names the data; a remote change cannot be seen offline
            items.append({"kind": "hub", "spec": i, "source": src, "name": spec.hub_path})
    fp.update(repr([(it["kind"], it["name"], it.get("size")) for it in items]).encode())
    return items, fp.hexdigest()


def decode_text(data: bytes, lang: str) -> tuple[str, str]:
    """(text, reason) of a file's bytes: Python files as the interpreter decodes them (PEP 263: a UTF-8 BOM or a
    `coding:` declaration in the first two lines), other files as UTF-8 with an optional BOM."""
    if b"\x00" in data:
        return "", "binary"
    encoding = "utf-8-sig"
    if lang == "python":
        try:
            encoding, _ = tokenize.detect_encoding(io.BytesIO(data).readline)
        except SyntaxError:  # not UTF-8 without a declaration, an unknown codec, a BOM contradicting the declaration
            try:
                data.decode("utf-8")
            except UnicodeDecodeError:
                return "", "non_utf8"
            return "", "bad_encoding_declaration"
    try:
        return data.decode(encoding), ""
    except (UnicodeDecodeError, LookupError):
        return "", "non_utf8"


def read_text_file(path: Path, max_doc_bytes: int, lang: str = "text") -> tuple[str, str]:
    """(text, reason): the decoded text of a file, or an empty text and why it could not be used.

    Opened without following a symlink and without blocking, then checked to be a regular file, so a FIFO or a
    symlink that replaced the file after listing is refused instead of hanging the task."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except OSError as e:
        return "", "symlink" if e.errno == errno.ELOOP else _why(e)
    try:
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                return "", "not_a_file"
            if st.st_size > max_doc_bytes:
                return "", "too_large"
            data = f.read(st.st_size + 1)  # the size fstat gave, and one byte more to see a file that grew
            if len(data) > st.st_size:
                data += f.read(max_doc_bytes + 1 - len(data))
    except OSError as e:  # EIO, EISDIR on odd filesystems
        return "", _why(e)
    if len(data) > max_doc_bytes:
        return "", "too_large"
    return decode_text(data, lang)


def row_record(row: object, where: str, spec: SourceConfig, max_doc_bytes: int) -> dict:
    """The record of one row of a files/hub source: its text, path and language, or the reason it is unusable."""
    src = label(spec)
    if not isinstance(row, dict):
        return record(path=where, source=src, reason="bad_json_line")
    text = row.get(spec.text_field)
    if not isinstance(text, str):
        return record(path=where, source=src, reason="missing_text_field")
    row_path = row.get(spec.path_field) if spec.path_field else None
    if row_path:
        where = f"{where}:{printable(str(row_path))}"
    lang = normalize_lang(row.get(spec.lang_field) if spec.lang_field else None, row_path, spec.default_lang)
    if len(text) > max_doc_bytes:  # characters <= bytes; the exact byte bound is applied by the filters
        return record(path=where, lang=lang, source=src, reason="too_large")
    return record(text=text, path=where, lang=lang, source=src)


def check_sources(specs: list[SourceConfig]) -> None:
    """Fail early, naming the path, when a local source does not exist (hub sources are checked when read)."""
    for spec in specs:
        if spec.kind == "python_env":
            _python_env_roots(spec.roots)
        elif spec.kind == "files":
            _expand_paths(spec.paths)
