"""What runs inside the sandbox: the tests' process and the program's process, and the verdict between them.

rewards/sandbox.py compiles this file once, sends the code object through a descriptor and runs `main` in the
sandboxed interpreter. It imports builtin modules only (each import would cost every program its start-up time).

Why two processes
-----------------
A program that shares a process with its tests controls how that process ends and what it prints: `os._exit(0)`,
`raise SystemExit`, an `atexit` or `sys.excepthook` that exits 0, a signal handler, a rebound `builtins.abs` or an
object whose `__eq__` is always true all look like passing tests from outside. So the tests never run where the
program runs:

- the tests' process (T) starts first, runs the trusted setup (e.g. HumanEval's prompt, whose helper functions
  some tests call; it is no secret, U's code contains it), forks the program's process (U), and only then reads
  the tests and a per-run random token from a descriptor U has closed. U never holds either. Under a privileged
  sandbox T and U then take two different fresh uids, so U cannot signal T, read its memory or open its
  descriptors through /proc;
- U installs the guard (rewards/guard.py) and runs the program as `__main__`, then answers T's requests: the
  value of one of its module-level names, or a call of one of its functions. Arguments and results cross as
  `marshal` data, so only plain values come back (int, float, complex, str, bytes, bool, None and lists, tuples,
  dicts, sets of them, exact types only): an always-equal object, an int subclass or a generator cannot even be
  sent;
- T runs the tests in a namespace of its own, with its own untouched builtins and modules. A name the tests and
  the setup do not define, and that is not a builtin, is looked up in U (the entry point always is, even though
  the setup defines a stub of it): `check(candidate)` receives a proxy that calls U. Only when the tests return
  does T write the token to the verdict descriptor, which U never had. The parent calls a program "passed" when
  it reads exactly that token; an exit status means nothing.

A program without tests passes when its module code runs to the end (U reports it to T; a program could forge that
report by writing to its own pipe, which is why graded programs always come with tests).
"""

import marshal
import posix
import sys

MAX_MESSAGE = 64 << 20  # bytes of one marshalled message between T and U
PLAIN = (int, float, complex, str, bytes, bool, type(None))
CONTAINERS = (list, tuple, set, frozenset)


class ProgramError(Exception):
    """The program's process raised, died or sent something that is not plain data."""


def read_all(fd: int) -> bytes:
    chunks = []
    while chunk := posix.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def read_exact(fd: int, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = posix.read(fd, min(left, 1 << 20))
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def send(fd: int, message) -> None:
    data = marshal.dumps(message)
    data = len(data).to_bytes(4, "little") + data
    while data:
        data = data[posix.write(fd, data) :]


def recv(fd: int):
    n = int.from_bytes(read_exact(fd, 4), "little")
    if n > MAX_MESSAGE:
        raise ProgramError(f"message of {n} bytes")
    return marshal.loads(read_exact(fd, n))


def plain(value, seen: set, depth: int = 0) -> bool:
    """Whether a value decoded from U is plain data (exact types, no code objects), each container checked once."""
    kind = type(value)
    if kind in PLAIN:
        return True
    if depth > 200 or kind not in CONTAINERS and kind is not dict:
        return False
    if id(value) in seen:
        return True
    seen.add(id(value))
    items = [x for kv in value.items() for x in kv] if kind is dict else value
    return all(plain(x, seen, depth + 1) for x in items)


def drop_privileges(uid: int | None, nproc: int | None) -> None:
    if uid is not None:
        posix.setgroups([])
        posix.setresgid(uid, uid, uid)
        posix.setresuid(uid, uid, uid)  # from uid 0 to another: every capability is gone
    if nproc is not None:
        import resource  # deferred: not a builtin module; only where limits are set (see the docstring)

        resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))


def flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:  # noqa: SIM105 (contextlib is not a builtin module: importing it costs every program)
            stream.flush()
        except BaseException:
            pass


def flush_and_exit(status: int) -> None:
    flush()
    posix._exit(status)


# ---------------------------------------------------------------- the program's process (U)


def program_process(job: dict, req_r: int, resp_w: int) -> None:
    """Never returns. Descriptors 3 and 4 become the request and response pipes; every other one is closed."""
    r, w = posix.dup(req_r), posix.dup(resp_w)
    posix.dup2(r, 3)
    posix.dup2(w, 4)
    posix.closerange(5, 1 << 20)
    uids = job["uids"]
    drop_privileges(uids[1] if uids else None, job["nproc"])
    try:
        read_exact(3, 1)  # T has read its secrets and closed their descriptor
    except EOFError:
        posix._exit(1)
    box = job["box"]
    with open(box + "/program.py", "w", encoding="utf-8") as f:
        f.write(job["code"])
    if job["guard"]:
        guard: dict = {"__name__": "sandbox_guard"}
        exec(marshal.loads(job["guard_code"]), guard)
        guard["install"](tuple(job["roots"]))
        del guard
    main = type(sys)("__main__")
    main.__file__ = box + "/program.py"
    sys.modules["__main__"] = main
    sys.argv = [main.__file__]
    code = job["code"]
    del job
    try:
        exec(compile(code, main.__file__, "exec"), main.__dict__)
    except BaseException:
        sys.__excepthook__(*sys.exc_info())
        flush_and_exit(1)
    flush()
    send(4, ("ready",))
    serve(main.__dict__)


def serve(names: dict) -> None:
    """Answer T until it says exit (or goes away): ("get", name) and ("call", name, args, kwargs)."""
    while True:
        try:
            request = recv(3)
        except EOFError:
            flush_and_exit(0)
        if request[0] == "exit":
            flush_and_exit(0)
        if request[0] == "get":
            name = request[1]
            if name.startswith("__") or name not in names:
                reply = ("missing",)
            else:
                reply = ("callable",) if callable(names[name]) else ("value", names[name])
        else:
            try:
                reply = ("ok", names[request[1]](*request[2], **request[3]))
            except BaseException as e:
                reply = ("raised", type(e).__name__, str(e)[:2000])
        flush()  # T may end the run as soon as it has its last answer
        try:
            send(4, reply)
        except (ValueError, TypeError):  # not marshallable: not plain data
            send(4, ("unsendable", type(reply[-1]).__name__))


# ---------------------------------------------------------------- the tests' process (T)


class Link:
    """T's ends of the pipes to U, set once U is forked."""

    req_w = resp_r = -1


def ask(request):
    try:
        send(Link.req_w, request)
        reply = recv(Link.resp_r)
    except (EOFError, OSError):
        raise ProgramError("the program's process ended") from None
    if type(reply) is not tuple or not reply or not plain(reply, set()):
        raise ProgramError("the program sent something that is not plain data")
    return reply


class Remote:
    """A function of the program, called in the program's process."""

    def __init__(self, name):
        self.name = name

    def __call__(self, *args, **kwargs):
        reply = ask(("call", self.name, args, kwargs))
        if reply[0] == "ok":
            return reply[1]
        if reply[0] == "raised":
            raise ProgramError(f"{reply[1]}: {reply[2]}")
        raise ProgramError(f"{self.name} returned a {reply[-1]}, not plain data")


BUILTINS = __builtins__ if type(__builtins__) is dict else __builtins__.__dict__


class TestGlobals(dict):
    """The tests' namespace: their own names, then builtins, then the program's (see the module docstring)."""

    entry_point: str | None = None

    def __missing__(self, name):
        if name.startswith("__") or (name in BUILTINS and name != self.entry_point):
            raise KeyError(name)
        reply = ask(("get", name))
        if reply[0] == "callable":
            return Remote(name)
        if reply[0] == "value":
            return reply[1]
        raise KeyError(name)


def tests_namespace(setup: str, entry_point: str | None) -> TestGlobals:
    """The namespace with the trusted setup run in it. Run before U is forked, so that what the setup imports (the
    prompt's `typing`, say) is imported once for both processes; the setup is no secret (it is part of U's code)."""
    names = TestGlobals(__name__="__main__", __builtins__=BUILTINS)
    names.entry_point = entry_point
    if setup:
        try:
            exec(compile(setup, "<setup>", "exec"), names)
        except Exception:  # a prefix that ends mid-statement, say: the tests see the program's names only
            names = TestGlobals(__name__="__main__", __builtins__=BUILTINS)
            names.entry_point = entry_point
        names.pop(entry_point, None)
    return names


def tests_process(names: TestGlobals, secret: tuple, verdict_fd: int) -> None:
    test, token = secret
    posix.write(Link.req_w, b"g")
    try:
        ready = recv(Link.resp_r)
    except EOFError:
        ready = None
    if ready != ("ready",):
        raise ProgramError("the program's code did not run to its end")
    if test:
        exec(compile(test, "<tests>", "exec"), names)
    posix.write(verdict_fd, token)
    try:  # noqa: SIM105
        send(Link.req_w, ("exit",))
    except OSError:
        pass


def main(job: dict, job_fd: int, secret_fd: int, verdict_fd: int) -> None:
    import resource  # deferred: not a builtin module; only where limits are set (see the docstring)

    posix.close(job_fd)
    for name, soft, hard in job["rlimits"]:
        resource.setrlimit(getattr(resource, name), (soft, hard))
    names = tests_namespace(job["setup"], job["entry_point"])
    req_r, req_w = posix.pipe()
    resp_r, resp_w = posix.pipe()
    pid = posix.fork()
    if pid == 0:
        posix.close(secret_fd)
        posix.close(verdict_fd)
        program_process(job, req_r, resp_w)
    posix.close(req_r)
    posix.close(resp_w)
    Link.req_w, Link.resp_r = req_w, resp_r
    secret = marshal.loads(read_all(secret_fd))
    posix.close(secret_fd)
    uids = job["uids"]
    drop_privileges(uids[0] if uids else None, job["nproc"])
    try:
        tests_process(names, secret, verdict_fd)
    except BaseException:
        sys.__excepthook__(*sys.exc_info())
        flush_and_exit(1)
    flush_and_exit(0)
