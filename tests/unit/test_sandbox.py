"""The code sandbox: ordinary programs work, hostile ones are contained, scored as failures, and the host unharmed.

Each hostile program runs twice where the machine allows: with the Python guard (audit hook) and without it
(`guard=False`), so the OS layers (uid drop, namespaces, rlimits) are shown to hold on their own.
"""

import os
import select
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from rewards.sandbox import Limits, isolation, run_many, run_program

ISO = isolation()
FAST = Limits(wall_s=3.0)
GUARDS = [pytest.param(True, id="guard"), pytest.param(False, id="os-only")]


def _os_layer(guard: bool, needed: str) -> None:
    """Skip the guard=False variant when the OS layer that would contain the program is not available here."""
    if guard:
        return
    have = {"uid": ISO.drop_uid, "net": "net" in ISO.namespaces, "pid": "pid" in ISO.namespaces}[needed]
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
def victim_dir():
    """A root-owned directory the sandbox's uid can read but not write, holding one file."""
    d = tempfile.mkdtemp(prefix="sandbox-victim-")
    os.chmod(d, 0o755)
    path = os.path.join(d, "precious.txt")
    with open(path, "w") as f:
        f.write("keep me")
    os.chmod(path, 0o644)
    yield d
    subprocess.run(["rm", "-rf", d], check=True)


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
    assert not bad.passed and bad.status == "failed" and bad.returncode == 1 and "AssertionError" in bad.stderr
    assert run_program("raise SystemExit(3)").returncode == 3
    assert run_program("def f(:\n  pass").status == "failed"  # syntax error


def test_program_may_write_inside_its_directory_which_is_removed_afterwards():
    src = (
        "import os, tempfile\n"
        "open('a.txt', 'w').write('x')\n"
        "os.mkdir('sub'); open(os.path.join(os.getcwd(), 'sub', 'b.txt'), 'w').write('y')\n"
        "os.rename('a.txt', 'sub/c.txt'); os.remove('sub/b.txt')\n"
        "with tempfile.NamedTemporaryFile('w', delete=False) as f: f.write('z')\n"
        "assert f.name.startswith(os.getcwd()), f.name\n"
        "print(os.getcwd())\n"
    )
    r = run_program(src)
    assert r.passed, r.stderr
    assert not os.path.exists(r.stdout.strip())


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


# ---------------------------------------------------------------- hostile programs


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
    time.sleep(0.2)
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


_DESTROY = {
    "remove": "import os; os.remove({f!r})",
    "rmtree": "import shutil; shutil.rmtree({d!r})",
    "overwrite": "open({f!r}, 'w').write('pwned')",
    "append": "open({f!r}, 'a').write('pwned')",
    "os.open": "import os; os.write(os.open({f!r}, os.O_WRONLY | os.O_TRUNC), b'pwned')",
    "rename": "import os; os.rename({f!r}, {f!r} + '.moved')",
    "create": "open({d!r} + '/new.txt', 'w').write('pwned')",
    "symlink": "import os; os.symlink({f!r}, 'link'); open('link', 'w').write('pwned')",
    "chmod": "import os; os.chmod({f!r}, 0o777)",
    "relative": "import os; os.chdir({d!r}); open('new.txt', 'w').write('pwned')",
    "sqlite": "import sqlite3; sqlite3.connect({d!r} + '/new.txt').execute('create table t (x)')",
}


@pytest.mark.parametrize("guard", GUARDS)
@pytest.mark.parametrize("attack", sorted(_DESTROY))
def test_files_outside_the_directory_are_safe(attack, guard, victim_dir):
    _os_layer(guard, "uid")
    f = os.path.join(victim_dir, "precious.txt")
    mode_before = os.stat(f).st_mode
    r = run_program(_DESTROY[attack].format(f=f, d=victim_dir), FAST, guard=guard)
    assert r.status == "failed", r
    if guard:
        assert "refused" in r.stderr, r.stderr
    with open(f) as fh:
        assert fh.read() == "keep me"
    assert os.stat(f).st_mode == mode_before
    assert sorted(os.listdir(victim_dir)) == ["precious.txt"]


def test_writes_to_world_writable_tmp_are_refused_by_the_guard():
    target = os.path.join(tempfile.gettempdir(), f"sandbox-escape-{os.getpid()}.txt")
    r = run_program(f"open({target!r}, 'w').write('pwned')", FAST)
    assert r.status == "failed" and "refused" in r.stderr
    assert not os.path.exists(target)


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
        readable, _, _ = select.select([server], [], [], 0.2)
        assert readable == [], "the sandboxed program reached a host socket"
    finally:
        server.close()


@pytest.mark.parametrize("guard", GUARDS)
def test_environment_secrets_do_not_leak(guard, monkeypatch, victim_process):
    # reading is not guarded: other processes' environments are hidden by the uid drop or the private /proc
    if not (ISO.drop_uid or "mount" in ISO.namespaces):
        pytest.skip(f"neither uid drop nor a private /proc here ({ISO.describe()})")
    _os_layer(guard, "uid")
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
    assert r.passed, r.stderr  # reading is allowed; the secrets are simply not there
    out = r.stdout + r.stderr
    assert "hunter2" not in out
    assert "SANDBOX_TEST_SECRET" not in out


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
        "os.killpg(os.getpgrp(), signal.SIGKILL)\n"
    )
    r = run_program(src, FAST, guard=guard)
    if guard:
        assert r.status == "failed" and "os.kill" in r.stderr and "refused" in r.stderr
    else:  # the victim is invisible from the PID namespace; signals to its own group spare PID 1
        assert f"refused {victim_process.pid} ProcessLookupError" in r.stdout
    time.sleep(0.1)
    assert victim_process.poll() is None, "victim was killed"
    os.kill(os.getpid(), 0)  # we are alive (trivially, but also our pid was named in the program)


def test_guard_cannot_be_switched_off_from_inside():
    attacks = [
        # find the hook through the garbage collector and rewrite its defaults
        "import gc; [f for f in gc.get_objects() if getattr(f, '__name__', '') == 'hook']",
        # rebinding the functions the hook would use does not change what it checks
        "import os, posixpath\nposixpath.realpath = lambda p, **k: os.getcwd()\nos.path.realpath = posixpath.realpath\n"
        "os.lstat = lambda p: None\nopen('/tmp/sandbox-rebind-escape.txt', 'w')",
        # a trace function could rewrite the hook's locals
        "import sys; sys.settrace(lambda *a: None)",
        "def f(): pass\nf.__code__ = (lambda: None).__code__",
    ]
    for src in attacks:
        r = run_program(src, FAST)
        assert r.status == "failed" and "refused" in r.stderr, (src, r.stderr)
    assert not os.path.exists("/tmp/sandbox-rebind-escape.txt")


def test_limits_reject_nonpositive_values():
    with pytest.raises(ValueError, match="wall_s"):
        Limits(wall_s=0)
    with pytest.raises(ValueError, match="cpu_s"):
        Limits(cpu_s=-1)


def test_isolation_probe_reports_layers():
    assert ISO.interpreter and os.path.exists(ISO.interpreter)
    assert set(ISO.namespaces) <= {"net", "pid", "mount"}
    if os.geteuid() == 0 and sys.platform == "linux":
        assert ISO.drop_uid, ISO.describe()  # root must never run untrusted code as root
