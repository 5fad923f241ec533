"""Run untrusted, model-written Python (HumanEval, tool calls) in a child process with limits.

`execute(code, timeout=5.0) -> ExecutionResult` with `.success`, `.timed_out`, `.memory_exceeded`,
`.stdout`, `.stderr`, `.returncode`, `.error`.

What it does
- A fresh `python -I` child (`sys.executable`) in its own session / process group, in a new temporary
  directory that is deleted afterwards; environment reduced to PATH, HOME (the temp dir), LANG and
  OMP_NUM_THREADS=1; stdin is /dev/null once the child has read the program.
- Wall-clock timeout (default 5 s): the whole process group gets SIGKILL, and so does anything left
  in the group after a normal exit. RLIMIT_CPU backs the timeout up.
- Resource limits set in the child before the code runs: address space / data (default 256 MB, not
  on macOS), file size written (16 MB; stdout and stderr go to files so a print loop cannot fill our
  memory), no core dumps, and a cap on the user's number of processes (Linux, best effort: the kernel
  does not apply RLIMIT_NPROC to root, so as root only the guard below and the group kill stop a fork loop).
- HumanEval-style "reliability guard": `os.fork/system/kill/killpg/setsid/remove/unlink/rmdir/rename/
  chmod/chdir/...`, `shutil.rmtree/move`, `subprocess.Popen`, `builtins.exit/quit` are replaced by
  None, so accidental destructive calls fail instead of acting.
- **Success needs the program to run to the end.** After the code returns normally the runner writes a
  random per-call sentinel (never visible to the code as a name) to stdout; `success` is True only when
  the child exits 0 *and* the sentinel is there. `sys.exit(0)`, `os._exit(0)`, `raise SystemExit`
  before the tests have run therefore count as failures, as do timeouts, crashes and exceptions.

What it does NOT do (this is not a security boundary)
- No network isolation: sockets can be opened.
- No kernel-level isolation (no seccomp, namespaces, containers, VM): files writable by this user can
  still be written or truncated through `open(...)`, and ctypes / `importlib.reload(os)` / reading the
  runner's frame can undo the guard or forge the sentinel. Deliberately malicious code can escape.
- Children that call `setsid` through ctypes can leave the process group and outlive the timeout.
It protects evaluations from accidental damage by weak models (infinite loops, fork loops, memory
blow-ups, stray deletes, premature exits), which is the threat model of HumanEval and nanochat.
"""
from __future__ import annotations

import dataclasses
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time

DEFAULT_MEMORY_BYTES = 256 * 1024 * 1024
MAX_OUTPUT_BYTES = 16 * 1024 * 1024
MAX_EXTRA_PROCESSES = 16


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

    # nanochat's name for the same flag
    @property
    def timeout(self) -> bool:
        return self.timed_out


# The child's program. It reads "<sentinel>\n<code>" from stdin, rebinds stdin to /dev/null, limits
# itself, disables destructive functions, runs the code, and prints the sentinel only if it returned.
_RUNNER = r'''
import sys
_data = sys.stdin.buffer.read().decode("utf-8")
_sentinel, _code = _data.split("\n", 1)
del _data
import os
_fd = os.open(os.devnull, os.O_RDONLY); os.dup2(_fd, 0); os.close(_fd)
sys.stdin = open(os.devnull)

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
        try:  # RLIMIT_NPROC counts all of this user's processes: allow the current ones plus a few
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

_limits(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
_guard()
_write, _out = os.write, sys.stdout
_g = {"__name__": "__main__", "__builtins__": __builtins__}
exec(compile(_code, "<solution>", "exec"), _g)
del _g
_out.flush()
_write(1, ("\n" + _sentinel + "\n").encode())
'''


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def execute(code: str, timeout: float = 5.0, maximum_memory_bytes: int | None = DEFAULT_MEMORY_BYTES,
            max_output_bytes: int = MAX_OUTPUT_BYTES) -> ExecutionResult:
    """Runs `code` as a fresh program in the sandbox; see the module docstring for what is and is not guarded.

    `success` = exit status 0 and the code ran to its end (see "Success needs..."). stdout excludes the
    sentinel line; each of stdout/stderr is cut at `max_output_bytes` (the file-size limit of the child).
    """
    sentinel = "__nanojax_done_" + secrets.token_hex(16) + "__"
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="nanojax_exec_") as work, \
            tempfile.TemporaryDirectory(prefix="nanojax_exec_io_") as io_dir:
        out_path, err_path = os.path.join(io_dir, "stdout"), os.path.join(io_dir, "stderr")
        env = {"PATH": "/usr/bin:/bin", "HOME": work, "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1",
               "TMPDIR": work, "PYTHONDONTWRITEBYTECODE": "1"}
        cpu = max(1, int(timeout) + 1)
        mem = int(maximum_memory_bytes or 0)
        args = [sys.executable, "-I", "-c", _RUNNER, str(mem), str(max_output_bytes), str(MAX_EXTRA_PROCESSES),
                str(cpu)]
        timed_out = False
        with open(out_path, "wb") as fout, open(err_path, "wb") as ferr:
            proc = subprocess.Popen(args, cwd=work, env=env, stdin=subprocess.PIPE, stdout=fout, stderr=ferr,
                                    start_new_session=True, close_fds=True)
            try:
                try:
                    proc.stdin.write((sentinel + "\n" + code).encode("utf-8", "surrogatepass"))
                    proc.stdin.close()
                except BrokenPipeError:
                    pass
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_group(proc.pid)  # the whole group, also after a normal exit (leftover children)
                proc.wait()
        stdout = _read(out_path, max_output_bytes)
        stderr = _read(err_path, max_output_bytes)
    rc = proc.returncode
    finished = stdout.endswith("\n" + sentinel + "\n")
    if finished:
        stdout = stdout[: -len(sentinel) - 2]
    else:
        stdout = stdout.replace("\n" + sentinel + "\n", "")
    memory_exceeded = "MemoryError" in stderr or (rc is not None and rc < 0 and -rc == signal.SIGSEGV and mem > 0)
    success = rc == 0 and finished and not timed_out
    error = None
    if timed_out:
        error = f"timed out after {timeout:g} s (process group killed)"
    elif not success:
        last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
        if rc == 0:
            error = "exited before the end of the program (sys.exit / os._exit)"
        elif rc is not None and rc < 0:
            error = f"killed by signal {signal.Signals(-rc).name}" + (f": {last}" if last else "")
        else:
            error = last or f"exit status {rc}"
    return ExecutionResult(success=success, stdout=stdout, stderr=stderr, returncode=rc, timed_out=timed_out,
                           memory_exceeded=memory_exceeded, error=error, duration_s=time.monotonic() - t0)


def _read(path: str, limit: int) -> str:
    with open(path, "rb") as f:
        return f.read(limit + 4096).decode("utf-8", "replace")


# nanochat's name
execute_code = execute
