"""Hostile programs against `echo_jax.lm.sandbox`: each must be contained, get the right status,
change nothing outside its work dir, leave no process behind, and leave the pool working."""

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

import psutil
import pytest

from echo_jax.lm import sandbox

ROOT = os.geteuid() == 0
SECRET = "echo-sandbox-secret-6f1d2a"
TINYGSM = textwrap.dedent("""\
    def simple_math_problem() -> int:
        apples_per_box = 12
        boxes = 7
        eaten = 5
        return apples_per_box * boxes - eaten
""")


def _servers() -> set[int]:
    return {p.pid for p in psutil.Process().children() if "--serve" in p.cmdline()}


def _strays(uids: set[int]) -> list[psutil.Process]:
    """Processes left by our programs: children of our servers, or escapees with our uids.

    Other callers on the machine may run sandboxes with the same uids, under their own servers.
    """
    ours = _servers()
    strays = [p for pid in ours for p in psutil.Process(pid).children(recursive=True)]
    for p in psutil.process_iter(["uids", "ppid"]):
        if p.info["uids"] and p.info["uids"].real in uids and p not in strays:
            try:
                foreign_server = "--serve" in psutil.Process(p.info["ppid"]).cmdline()
            except psutil.Error:
                foreign_server = False
            if not foreign_server or p.info["ppid"] in ours:
                strays.append(p)
    return strays


@pytest.fixture(scope="module")
def pool():
    with sandbox.Sandbox(num_workers=2) as sb:
        yield sb


@pytest.fixture
def sb(pool):
    """The shared pool, checked after the test: same servers, no strays, still answering."""
    before = _servers()
    yield pool
    assert _strays({server.isolation["uid"] for server in pool._servers}) == []
    assert _servers() == before  # no server was killed or restarted
    after = pool.run_many([TINYGSM] * 2, call="simple_math_problem")
    assert [(r.status, r.value) for r in after] == [("ok", "79")] * 2


@pytest.fixture
def canary():
    """Root-owned dir (0o755) holding a root-owned file (0o644), outside any private tmpfs."""
    directory = os.path.join(os.path.dirname(os.path.abspath(__file__)), f".canary-{os.getpid()}")
    os.makedirs(directory, mode=0o755)
    target = os.path.join(directory, "canary.txt")
    with open(target, "w") as f:
        f.write("original")
    os.chmod(target, 0o644)
    before = os.stat(target)
    try:
        yield directory, target
        assert sorted(os.listdir(directory)) == ["canary.txt"]
        with open(target) as f:
            assert f.read() == "original"
        after = os.stat(target)
        assert (after.st_mode, after.st_uid, after.st_mtime_ns) == (
            before.st_mode,
            before.st_uid,
            before.st_mtime_ns,
        )
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# ----------------------------------------------------------------------------------- normal use


def test_tinygsm_call_returns_repr_of_value(sb):
    result = sb.run(TINYGSM, call="simple_math_problem")
    assert result == sandbox.SandboxResult("ok", "", "", "79")


def test_print_exception_and_missing_function(sb):
    assert sb.run("print('hello', 6 * 7)").stdout == "hello 42\n"
    error = sb.run("def f():\n    return 1 / 0\nf()")
    assert error.status == "error" and error.stderr.rstrip().endswith("division by zero")
    assert 'File "<program>", line 2' in error.stderr
    missing = sb.run("x = 1", call="simple_math_problem")
    assert missing.status == "error" and "simple_math_problem" in missing.stderr


def test_failed_program_carries_its_error_text(sb):
    assert sb.run("print(1)").error == ""
    missing = sb.run("import os\nimport no_such_module_echo")
    assert missing.error == "ModuleNotFoundError: No module named 'no_such_module_echo'"
    assert sb.run("import sys; sys.exit(3)").error == "SystemExit: 3"
    assert sb.run("x = []\nwhile True: x.append(' ' * 10**6)", memory_mb=128).error == "MemoryError"
    timeout = sb.run("while True: pass", timeout_s=0.5)  # wall clock or CPU time, whichever first
    assert timeout.error.startswith("[sandbox] ") and "limit" in timeout.error
    segfault = sb.run("import ctypes; ctypes.string_at(0)")
    assert segfault.error == "[sandbox] killed by signal SIGSEGV"


def test_run_many_keeps_order_and_module_api():
    codes = [f"def simple_math_problem():\n    return {i} / 4\n" for i in range(20)]
    results = sandbox.run_many(codes, call="simple_math_problem", max_workers=3)
    assert [r.value for r in results] == [repr(i / 4) for i in range(20)]
    assert sandbox.run_python("import fractions; print(fractions.Fraction(1, 3))").stdout == "1/3\n"
    assert sandbox.default_sandbox().num_workers >= 3


@pytest.mark.skipif(not ROOT, reason="uid drop and namespaces need root")
def test_isolation_mechanisms_active(pool):
    iso = pool.isolation()  # namespaces may be unavailable (e.g. Docker): seccomp still blocks
    assert iso["uid_drop"] and (iso["netns"] or iso["seccomp"]) and not iso["socket_patch"]
    assert sandbox.UID_BASE <= iso["uid"] < sandbox.UID_BASE + sandbox.UID_COUNT
    result = pool.run("import os; print(os.getuid(), os.getgid(), os.getgroups(), os.listdir('.'))")
    uid, gid, groups, listing = result.stdout.split(" ", 3)
    assert int(uid) == int(gid) >= sandbox.UID_BASE and groups == "[]" and listing == "[]\n"


def test_value_size_limit(sb):
    fits = sb.run("def f():\n    return '\U0001f600' * 60000", call="f")
    assert fits.status == "ok" and fits.value == repr("\U0001f600" * 60000)
    too_big = sb.run("def f():\n    return 'x' * 10**6", call="f")
    assert too_big.status == "error" and "exceeds" in too_big.stderr


def test_programs_get_fresh_random_state(sb):
    results = sb.run_many(["import random; print(random.random())"] * 4)
    assert len({r.stdout for r in results}) == 4


def test_work_dir_is_fresh_and_private(sb):
    sb.run_many(["open('left_behind', 'w').write('x')"] * 4)
    result = sb.run("import os\nprint(os.listdir('.'))\nos.listdir('..')")
    assert result.stdout == "[]\n" and result.status == "error"  # parent dir is not listable


# -------------------------------------------------------------------------------- hostile code


@pytest.mark.parametrize(
    "code",
    [
        "while True: pass",
        "import time; time.sleep(30)",
        "import signal\nfor s in (signal.SIGTERM, signal.SIGALRM, signal.SIGXCPU, signal.SIGINT):\n"
        "    signal.signal(s, signal.SIG_IGN)\nwhile True: pass",
        "x = 10 ** 10 ** 8",
    ],
)
def test_runaway_programs_time_out(sb, code):
    start = time.monotonic()
    result = sb.run(code, timeout_s=0.5)
    assert result.status == "timeout"
    assert time.monotonic() - start < 3.0


def test_fork_bomb_threads_and_subprocesses_are_refused(sb):
    for code in [
        "import os\nwhile True: os.fork()",
        "import threading, time\nthreading.Thread(target=time.sleep, args=(60,)).start()",
        "import subprocess; subprocess.run(['sleep', '60'])",
        "__builtins__.__import__('posix').fork()",
        "[c for c in ().__class__.__base__.__subclasses__() if c.__name__ == 'Popen'][0]"
        "(['sh', '-c', 'sleep 60'])",
    ]:
        result = sb.run(code, timeout_s=1.0)
        assert result.status == "error", (code, result)
    system = sb.run("import os\nprint(os.system('touch pwned'), os.path.exists('pwned'))")
    assert system.status == "ok" and system.stdout.split()[1] == "False"


def test_memory_bomb(sb):
    result = sb.run("x = []\nwhile True: x.append(' ' * 10**6)", memory_mb=128)
    assert result.status == "memory" and "MemoryError" in result.stderr


def test_recursion(sb):
    assert sb.run("def f(): return f()\nf()").status == "error"
    # Unbounded C recursion (pickling deeply nested lists) overflows the C stack: a segfault.
    deep = "import pickle, sys\nsys.setrecursionlimit(10**7)\nx = []\n"
    result = sb.run(deep + "for _ in range(10**5): x = [x]\npickle.dumps(x)", timeout_s=5)
    assert result.status in ("killed", "error")  # "error" (RecursionError) from Python 3.12 on


def test_segfault_and_abort(sb):
    assert sb.run("import ctypes; ctypes.string_at(0)").status == "killed"
    assert sb.run("import os; os.abort()").status == "killed"


@pytest.mark.parametrize(
    "code,status",
    [
        ("import sys; print('bye'); sys.exit(0)", "ok"),
        ("import sys; sys.exit()", "ok"),
        ("import sys; sys.exit(3)", "error"),
        ("import sys; sys.exit('message')", "error"),
        ("import os; os._exit(0)", "killed"),
        ("import os; os._exit(3)", "killed"),
        ("import os; os.closerange(0, 1024); print('gone')", "killed"),
        ("import os; os.write(3, b'{not json'); os._exit(0)", "killed"),
    ],
)
def test_exits(sb, code, status):
    assert sb.run(code).status == status


def test_huge_stdout_is_capped(sb):
    rss = psutil.Process().memory_info().rss
    result = sb.run(
        "import sys\nfor _ in range(100): sys.stdout.write('x' * 10**6)\n"
        "sys.stderr.write('e' * 10**7)"
    )
    assert result.status == "ok"
    assert result.stdout.startswith("x" * sandbox.OUTPUT_CAP) and "bytes dropped" in result.stdout
    assert max(len(result.stdout), len(result.stderr)) < sandbox.OUTPUT_CAP + 100
    assert psutil.Process().memory_info().rss - rss < 50 * 2**20


def test_big_files_are_refused_and_removed(sb):
    result = sb.run("f = open('big', 'wb')\nfor _ in range(1024): f.write(b'0' * 2**20)")
    assert result.status == "error" and "File too large" in result.stderr
    assert sb.run("import os; print(os.listdir('.'))").stdout == "[]\n"


@pytest.mark.skipif(not ROOT, reason="file isolation relies on dropping root")
def test_files_outside_the_work_dir_are_untouchable(sb, canary):
    directory, target = canary
    code = textwrap.dedent(f"""\
        import os, shutil
        attempts = {{
            "write": lambda: open({target!r}, "w").write("pwned"),
            "append": lambda: open({target!r}, "a").write("pwned"),
            "delete": lambda: os.remove({target!r}),
            "chmod": lambda: os.chmod({target!r}, 0o777),
            "rename": lambda: os.rename({target!r}, {target!r} + ".bak"),
            "create": lambda: open(os.path.join({directory!r}, "new"), "w"),
            "rmtree": lambda: shutil.rmtree({directory!r}),
            "shadow": lambda: open("/etc/shadow").read(),
            "symlink": lambda: os.symlink("/etc/shadow", os.path.join({directory!r}, "link")),
            "root": lambda: open("/root/.bashrc").read(),
            "setuid": lambda: os.setuid(0),
        }}
        for name, attempt in attempts.items():
            try:
                attempt()
                print(name, "ALLOWED")
            except OSError:
                print(name, "denied")
    """)
    result = sb.run(code)
    assert result.status == "ok" and "ALLOWED" not in result.stdout, result
    assert result.stdout.count("denied") == 11


def test_tmp_writes_do_not_leak(sb):
    if not sb.isolation()["private_tmp"]:
        pytest.skip("no private tmpfs: /tmp is shared with the host")
    for tmp in ("/tmp", "/var/tmp", "/dev/shm"):
        marker = f"{tmp}/echo-sandbox-escape-{os.getpid()}"
        assert sb.run(f"open({marker!r}, 'w').write('x')").status == "ok"
        assert not os.path.exists(marker)
        results = sb.run_many([f"import os; print(os.path.exists({marker!r}))"] * 2)
        assert [r.stdout for r in results] == ["False\n"] * 2  # gone for the next program too


def test_network_is_unreachable(sb):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(0.3)
        port = listener.getsockname()[1]
        codes = [
            f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=1)",
            f"import _socket; s = _socket.socket(); s.connect(('127.0.0.1', {port}))",
            f"import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM)"
            f".sendto(b'x', ('127.0.0.1', {port}))",
            "import urllib.request; urllib.request.urlopen('http://example.com', timeout=1)",
        ]
        for code in codes:
            result = sb.run(code, timeout_s=2.0)
            assert result.status == "error", (code, result)
        with pytest.raises(socket.timeout):
            listener.accept()


def test_environment_and_parent_secrets_are_invisible(sb, monkeypatch):
    monkeypatch.setenv("ECHO_SANDBOX_SECRET", SECRET)  # set before a fresh pool starts
    code = textwrap.dedent(f"""\
        import os
        print(sorted(os.environ))
        for path in ("/proc/self/environ", "/proc/1/environ", "/proc/{os.getpid()}/environ",
                     "/proc/{os.getpid()}/cmdline", "/proc/{os.getppid()}/environ"):
            try:
                print(open(path, "rb").read())
            except OSError as exc:
                print(path, type(exc).__name__)
    """)
    with sandbox.Sandbox(num_workers=1) as fresh:
        result = fresh.run(code)
    assert result.status == "ok"
    assert SECRET not in result.stdout + result.stderr
    assert "ECHO_SANDBOX_SECRET" not in result.stdout and "PYTEST" not in result.stdout


@pytest.mark.parametrize(
    "code",
    [
        "import os, signal; os.kill(os.getppid(), signal.SIGKILL)",
        f"import os, signal; os.kill({os.getpid()}, signal.SIGKILL)",
        "import os, signal; os.killpg(os.getpgid(os.getppid()), signal.SIGKILL)",
        "import os, signal; os.kill(-1, signal.SIGKILL)",
        "import os; os.kill(1, 9)",
    ],
    ids=["parent", "this_test_process", "parent_group", "everyone", "init"],  # stable: xdist
)
def test_cannot_signal_the_server_or_caller(sb, code):
    # kill(-1) "succeeds" when every target refuses with EPERM; seccomp makes it an error.
    lenient = "kill(-1" in code and not sb.isolation()["seccomp"]
    assert sb.run(code).status in (("ok", "error") if lenient else ("error",))


def test_cannot_kill_a_concurrent_sibling(sb):
    sleeper = "import time; time.sleep(0.5); print('alive')"
    killer = "import os, time; time.sleep(0.1); os.kill(-1, 9)"
    results = sb.run_many([sleeper, killer], max_workers=2)
    assert results[0].status == "ok" and results[0].stdout == "alive\n"


# ------------------------------------------------------------ the environment under /tmp


def test_cleanup_spares_kept_paths_and_their_ancestors(tmp_path):
    """`_clear_dir` (run as root on the private /tmp after every program) must never delete or
    descend into the bind-mounted environment; here on a plain dir, no namespace needed."""
    keep = [str(tmp_path / "outer" / "venv"), str(tmp_path / "env")]
    for kept in keep:
        os.makedirs(os.path.join(kept, "lib"))
        pathlib.Path(kept, "lib", "mod.py").write_text("VALUE = 1")
    (tmp_path / "outer" / "sibling").write_text("x")  # inside a kept path's ancestor: spared
    (tmp_path / "base").mkdir()
    for junk in ("env2", "outer2", "junk_dir/deep"):
        (tmp_path / junk).mkdir(parents=True)
    (tmp_path / "junk_file").write_text("x")
    os.symlink(keep[0], tmp_path / "link_to_venv")
    sandbox._clear_dir(str(tmp_path), str(tmp_path / "base"), keep)
    assert sorted(os.listdir(tmp_path)) == ["base", "env", "outer"]
    assert sorted(os.listdir(tmp_path / "outer")) == ["sibling", "venv"]
    for kept in keep:
        assert pathlib.Path(kept, "lib", "mod.py").read_text() == "VALUE = 1"


_VENV_SCRIPT = textwrap.dedent("""\
    import json, os, sys
    from echo_jax.lm import sandbox
    site = sys.argv[1]
    programs = {
        "import": "import echo_probe_mod; print(echo_probe_mod.VALUE)",
        "write": f"open({os.path.join(site, 'echo_evil.py')!r}, 'w').write('x')",
        "delete": f"import os; os.remove({os.path.join(site, 'echo_probe_mod.py')!r})",
        "litter": "open('/tmp/echo-litter', 'w').write('x')",
        "after": "import os, echo_probe_mod\\n"
        "print(os.path.exists('/tmp/echo-litter'), echo_probe_mod.VALUE)",
    }
    with sandbox.Sandbox(num_workers=1) as sb:
        results = {name: sb.run(code) for name, code in programs.items()}
    print(json.dumps({name: [r.status, r.stdout, r.error] for name, r in results.items()}))
""")


@pytest.fixture
def tmp_venv():
    """A throwaway virtualenv under a 0700 dir in /tmp (as a CI runner's), its site-packages
    world-writable so only a read-only mount keeps programs out; yields (python, site)."""
    parent = tempfile.mkdtemp(prefix="echo-sandbox-venv-", dir="/tmp")
    try:
        venv = os.path.join(parent, "venv")
        made = subprocess.run(
            [sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", venv],
            capture_output=True,
            text=True,
        )
        if made.returncode != 0:
            pytest.skip(f"python -m venv is unavailable: {made.stderr.strip()[-300:]}")
        python = os.path.join(venv, "bin", "python")
        site = subprocess.run(
            [python, "-I", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        pathlib.Path(site, "echo_probe_mod.py").write_text("VALUE = 6 * 7\n")
        os.chmod(site, 0o777)
        yield python, site
    finally:
        shutil.rmtree(parent, ignore_errors=True)


@pytest.mark.skipif(not ROOT, reason="the private /tmp (a mount namespace) needs root")
def test_virtualenv_under_tmp_is_importable_read_only_and_survives_cleanup(pool, tmp_venv):
    if not pool.isolation()["private_tmp"]:
        pytest.skip("no mount namespace here: /tmp is not replaced, so nothing is hidden")
    python, site = tmp_venv
    files = [os.path.join(site, "echo_probe_mod.py"), python, os.path.dirname(python)]
    files.append(os.path.join(os.path.dirname(os.path.dirname(python)), "pyvenv.cfg"))
    repo = str(pathlib.Path(__file__).resolve().parents[2])  # the venv's caller imports echo_jax
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": repo}
    ran = subprocess.run(
        [python, "-c", _VENV_SCRIPT, site], env=env, capture_output=True, text=True, timeout=120
    )
    assert ran.returncode == 0, ran.stderr
    out = json.loads(ran.stdout)
    assert out["import"] == ["ok", "42\n", ""], out
    for attempt in ("write", "delete"):
        status, _, error = out[attempt]
        assert status == "error" and "Read-only file system" in error, out
    assert out["litter"][0] == "ok" and out["after"] == ["ok", "False 42\n", ""], out
    assert all(os.path.exists(f) for f in files), files  # cleanup left the environment alone
    assert os.listdir(site) == ["echo_probe_mod.py"]
