"""SIGKILL at random moments (one of them while Orbax is writing a checkpoint), then the same command again: the
run still ends with exactly the parameters and loss of a run that was never interrupted."""
import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from helpers import ROOT
from nanojax import checkpoint as ckpt

STEPS = 40


def _config_file(tmp_path, run_dir) -> pathlib.Path:
    """A config file for the CLI: the micro test config, a checkpoint after every step, async saves."""
    f = tmp_path / f"{run_dir.name}_cfg.py"
    f.write_text(
        f"import sys\nsys.path.insert(0, {str(ROOT / 'tests')!r})\nfrom helpers import micro_config\n\n\n"
        f"def get_config():\n    c = micro_config({str(run_dir)!r}, steps={STEPS})\n"
        f"    c.train.checkpoint_every, c.train.max_to_keep, c.train.async_checkpointing = 1, 2, True\n"
        f"    return c\n"
    )
    return f


def _env():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    env.pop("NANOJAX_TRACEBACK", None)
    return env


def _start(config_file):
    return subprocess.Popen([sys.executable, "-m", "nanojax.train", f"--config={config_file}"], cwd=ROOT,
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_step(proc, lines, step: int) -> bool:
    """Read the run's output until it reports a step >= `step`; False if it ended first."""
    deadline = time.time() + 120
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step ") and int(line.split()[1].split("/")[0]) >= step:
            return True
        assert time.time() < deadline, "".join(lines)
    return False


def _tmp_dirs(ckpts: pathlib.Path) -> set:
    """Orbax's in-flight writes, as (name, inode): a re-save of the same step reuses the name, not the inode."""
    found = set()
    for name in os.listdir(ckpts) if ckpts.exists() else []:
        if name.endswith(".orbax-checkpoint-tmp"):
            try:
                found.add((name, os.stat(ckpts / name).st_ino))
            except FileNotFoundError:  # committed (renamed) meanwhile
                pass
    return found


def _kill(proc, lines):
    proc.send_signal(signal.SIGKILL)
    lines.append(proc.communicate(timeout=60)[0])
    assert proc.returncode == -signal.SIGKILL, "".join(lines)


def _final(run_dir):
    losses = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "loss" in r:
            losses[r["step"]] = r["loss"]
    model, _, _ = ckpt.load_model(run_dir)
    return losses, jax.tree.map(np.asarray, nnx.state(model, nnx.Param))


@pytest.mark.slow
def test_sigkill_at_random_moments_then_the_same_command_ends_like_an_uninterrupted_run(tmp_path):
    rng = random.Random(20261126)
    ref_dir, run_dir = tmp_path / "reference", tmp_path / "killed"
    ckpts = run_dir / "checkpoints"
    out = subprocess.run([sys.executable, "-m", "nanojax.train", f"--config={_config_file(tmp_path, ref_dir)}"],
                         cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    config_file = _config_file(tmp_path, run_dir)

    # three kills at random points spread over the run, the second one while a save is being written
    t1 = rng.randint(2, 10)
    t2 = rng.randint(t1 + 3, 22)
    targets = [(t1, "random"), (t2, "mid-write"), (rng.randint(t2 + 3, STEPS - 6), "random")]
    log, mid_write_kills = [], 0
    for target, kill in targets:
        for _attempt in range(3):  # a mid-write kill may lose the race with the commit's rename: try again
            stale = _tmp_dirs(ckpts)  # left by an earlier kill
            proc = _start(config_file)
            if not _wait_for_step(proc, log, target):
                pytest.fail("the run ended before it could be killed:\n" + "".join(log))
            if kill == "random":
                time.sleep(rng.uniform(0.0, 0.15))
                _kill(proc, log)
                break
            deadline = time.time() + 30
            while not (_tmp_dirs(ckpts) - stale) and proc.poll() is None and time.time() < deadline:
                pass  # spin: a save is in flight from the moment its tmp directory exists
            writing = _tmp_dirs(ckpts) - stale
            _kill(proc, log)
            if writing and writing <= _tmp_dirs(ckpts):  # still uncommitted after the kill
                mid_write_kills += 1
                break
    assert mid_write_kills == 1, "never killed while a checkpoint was being written:\n" + "".join(log)

    out = subprocess.run([sys.executable, "-m", "nanojax.train", f"--config={config_file}"], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, "".join(log) + out.stdout + out.stderr
    assert f"finished at step {STEPS}" in out.stdout
    assert "Traceback" not in out.stderr and "warning: checkpoint step" not in out.stderr, out.stderr
    want_losses, want_params = _final(ref_dir)
    got_losses, got_params = _final(run_dir)
    assert sorted(got_losses) == list(range(1, STEPS + 1))
    assert got_losses == want_losses  # every step's last logged loss, the final one included
    jax.tree.map(np.testing.assert_array_equal, got_params, want_params)
