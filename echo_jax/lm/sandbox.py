"""Run untrusted, model-generated Python in isolated, resource-limited child processes.

A `Sandbox` owns a few *fork servers*: fresh ``python -I`` processes running this file as a script,
so they import only the stdlib and never inherit the caller's JAX/TF threads. Each server starts
with a minimal fixed environment (nothing of the caller's), isolates itself once (new network, IPC
and mount namespaces; private tmpfs over /tmp-like dirs; procfs with hidepid) and then forks one
child per program; it never runs untrusted code itself. The interpreter's directories (its prefixes
and ``sys.path``) stay importable: where a tmpfs would hide them (a virtualenv under /tmp, pyenv
under a 0700 /root) they are bind-mounted back read-only, and the per-program cleanup of the
private tmp dirs never touches them. The child starts a new session, applies
rlimits (CPU, address space, NPROC=0, file size, fds), drops to an unprivileged uid/gid of its own
(one per server, from `UID_BASE`; needs root), sets no_new_privs and PDEATHSIG, installs a seccomp
filter (socket, kill & co, ptrace, namespace, mount and io_uring syscalls fail with EPERM) and only
then ``exec``s the program in a fresh ``__main__`` inside an empty work dir. Output comes back over
pipes, capped at `OUTPUT_CAP` bytes. Threads cannot be started (NPROC=0 counts them too).

`SandboxResult.status`:
  ok       the program (and ``call``) finished; ``sys.exit()``/``sys.exit(0)`` count as ok.
  error    an exception escaped (stderr ends with its traceback), or ``sys.exit(nonzero)``.
  memory   a MemoryError escaped (typically the RLIMIT_AS address-space cap).
  timeout  wall clock past ``timeout_s`` or the RLIMIT_CPU limit was hit.
  killed   the process died from a signal (segfault, ...) or ended without reporting back
           (``os._exit(n)`` for any n, closing the sandbox's fds, a crashed fork server).
Lines the sandbox adds to stderr start with ``[sandbox]``.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import ctypes
import dataclasses
import itertools
import json
import linecache
import math
import os
import platform
import queue
import resource
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import types
from collections.abc import Sequence

OUTPUT_CAP = 64 * 1024  # bytes kept of stdout, of stderr, and characters of repr(value)
FILE_CAP = 16 * 1024 * 1024  # RLIMIT_FSIZE: largest file a program may write
TMPFS_OPTS = b"size=64m,mode=1777"  # each private tmpfs over /tmp, /var/tmp, /dev/shm, /run/lock
_PRIVATE_TMP = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")
UID_BASE, UID_COUNT = 65000, 500  # Debian reserves 65000-65533 and never allocates them
_GRACE_S = 10.0  # extra wait before the caller gives up on an unresponsive server
_HEADER = struct.Struct("!I")
_PRELOAD = ("decimal", "fractions", "statistics", "datetime")  # imported once, free in children
# The servers' (hence the programs') whole environment: nothing is inherited from the caller.
_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "HOME": "/nonexistent",
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}
_NEWNS, _NEWIPC, _NEWUSER, _NEWNET = 0x20000, 0x8000000, 0x10000000, 0x40000000
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_BIND, _MS_REC, _MS_PRIVATE = 2, 4, 8, 4096, 16384, 1 << 18
_MS_RDONLY, _MS_REMOUNT, _MNT_DETACH = 1, 32, 2
_ST_LOCKABLE = os.ST_NOEXEC | os.ST_NOATIME | os.ST_NODIRATIME | os.ST_RELATIME  # = their MS_*
_PR_SET_PDEATHSIG, _PR_SET_SECCOMP, _PR_SET_NO_NEW_PRIVS, _SECCOMP_MODE_FILTER = 1, 22, 38, 2
# Syscalls denied with EPERM: socket, ptrace, bpf, userfaultfd, perf_event_open, keyctl, add_key,
# request_key, unshare, setns, mount, umount2, pivot_root, kill, tkill, tgkill, rt_sigqueueinfo,
# rt_tgsigqueueinfo, process_vm_readv, process_vm_writev (per arch), then pidfd_send_signal,
# io_uring_*, open_tree, move_mount, fsopen, fsconfig, fsmount, fspick, mount_setattr (all archs).
_COMMON_NRS = (424, 425, 426, 427, 428, 429, 430, 431, 432, 433, 442)
_SECCOMP_ARCH = {  # machine -> (AUDIT_ARCH_*, syscall numbers in the order listed above)
    "x86_64": (
        0xC000003E,
        (
            41,
            101,
            321,
            323,
            298,
            250,
            248,
            249,
            272,
            308,
            165,
            166,
            155,
            62,
            200,
            234,
            129,
            297,
            310,
            311,
        ),
    ),
    "aarch64": (
        0xC00000B7,
        (
            198,
            117,
            280,
            282,
            241,
            219,
            217,
            218,
            97,
            268,
            40,
            39,
            41,
            129,
            130,
            131,
            138,
            240,
            270,
            271,
        ),
    ),
}


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    """Outcome of one program; see the module docstring for the meaning of `status`."""

    status: str  # "ok" | "error" | "timeout" | "memory" | "killed"
    stdout: str
    stderr: str
    value: str | None  # repr() of call's return value when status == "ok" and call was given

    @property
    def error(self) -> str:
        """Why the program failed, in one line; "" when it did not.

        The last line of stderr: for "error"/"memory" the traceback's last line (e.g.
        "ModuleNotFoundError: No module named 'sympy'"), for "timeout"/"killed" the
        ``[sandbox] ...`` note, which is always appended last.
        """
        if self.status == "ok":
            return ""
        lines = [line for line in self.stderr.splitlines() if line.strip()]
        return lines[-1].strip() if lines else ""


def _send(fd: int, obj: object) -> None:
    data = json.dumps(obj).encode()
    view = memoryview(_HEADER.pack(len(data)) + data)
    while view:
        view = view[os.write(fd, view) :]


def _read_exact(fd: int, n: int, deadline: float | None) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        wait = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not select.select([fd], [], [], wait)[0]:
            raise TimeoutError("sandbox server did not answer in time")
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            raise EOFError("sandbox server closed its pipe")
        buf += chunk
    return bytes(buf)


def _recv(fd: int, deadline: float | None = None) -> dict:
    (n,) = _HEADER.unpack(_read_exact(fd, _HEADER.size, deadline))
    return json.loads(_read_exact(fd, n, deadline))


# ----------------------------------------------------------------- fork server: the child side

_libc = ctypes.CDLL(None, use_errno=True)
_libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
_libc.unshare.argtypes = [ctypes.c_int]
_libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


class _SockFilter(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_ushort),
        ("jt", ctypes.c_ubyte),
        ("jf", ctypes.c_ubyte),
        ("k", ctypes.c_uint32),
    ]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def _seccomp_program() -> _SockFprog | None:
    """BPF: kill foreign-arch syscalls (i386/x32 tricks), EPERM the deny list, allow the rest."""
    if platform.machine() not in _SECCOMP_ARCH:
        return None
    audit_arch, nrs = _SECCOMP_ARCH[platform.machine()]
    nrs += _COMMON_NRS
    k = len(nrs)
    ld, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06
    insns = [
        (ld, 0, 0, 4),
        (jeq, 1, 0, audit_arch),
        (ret, 0, 0, 0x80000000),
        (ld, 0, 0, 0),
        (jge, k + 1, 0, 0x40000000),
    ]
    insns += [(jeq, k - j, 0, nr) for j, nr in enumerate(nrs)]
    insns += [(ret, 0, 0, 0x7FFF0000), (ret, 0, 0, 0x00050000 | 1)]  # ALLOW, ERRNO(EPERM)
    return _SockFprog(len(insns), (_SockFilter * len(insns))(*insns))  # keeps the array alive


def _prctl(option: int, arg2: int = 0, arg3: int = 0) -> None:
    if _libc.prctl(option, arg2, arg3, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl({option}) failed")


def _block_sockets() -> None:
    """Last-resort, bypassable network block, used only when neither netns nor seccomp work."""
    import socket

    def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError("network access is disabled in the sandbox")

    for name in ("socket", "create_connection", "create_server", "getaddrinfo", "socketpair"):
        setattr(socket, name, refuse)


def _confine(ctx: dict, req: dict, work: str, fds: list[int]) -> None:
    """Runs in the forked child; when it returns, the process is fully confined."""
    os.setsid()
    for target, fd in zip((1, 2, 3), fds):
        os.dup2(fd, target)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    os.closerange(4, 1 << 20)
    os.chdir(work)
    cpu, mem = max(1, math.ceil(req["timeout_s"])), req["memory_mb"] << 20
    for lim, val in (
        (resource.RLIMIT_CPU, (cpu, cpu + 1)),
        (resource.RLIMIT_AS, (mem, mem)),
        (resource.RLIMIT_NPROC, (0, 0)),
        (resource.RLIMIT_FSIZE, (FILE_CAP,) * 2),
        (resource.RLIMIT_NOFILE, (128, 128)),
        (resource.RLIMIT_CORE, (0, 0)),
        (resource.RLIMIT_MEMLOCK, (0, 0)),
        (resource.RLIMIT_MSGQUEUE, (0, 0)),
    ):
        resource.setrlimit(lim, val)
    if ctx["uid_drop"]:
        os.setgroups([])
        os.setresgid(ctx["uid"], ctx["uid"], ctx["uid"])
        os.setresuid(ctx["uid"], ctx["uid"], ctx["uid"])
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)  # after setuid, which clears it
    if os.getppid() != ctx["server_pid"]:
        os._exit(125)
    _prctl(_PR_SET_NO_NEW_PRIVS, 1)
    if ctx["seccomp"]:
        _prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.addressof(_SECCOMP))
    if ctx["socket_patch"]:
        _block_sockets()
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # oversized writes raise OSError(EFBIG)


def _execute(code: str, call: str | None) -> None:
    """Runs the program in a fresh __main__, reports {status, value} on fd 3 and exits."""
    write, exit_, flushes = os.write, os._exit, (sys.stdout.flush, sys.stderr.flush)
    status, value, tail = "ok", None, ""
    main = sys.modules["__main__"] = types.ModuleType("__main__")
    linecache.cache["<program>"] = (len(code), None, code.splitlines(True), "<program>")
    try:
        exec(compile(code, "<program>", "exec"), main.__dict__)
        if call is not None:
            if not callable(main.__dict__.get(call)):
                raise NameError(f"the program defines no function {call!r}")
            value = repr(main.__dict__[call]())
            if len(value) > OUTPUT_CAP:
                raise ValueError(f"repr of the return value exceeds {OUTPUT_CAP} characters")
    except SystemExit as exc:
        if exc.code not in (None, 0):
            status, value, tail = "error", None, f"SystemExit: {exc.code!r}\n"
    except BaseException as exc:  # noqa: BLE001 - the program's failure is the result
        status, value = ("memory" if isinstance(exc, MemoryError) else "error"), None
        try:
            exc = exc.with_traceback(exc.__traceback__.tb_next)  # hide this runner's frame
            tail = "".join(traceback.format_exception(exc))
        except BaseException:  # noqa: BLE001 - e.g. MemoryError while formatting
            tail = f"{type(exc).__name__}\n"
    for flush in flushes:
        try:
            flush()
        except BaseException:  # noqa: BLE001 - the program may have broken its own streams
            pass
    try:
        write(2, tail[-4096:].encode(errors="replace"))
    except OSError:
        pass
    write(3, json.dumps({"status": status, "value": value}).encode())
    exit_(0)


# ---------------------------------------------------------------- fork server: the server side


def _isolate_server(uid: int) -> dict:
    """One-time isolation of the server process; every child inherits the namespaces."""
    root = os.geteuid() == 0
    ctx = {
        "uid": uid if root else os.geteuid(),
        "uid_drop": root,
        "netns": False,
        "private_tmp": False,
        "hidepid": False,
        "server_pid": os.getpid(),
        "keep": [],  # environment dirs bound into the private tmp dirs: `_cleanup` skips them
    }
    if root and _libc.unshare(_NEWNS | _NEWNET | _NEWIPC) == 0:
        ctx["netns"] = True
        if _libc.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None) == 0:  # else: no mounts
            ctx["private_tmp"], ctx["keep"] = _mount_private_tmp()
            # Before 5.8 all procfs mounts of a pid namespace share options: leave them alone.
            if tuple(map(int, platform.release().split(".")[:2])) >= (5, 8):
                flags = _MS_NOSUID | _MS_NODEV | _MS_NOEXEC
                ctx["hidepid"] = _libc.mount(b"proc", b"/proc", b"proc", flags, b"hidepid=2") == 0
    else:  # without root, only a user namespace gives a network namespace
        flags = [_NEWNET] + ([] if root else [_NEWUSER | _NEWNET])
        ctx["netns"] = any(_libc.unshare(f) == 0 for f in flags)
    _prctl(_PR_SET_NO_NEW_PRIVS, 1)
    ctx["seccomp"] = _SECCOMP is not None and _probe_seccomp()
    ctx["socket_patch"] = not (ctx["netns"] or ctx["seccomp"])
    ctx["base"] = tempfile.mkdtemp(prefix="echo-sandbox-")
    os.chmod(ctx["base"], 0o711)
    return ctx


def _python_paths() -> set[str]:
    """The interpreter's directories (prefixes, existing sys.path dirs), as given and resolved."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, *filter(os.path.isdir, sys.path)}
    return {os.path.normpath(f(p)) for p in paths for f in (os.path.abspath, os.path.realpath)}


def _is_under(path: str, root: str) -> bool:
    """`path` lies strictly inside `root` (both normalised; "/" contains nothing here)."""
    return path.startswith(root + os.sep)


def _outermost(paths: set[str]) -> list[str]:
    """The paths not inside another of them: exposing these exposes all."""
    return sorted(p for p in paths if not any(_is_under(p, q) for q in paths))


def _makedirs(path: str) -> None:
    """`os.makedirs` with mode 0755 whatever the umask: the sandbox uid must traverse them."""
    parent = os.path.dirname(path)
    if parent != path and not os.path.isdir(parent):
        _makedirs(parent)
    if not os.path.isdir(path):
        os.mkdir(path)
        os.chmod(path, 0o755)


def _bind_readonly(fd: int, path: str) -> None:
    """Bind-mounts the directory open as O_PATH `fd` on `path` (created as needed), read-only.

    A bind mount takes its source's write permission: the read-only remount is a second step,
    which must repeat the source's exec/atime flags (they may be locked). Where it fails the
    bind is detached again, so the environment is never exposed writable.
    """
    _makedirs(path)
    target = path.encode()
    if _libc.mount(f"/proc/self/fd/{fd}".encode(), target, None, _MS_BIND | _MS_REC, None) != 0:
        return
    same = os.statvfs(path).f_flag & _ST_LOCKABLE
    flags = _MS_BIND | _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NODEV | same
    if _libc.mount(None, target, None, flags, None) != 0 and _libc.umount2(target, _MNT_DETACH):
        raise OSError(ctypes.get_errno(), f"cannot make the bind mount on {path} read-only")


def _expose_python(paths: set[str], fds: dict[str, int]) -> None:
    """Keeps `paths` (none inside a private tmp dir) importable for the sandbox uid.

    With e.g. pyenv under /root (mode 0700), a tmpfs is mounted over the first untraversable
    ancestor, hiding its contents, and only the Python directories are bind-mounted back.
    """
    by_blocker: dict[str, list[str]] = {}
    for path in _outermost(paths):
        parts = path.split(os.sep)
        blocked = (os.sep.join(parts[:i]) for i in range(2, len(parts)))
        blocker = next((a for a in blocked if not os.stat(a).st_mode & 0o001), None)
        if blocker:
            by_blocker.setdefault(blocker, []).append(path)
    for blocker, inner in by_blocker.items():
        for path in inner:
            fds[path] = os.open(path, os.O_PATH)  # before the tmpfs hides it
        _libc.mount(b"tmpfs", blocker.encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV, b"mode=0755")


def _mount_private_tmp() -> tuple[bool, list[str]]:
    """Private tmpfs over each of `_PRIVATE_TMP`, the interpreter's directories kept importable.

    Directories of the interpreter inside a private tmp dir (a virtualenv under /tmp) are opened
    before the tmpfs hides them and bound back read-only after. Returns whether every tmpfs was
    mounted and the paths bound into them (empty dirs where a bind failed), which `_cleanup`
    must never delete.
    """
    tmp_dirs = [d for d in _PRIVATE_TMP if os.path.isdir(d)]
    paths = _python_paths()
    inside = {p for p in paths if any(_is_under(p, d) for d in tmp_dirs)}
    fds = {p: os.open(p, os.O_PATH) for p in _outermost(inside)}
    _expose_python(paths - inside, fds)
    flags = _MS_NOSUID | _MS_NODEV
    mounted = [
        d for d in tmp_dirs if _libc.mount(b"tmpfs", d.encode(), b"tmpfs", flags, TMPFS_OPTS) == 0
    ]
    keep = [p for p in fds if p in inside and any(_is_under(p, d) for d in mounted)]
    for path, fd in fds.items():
        if path not in inside or path in keep:
            _bind_readonly(fd, path)
        os.close(fd)
    return len(mounted) == len(tmp_dirs), keep


def _probe_seccomp() -> bool:
    """Installs the filter in a throwaway child and checks that socket() is refused."""
    pid = os.fork()
    if pid == 0:
        try:
            _prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.addressof(_SECCOMP))
            import socket

            socket.socket()
        except PermissionError:
            os._exit(0)
        finally:
            os._exit(1)
    return os.waitpid(pid, 0)[1] == 0


def _drain(fd: int, buf: bytearray, cap: int) -> int:
    """Reads what is available, keeping the first `cap` bytes; bytes read, -1 at EOF."""
    try:
        chunk = os.read(fd, 1 << 16)
    except BlockingIOError:
        return 0
    buf += chunk[: max(0, cap - len(buf))]
    return len(chunk) or -1


def _run_one(ctx: dict, req: dict, n: int) -> dict:
    work = os.path.join(ctx["base"], str(n))
    os.mkdir(work, 0o700)
    if ctx["uid_drop"]:
        os.chown(work, ctx["uid"], ctx["uid"])
    pipes = [os.pipe() for _ in range(3)]  # stdout, stderr, result report
    caps = (OUTPUT_CAP, OUTPUT_CAP, 12 * OUTPUT_CAP + 64)  # JSON escapes take <= 12 bytes/char
    pid = os.fork()
    if pid == 0:  # any failure while confining exits before the program runs
        try:
            _confine(ctx, req, work, [w for _, w in pipes])
            _execute(req["code"], req["call"])
        finally:
            os._exit(125)
    deadline = time.monotonic() + req["timeout_s"]
    bufs, total, open_fds = [bytearray() for _ in pipes], [0, 0, 0], {}
    for i, (r, w) in enumerate(pipes):
        os.close(w)
        os.set_blocking(r, False)
        open_fds[r] = i
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):  # old kernel: poll instead
        pidfd = None
    timed_out, exited_at = False, None
    while exited_at is None or (open_fds and time.monotonic() - exited_at < 1.0):
        if exited_at is None and not timed_out and time.monotonic() >= deadline:
            timed_out = True
            for kill in (os.killpg, os.kill):
                try:
                    kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        wait = 0.05 if timed_out else max(0.0, deadline - time.monotonic())
        watch = list(open_fds) + ([pidfd] if pidfd is not None and exited_at is None else [])
        for fd in select.select(watch, [], [], wait if pidfd is not None else 0.002)[0]:
            if fd in open_fds:
                got = _drain(fd, bufs[open_fds[fd]], caps[open_fds[fd]])
                total[open_fds[fd]] += max(got, 0)
                if got < 0:
                    os.close(fd)
                    del open_fds[fd]
        if exited_at is None and os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT):
            exited_at = time.monotonic()
    for fd in [*open_fds] + ([pidfd] if pidfd is not None else []):
        os.close(fd)
    _, wstatus, usage = os.wait4(pid, 0)
    _cleanup(ctx, work)
    return _verdict(req, bufs, total, wstatus, usage.ru_utime + usage.ru_stime, timed_out)


def _verdict(
    req: dict, bufs: list[bytearray], total: list[int], wstatus: int, cpu: float, timed_out: bool
) -> dict:
    out, err = (
        b.decode(errors="replace")
        + (f"\n[sandbox] {t - len(b)} more bytes dropped\n" if t > len(b) else "")
        for b, t in zip(bufs[:2], total)
    )
    status, value, note = "killed", None, ""
    if timed_out:
        status, note = "timeout", f"wall-clock limit of {req['timeout_s']} s exceeded"
    elif os.WIFSIGNALED(wstatus):
        sig = os.WTERMSIG(wstatus)
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu >= math.ceil(req["timeout_s"])):
            status, note = "timeout", f"CPU-time limit exceeded ({cpu:.2f} s)"
        else:
            note = f"killed by signal {signal.Signals(sig).name}"
    else:
        try:
            report = json.loads(bufs[2])
            status, value = report["status"], report["value"]
            if status not in ("ok", "error", "memory") or not isinstance(value, (str, type(None))):
                raise ValueError(report)
        except Exception:  # noqa: BLE001 - no or garbled report: the program left abnormally
            status, value = "killed", None
            note = f"exited with code {os.WEXITSTATUS(wstatus)} without reporting a result"
    if note:
        err += ("" if not err or err.endswith("\n") else "\n") + f"[sandbox] {note}\n"
    return {"status": status, "stdout": out, "stderr": err, "value": value}


def _holds(entry: str, keep: Sequence[str]) -> bool:
    """`entry` is a kept path or one of its ancestors."""
    return any(k == entry or _is_under(k, entry) for k in keep)


def _clear_dir(directory: str, spare: str, keep: Sequence[str]) -> None:
    """Deletes every entry of `directory` but `spare` and the kept paths and their ancestors.

    The kept paths are the bind-mounted environment: deleting them, or descending into them from
    an ancestor, would delete the real virtualenv. An entry is judged by its own name (under the
    directory's real path too), never by where it points: a symlink to a kept path is unlinked.
    """
    real = os.path.realpath(directory)
    for entry in os.scandir(directory):
        names = (entry.path, os.path.join(real, entry.name))
        if spare in names or any(_holds(n, keep) for n in names):
            continue
        _delete(entry.path)


def _delete(path: str) -> None:
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    except (OSError, RecursionError):  # e.g. absurdly deep trees
        subprocess.run(["rm", "-rf", "--one-file-system", path], check=False)


def _cleanup(ctx: dict, work: str) -> None:
    """Deletes the work dir and, in a private mount namespace, whatever is left in tmp dirs."""
    _delete(work)
    if ctx["private_tmp"]:
        for directory in filter(os.path.isdir, _PRIVATE_TMP):
            _clear_dir(directory, ctx["base"], ctx["keep"])


def _serve(uid: int) -> None:
    rfd, wfd = os.dup(0), os.dup(1)  # keep the protocol pipes away from fds 0-3
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    for name in _PRELOAD:
        __import__(name)
    ctx = _isolate_server(uid)
    _send(wfd, {k: v for k, v in ctx.items() if k not in ("base", "server_pid", "keep")})
    try:
        for n in range(1, sys.maxsize):
            try:
                req = _recv(rfd)
            except EOFError:
                break
            _send(wfd, _run_one(ctx, req, n))
    finally:
        shutil.rmtree(ctx["base"], ignore_errors=True)


_SECCOMP = _seccomp_program() if __name__ == "__main__" else None

# -------------------------------------------------------------------------------- caller side


_uid_counter = itertools.count()  # next() on it is atomic, unlike on a generator


def _next_uid() -> int:
    """A uid for a new server; the pid offset makes clashes between caller processes rare."""
    return UID_BASE + (os.getpid() + next(_uid_counter)) % UID_COUNT


class _Server:
    """Handle on one fork-server process; used by one thread at a time."""

    def __init__(self, uid: int) -> None:
        self.uid, self.isolation = uid, {}
        self._proc: subprocess.Popen | None = None
        self._spawn()

    def _spawn(self) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-I", os.path.abspath(__file__), "--serve", str(self.uid)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=_ENV,
            cwd="/",
            start_new_session=True,
        )
        self.isolation = {}

    def ready(self) -> None:
        if self._proc is None or self._proc.poll() is not None:
            self._spawn()
        if not self.isolation:
            self.isolation = _recv(self._proc.stdout.fileno(), time.monotonic() + 60)

    def run(self, req: dict) -> SandboxResult:
        self.ready()
        try:
            _send(self._proc.stdin.fileno(), req)
            deadline = time.monotonic() + req["timeout_s"] + _GRACE_S
            return SandboxResult(**_recv(self._proc.stdout.fileno(), deadline))
        except (OSError, EOFError, TimeoutError, ValueError) as exc:
            self.close()
            return SandboxResult("killed", "", f"[sandbox] fork server failed: {exc!r}\n", None)

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.stdin.close()  # the server exits on EOF once the current program is done
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()  # its children die with it (PDEATHSIG)
            proc.wait()
        proc.stdout.close()


class Sandbox:
    """Pool of fork servers; each server runs its programs under its own uid/gid.

    Uids are handed out process-wide from `UID_BASE`, so a program can neither signal a sibling
    running concurrently in another worker (or pool) nor count against its process limit.
    """

    def __init__(self, num_workers: int | None = None) -> None:
        self._servers: list[_Server] = []
        self._idle: queue.SimpleQueue[_Server] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self.grow(num_workers or max(2, os.cpu_count() or 1))

    @property
    def num_workers(self) -> int:
        return len(self._servers)

    def grow(self, num_workers: int) -> None:
        """Starts fork servers (in parallel) until there are at least `num_workers`."""
        with self._lock:
            new = [_Server(_next_uid()) for _ in range(self.num_workers, num_workers)]
            for server in new:
                server.ready()
                self._servers.append(server)
                self._idle.put(server)

    def isolation(self) -> dict:
        """The mechanisms a worker actually got: uid_drop, netns, seccomp, private_tmp, ..."""
        server = self._idle.get()
        try:
            server.ready()
            return dict(server.isolation)
        finally:
            self._idle.put(server)

    def run(
        self, code: str, *, timeout_s: float = 2.0, memory_mb: int = 256, call: str | None = None
    ) -> SandboxResult:
        """Runs one program on the next free worker."""
        req = {
            "code": code,
            "timeout_s": float(timeout_s),
            "memory_mb": int(memory_mb),
            "call": call,
        }
        server = self._idle.get()
        try:
            return server.run(req)
        finally:
            self._idle.put(server)

    def run_many(
        self,
        codes: Sequence[str],
        *,
        timeout_s: float = 2.0,
        memory_mb: int = 256,
        call: str | None = None,
        max_workers: int | None = None,
    ) -> list[SandboxResult]:
        """Runs programs on up to `max_workers` workers at once; results in input order."""
        workers = max(1, min(len(codes), max_workers or self.num_workers, self.num_workers))
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            return list(
                pool.map(
                    lambda code: self.run(
                        code, timeout_s=timeout_s, memory_mb=memory_mb, call=call
                    ),
                    codes,
                )
            )

    def close(self) -> None:
        with self._lock:
            for server in self._servers:
                server.close()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_default: Sandbox | None = None
_default_lock = threading.Lock()


def default_sandbox(min_workers: int | None = None) -> Sandbox:
    """The lazily created process-wide pool (shut down at interpreter exit)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Sandbox()
            atexit.register(_default.close)
        if min_workers:
            _default.grow(min_workers)
        return _default


def run_python(
    code: str, *, timeout_s: float = 2.0, memory_mb: int = 256, call: str | None = None
) -> SandboxResult:
    """Runs one untrusted program in the default pool."""
    return default_sandbox().run(code, timeout_s=timeout_s, memory_mb=memory_mb, call=call)


def run_many(
    codes: Sequence[str],
    *,
    timeout_s: float = 2.0,
    memory_mb: int = 256,
    call: str | None = None,
    max_workers: int | None = None,
) -> list[SandboxResult]:
    """Runs untrusted programs in the default pool, grown to `max_workers` if needed."""
    return default_sandbox(max_workers).run_many(
        codes, timeout_s=timeout_s, memory_mb=memory_mb, call=call, max_workers=max_workers
    )


if __name__ == "__main__" and sys.argv[1:2] == ["--serve"]:
    _serve(int(sys.argv[2]))
