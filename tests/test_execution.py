import gzip
import json
import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from nanojax.execution import execute


def test_success_and_output():
    r = execute("print('hello')\nassert 1 + 1 == 2")
    assert r.success and r.returncode == 0 and not r.timed_out
    assert r.stdout == "hello\n"


def test_failing_assert_fails():
    r = execute("assert 1 == 2, 'nope'")
    assert not r.success and r.returncode == 1
    assert "AssertionError" in r.stderr


def test_syntax_error_fails():
    assert not execute("def f(:\n  pass").success


@pytest.mark.parametrize("exit_code", [
    "import sys\nsys.exit(0)",
    "raise SystemExit(0)",
    "import os\nos._exit(0)",
    "exit(0)",
])
def test_early_exit_before_tests_does_not_pass(exit_code):
    code = "def f():\n    return 1\n" + exit_code + "\nassert f() == 2\n"
    r = execute(code)
    assert not r.success


def test_infinite_loop_times_out():
    r = execute("while True:\n    pass", timeout=1.0)
    assert not r.success and r.timed_out
    assert r.duration_s < 5


def test_sleeping_children_killed_with_group(tmp_path):
    # a thread that outlives the code is killed with the group; the code itself completed
    r = execute("import threading, time\nthreading.Thread(target=time.sleep, args=(60,)).start()\nprint('x')",
                timeout=2.0)
    assert r.duration_s < 5


@pytest.mark.parametrize("code", [
    "import os\nwhile True:\n    os.fork()",
    "import subprocess\nwhile True:\n    subprocess.Popen(['sleep', '100'])",
    "import multiprocessing\nwhile True:\n    multiprocessing.Process(target=print).start()",
])
def test_fork_bomb_contained(code):
    r = execute(code, timeout=2.0)
    assert not r.success
    assert r.duration_s < 5


@pytest.mark.parametrize("code", ["x = bytearray(4 * 1024**3)", "x = [0] * (10**9)"])
def test_memory_hog_contained(code):
    r = execute(code, timeout=5.0)
    assert not r.success and r.memory_exceeded


def test_cannot_delete_files_outside(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (tmp_path / "dir").mkdir()
    for code in [f"import os\nos.remove({str(victim)!r})",
                 f"import os\nos.unlink({str(victim)!r})",
                 f"import pathlib\npathlib.Path({str(victim)!r}).unlink()",
                 f"import shutil\nshutil.rmtree({str(tmp_path / 'dir')!r})",
                 f"import os\nos.system('rm -f {victim}')",
                 f"import subprocess\nsubprocess.run(['rm', '-f', {str(victim)!r}])"]:
        r = execute(code)
        assert not r.success, code
    assert victim.read_text() == "keep me"
    assert (tmp_path / "dir").is_dir()


def test_runs_in_private_temp_dir_with_minimal_env():
    r = execute("import os, sys\nprint(os.getcwd())\nprint(sorted(os.environ))\nprint(sys.stdin.read())")
    assert r.success, r.stderr
    cwd, env, stdin = r.stdout.split("\n")[:3]
    assert "nanojax_exec_" in cwd and cwd != os.getcwd()
    assert set(eval(env)) <= {"PATH", "HOME", "LANG", "OMP_NUM_THREADS", "TMPDIR", "PYTHONDONTWRITEBYTECODE",
                              "LC_CTYPE"}
    assert stdin == ""
    assert not os.path.exists(cwd)  # deleted afterwards


def test_output_flood_is_capped():
    r = execute("while True:\n    print('x' * 10000)", timeout=3.0)
    assert not r.success
    assert len(r.stdout) < 20 * 1024 * 1024


def _humaneval_program(row, body):
    return row["prompt"] + body + "\n\n" + row["test"] + "\n" + f"check({row['entry_point']})\n"


def test_humaneval_canonical_solutions_pass_and_broken_fail(shared_dir):
    path = shared_dir / "data" / "humaneval" / "HumanEval.jsonl.gz"
    if not path.exists():
        pytest.skip(f"{path} not found")
    rows = [json.loads(line) for line in gzip.open(path, "rt")]
    assert len(rows) == 164
    good = [_humaneval_program(r, r["canonical_solution"]) for r in rows]
    # broken: the function returns None (every check has at least one assert on the value)
    bad = [_humaneval_program(r, "    return None\n") for r in rows[:20]]
    # premature exit: the canonical solution then sys.exit(0) before check() runs
    early = [r["prompt"] + r["canonical_solution"] + "\nimport sys\nsys.exit(0)\n" + r["test"] +
             f"\ncheck({r['entry_point']})\n" for r in rows[:5]]
    with ThreadPoolExecutor(4) as pool:
        good_res = list(pool.map(lambda c: execute(c, timeout=10.0), good))
        bad_res = list(pool.map(lambda c: execute(c, timeout=10.0), bad + early))
    failed = [(r["task_id"], res.error) for r, res in zip(rows, good_res) if not res.success]
    assert not failed, failed
    assert not any(res.success for res in bad_res)
