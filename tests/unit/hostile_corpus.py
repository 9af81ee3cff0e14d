"""Hostile corpora built at test time, and helpers to read them the way the data stage does.

`make_bad_corpus` is a python_env root, `make_hostile_files` a `files` source directory; each holds real
documents beside every kind of input that once crashed, hung or silently misled the stage (issue 17).
"""

from __future__ import annotations

import bz2
import gzip
import inspect
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from data.config import SourceConfig
from data.readers import ItemReader
from data.sources import list_items

REPO = Path(__file__).resolve().parents[2]
GOOD_PY = inspect.getsource(textwrap)
PROSE = (
    "Tokenizers split text into pieces that a model can count, and the pieces are chosen from the data itself. "
    "Byte-level byte pair encoding never meets an unknown character, because every byte has a symbol of its own. "
    "The trainer starts from single bytes and merges the most frequent pair again and again, until the vocabulary "
    "reaches the size that was asked for. Rare words are then spelled with several pieces, common ones with one.\n"
)


def rows_of(*texts: str, **extra) -> bytes:
    return "".join(json.dumps({"text": t, **extra}) + "\n" for t in texts).encode()


def make_bad_corpus(root: Path) -> Path:
    """A python_env root: good files and every kind of bad item the stage must survive."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(inspect.getsourcefile(textwrap), root / "good.py")
    (root / "doc.rst").write_text("Title\n=====\n\nA short paragraph of documentation written in words.\n")
    (root / "bin.py").write_bytes(b"\x7fELF\x02\x01\x01\x00\x00\x00" * 50)
    (root / "latin1.py").write_bytes("name = 'café'\n".encode("latin-1") * 10)
    (root / "empty.py").write_bytes(b"")
    (root / "one_line.txt").write_bytes(b"a" * 50_000_000)  # a single 50 MB line
    os.symlink(root / "loop_b.py", root / "loop_a.py")  # a symlink loop
    os.symlink(root / "loop_a.py", root / "loop_b.py")
    (root / "sub").mkdir()
    os.symlink(root, root / "sub" / "up")  # a directory loop
    (root / "ignored.bin").write_bytes(b"\x00\x01")
    os.mkfifo(root / "pipe.py")  # reading it would block forever
    # Python as the interpreter reads it (PEP 263): a BOM, a coding declaration
    (root / "bom.py").write_bytes(b"\xef\xbb\xbf" + GOOD_PY.encode())
    (root / "declared_latin1.py").write_bytes(b"# -*- coding: latin-1 -*-\n" + "name = 'café'\n".encode("latin-1") * 10)
    with open(os.fsencode(root) + b"/caf\xe9_name.py", "wb") as f:  # a file name that is not UTF-8
        f.write(b"def increment(x):\n    return x + 1\n\n\ndef double_increment(y):\n    return increment(y) * 2\n")
    (root / "think.py").write_text(
        'OPEN, CLOSE = "<think>", "</think>"\n\n\ndef wrap(text):\n    return OPEN + text + CLOSE\n'
    )
    return root


def make_hostile_files(root: Path) -> tuple[Path, dict[str, str]]:
    """A files-source directory and the reason expected for each input ("" = it becomes documents)."""
    root.mkdir(parents=True, exist_ok=True)
    expect = {}

    def put(name: str, data: bytes, reason: str = "") -> None:
        (root / name).write_bytes(data)
        expect[name] = reason

    put("good.jsonl", rows_of(PROSE, GOOD_PY, lang="text"))
    put("good.jsonl.gz", gzip.compress(rows_of(PROSE + "gz")))
    put("good.jsonl.zst", zstandard.ZstdCompressor().compress(rows_of(PROSE + "zst")))
    put("good.jsonl.bz2", bz2.compress(rows_of(PROSE + "bz2")))
    put("array.json", json.dumps([{"text": PROSE + "array one"}, {"text": PROSE + "array two"}], indent=2).encode())
    put("bom.jsonl", b"\xef\xbb\xbf" + rows_of(PROSE + "bom"))
    put("surrogate.jsonl", b'{"text": "lone \\ud800 surrogate ' + PROSE.encode()[:200] + b'"}\n')
    put("deep.jsonl", b'{"text": ' + b"[" * 200_000 + b"]" * 200_000 + b"}\n" + rows_of(PROSE + "after deep"))
    put("corrupt.parquet", b"PAR1" + os.urandom(2000), "corrupt_parquet")
    many = gzip.compress(rows_of(*(os.urandom(300).hex() for _ in range(400))))
    put("truncated.jsonl.gz", many[: len(many) // 2], "corrupt_file")  # rows, then a gzip stream cut short
    put("empty.jsonl", b"", "empty_file")
    put("notes.csv", b"a,b\n1,2\n", "unsupported_format")
    pq.write_table(pa.Table.from_pylist([{"text": PROSE + "parquet"}]), root / "good.parquet")
    expect["good.parquet"] = ""
    (root / "dir.jsonl").mkdir()  # a folder named *.jsonl: walked into, never opened as a file
    (root / "dir.jsonl" / "inner.jsonl").write_bytes(rows_of(PROSE + "inner"))
    expect["dir.jsonl/inner.jsonl"] = ""
    os.mkfifo(root / "fifo.jsonl")
    expect["fifo.jsonl"] = "not_a_file"
    os.symlink(root / "nowhere.jsonl", root / "broken.jsonl")
    expect["broken.jsonl"] = "broken_symlink"
    with open(os.fsencode(root) + b"/latin\xe9.jsonl", "wb") as f:  # a name that is not UTF-8
        f.write(rows_of(PROSE + "odd name"))
    expect["latin\\xe9.jsonl"] = ""
    return root, expect


def read_records(specs: list[SourceConfig], seed: int = 0, max_doc_bytes: int = 500_000, world_size: int = 1):
    """Every record of the sources, as the stage's first datatrove step yields them (all tasks, in order)."""
    items, _ = list_items(specs, seed)
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        f.write("".join(json.dumps(it) + "\n" for it in items))
    try:
        out = []
        for rank in range(world_size):
            for doc in ItemReader(f.name, specs, max_doc_bytes).run(None, rank, world_size):
                out.append({"text": doc.text, **doc.metadata})
        return out
    finally:
        os.unlink(f.name)


def shared_tmp() -> Path:
    """A fresh directory another uid can enter (pytest's tmp_path lives under a 0700 folder of root's)."""
    d = Path(tempfile.mkdtemp(prefix="hostile-", dir="/tmp"))
    d.chmod(0o755)
    return d


def run_as_other_user(code: str, timeout: float = 120) -> str:
    """Run Python `code` as a fresh uid with no privileges (as root, chmod 000 hides nothing); return its stdout.

    Not root: the current user is already unprivileged, so the code runs as it is."""
    cmd = [sys.executable, "-c", code]
    if os.geteuid() == 0:
        cmd = ["setpriv", "--reuid=54321", "--regid=54321", "--clear-groups", *cmd]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HOME": "/tmp", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd="/tmp")
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout
