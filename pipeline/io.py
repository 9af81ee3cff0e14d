"""Crash-safe file output and content hashing for the run-directory contract.

Every artifact a later stage reads is published atomically: it is written under a temporary name in the same
directory and moved onto its final name with one `os.replace`, so a crash leaves either the old artifact, the new
one, or an ignorable `.tmp-*` leftover — never a half-written file that loads as valid.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` atomically (temp file + fsync + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; published artifacts are ordinary files
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def scoped_env(env: dict[str, str]) -> Iterator[None]:
    """`env` set in os.environ for the duration of the block, the previous values (or absence) restored after."""
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `final`; on success it replaces `final`, on error it is deleted.

    A previous `final` is removed only after the new content is complete, so readers never see a partial directory.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp creates 0700
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        trash = final.with_name(f".trash-{final.name}-{os.getpid()}")
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)


def clean_temporaries(directory: Path) -> list[Path]:
    """Delete `.tmp-*` / `.trash-*` leftovers of an interrupted run inside `directory`; returns what was removed."""
    removed = []
    directory = Path(directory)
    if not directory.is_dir():
        return removed
    for p in directory.iterdir():
        if p.name.startswith((".tmp-", ".trash-")):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def _feed_file(h, path: Path, chunk: int = 1 << 20) -> None:
    """Stream a regular file's bytes into the hash `h`; a file that cannot be read feeds a marker naming why.

    Not regular (a FIFO, a device): never read, since reading one may block forever."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        h.update(f"\0unreadable:{errno.errorcode.get(e.errno, e.errno)}".encode())
        return
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            h.update(b"\0not_a_file")
            return
        try:
            while block := fh.read(chunk):
                h.update(block)
        except OSError as e:
            h.update(f"\0unreadable:{errno.errorcode.get(e.errno, e.errno)}".encode())


def hash_file(path: Path) -> str:
    """sha256 of a file's bytes (never raises: see `_feed_file`)."""
    h = hashlib.sha256()
    _feed_file(h, Path(path))
    return h.hexdigest()


def _tree_files(root: Path) -> list[Path]:
    """Files below `root`, sorted as paths, without following directory symlinks; hidden entries skipped."""
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):  # unreadable folders: skipped by walk
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        out.extend(Path(dirpath, f) for f in filenames if not f.startswith("."))
    return sorted(out)


def hash_path(path: Path) -> str:
    """sha256 of a file, or of a directory tree (relative names and contents, in sorted order); hidden files skipped.

    Robust to the tree changing or refusing access while it is hashed: an unreadable, vanished or non-regular
    entry contributes its name and a marker (see `_feed_file`) instead of raising; names that are not valid UTF-8
    are hashed as their bytes."""
    path = Path(path)
    h = hashlib.sha256()
    if path.is_file():
        files, root = [path], path.parent
    elif path.is_dir():
        files, root = _tree_files(path), path
    else:
        raise FileNotFoundError(f"cannot hash {path}: no such file or directory")
    for f in files:
        h.update(os.fsencode(f.relative_to(root)))
        h.update(b"\0")
        _feed_file(h, f)
    return h.hexdigest()


def hash_stats(entries: Iterable[tuple[str, Path]]) -> str:
    """sha256 over (name, size, mtime) of each (name, path) entry: a cheap fingerprint of a large file listing.

    A vanished or unreadable entry contributes its name and the error, so a listing that changes in any way (a file
    added, removed, edited, or made unreadable) changes the fingerprint."""
    h = hashlib.sha256()
    for name, p in entries:
        try:
            st = os.stat(p, follow_symlinks=False)
            mark = f"{st.st_size}:{st.st_mtime_ns}:{stat.S_IFMT(st.st_mode)}"
        except OSError as e:
            mark = f"error:{errno.errorcode.get(e.errno, e.errno)}"
        h.update(os.fsencode(name) + b"\0" + mark.encode() + b"\n")
    return h.hexdigest()


def hash_config(obj: Any) -> str:
    """Stable hash of a JSON-serialisable config."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
