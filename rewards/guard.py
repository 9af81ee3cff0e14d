"""The Python guard of the sandbox: an audit hook (PEP 578) installed in the program's process before its code runs.

This is the second layer. The first is the operating system (rewards/sandbox.py): a read-only view of the system,
private tmpfs mounts as the only writable places, namespaces, fresh uids, rlimits. The guard refuses, by raising
PermissionError, what the program has no business doing even where the kernel would contain it, so that a hostile
program fails loudly instead of poking at the walls:

- changing a path outside the writable roots: opening it for writing, removing, renaming, linking (either end),
  chmod/chown/utime/xattr, truncating; an fd argument counts as the path it was opened from (`os.fchmod(fd)` on a
  read-only descriptor of an outside file is refused); `os.open` of a directory outside the roots (its fd would
  be a `dir_fd` for later calls, whose audit events do not carry it); `os.mkfifo` and `os.mknod` raise no audit
  event at all, so they are removed from `os` and `posix`;
- opening anything under /proc/<pid>/ of another process (the tests' process: its descriptors and memory);
- sockets, fork, exec, spawn, `os.system`, `subprocess`, signals to other processes, `resource.prlimit` of
  another process, `ioctl`;
- importing a module when any part of its dotted name is a refused native module (`ctypes`, `x._ctypes`, ...),
  loading any native module from outside the interpreter's own lib-dynload directory (the audit event of a native
  load names its file), and importing at all once `sys.path`, `sys.meta_path` or `sys.path_hooks` were changed;
- what would let the program rewrite the guard: `sys.addaudithook`, `sys.settrace`/`setprofile` (a trace
  function can rewrite a running frame's locals), `gc.get_objects`/`get_referrers`/`get_referents`, setting or
  deleting a function's `__code__`, `__defaults__` or `__kwdefaults__`. Everything the hook uses, builtins included, is
  bound as a default argument (never a global or a closure cell) and held in immutable containers, and it never
  calls the program's code (audit events carry paths already converted to `str`, `bytes` or an fd; anything else
  is refused rather than converted).

The file imports nothing but builtin modules: it is compiled in the parent and executed in the sandboxed process,
where each import would cost every program its start-up time.
"""

import posix
import sys

REFUSED_EVENTS = frozenset(
    {
        "socket.__new__",
        "socket.bind",
        "socket.connect",
        "socket.sendto",
        "socket.sendmsg",
        "socket.getaddrinfo",
        "socket.gethostbyname",
        "os.fork",
        "os.forkpty",
        "os.exec",
        "os.posix_spawn",
        "os.spawn",
        "os.system",
        "os.startfile",
        "os.killpg",
        "subprocess.Popen",
        "pty.spawn",
        "fcntl.ioctl",
        "gc.get_objects",
        "gc.get_referrers",
        "gc.get_referents",
        "sys.setprofile",
        "sys.settrace",
        "sys.addaudithook",
        "ctypes.dlopen",
        "ctypes.dlsym",
        "ctypes.cdata",
    }
)
# native modules (or packages built on them) that reach around the audit hooks: refused wherever they appear in a
# dotted name, and by the file name of a native load
REFUSED_MODULES = frozenset(
    {
        "ctypes",
        "_ctypes",
        "_ctypes_test",
        "cffi",
        "_cffi_backend",
        "_posixsubprocess",
        "_posixshmem",
        "_multiprocessing",
        "_sqlite3",
        "sqlite3",
        "_testcapi",
        "_testinternalcapi",
        "_testbuffer",
        "_testimportmultiple",
        "_testmultiphase",
        "_testsinglephase",
        "_xxsubinterpreters",
        "_xxinterpchannels",
        "_xxtestfuzz",
        "xxlimited",
        "xxlimited_35",
        "xxsubtype",
        "_tkinter",
        "posix",  # already loaded: imported again only after someone removed it from sys.modules
    }
)
# audit event -> ((index of a path argument being changed, index of its dir_fd argument or -1), ...)
PATH_EVENTS = (
    ("os.remove", ((0, 1),)),
    ("os.rmdir", ((0, 1),)),
    ("os.mkdir", ((0, 2),)),
    ("os.rename", ((0, 2), (1, 3))),
    ("os.link", ((0, 2), (1, 3))),
    ("os.symlink", ((1, 2),)),
    ("os.truncate", ((0, -1),)),
    ("os.chmod", ((0, 2),)),
    ("os.chown", ((0, 3),)),
    ("os.utime", ((0, 3),)),
    ("os.chflags", ((0, -1),)),
    ("os.setxattr", ((0, -1),)),
    ("os.removexattr", ((0, -1),)),
    ("shutil.rmtree", ((0, -1),)),
    ("shutil.copyfile", ((1, -1),)),
    ("shutil.copytree", ((1, -1),)),
    ("shutil.move", ((0, -1), (1, -1))),
    ("shutil.chown", ((0, -1),)),
    ("shutil.copymode", ((1, -1),)),
    ("shutil.copystat", ((1, -1),)),
    ("shutil.unpack_archive", ((1, -1),)),
    ("shutil.make_archive", ((0, -1),)),
)


def install(roots: tuple[str, ...]) -> None:
    """Install the hook. `roots`: the writable directories (absolute, no trailing slash). Files under `sys.path`
    as it is now (the interpreter's own library: no site-packages, no working directory) are opened for reading
    without resolving their path.

    Each function below reads nothing but its parameters: whatever it needs (builtins included) is bound as a
    default argument when it is defined, before the program runs. A frame of the hook, which the program might
    catch from a signal handler or a finalizer, then exposes nothing it could change to weaken a later check.
    """
    state = (
        tuple(sys.path),
        tuple(sys.meta_path),
        tuple(sys.path_hooks),
        tuple(p for p in sys.path if p.endswith("/lib-dynload")),
    )
    path_events = type(type.__dict__)(dict(PATH_EVENTS))  # a read-only mapping
    watched = frozenset(path_events) | REFUSED_EVENTS
    watched |= {"open", "os.kill", "import", "resource.prlimit", "object.__setattr__", "object.__delattr__"}
    write_flags = posix.O_WRONLY | posix.O_RDWR | posix.O_CREAT | posix.O_TRUNC | posix.O_APPEND
    own = f"/proc/{posix.getpid()}"
    trusted = tuple(p + "/" for p in sys.path if p.startswith("/"))

    def resolve(
        path, dir_fd, lstat=posix.lstat, readlink=posix.readlink, getcwd=posix.getcwd, type=type, int=int, bytes=bytes
    ):
        """realpath from functions bound at install time; a descriptor that is no file ("pipe:[12]") comes back
        as its link text, which no root contains."""
        if type(path) is int:
            path, dir_fd = readlink(f"/proc/self/fd/{path}"), None
            if not path.startswith("/"):
                return path
        elif type(path) is bytes:
            path = path.decode("utf-8", "surrogateescape")
        if not path.startswith("/"):
            base = getcwd() if dir_fd is None else readlink(f"/proc/self/fd/{dir_fd}")
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
            if st.st_mode & 0o170000 == 0o120000:  # a symlink
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

    def within(real, roots=roots, any=any):
        return real == "/dev/null" or any(real == r or real.startswith(r + "/") for r in roots)

    def path_ok(
        path,
        dir_fd,
        resolve=resolve,
        within=within,
        type=type,
        kinds=(str, bytes, int),
        std=("/dev/stdout", "/dev/stderr"),
    ):
        if type(path) not in kinds:
            return False  # a path object: its __fspath__ is the program's code
        if type(path) is kinds[0] and path in std:
            return True  # the capture files, bounded by RLIMIT_FSIZE
        return within(resolve(path, dir_fd))

    def other_process(real, own=own):
        return real.startswith("/proc/") and real[6:7].isdigit() and not (real == own or real.startswith(own + "/"))

    def check_open(
        path,
        mode,
        flags,
        path_ok=path_ok,
        resolve=resolve,
        within=within,
        other_process=other_process,
        stat=posix.stat,
        type=type,
        any=any,
        kinds=(str, bytes, int),
        write_flags=write_flags,
        trusted=trusted,
    ):
        if type(path) is kinds[2]:
            return  # wraps a descriptor opened under these same checks
        if type(path) is not kinds[0] and type(path) is not kinds[1]:
            raise PermissionError("sandbox: open() of a path object refused")
        text = path.decode("utf-8", "surrogateescape") if type(path) is kinds[1] else path
        writing = (type(mode) is kinds[0] and any(c in mode for c in "wax+")) or (
            type(flags) is kinds[2] and flags & write_flags
        )
        if not writing and ".." not in text and text.startswith(trusted):
            return
        real = resolve(text, None)
        if other_process(real):
            raise PermissionError(f"sandbox: opening {text!r} refused (another process)")
        if writing and not path_ok(text, None):
            raise PermissionError(f"sandbox: writing {text!r} refused")
        if mode is None and not within(real):  # os.open: no directory descriptor from outside the roots
            try:
                is_dir = stat(real).st_mode & 0o170000 == 0o040000
            except OSError:
                is_dir = False
            if is_dir:
                raise PermissionError(f"sandbox: os.open of directory {text!r} refused")

    def same_finders(args, state=state, type=type, len=len, all=all, zip=zip, list=list, str=str):
        path, meta_path, hooks = args[2], args[3], args[4]
        if not (type(path) is list and type(meta_path) is list and type(hooks) is list):
            return False
        return (
            len(path) == len(state[0])
            and all(type(p) is str and p == q for p, q in zip(path, state[0]))
            and len(meta_path) == len(state[1])
            and all(p is q for p, q in zip(meta_path, state[1]))
            and len(hooks) == len(state[2])
            and all(p is q for p, q in zip(hooks, state[2]))
        )

    def check_import(
        args,
        refused=REFUSED_MODULES,
        same_finders=same_finders,
        resolve=resolve,
        state=state,
        any=any,
        type=type,
        str=str,
    ):
        name, origin = args[0], args[1]
        if type(name) is not str or any(part in refused for part in name.split(".")):
            raise PermissionError(f"sandbox: import of {name} refused")
        if origin is None:  # the import statement: finders must be the interpreter's own
            if not same_finders(args):
                raise PermissionError("sandbox: import after sys.path/meta_path/path_hooks changed refused")
        elif type(origin) is str and origin.startswith("/"):  # a native module loaded from this file
            real = resolve(origin, None)
            base = real.rpartition("/")[2].partition(".")[0]
            if base in refused or not any(real.startswith(d + "/") for d in state[3]):
                raise PermissionError(f"sandbox: native module {name} from {origin} refused")

    def hook(
        event,
        args,
        watched=watched,
        refused=REFUSED_EVENTS,
        path_events=path_events,
        path_ok=path_ok,
        check_open=check_open,
        check_import=check_import,
        getpid=posix.getpid,
        type=type,
        len=len,
        int=int,
    ):
        if event not in watched:
            return
        if event in refused:
            raise PermissionError(f"sandbox: {event} refused")
        if event == "open":
            check_open(args[0], args[1], args[2])
        elif event == "import":
            check_import(args)
        elif event == "os.kill":
            if args[0] != getpid():
                raise PermissionError(f"sandbox: os.kill({args[0]!r}) refused")
        elif event == "resource.prlimit":
            if args[0] not in (0, getpid()):
                raise PermissionError("sandbox: prlimit of another process refused")
        elif event in ("object.__setattr__", "object.__delattr__"):
            if args[1] in ("__code__", "__defaults__", "__kwdefaults__"):
                raise PermissionError(f"sandbox: changing {args[1]} refused")
        else:
            for i, j in path_events[event]:
                if i >= len(args):
                    continue
                dir_fd = args[j] if 0 <= j < len(args) and type(args[j]) is int and args[j] >= 0 else None
                if not path_ok(args[i], dir_fd):
                    raise PermissionError(f"sandbox: {event}({args[i]!r}) refused")

    for name in ("mkfifo", "mknod"):  # no audit event: gone before `os` copies them (os is not imported yet)
        if hasattr(posix, name):
            delattr(posix, name)
    if "os" in sys.modules:
        for name in ("mkfifo", "mknod"):
            sys.modules["os"].__dict__.pop(name, None)
    sys.addaudithook(hook)
