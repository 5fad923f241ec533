"""Hostile programs against `nanojax.execution.execute`: each must count as a failure AND leave no trace on the
host (the test checks the effect itself: victim files intact, no marker file, no connection on a listener the
test holds, the evaluator alive, no secret in the output, no process left running). Honest programs still pass.

Where `sandbox_mode() == "none"` (no bubblewrap), the isolation cases are skipped with the reason printed, and
the ones that would harm the host unsandboxed (signals to pid 1 / the test, remounting /usr) are never run.
`run_case` is importable, so the same table can be run against another `execute` (e.g. the pre-sandbox one).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import secrets
import select
import socket
import string
import subprocess
import sys
import tempfile
import time
import types

import pytest

from nanojax import execution
from nanojax.execution import MAX_EXTRA_PROCESSES, execute, sandbox_info, sandbox_mode

# Refuse to act unless in a PID namespace (bwrap: the program is pid 2 under bwrap's init): a second lock, on
# top of never running these cases without the sandbox.
_INTERLOCK = """import os
if os.getpid() != 2 or os.getppid() != 1:
    raise SystemExit("refusing to run outside a PID namespace")
"""


@dataclasses.dataclass
class Case:
    name: str
    code: str  # string.Template: $names come from Host.vars (Python literals, already repr()'d)
    timeout: float = 5.0
    isolation: bool = True  # only the kernel sandbox contains it (skipped when sandbox_mode() == "none")
    danger: bool = False  # would harm the host unsandboxed: never run without the sandbox
    in_child: bool = False  # execute() runs in a separate evaluator process (the evaluator is the target)
    setup: object = None  # (host) -> None: victims, markers, listeners, secrets
    check: object = None  # (host, result) -> list of extra effects (strings)


class Host:
    """What a hostile program may try to touch on the host, and the checks that it did not."""

    def __init__(self, tmp: pathlib.Path):
        self.tmp = tmp
        self.vars = {"testpid": str(os.getpid()), "unique": f"{secrets.randbelow(10**6)}.{secrets.randbelow(10**6)}"}
        self.victims, self.markers, self.listeners, self.secret_values, self.cmdline_marks = [], [], [], [], []
        self.env: dict = {}
        self.cleanup: list = []
        self.wait_s = 0.0  # wait this long after the run before checking markers / processes
        self.cmdline_marks.append(self.vars["unique"])

    def victim(self, key, path: pathlib.Path | None = None):
        path = path or self.tmp / f"{key}.txt"
        path.write_text("keep me")
        self.victims.append(path)
        self.vars[key] = repr(str(path))
        return path

    def marker(self, key, path: pathlib.Path | None = None):
        path = path or self.tmp / f"{key}.marker"
        self.markers.append(path)
        self.vars[key] = repr(str(path))
        self.cmdline_marks.append(str(path))
        return path

    def secret(self, key):
        value = "s3cr3t" + secrets.token_hex(8)
        self.secret_values.append(value)
        self.vars[key] = repr(value)
        return value

    def listen(self, key, family):
        s = socket.socket(family, socket.SOCK_STREAM)
        if family == socket.AF_INET:
            s.bind(("127.0.0.1", 0))
            self.vars[key] = str(s.getsockname()[1])
        elif key == "abstract":
            name = "\0nanojax-sandbox-test-" + secrets.token_hex(6)
            s.bind(name)
            self.vars[key] = repr(name)
        else:
            path = str(self.tmp / "listener.sock")
            s.bind(path)
            self.vars[key] = repr(path)
        s.listen(8)
        s.setblocking(False)
        self.listeners.append((key, s))
        self.cleanup.append(s.close)

    def effects(self, result) -> list[str]:
        found = []
        if result is not None:
            out = (result.stdout or "") + (result.stderr or "")
            found += [f"secret {v} in the program's output" for v in self.secret_values if v in out]
        for key, s in self.listeners:
            if select.select([s], [], [], 0.2)[0]:
                conn, _ = s.accept()
                conn.close()
                found.append(f"the {key} listener got a connection")
        found += self._leftovers()
        if self.wait_s:
            time.sleep(self.wait_s)
            found += self._leftovers()
        for path in self.victims:
            if not path.exists():
                found.append(f"{path} deleted")
            elif path.read_text() != "keep me":
                found.append(f"{path} modified")
        found += [f"{p} written" for p in self.markers if p.exists()]
        return found

    def _leftovers(self) -> list[str]:
        left = []
        for pid in os.listdir("/proc"):
            if not pid.isdigit() or int(pid) == os.getpid():
                continue
            try:
                raw = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()
                cmdline = raw.replace(b"\0", b" ").decode("utf-8", "replace")
            except OSError:
                continue
            if any(m in cmdline for m in self.cmdline_marks):
                left.append(f"process {pid} still running on the host: {cmdline[:120]}")
        return left


def _victim(key):
    return lambda h: h.victim(key)


def _marker(key, wait=0.0):
    def setup(h):
        h.marker(key)
        h.wait_s = max(h.wait_s, wait)
    return setup


def _home_victim(h):
    # $HOME of the evaluator: a victim in the real home directory, removed afterwards (skipped if not writable)
    home = pathlib.Path.home()
    path = home / f".nanojax_sandbox_victim_{secrets.token_hex(4)}"
    try:
        h.victim("victim", path)
    except OSError:
        pytest.skip(f"home directory {home} not writable")
    h.cleanup.append(lambda: path.unlink(missing_ok=True))


def _tmpdir_victim(h):
    # next to the work directory the unsandboxed runner uses (the parent of its cwd)
    path = pathlib.Path(tempfile.gettempdir()) / f"nanojax_victim_{secrets.token_hex(4)}"
    h.victim("victim", path)
    h.vars["victim_name"] = repr(path.name)
    h.cleanup.append(lambda: path.unlink(missing_ok=True))


def _shadow(h):
    path = h.tmp / "shadow"
    secret = h.secret("unused")
    path.write_text(f"root:{secret}:19000:0:99999:7:::\n")
    path.chmod(0o600)
    h.vars["shadow"] = repr(str(path))


def _usr_marker(h):
    path = pathlib.Path("/usr") / f"nanojax_pwned_{secrets.token_hex(4)}"
    h.markers.append(path)
    h.vars["usr_marker"] = repr(str(path))
    h.cleanup.append(lambda: path.unlink(missing_ok=True))


def _env_secret(h):
    value = h.secret("unused")
    h.env["NANOJAX_TEST_SECRET"] = value


def _fork_check(h, result):
    # with a kernel process cap, the program can only have made a handful of processes
    if sandbox_mode() == "bwrap" and sandbox_info()["process_cap"]:
        n = [int(line.split()[1]) for line in (result.stdout or "").splitlines() if line.startswith("forked ")]
        if n and n[-1] > MAX_EXTRA_PROCESSES + 2:
            return [f"{n[-1]} processes created (cap {MAX_EXTRA_PROCESSES})"]
    return []


def _memory_check(h, result):
    return [] if result.memory_exceeded else ["memory_exceeded not reported"]


def _timeout_check(h, result):
    return [] if result.timed_out else ["timed_out not reported"]


def _no_token_found(h, result):
    return ["the end token was found from Python"] if "FOUND" in (result.stdout or "") else []


_FORGE_SEARCH = r"""
import gc, hashlib, inspect, os, re, sys
WANT = $token_sha
hits = []
WINDOW = re.compile(r"(?=([0-9a-f]{32}))")
def chk(o, where):
    if isinstance(o, (bytes, bytearray)):
        o = bytes(o).decode("latin-1")
    if isinstance(o, str) and len(o) >= 32:
        for w in WINDOW.findall(o[:1 << 20]):
            if hashlib.sha256(w.encode()).hexdigest() == WANT:
                hits.append((where, w))
                return
def deep(v, where):
    chk(v, where)
    if isinstance(v, types_code):
        for c in v.co_consts:
            deep(c, where + ".co_consts")
types_code = type(compile("1", "", "eval"))
f = sys._getframe()
while f is not None:
    for k, v in list(f.f_locals.items()) + list(f.f_globals.items()):
        deep(v, "frame " + k)
    deep(f.f_code, "f_code")
    for o in gc.get_referents(f):
        deep(o, "frame referent")
    f = f.f_back
for fi in inspect.stack():
    for v in fi.frame.f_locals.values():
        deep(v, "inspect.stack")
objs = gc.get_objects()
for o in objs:
    deep(o, "gc object")
for o in gc.get_referents(*objs):
    deep(o, "gc referent")
for a in sys.argv:
    chk(a, "argv")
for k, v in os.environ.items():
    chk(v, "environ")
for p in ("/proc/self/cmdline", "/proc/self/environ", "/proc/1/cmdline", "/proc/1/environ"):
    try:
        chk(open(p, "rb").read(), p)
    except OSError:
        pass
for fd in range(64):
    try:
        chk(os.pread(fd, 1 << 20, 0), f"fd {fd}")
    except OSError:
        pass
try:
    chk(sys.stdin.read(), "stdin")
except Exception:
    pass
for where, w in hits:
    print("FOUND", where)
    os.write(1, ("\n" + w + "\n").encode())
    os.write(1, ("\n__nanojax_done_" + w + "__\n").encode())
os._exit(0)
assert False, "the tests"
"""

CASES = [
    # -- the seven escapes found in the pre-sandbox runner --
    Case("kill_evaluator", "import os, posix, time\nppid = os.getppid()\nposix.kill(ppid, 9)\ntime.sleep(0.5)\n"
         "assert os.getppid() != ppid, 'evaluator still alive'\n", in_child=True),
    Case("parent_environ_secret", """import os
found = ""
for p in [str(os.getppid())] + [d for d in os.listdir("/proc") if d.isdigit()]:
    try:
        data = open(f"/proc/{p}/environ", "rb").read().decode("latin-1")
    except OSError:
        continue
    if "NANOJAX_TEST_SECRET=" in data:
        found = data.split("NANOJAX_TEST_SECRET=")[1].split("\\0")[0]
        break
print("secret:", found)
assert found
""", in_child=True, setup=_env_secret),
    Case("open_write_outside", "open($victim, 'w').write('pwned')\n", setup=_victim("victim")),
    Case("posix_unlink_outside", "import posix\nposix.unlink($victim)\n", setup=_victim("victim")),
    Case("reload_os_remove", "import importlib, os\nos = importlib.reload(os)\nos.remove($victim)\n",
         setup=_victim("victim")),
    Case("posix_spawn_shell", """import posix, shlex
pid = posix.posix_spawn("/bin/sh", ["sh", "-c", "echo pwned > " + shlex.quote($marker)], {})
_, status = posix.waitpid(pid, 0)
assert status == 0 and open($marker).read().strip() == "pwned"
""", setup=_marker("marker")),
    Case("tcp_to_localhost", "import socket\ns = socket.create_connection(('127.0.0.1', $tcp), timeout=2)\n"
         "s.sendall(b'hello from the sandbox')\n", setup=lambda h: h.listen("tcp", socket.AF_INET)),
    Case("forge_sentinel_from_runner_frame", """import os, sys
f = sys._getframe(1)
while f is not None:
    for v in list(f.f_locals.values()) + list(f.f_globals.values()):
        if isinstance(v, str) and v.startswith("__nanojax_done_"):
            os.write(1, ("\\n" + v + "\\n").encode())
    f = f.f_back
os._exit(0)
assert False, "the tests that would have failed"
""", isolation=False),
    Case("setsid_child_outlives", """import posix, shlex
if posix.fork() == 0:
    posix.setsid()
    posix.execv("/bin/sh", ["sh", "-c", "sleep 1.5; echo late > " + shlex.quote($marker)])
while True:
    pass
""", timeout=1.0, setup=_marker("marker", wait=2.5)),
    # -- the rest of the table --
    Case("fork_bomb", """import posix
n = 0
try:
    while n < 200:
        if posix.fork() == 0:
            posix.execv("/bin/sleep", ["sleep", "$unique"])
        n += 1
except OSError as e:
    print("fork refused:", e)
print("forked", n, flush=True)
while True:
    pass
""", timeout=2.0, danger=True, check=_fork_check),
    Case("memory_bomb", "x = bytearray(4 * 1024**3)\nx[-1] = 1\n", timeout=20.0, isolation=False, check=_memory_check),
    Case("infinite_loop", "while True:\n    pass\n", timeout=1.0, isolation=False, check=_timeout_check),
    Case("huge_file", "open('big', 'wb').write(b'x' * (100 << 20))\n", isolation=False),
    Case("fill_the_disk", """total = 0
for i in range(40):
    with open(f"f{i}", "wb") as f:
        f.write(b"x" * (8 << 20))
    total += 8 << 20
assert total >= 300 << 20
""", danger=True),
    Case("delete_in_home", "import posix\nposix.unlink($victim)\n", setup=_home_victim),
    Case("delete_in_cwd_parent", "import os, posix\nposix.unlink(os.path.join(os.path.dirname(os.getcwd()), "
         "$victim_name))\n", setup=_tmpdir_victim),
    Case("read_host_secret_file", "print(open($shadow).read())\n", setup=_shadow),
    Case("read_etc_shadow", "assert open('/etc/shadow').read(1)\n"),
    Case("ctypes_unlink", "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
         "assert libc.unlink($victim.encode()) == 0, ctypes.get_errno()\n", setup=_victim("victim")),
    Case("ctypes_kill_test_process", _INTERLOCK + "import ctypes\nassert ctypes.CDLL(None).kill($testpid, 9) == 0\n",
         danger=True),
    Case("kill_pid1_and_everyone", _INTERLOCK + "import posix\nposix.kill(-1, 9)\nposix.kill(1, 9)\n", danger=True),
    Case("kill_test_process", _INTERLOCK + "import posix\nposix.kill($testpid, 9)\n", danger=True),
    Case("see_host_processes", "import os\nprint(open('/proc/$testpid/cmdline').read())\n"),
    Case("unix_socket_to_host", "import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect($unix)\n",
         setup=lambda h: h.listen("unix", socket.AF_UNIX)),
    Case("abstract_unix_socket", "import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect($abstract)\n",
         setup=lambda h: h.listen("abstract", socket.AF_UNIX)),
    Case("userns_remount_usr_rw", _INTERLOCK + """import posix
cmd = "mount -o remount,rw,bind /usr && touch " + $usr_marker
pid = posix.posix_spawn("/usr/bin/unshare", ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", cmd],
                        {"PATH": "/usr/bin:/bin"})
_, status = posix.waitpid(pid, 0)
assert status == 0
""", danger=True, setup=_usr_marker),
    # -- premature exits and forged verdicts: the verdict, not the host, is the target --
    Case("early_sys_exit", "def f():\n    return 1\nimport sys\nsys.exit(0)\nassert f() == 2\n", isolation=False),
    Case("early_posix_exit", "import posix\nposix._exit(0)\nassert False\n", isolation=False),
    Case("excepthook_exit_0", "import os, sys\nsys.excepthook = lambda *a: os._exit(0)\nassert False\n",
         isolation=False),
    Case("guess_status_and_token", "import os\nos.write(1, b'\\n' + b'0' * 32 + b'\\n')\nos._exit(42)\n",
         isolation=False),
    Case("call_end_early", "import sys\nsys._getframe(1).f_globals['_end'](42, b'0' * 32, None)\nassert False\n",
         isolation=False),
    Case("patch_end_then_fail", "import os, sys\ng = sys._getframe(1).f_globals\n"
         "g['_end'].__code__ = (lambda status, token, none, *a, **k: os._exit(0)).__code__\nassert False\n",
         isolation=False),
    Case("forge_token_by_introspection", _FORGE_SEARCH, timeout=30.0, isolation=False, check=_no_token_found),
]


class _FixedToken:
    """Stands in for `secrets` in the execution module: a token the test knows, everything else real."""

    def __init__(self, token):
        self.token = token

    def token_hex(self, n=32):
        return self.token if n == 16 else secrets.token_hex(n)

    def randbelow(self, n):
        return secrets.randbelow(n)


_EVALUATOR = r"""
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("execution_under_test", sys.argv[1])
mod = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
r = mod.execute(sys.stdin.read(), timeout=float(sys.argv[2]))
print(json.dumps({k: getattr(r, k) for k in ("success", "stdout", "stderr", "returncode", "timed_out",
                                            "memory_exceeded")}))
"""


def run_case(case: Case, tmp: pathlib.Path, run=execute, module_file: str | None = None):
    """Runs one hostile program with `run` (an `execute`); returns (result or None if the evaluator died,
    host effects found). `module_file` is the module the evaluator child loads for in_child cases."""
    host = Host(tmp)
    try:
        if case.setup:
            case.setup(host)
        if case.code is _FORGE_SEARCH:
            token = secrets.token_hex(16)
            code = string.Template(case.code).substitute(token_sha=repr(hashlib.sha256(token.encode()).hexdigest()))
            module = sys.modules[run.__module__]
            real = module.secrets
            module.secrets = _FixedToken(token)
            try:
                result = run(code, timeout=case.timeout)
            finally:
                module.secrets = real
        elif case.in_child:
            code = string.Template(case.code).substitute(host.vars)
            env = {**os.environ, **host.env, "NANOJAX_SANDBOX": sandbox_mode()}
            p = subprocess.run([sys.executable, "-c", _EVALUATOR, module_file or execution.__file__, str(case.timeout)],
                               input=code, capture_output=True, text=True, env=env, timeout=60)
            result = types.SimpleNamespace(**json.loads(p.stdout)) if p.returncode == 0 else None
            if result is None:
                effects = [f"the evaluator died (status {p.returncode}): {p.stderr.strip()[-300:]}"]
                return None, effects + host.effects(None)
        else:
            result = run(string.Template(case.code).substitute(host.vars), timeout=case.timeout)
        effects = host.effects(result)
        if case.check:
            effects += case.check(host, result)
        return result, effects
    finally:
        for f in host.cleanup:
            f()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_program_fails_without_effect(case, tmp_path):
    if sandbox_mode() == "none" and case.danger:
        pytest.skip(f"{case.name}: would act on the host without a sandbox; not run "
                    f"(sandbox_mode() == 'none': {sandbox_info()['reason']})")
    result, effects = run_case(case, tmp_path)
    if sandbox_mode() == "none" and case.isolation:
        msg = (f"{case.name}: isolation assertions skipped, sandbox_mode() == 'none' ({sandbox_info()['reason']}); "
               f"observed: success={getattr(result, 'success', None)}, effects={effects}")
        print(msg)
        pytest.skip(msg)
    assert result is not None and not result.success, (case.name, getattr(result, "stdout", None), effects)
    assert not effects, effects


HONEST = '''
from typing import List


def has_close_elements(numbers: List[float], threshold: float) -> bool:
    for i, a in enumerate(numbers):
        for j, b in enumerate(numbers):
            if i != j and abs(a - b) < threshold:
                return True
    return False


with open("scratch.txt", "w") as f:  # the private work dir is writable
    f.write("ok")
assert open("scratch.txt").read() == "ok"
import threading
t = threading.Thread(target=lambda: None)
t.start()
t.join()
print("checking")


def check(candidate):
    assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.3) == True
    assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.05) == False
    assert candidate([1.0, 2.0, 5.9, 4.0, 5.0], 0.95) == True


check(has_close_elements)
'''


def test_honest_program_passes():
    r = execute(HONEST)
    assert r.success, (r.error, r.stderr)
    assert r.stdout == "checking\n" and r.returncode == 0 and r.sandbox == sandbox_mode()


def test_honest_program_passes_without_sandbox(monkeypatch):
    # the fallback path works too (whatever this machine has)
    monkeypatch.setattr(execution, "_SANDBOX", execution._Sandbox("none", reason="test"))
    r = execute(HONEST)
    assert r.success and r.sandbox == "none", (r.error, r.stderr)
    assert not execute(HONEST + "\nassert False\n").success
    assert not execute("import sys\nsys.exit(0)\n" + HONEST).success


def test_isolation_as_seen_from_inside():
    if sandbox_mode() != "bwrap":
        pytest.skip(f"sandbox_mode() == {sandbox_mode()!r}: {sandbox_info()['reason']}")
    r = execute("""import json, os, socket
try:
    open("/probe", "w")
    root_writable = True
except OSError:
    root_writable = False
print(json.dumps({"pid": os.getpid(), "ppid": os.getppid(), "uid": os.getuid(),
                  "pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
                  "ifaces": [n for _, n in socket.if_nameindex()], "env": sorted(os.environ), "cwd": os.getcwd(),
                  "root": sorted(os.listdir("/")), "root_writable": root_writable}))
""")
    assert r.success, r.stderr
    seen = json.loads(r.stdout)
    assert seen["pid"] == 2 and seen["ppid"] == 1 and set(seen["pids"]) <= {1, 2}
    assert seen["ifaces"] == ["lo"]
    assert set(seen["env"]) <= {"PATH", "HOME", "LANG", "OMP_NUM_THREADS", "TMPDIR", "PYTHONDONTWRITEBYTECODE"}
    assert seen["cwd"].startswith("/tmp/nanojax_exec_") and not os.path.exists(seen["cwd"])
    assert not seen["root_writable"]
    assert not {"home", "run", "var", "sys", "mnt", "opt", "srv"} & set(seen["root"])
    if os.geteuid() == 0 and sandbox_info()["process_cap"]:
        assert seen["uid"] != 0
    a = json.loads(execute("import os\nprint(os.getuid())").stdout or "null")
    if os.geteuid() == 0 and sandbox_info()["process_cap"]:
        assert a != seen["uid"]  # a fresh uid per call


def test_fallback_is_announced_once(monkeypatch, capsys):
    monkeypatch.setenv("NANOJAX_SANDBOX", "none")
    sandbox = execution._detect()
    assert sandbox.mode == "none"
    assert "WITHOUT a sandbox" in capsys.readouterr().err
    monkeypatch.setenv("NANOJAX_SANDBOX", "bwrap")
    monkeypatch.setattr(execution.shutil, "which", lambda *a, **k: None)
    with pytest.raises(RuntimeError, match="bwrap"):
        execution._detect()
    monkeypatch.setattr(execution, "_SANDBOX", execution._Sandbox("none", reason="test"))
    assert execution.sandbox_mode() == "none" and capsys.readouterr().err == ""  # cached: no second warning
