"""What every benchmark shares: where results go and how each row says where it was measured."""

from __future__ import annotations

import csv
import datetime
import os
import platform
import subprocess
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu} x{os.cpu_count()}"


def commit() -> str:
    try:
        repo = RESULTS_DIR.parent.parent
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True)
        # the results files themselves do not make the code dirty: a bench appending several rows labels each one
        status = ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)bench/results"]
        dirty = subprocess.run(status, cwd=repo, capture_output=True, text=True)
        return (sha.stdout.strip() or "unknown") + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def append_result(name: str, row: dict) -> Path:
    """Append `row` (plus machine, commit, date) to bench/results/<name>.csv, writing a header for a new file.

    When the row has columns the file's header lacks (a bench that gained a column), the file is rewritten once with
    the union of the columns, older rows left empty in the new ones, so no row is ever written under the wrong
    header."""
    path = RESULTS_DIR / f"{name}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    full = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine(),
        "commit": commit(),
        **row,
    }
    fields = list(full)
    if path.exists():
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            old_fields, old_rows = list(reader.fieldnames or []), list(reader)
        fields = old_fields + [k for k in full if k not in old_fields]
        if fields != old_fields:
            with open(path, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=fields)
                w.writeheader()
                w.writerows(old_rows)
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, restval="")
        if new:
            w.writeheader()
        w.writerow(full)
    return path
