"""A sandbox that runs untrusted Python programs (model completions plus their unit tests).

RL rewards and the HumanEval evaluation both execute code the model wrote. A program "passes" when it exits
with status 0 within its limits; anything else (an exception, a failed assert, a timeout, a refused operation)
is a failure. `run_program(source)` runs one program, `run_many(sources, max_workers=4)` a batch concurrently.
`python -m rewards.sandbox` prints the layers in use on this machine and the per-program overhead.

How one program runs
--------------------
1. A fresh temporary directory is made; the program is written to `box/program.py` and `box/` becomes its working
   directory, `HOME` and `TMPDIR`. Its stdout and stderr go to files *beside* `box/`, read back (truncated) at the
   end. The directory is deleted afterwards.
2. The interpreter starts with a clean environment (only PATH, LANG, HOME, TMPDIR and fixed PYTHON* settings: hash
   seed 0 so set iteration order, hence the grade, is reproducible), without site-packages (`-S -s`), stdin closed,
   in its own session (a process group the parent can kill as a whole).
3. OS layers, each used when this machine allows it (probed once, see `isolation()`):
   - network, PID and mount namespaces (`unshare --net --pid --fork --mount-proc`, or `unshare -r ...` for a
     non-root user): there is no network interface but a downed loopback, and the program is PID 1 of its own
     namespace with its own /proc, so it cannot see or signal any host process, and when it dies every process it
     started dies with it;
   - an unprivileged user ID when we are root (a fresh uid per run): the kernel's file permissions then forbid
     writing or deleting anything root owns, signalling root's processes and reading their /proc/<pid>/environ,
     and RLIMIT_NPROC is enforced (the kernel does not enforce it for root). The interpreter must be readable by
     that uid; if `sys.executable` is not (e.g. under /root), a system python3 that is gets used instead.
   - resource limits: RLIMIT_CPU, RLIMIT_AS (memory), RLIMIT_FSIZE, RLIMIT_NPROC, RLIMIT_NOFILE, no core dumps;
   - a wall-clock timeout, after which the program (PID 1 of its namespace) and its process group are SIGKILLed.
4. A Python guard: before the untrusted code runs, a bootstrap installs an audit hook (`sys.addaudithook`, PEP 578)
   that refuses, by raising PermissionError: opening a file for writing, or removing, renaming, linking, chmod-ing,
   truncating a path, outside the box (symlinks resolved; /dev/null, /dev/stdout and /dev/stderr allowed);
   creating sockets; fork, exec, spawn, `os.system` and `subprocess`; signals to any process but itself;
   importing ctypes, cffi or _posixsubprocess; and the introspection that would let code find and rewrite the hook
   (gc.get_objects/get_referrers/get_referents, sys.settrace/setprofile, setting a function's __code__ or
   __defaults__). The hook cannot be removed once installed.

What it protects against: accidental or naive hostile code, i.e. infinite loops, fork bombs, memory bombs, huge
outputs, deleting or writing files outside its directory, network access, reading the parent's environment
variables, killing the parent or other processes. The test suite `tests/unit/test_sandbox.py` runs such programs.

What it does NOT protect against: a determined attacker. The audit hook is a guard, not a security boundary:
native code defeats it (ctypes is refused at import, but any C extension reachable on sys.path, or a bug in
CPython, bypasses it), path checks race with the filesystem (check-then-open), and `os.open(name, dir_fd=fd)` is
checked against the working directory, not `fd`. Reads are not restricted: the program may read any file its uid
may read (with neither the uid drop nor a private /proc, that includes the environment of the user's processes).
What each missing OS layer costs:
- no uid drop (we are not root): the kernel lets the program write the user's own files, only the guard stops it;
  and even with the drop, world-writable directories (/tmp, /dev/shm) are writable but for the guard;
- no namespaces (no `unshare`, or not permitted): no network isolation beyond the guard, and processes that left
  the process group can outlive a timeout (RLIMIT_CPU still ends busy ones).
Kernel exploits and side channels are out of scope. Code from real adversaries belongs in a VM or gVisor.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import itertools
import math
import os
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

# Runs inside the sandboxed interpreter before the program: rlimits, the audit hook, then the program as __main__.
# Compiled once per parent process to a .pyc (see `_bootstrap_pyc`) that each program's interpreter runs.
# Everything the hook needs is bound as a default argument (setting __defaults__ is refused), so rebinding
# os.path or posix functions in the program does not change what the hook checks.
_BOOTSTRAP = r"""
import sys, resource
# argv: box, guard (0/1), then NAME=soft,hard per rlimit. Only builtins and `resource` are imported here: each
# module imported costs every program its import time (json alone would double the startup).
_box, _guard = sys.argv[1], sys.argv[2] == "1"
_spec = _name = _vals = None
for _spec in sys.argv[3:]:
    _name, _, _vals = _spec.partition("=")
    resource.setrlimit(getattr(resource, _name), tuple(int(v) for v in _vals.split(",")))

def _install_guard(box):
    import posix
    WRITE_FLAGS = posix.O_WRONLY | posix.O_RDWR | posix.O_CREAT | posix.O_TRUNC | posix.O_APPEND
    # audit event -> ((index of a path being modified, index of its dir_fd argument or None), ...)
    PATH_EVENTS = {
        "os.remove": ((0, 1),), "os.rmdir": ((0, 1),), "os.mkdir": ((0, 2),), "os.rename": ((0, 2), (1, 3)),
        "os.link": ((1, 3),), "os.symlink": ((1, 2),), "os.truncate": ((0, None),), "os.chmod": ((0, 2),),
        "os.chown": ((0, 3),), "os.utime": ((0, 3),), "os.chflags": ((0, None),), "os.setxattr": ((0, None),),
        "os.removexattr": ((0, None),), "shutil.rmtree": ((0, None),), "shutil.copyfile": ((1, None),),
        "shutil.copytree": ((1, None),), "shutil.move": ((0, None), (1, None)), "shutil.chown": ((0, None),),
        "shutil.copymode": ((1, None),), "shutil.copystat": ((1, None),), "shutil.unpack_archive": ((1, None),),
        "shutil.make_archive": ((0, None),), "sqlite3.connect": ((0, None),),
    }
    DENIED = frozenset({
        "socket.__new__", "socket.bind", "socket.connect", "socket.sendto", "socket.getaddrinfo",
        "os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn", "os.system", "os.startfile",
        "subprocess.Popen", "pty.spawn", "os.killpg", "gc.get_objects", "gc.get_referrers", "gc.get_referents",
        "sys.setprofile", "sys.settrace", "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata",
    })
    BLOCKED_MODULES = frozenset({"ctypes", "_ctypes", "cffi", "_cffi_backend", "_posixsubprocess",
                                 "_xxsubinterpreters", "_testcapi", "_testinternalcapi"})
    WATCHED = frozenset(PATH_EVENTS) | DENIED | {"open", "os.kill", "import", "object.__setattr__"}

    def resolve(path, dir_fd, lstat=posix.lstat, readlink=posix.readlink, getcwd=posix.getcwd,
                fspath=posix.fspath):
        # realpath built only from functions bound at install time
        path = fspath(path)
        if isinstance(path, bytes):
            path = path.decode("utf-8", "surrogateescape")
        if not path.startswith("/"):
            base = getcwd() if dir_fd is None else readlink("/proc/self/fd/%d" % dir_fd)
            path = base + "/" + path
        todo, done, hops = path.split("/")[::-1], "", 0
        while todo:
            part = todo.pop()
            if part in ("", "."):
                continue
            if part == "..":
                done = done.rpartition("/")[0]
                continue
            cand = done + "/" + part
            try:
                st = lstat(cand)
            except OSError:
                done = cand
                continue
            if st.st_mode & 0o170000 == 0o120000:  # S_ISLNK
                hops += 1
                if hops > 40:
                    raise PermissionError("sandbox: too many symlinks")
                target = readlink(cand)
                if target.startswith("/"):
                    done = ""
                todo.extend(target.split("/")[::-1])
            else:
                done = cand
        return done or "/"

    def inside(path, dir_fd=None, box=box, resolve=resolve, std=("/dev/stdout", "/dev/stderr")):
        if isinstance(path, int):
            return True  # an fd: already opened under the same checks
        if path in std:
            return True  # the capture files, bounded by RLIMIT_FSIZE
        real = resolve(path, dir_fd)
        return real == box or real.startswith(box + "/") or real == "/dev/null"

    def hook(event, args, WATCHED=WATCHED, DENIED=DENIED, PATH_EVENTS=PATH_EVENTS, WRITE_FLAGS=WRITE_FLAGS,
             BLOCKED=BLOCKED_MODULES, inside=inside, getpid=posix.getpid):
        if event not in WATCHED:
            return
        if event in DENIED:
            raise PermissionError("sandbox: %s refused" % event)
        if event == "open":
            path, mode, flags = args
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & WRITE_FLAGS)
            if writing and path is not None and not inside(path):
                raise PermissionError("sandbox: writing %r refused" % (path,))
        elif event == "os.kill":
            if args[0] != getpid():
                raise PermissionError("sandbox: os.kill(%r) refused" % (args[0],))
        elif event == "import":
            if args[0].partition(".")[0] in BLOCKED:
                raise PermissionError("sandbox: import of %s refused" % args[0])
        elif event == "object.__setattr__":
            if args[1] in ("__code__", "__defaults__", "__kwdefaults__"):
                raise PermissionError("sandbox: setting %s refused" % args[1])
        else:
            for i, j in PATH_EVENTS[event]:
                dir_fd = args[j] if j is not None and j < len(args) else None
                dir_fd = dir_fd if isinstance(dir_fd, int) and dir_fd >= 0 else None
                if not inside(args[i], dir_fd):
                    raise PermissionError("sandbox: %s(%r) refused" % (event, args[i]))

    sys.addaudithook(hook)

if _guard:
    _install_guard(_box)
del _install_guard

_path = _box + "/program.py"
with open(_path, encoding="utf-8") as _f:
    _code = compile(_f.read(), _path, "exec")
_main = type(sys)("__main__")
_main.__file__ = _path
sys.modules["__main__"] = _main
sys.argv = [_path]
del _box, _guard, _f, _spec, _name, _vals
exec(_code, _main.__dict__)
"""

_UID_BASE = 200_000  # fresh uids for dropped privileges: 200000 + (pid % 1000) * 1000 + run counter
_run_counter = itertools.count()


@dataclass(frozen=True)
class Limits:
    """Per-program limits. cpu_s defaults to ceil(wall_s) + 1 (the wall clock normally fires first)."""

    wall_s: float = 5.0
    cpu_s: int | None = None
    memory_mb: int = 1024
    file_size_mb: int = 16
    nproc: int = 32  # processes and threads of the program's uid (only enforced when the uid is dropped)
    nofile: int = 64
    max_output_bytes: int = 64 * 1024

    def __post_init__(self):
        for name in ("wall_s", "memory_mb", "file_size_mb", "nproc", "nofile", "max_output_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"Limits.{name} must be positive, got {getattr(self, name)}")
        if self.cpu_s is not None and self.cpu_s <= 0:
            raise ValueError(f"Limits.cpu_s must be positive, got {self.cpu_s}")

    def rlimits(self) -> list[tuple[str, int, int]]:
        cpu = self.cpu_s if self.cpu_s is not None else math.ceil(self.wall_s) + 1
        mem, fsize = self.memory_mb << 20, self.file_size_mb << 20
        return [
            ("RLIMIT_CPU", cpu, cpu + 1),
            ("RLIMIT_AS", mem, mem),
            ("RLIMIT_FSIZE", fsize, fsize),
            ("RLIMIT_NOFILE", self.nofile, self.nofile),
            ("RLIMIT_CORE", 0, 0),
            ("RLIMIT_NPROC", self.nproc, self.nproc),
        ]


@dataclass(frozen=True)
class RunResult:
    status: str  # "passed" (exit 0), "failed" (any other exit), "timeout" (killed at the wall-clock limit)
    returncode: int | None
    stdout: str
    stderr: str
    wall_s: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@dataclass(frozen=True)
class Isolation:
    """Which OS layers this machine grants, found by probing once (see `isolation()`)."""

    launcher: tuple[str, ...]  # the unshare prefix, empty when namespaces are unavailable
    interpreter: str
    drop_uid: bool
    namespaces: tuple[str, ...]

    def describe(self) -> str:
        ns = "+".join(self.namespaces) or "none"
        return f"namespaces={ns} drop_uid={self.drop_uid} interpreter={self.interpreter}"


def _clean_env(box: str) -> dict[str, str]:
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "HOME": box,
        "TMPDIR": box,
        "PYTHONHASHSEED": "0",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONIOENCODING": "utf-8",
        "PYTHONSAFEPATH": "1",
    }


def _probe(launcher: Sequence[str], interpreter: str, uid: int | None) -> bool:
    """Does this launcher + interpreter start, import stdlib C modules and see the expected uid?"""
    check = "import math, hashlib, json, collections, re, os; print(os.getuid())"
    with tempfile.TemporaryDirectory(prefix="sandbox-probe-") as d:
        if uid is not None:
            os.chown(d, uid, uid)
        try:
            out = subprocess.run(
                [*launcher, *_uid_args(launcher, uid), interpreter, "-S", "-s", "-c", check],
                cwd=d,
                env=_clean_env(d),
                capture_output=True,
                timeout=30,
                text=True,
                **_popen_uid_kwargs(launcher, uid),
            )
        except (OSError, subprocess.SubprocessError):
            return False
    return out.returncode == 0 and (uid is None or out.stdout.strip() == str(uid))


def _uid_args(launcher: Sequence[str], uid: int | None) -> list[str]:
    return ["--setuid", str(uid), "--setgid", str(uid)] if (launcher and uid is not None) else []


def _popen_uid_kwargs(launcher: Sequence[str], uid: int | None) -> dict:
    # without unshare the uid is dropped by subprocess itself (in C, thread-safe, unlike preexec_fn)
    return {"user": uid, "group": uid, "extra_groups": []} if (not launcher and uid is not None) else {}


@functools.cache
def isolation() -> Isolation:
    """Probe once which layers work here: namespaces, uid drop, and an interpreter the dropped uid can run."""
    unshare = shutil.which("unshare")
    root = os.geteuid() == 0
    launchers: list[tuple[tuple[str, ...], tuple[str, ...]]] = []
    if unshare:
        # --mount-proc: a private mount namespace whose /proc lists only the namespace's own processes
        ns_flags = ("--net", "--pid", "--fork", "--kill-child", "--mount-proc")
        launchers.append(
            ((unshare, *ns_flags), ("net", "pid", "mount"))
            if root
            else ((unshare, "-r", *ns_flags), ("net", "pid", "mount"))
        )
    launchers.append(((), ()))
    own = os.path.realpath(sys.executable)
    interpreters = [own] + [
        p
        for p in (
            shutil.which(f"python{sys.version_info[0]}.{sys.version_info[1]}", path="/usr/local/bin:/usr/bin"),
            "/usr/local/bin/python3",
            "/usr/bin/python3",
        )
        if p and os.path.exists(p) and os.path.realpath(p) != own
    ]
    probe_uid = _UID_BASE + 999
    for launcher, namespaces in launchers:
        if root:
            for interp in interpreters:
                if _probe(launcher, interp, probe_uid):
                    return Isolation(launcher, interp, True, namespaces)
        if _probe(launcher, own, None):
            return Isolation(launcher, own, False, namespaces)
    raise RuntimeError(f"sandbox: cannot start {own} even without isolation")


def _child_pids(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def _kill_tree(proc: subprocess.Popen, pid_namespace: bool) -> None:
    """SIGKILL the program and everything it started; return once they are gone."""
    # With a PID namespace the program is unshare's child and PID 1 of its namespace: killing it kills every process
    # in the namespace, even those that left the process group, and unshare reaps it only once all are dead.
    children = _child_pids(proc.pid) if pid_namespace else []
    for child in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
    if children:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
            return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _wait(proc: subprocess.Popen, timeout: float) -> bool:
    """Wait for exit up to timeout; True if it exited. A pidfd wakes us the moment it exits (Popen.wait(timeout)
    polls with sleeps growing to 50 ms, which would add tens of ms to every program)."""
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        pidfd = None
    if pidfd is None:
        try:
            proc.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
    try:
        ready, _, _ = select.select([pidfd], [], [], timeout)
    finally:
        os.close(pidfd)
    if ready:
        proc.wait()
    return bool(ready)


def _bootstrap_pyc(interpreter: str) -> str:
    """The bootstrap compiled once by the sandbox's interpreter, in a directory any uid can read: compiling its
    source in every program would cost ~3 ms of CPU each."""
    pyc = _compile_bootstrap(interpreter)
    if not os.path.exists(pyc):  # removed by a tmp cleaner: build it again
        _compile_bootstrap.cache_clear()
        pyc = _compile_bootstrap(interpreter)
    return pyc


@functools.cache
def _compile_bootstrap(interpreter: str) -> str:
    d = tempfile.mkdtemp(prefix="sandbox-bootstrap-")
    atexit.register(shutil.rmtree, d, True)
    os.chmod(d, 0o755)
    src, pyc = os.path.join(d, "bootstrap.py"), os.path.join(d, "bootstrap.pyc")
    with open(src, "w", encoding="utf-8") as f:
        f.write(_BOOTSTRAP)
    compile_it = "import py_compile, sys; py_compile.compile(sys.argv[1], sys.argv[2], doraise=True)"
    subprocess.run([interpreter, "-S", "-s", "-c", compile_it, src, pyc], check=True, env=_clean_env(d))
    os.chmod(pyc, 0o644)
    return pyc


def _read_head(path: str, limit: int) -> str:
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    text = data[:limit].decode("utf-8", errors="replace")
    return text + ("\n[... output truncated]" if len(data) > limit else "")


def run_program(source: str, limits: Limits | None = None, *, guard: bool = True) -> RunResult:
    """Run one program in the sandbox. `guard=False` disables the Python audit hook (tests of the OS layers)."""
    limits = limits or Limits()
    iso = isolation()
    uid = _UID_BASE + (os.getpid() % 1000) * 1000 + next(_run_counter) % 1000 if iso.drop_uid else None
    work = tempfile.mkdtemp(prefix="sandbox-")
    try:
        os.chmod(work, 0o711)  # traversable by the program's uid (absolute paths into box/), not listable
        box = os.path.join(work, "box")
        os.mkdir(box, 0o700)
        with open(os.path.join(box, "program.py"), "w", encoding="utf-8") as f:
            f.write(source)
        if uid is not None:
            os.chown(box, uid, uid)
        rlimits = [f"{name}={soft},{hard}" for name, soft, hard in limits.rlimits()]
        cmd = [
            *iso.launcher,
            *_uid_args(iso.launcher, uid),
            iso.interpreter,
            "-S",
            "-s",
            _bootstrap_pyc(iso.interpreter),
        ]
        cmd += [box, "1" if guard else "0", *rlimits]
        out_path, err_path = os.path.join(work, "stdout"), os.path.join(work, "stderr")
        t0 = time.perf_counter()
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            if uid is not None:  # so that /dev/stdout (a link to the capture file) can be reopened by the program
                os.fchown(out.fileno(), uid, uid)
                os.fchown(err.fileno(), uid, uid)
            proc = subprocess.Popen(
                cmd,
                cwd=box,
                env=_clean_env(box),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
                **_popen_uid_kwargs(iso.launcher, uid),
            )
            if _wait(proc, limits.wall_s):
                returncode = proc.returncode
                status = "passed" if returncode == 0 else "failed"
            else:
                returncode, status = None, "timeout"
            if status == "timeout" or "pid" not in iso.namespaces:
                _kill_tree(
                    proc, "pid" in iso.namespaces
                )  # with a PID namespace, a finished PID 1 took its descendants with it
        wall = time.perf_counter() - t0
        n = limits.max_output_bytes
        return RunResult(status, returncode, _read_head(out_path, n), _read_head(err_path, n), wall)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_many(
    sources: Sequence[str], limits: Limits | None = None, *, max_workers: int = 4, guard: bool = True
) -> list[RunResult]:
    """Run programs concurrently (threads waiting on subprocesses), results in input order.

    More workers than cores pays: much of a program's latency is waiting on the kernel (namespaces set up and torn
    down), not CPU. Measured on 2 busy cores (`python -m rewards.sandbox`): ~10 ms of CPU per trivial program against
    ~7 ms for a bare `python -c pass`; ~70 ms wall per program with 1 worker, ~35 ms with 2, ~17-20 ms with 4.
    """
    if max_workers < 1:
        raise ValueError(f"max_workers must be >= 1, got {max_workers}")
    if not sources:
        return []
    isolation()  # probe once before the threads start
    with ThreadPoolExecutor(max_workers=min(max_workers, len(sources))) as pool:
        return list(pool.map(lambda s: run_program(s, limits, guard=guard), sources))


def measure_overhead(n: int = 100, workers: Sequence[int] = (1, 2, 4)) -> list[dict[str, float]]:
    """Milliseconds per trivial program (`pass`): the bare interpreter versus the whole sandbox, by worker count.

    Also the CPU the sandbox adds per program (children's user+sys time), which unlike wall time barely depends
    on what else the machine is doing.
    """
    iso = isolation()
    bare = [iso.interpreter, "-S", "-s", "-c", "pass"]

    def run_bare(workdir: str) -> None:
        subprocess.run(bare, cwd=workdir, env=_clean_env(workdir), check=True)

    def timed(fn) -> tuple[float, float]:
        c0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
        fn()
        wall, c1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
        return wall / n * 1e3, (c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime) / n * 1e3

    rows = []
    with tempfile.TemporaryDirectory() as d:
        for w in workers:
            with ThreadPoolExecutor(w) as pool:
                bare_ms, bare_cpu = timed(lambda pool=pool: list(pool.map(run_bare, [d] * n)))
            box_ms, box_cpu = timed(lambda w=w: run_many(["pass"] * n, max_workers=w))
            rows.append(
                {
                    "workers": w,
                    "bare_ms": bare_ms,
                    "bare_cpu_ms": bare_cpu,
                    "sandbox_ms": box_ms,
                    "sandbox_cpu_ms": box_cpu,
                }
            )
    return rows


if __name__ == "__main__":
    # python -m rewards.sandbox   (prints the isolation layers in use and the per-program overhead)
    print(isolation().describe())
    for row in measure_overhead():
        print("  ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
