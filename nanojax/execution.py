"""Run untrusted, model-written Python (HumanEval, tool calls) in a sandboxed child process with limits.

`execute(code, timeout=5.0, maximum_memory_bytes=256 MB) -> ExecutionResult` with `.success`, `.timed_out`,
`.memory_exceeded`, `.stdout`, `.stderr`, `.returncode`, `.error`, `.duration_s` and `.sandbox`.
`sandbox_mode()` -> "bwrap" | "none" says which of the two set-ups below runs the code (decided once per
process, on first use); `sandbox_info()` adds why, and whether the kernel caps the number of processes.

Threat model: the code may be hostile, not just buggy -- a model trained with RL on execution rewards, or a
chat user's tool call. It must not act on the host, and it must not be able to claim a pass it did not earn
by exiting early or by forging the verdict.

Kernel isolation ("bwrap": Linux with bubblewrap, the default where it works)
- Namespaces: new PID, mount, network, IPC, UTS and cgroup namespaces (and a user namespace when we are not
  root, with further user namespaces disabled). The program sees only its own processes (it is PID 2 under
  bwrap's init), a fresh /proc, and a network with nothing but its own loopback: no host process, no host
  environment (`/proc/<ppid>/environ`), no socket to the host's 127.0.0.1.
- File system: a new root holding read-only binds of /usr (+ the /bin, /lib... links), the dynamic loader's
  /etc files, and the Python installation / venv running us; a minimal /dev; private, size-capped tmpfs on
  /tmp (the work dir, cwd, HOME and TMPDIR: `/tmp/nanojax_exec_<random>`) and /dev/shm; / and /dev read-only.
  Everything else of the host (home dirs, the host's /tmp, /run and its sockets, the checkout, /etc/shadow,
  /sys) is simply absent. Nothing written survives the call.
- Identity: as root, the program runs under a fresh random unprivileged uid/gid (3e9 + random, one per call,
  via util-linux `setpriv`), with no capabilities, an empty bounding set and no_new_privs; so the kernel
  enforces RLIMIT_NPROC (a fork bomb stops at MAX_EXTRA_PROCESSES), the program cannot signal bwrap's init or
  other calls' processes, and file permissions apply to it. As a normal user, bwrap's user namespace keeps
  the user's uid without capabilities (RLIMIT_NPROC then counts that namespace's processes only). If `setpriv`
  is missing as root, the uid is 65534 inside a user namespace that maps to root outside: no capabilities,
  but RLIMIT_NPROC is then not enforced (`sandbox_info()["process_cap"]` is False).
- Environment: cleared; only PATH, HOME, LANG, OMP_NUM_THREADS, TMPDIR, PYTHONDONTWRITEBYTECODE are set.
- Lifetime: bwrap runs with --die-with-parent and --new-session. When the program's process exits, or when
  we SIGKILL bwrap at the wall-clock timeout, the namespace's init dies and the kernel kills every process in
  the PID namespace, `setsid` / daemonized children included; `execute` returns only once that init is gone.
- Not covered: there is no seccomp filter, so the kernel's whole system-call surface is reachable (a kernel
  exploit escapes, as from any container without seccomp); as root (setpriv mode) the program may still create
  user namespaces of its own (harmless here: the mounts it inherits stay locked read-only); world-readable
  files under the bound directories (/usr, the Python installation) can be read.
- Cost (2-core machine, lightly loaded): bwrap + setpriv add ~5-7 ms of wall and CPU time per call over the
  unsandboxed runner: `execute("print(1)")` 22.5 -> 27.9 ms median, the 164 HumanEval canonical solutions
  24.4 -> 31.3 ms each (run one after another). Both are below the pre-sandbox runner (32.5 / 37.3 ms), whose
  `Popen.wait(timeout)` polled with sleeps of up to 50 ms; `execute` now waits on a pidfd. Under heavy load
  the extra processes cost more (tens of ms). The first call also runs one probe (~40-70 ms).

Fallback ("none": macOS, no bwrap, user namespaces forbidden, or NANOJAX_SANDBOX=none): a fresh `python -I` in
its own session with the same environment, limits and guard, in a temporary directory deleted afterwards; the
whole process group is SIGKILLed at the timeout and after the exit. This is NOT a security boundary (files,
network, other processes and `setsid` escapes are reachable); a one-line warning goes to stderr once per
process. NANOJAX_SANDBOX=bwrap makes a missing sandbox an error instead (RuntimeError on first use).

Resource limits (both set-ups, set in the child before the code runs): address space / data (default 256 MB,
not on macOS), file size written (16 MB; stdout and stderr go to files so a print loop cannot fill our
memory), no core dumps, CPU seconds (backs the wall-clock timeout up), and a cap on the processes of the uid
(current + MAX_EXTRA_PROCESSES; only enforced by the kernel for non-root uids). The HumanEval-style
"reliability guard" (`os.fork/system/kill/remove/unlink/...`, `shutil.rmtree`, `subprocess.Popen`,
`builtins.exit/quit` replaced by None) still turns accidental destructive calls into failures; it is not
what protects the host (`posix.*`, ctypes and `importlib.reload(os)` undo it).

The verdict, and why the program cannot forge it
- `success` = the program's code ran to its end: `exec` of the top-level code returned normally in the
  untrusted process. After it returns, the trusted prologue (in the same process) writes a per-call random
  token to stdout and exits with a per-call random status (3..125). The parent (outside the sandbox) draws
  both, sends them on the child's stdin together with the code, and counts a pass only if the exit status
  is that number AND the token line is in stdout; any other exit (sys.exit(0), os._exit(0), exit(0), a
  signal, a guessed status) is a failure, and so are timeouts, crashes and exceptions.
- The exit status travels only through the kernel (the program's own exit status -> bwrap's init -> bwrap's
  monitor, over an eventfd the program does not inherit -> bwrap's exit status). The program can choose its
  own exit status and write its own stdout; it has no other channel to the verdict.
- The two numbers are read from stdin, before the code exists, into the *evaluation stack* of the prologue's
  top-level frame: they are arguments of the pending call `_end(status, token, exec(code))`. They are in
  no variable, constant, attribute, closure, command line, environment variable, file or fd; CPython (3.11
  as tested; 3.12-3.14 traverse frames the same way) exposes a running frame's value stack neither through
  frame objects (`f_locals`, `f_globals`, `f_code.co_consts`) nor through `gc.get_referents` /
  `gc.get_objects`, so walking frames, `inspect.stack()`, gc, `sys.argv`, `/proc/self/cmdline|environ`, the
  program's fds or the code text finds neither (tests/reliability/test_sandbox.py checks this with a known
  token).
- Limits of this guarantee (honest): (1) code that reads its own process memory (ctypes, `/proc/self/mem`,
  crafted bytecode that reads out of bounds, a spawned helper with ptrace) can find the two numbers --
  nothing that lives in the untrusted address space can be hidden from such code, and any end-of-program
  marker must be produced inside that address space. (2) "Ran to the end" is all that is checked: a program
  can still make its own tests pass without solving the task (objects whose `__eq__` always returns True,
  redefining `check`, trace-function jumps inside the program). Those are reward hacks in the program's
  semantics; no sandbox can tell them apart from a solution, and they need an evaluator that runs the tests
  outside the untrusted process and compares plain values. Monitor RL rollouts for them.
- Returned fields: `returncode` is 0 on success, else the child's exit status (negative = killed by that
  signal; under bwrap a status 128+N is reported as -N); `stdout` excludes the token line.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

DEFAULT_MEMORY_BYTES = 256 * 1024 * 1024
MAX_OUTPUT_BYTES = 16 * 1024 * 1024
MAX_EXTRA_PROCESSES = 16
SANDBOX_TMP_BYTES = 64 * 1024 * 1024  # the private /tmp tmpfs (work dir) under bwrap
SANDBOX_SHM_BYTES = 16 * 1024 * 1024  # the private /dev/shm tmpfs under bwrap
_SYSTEM_PATH = "/usr/bin:/bin"


@dataclasses.dataclass
class ExecutionResult:
    success: bool
    stdout: str
    stderr: str
    returncode: int | None
    timed_out: bool = False
    memory_exceeded: bool = False
    error: str | None = None
    duration_s: float = 0.0
    sandbox: str = "none"  # "bwrap" or "none": how this run was isolated

    # nanochat's name for the same flag
    @property
    def timeout(self) -> bool:
        return self.timed_out


# The child's program (trusted prologue). stdin carries "<3-digit exit status><32-char token><code>".
# The status and token go straight onto the evaluation stack of this frame as the first two arguments of
# the pending `_end(...)` call (see the module docstring); the code is read to EOF, stdin becomes
# /dev/null, the limits and the guard are applied, and the code runs. `_end` runs only if `exec` returned.
_RUNNER = r'''# nanojax.execution runner
import os, sys


def _take(n):
    b = b""
    while len(b) < n:
        c = os.read(0, n - len(b))
        if not c:
            os._exit(2)
        b += c
    return b


def _limits(mem, fsize, nproc_extra, cpu):
    import resource
    def setl(which, value):
        try:
            soft, hard = resource.getrlimit(which)
            if hard != resource.RLIM_INFINITY:
                value = min(value, hard)
            resource.setrlimit(which, (value, value))
        except (ValueError, OSError):
            pass
    if mem and sys.platform != "darwin":
        setl(resource.RLIMIT_AS, mem)
        setl(resource.RLIMIT_DATA, mem)
    setl(resource.RLIMIT_FSIZE, fsize)
    setl(resource.RLIMIT_CORE, 0)
    setl(resource.RLIMIT_CPU, cpu)
    if sys.platform.startswith("linux") and hasattr(resource, "RLIMIT_NPROC"):
        try:  # RLIMIT_NPROC counts all of this uid's processes: allow the current ones plus a few
            uid = os.getuid()
            n = sum(1 for p in os.listdir("/proc") if p.isdigit() and os.stat("/proc/" + p).st_uid == uid)
        except OSError:
            n = None
        if n is not None:
            setl(resource.RLIMIT_NPROC, n + nproc_extra)


def _guard():
    import builtins, shutil, subprocess, faulthandler
    faulthandler.disable()
    builtins.exit = None
    builtins.quit = None
    builtins.help = None
    for name in ("kill", "killpg", "system", "remove", "removedirs", "rmdir", "fchdir", "setuid",
                 "setgid", "setsid", "setpgid", "setpgrp", "fork", "forkpty", "vfork", "rename", "renames",
                 "truncate", "ftruncate", "replace", "unlink", "fchmod", "fchown", "chmod", "chown", "chroot",
                 "lchflags", "lchmod", "lchown", "chdir", "execv", "execve", "execvp", "execvpe", "execl",
                 "execle", "execlp", "execlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe", "spawnl",
                 "spawnle", "spawnlp", "spawnlpe", "posix_spawn", "posix_spawnp", "popen", "startfile",
                 "link", "symlink", "mkfifo", "mknod", "plock", "nice"):
        if hasattr(os, name):
            setattr(os, name, None)
    shutil.rmtree = None
    shutil.move = None
    shutil.chown = None
    subprocess.Popen = None
    subprocess.run = None
    subprocess.call = None
    subprocess.check_call = None
    subprocess.check_output = None
    subprocess.getoutput = None
    subprocess.getstatusoutput = None
    for mod in ("ipdb", "joblib", "resource", "psutil", "tkinter", "multiprocessing", "_posixsubprocess", "pty"):
        sys.modules[mod] = None


def _program():
    chunks = []
    while True:
        c = os.read(0, 1 << 16)
        if not c:
            break
        chunks.append(c)
    fd = os.open(os.devnull, os.O_RDONLY)
    os.dup2(fd, 0)
    os.close(fd)
    sys.stdin = open(os.devnull)
    os.environ.pop("PWD", None)  # set by bwrap
    _limits(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
    _guard()
    return compile(b"".join(chunks).decode("utf-8", "surrogatepass"), "<solution>", "exec")


def _end(status, token, _none, _write=os.write, _exit=os._exit, _sys=sys):
    for f in (_sys.stdout, _sys.stderr):
        try:
            f.flush()
        except BaseException:
            pass
    _write(1, b"\n" + token + b"\n")
    _exit(status)


_end(int(_take(3)), _take(32), exec(_program(), {"__name__": "__main__", "__builtins__": __builtins__}))
'''


@dataclasses.dataclass(frozen=True)
class _Sandbox:
    mode: str  # "bwrap" | "none"
    reason: str = ""  # why "none"
    bwrap: str = ""
    setpriv: str = ""  # as root: run the program under a fresh unprivileged uid
    userns: bool = False  # bwrap's user namespace (not root, or root without setpriv)
    view: tuple = ()  # bwrap arguments: the read-only system part of the file system
    python_dirs: tuple = ()  # read-only binds of the interpreter / venv (after /tmp, which may hold them)

    @property
    def process_cap(self) -> bool:
        return self.mode == "bwrap" and (bool(self.setpriv) or os.geteuid() != 0)

    def argv(self, work: str, env: dict, runner: list[str], info_fd: int) -> list[str]:
        a = [self.bwrap, "--info-fd", str(info_fd), "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
             "--unshare-cgroup-try"]
        if self.userns:
            a += ["--unshare-user", "--disable-userns"]
            if os.geteuid() == 0:  # no setpriv: at least not uid 0 (no capabilities) inside
                a += ["--uid", "65534", "--gid", "65534"]
        a += ["--die-with-parent", "--new-session", *self.view,
              "--proc", "/proc", "--dev", "/dev",
              "--perms", "1777", "--size", str(SANDBOX_SHM_BYTES), "--tmpfs", "/dev/shm", "--remount-ro", "/dev",
              "--perms", "1777", "--size", str(SANDBOX_TMP_BYTES), "--tmpfs", "/tmp"]
        a += _mkdirs(self.python_dirs)
        for d in self.python_dirs:
            a += ["--ro-bind", d, d]
        a += ["--perms", "0777", "--dir", work, "--chdir", work, "--remount-ro", "/", "--clearenv"]
        for k, v in env.items():
            a += ["--setenv", k, v]
        if self.setpriv:
            uid = str(3_000_000_000 + secrets.randbelow(1_000_000_000))
            a += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--cap-add", "CAP_SETPCAP",
                  "--", self.setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--inh-caps=-all",
                  "--bounding-set=-all", "--no-new-privs"]
        return a + ["--", *runner]


def _system_view() -> tuple:
    args = []
    for name in ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        path = "/" + name
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    args += ["--perms", "0755", "--dir", "/etc"]
    for name in ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "nsswitch.conf", "passwd", "group"):
        args += ["--ro-bind-try", "/etc/" + name, "/etc/" + name]
    return tuple(args)


def _mkdirs(paths) -> list[str]:
    """`--dir` for the parents of mount points, with mode 0755 (bwrap 0.8 creates them 0700 otherwise)."""
    args, done = [], {"/", "/tmp"}
    for path in paths:
        parts = path.strip("/").split("/")[:-1]
        for i in range(len(parts)):
            parent = "/" + "/".join(parts[: i + 1])
            if parent not in done:
                done.add(parent)
                args += ["--perms", "0755", "--dir", parent]
    return args


def _python_dirs() -> tuple:
    """The interpreter's installation and venv (outside /usr), each bound read-only at its own path."""
    exe = os.path.realpath(sys.executable)
    cands = {sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix,
             os.path.dirname(os.path.dirname(exe)), os.path.dirname(os.path.abspath(sys.executable))}
    covered = ["/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"]
    out = []
    for p in sorted({os.path.normpath(os.path.abspath(c)) for c in cands if c}, key=len):
        if p == "/" or not os.path.isdir(p) or any(p == q or p.startswith(q + "/") for q in covered + out):
            continue
        out.append(p)
    return tuple(out)


_SANDBOX: _Sandbox | None = None
_SANDBOX_LOCK = threading.Lock()


def _detect() -> _Sandbox:
    choice = (os.environ.get("NANOJAX_SANDBOX") or "auto").strip().lower()
    if choice not in ("auto", "bwrap", "none"):
        raise ValueError(f"NANOJAX_SANDBOX={choice!r}: expected auto, bwrap or none")
    if choice == "none":
        reason = "NANOJAX_SANDBOX=none"
    elif not sys.platform.startswith("linux"):
        reason = f"no bubblewrap sandbox on {sys.platform}"
    elif not (bwrap := shutil.which("bwrap", path=os.environ.get("PATH", "") + os.pathsep + _SYSTEM_PATH)):
        reason = "bubblewrap (bwrap) not found; install it (e.g. apt-get install bubblewrap)"
    else:
        root = os.geteuid() == 0
        setpriv = (shutil.which("setpriv", path=_SYSTEM_PATH + os.pathsep + "/usr/sbin:/sbin") or "") if root else ""
        sandbox = _Sandbox("bwrap", bwrap=bwrap, setpriv=setpriv, userns=not setpriv, view=_system_view(),
                           python_dirs=_python_dirs())
        probe = _run("import os\nassert os.getpid() == 2, os.getpid()\n", 20.0, DEFAULT_MEMORY_BYTES, 1 << 16,
                     sandbox)
        if probe.success:
            return sandbox
        detail = (probe.stderr.strip().splitlines() or [probe.error or "?"])[-1]
        reason = f"bwrap does not work here ({detail[:300]})"
    if choice == "bwrap":
        raise RuntimeError(f"NANOJAX_SANDBOX=bwrap but {reason}")
    print(f"nanojax.execution: untrusted code runs WITHOUT a sandbox: {reason}. Only the in-process guard and "
          "resource limits apply (not a security boundary).", file=sys.stderr, flush=True)
    return _Sandbox("none", reason=reason)


def _sandbox() -> _Sandbox:
    global _SANDBOX
    if _SANDBOX is None:
        with _SANDBOX_LOCK:
            if _SANDBOX is None:
                _SANDBOX = _detect()
    return _SANDBOX


def sandbox_mode() -> str:
    """"bwrap" (kernel isolation) or "none" (process-level guard only); decided once per process."""
    return _sandbox().mode


def sandbox_info() -> dict:
    """The mode, why it is "none" if so, and whether the kernel caps the program's number of processes."""
    s = _sandbox()
    uid = "same as ours"
    if s.mode == "bwrap":
        uid = "a random unprivileged uid per call" if s.setpriv else "bwrap's user namespace"
    return {"mode": s.mode, "reason": s.reason, "process_cap": s.process_cap, "uid": uid}


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def execute(code: str, timeout: float = 5.0, maximum_memory_bytes: int | None = DEFAULT_MEMORY_BYTES,
            max_output_bytes: int = MAX_OUTPUT_BYTES) -> ExecutionResult:
    """Runs `code` as a fresh program in the sandbox; see the module docstring for what is and is not guarded.

    `success` = the code ran to its end (see "The verdict"). stdout excludes the end token; each of
    stdout/stderr is cut at `max_output_bytes` (the file-size limit of the child).
    """
    return _run(code, timeout, maximum_memory_bytes, max_output_bytes, _sandbox())


def _run(code: str, timeout: float, maximum_memory_bytes: int | None, max_output_bytes: int,
         sandbox: _Sandbox) -> ExecutionResult:
    status = 3 + secrets.randbelow(123)  # 3..125: not 0/1/2, not a shell or signal status
    token = secrets.token_hex(16)
    t0 = time.monotonic()
    cpu = max(1, int(timeout) + 1)
    mem = int(maximum_memory_bytes or 0)
    runner = [sys.executable, "-I", "-c", _RUNNER, str(mem), str(max_output_bytes), str(MAX_EXTRA_PROCESSES),
              str(cpu)]
    bwrap = sandbox.mode == "bwrap"
    timed_out = False
    with contextlib.ExitStack() as stack:
        io_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="nanojax_exec_io_"))
        if bwrap:  # the work dir exists only inside the sandbox, on its private tmpfs
            work = "/tmp/nanojax_exec_" + secrets.token_hex(8)
        else:
            work = stack.enter_context(tempfile.TemporaryDirectory(prefix="nanojax_exec_"))
        env = {"PATH": _SYSTEM_PATH, "HOME": work, "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1", "TMPDIR": work,
               "PYTHONDONTWRITEBYTECODE": "1"}
        info_r = info_w = -1
        if bwrap:  # bwrap writes the host pid of the namespace's init on info_w
            info_r, info_w = os.pipe()
            stack.callback(os.close, info_r)
            args, popen_env, cwd = sandbox.argv(work, env, runner, info_w), {"PATH": _SYSTEM_PATH}, "/"
        else:
            args, popen_env, cwd = runner, env, work
        out_path, err_path = os.path.join(io_dir, "stdout"), os.path.join(io_dir, "stderr")
        with open(out_path, "wb") as fout, open(err_path, "wb") as ferr:
            try:
                proc = subprocess.Popen(args, cwd=cwd, env=popen_env, stdin=subprocess.PIPE, stdout=fout,
                                        stderr=ferr, start_new_session=True, close_fds=True,
                                        pass_fds=(info_w,) if bwrap else ())
            finally:
                if bwrap:
                    os.close(info_w)
            try:
                try:
                    proc.stdin.write(f"{status:03d}{token}".encode() + code.encode("utf-8", "surrogatepass"))
                    proc.stdin.close()
                except BrokenPipeError:
                    pass
                timed_out = not _wait(proc, timeout)
            finally:
                # bwrap: killing bwrap kills the namespace's init, and with it every process in the namespace;
                # none: the whole process group. Also after a normal exit (leftover children).
                _kill_group(proc.pid)
                proc.wait()
                if bwrap:  # return only once the namespace is empty (its init is gone)
                    _wait_namespace_gone(info_r)
        stdout = _read(out_path, max_output_bytes)
        stderr = _read(err_path, max_output_bytes)
    rc = proc.returncode
    if bwrap and rc is not None and rc > 128 and (rc - 128) in signal.valid_signals():
        rc = -(rc - 128)  # bwrap reports "killed by signal N" as 128+N
    marker = "\n" + token + "\n"
    at = stdout.rfind(marker)
    if at >= 0:
        stdout = stdout[:at] + stdout[at + len(marker):]
    success = at >= 0 and rc == status and not timed_out
    memory_exceeded = "MemoryError" in stderr or (rc is not None and rc < 0 and -rc == signal.SIGSEGV and mem > 0)
    error = None
    if timed_out:
        error = f"timed out after {timeout:g} s ({'sandbox' if bwrap else 'process group'} killed)"
    elif not success:
        last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
        if rc == 0 or (rc is not None and rc > 0 and not last):
            error = "exited before the end of the program (sys.exit / os._exit)" + (f" with status {rc}" if rc else "")
        elif rc is not None and rc < 0:
            error = f"killed by signal {_signal_name(-rc)}" + (f": {last}" if last else "")
        else:
            error = last or f"exit status {rc}"
    return ExecutionResult(success=success, stdout=stdout, stderr=stderr, returncode=0 if success else rc,
                           timed_out=timed_out, memory_exceeded=memory_exceeded, error=error,
                           duration_s=time.monotonic() - t0, sandbox=sandbox.mode)


def _wait(proc: subprocess.Popen, timeout: float) -> bool:
    """True if `proc` exited within `timeout`. Waits on a pidfd where there is one (Popen.wait(timeout) polls with
    sleeps growing to 50 ms, which adds up to 50 ms to every call)."""
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        try:
            proc.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        ready = poller.poll(max(0.0, timeout) * 1000)
    finally:
        os.close(fd)
    if ready:
        proc.wait()
    return bool(ready)


def _wait_namespace_gone(info_r: int, limit_s: float = 2.0) -> None:
    """Waits until the PID namespace's init (host pid from bwrap's --info-fd) has exited. It exits when bwrap
    does (--die-with-parent), and the kernel lets it turn into a zombie only after every process of the
    namespace is gone, so after this nothing of the program is left running."""
    data = b""
    while select.select([info_r], [], [], 0.5)[0]:
        chunk = os.read(info_r, 4096)
        if not chunk:
            break
        data += chunk
    m = re.search(rb'"child-pid":\s*(\d+)', data)
    if not m:
        return
    stat, deadline, pause = f"/proc/{int(m.group(1))}/stat", time.monotonic() + limit_s, 0.0005
    while time.monotonic() < deadline:
        try:
            with open(stat, "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            return
        if state in (b"Z", b"X"):
            return
        time.sleep(pause)
        pause = min(pause * 2, 0.02)


def _signal_name(n: int) -> str:
    try:
        return signal.Signals(n).name
    except ValueError:
        return str(n)


def _read(path: str, limit: int) -> str:
    with open(path, "rb") as f:
        return f.read(limit + 4096).decode("utf-8", "replace")


# nanochat's name
execute_code = execute
