"""A damaged newest checkpoint never blocks a run: the trainer moves it aside (`<step>.corrupt-<time>`, nothing
deleted), says so in one line, resumes from the step before it and ends bit-identical to an uninterrupted run.
When no step is usable it stops with exit status 2 and one line. Read-only tools name the damaged step."""
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from helpers import ROOT, micro_config
from nanojax import checkpoint as ckpt
from nanojax.train import run

STEPS, EVERY = 6, 2  # the prepared run stopped at step 4 with checkpoints 2 and 4


def _config(run_dir, **train):
    c = micro_config(run_dir, steps=STEPS)
    c.train.checkpoint_every, c.train.max_to_keep = EVERY, 2
    for k, v in train.items():
        setattr(c.train, k, v)
    return c


def _last_losses(run_dir) -> dict:
    """{step: loss} from metrics.jsonl, the last record of each step winning (a resumed run repeats steps)."""
    out = {}
    for line in (pathlib.Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "loss" in r:
            out[r["step"]] = r["loss"]
    return out


def _params(run_dir, step=None):
    model, _, _ = ckpt.load_model(run_dir, step)
    return jax.tree.map(np.asarray, nnx.state(model, nnx.Param))


def _files(root) -> dict:
    root = pathlib.Path(root)
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """(a run stopped at step 4 with checkpoints 2 and 4, the same run uninterrupted to step 6)."""
    base = tmp_path_factory.mktemp("prepared")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOJAX_HOME", str(base / "home"))
        run(_config(base / "full"))
        assert run(_config(base / "partial", stop_after_steps=4))["step"] == 4
    assert sorted(p.name for p in (base / "partial" / "checkpoints").iterdir()) == ["2", "4"]
    return base / "partial", base / "full"


def _biggest_array_file(item_dir: pathlib.Path) -> pathlib.Path:
    return max((p for p in item_dir.rglob("*") if p.is_file() and p.parent.name == "d"), key=lambda p: p.stat().st_size)


def _truncate(path: pathlib.Path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])


# name -> (damage(checkpoints_dir), damaged step, step resumed from)
DAMAGE = {
    "truncated params array": (lambda c: _truncate(_biggest_array_file(c / "4" / "params")), 4, 2),
    "truncated opt_state array": (lambda c: _truncate(_biggest_array_file(c / "4" / "opt_state")), 4, 2),
    "empty stray newer dir": (lambda c: (c / "8").mkdir(), 8, 4),
    "meta file deleted": (lambda c: (c / "4" / "meta" / "metadata").unlink(), 4, 2),
    "garbage meta JSON": (lambda c: (c / "4" / "meta" / "metadata").write_text('{"step": 4, "conf'), 4, 2),
    "data item deleted": (lambda c: shutil.rmtree(c / "4" / "data"), 4, 2),
    "opt_state item missing": (lambda c: shutil.rmtree(c / "4" / "opt_state"), 4, 2),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_newest_step_is_moved_aside_and_the_run_resumes_bit_identical(damage, prepared, tmp_path, capsys):
    partial, full = prepared
    run_dir = tmp_path / "run"
    shutil.copytree(partial, run_dir)
    ckpts = run_dir / "checkpoints"
    hurt, bad_step, good_step = DAMAGE[damage]
    hurt(ckpts)
    capsys.readouterr()

    result = run(_config(run_dir))
    out = capsys.readouterr()

    assert result["step"] == STEPS
    assert f"resumed from {ckpts}/{good_step}\n" in out.out
    warnings = [line for line in out.err.splitlines() if line.startswith("warning: checkpoint step")]
    assert len(warnings) == 1 and "Traceback" not in out.err, out.err
    assert f"warning: checkpoint step {bad_step} is damaged (" in warnings[0]
    assert f"moved to checkpoints/{bad_step}.corrupt-" in warnings[0]
    assert warnings[0].endswith(f"resuming from step {good_step}")
    moved = [p for p in ckpts.iterdir() if p.name.startswith(f"{bad_step}.corrupt-")]
    assert len(moved) == 1 and moved[0].is_dir()  # kept, never deleted
    # Orbax re-listed its steps after the move: later saves and max_to_keep cleanup ignored the moved dir
    assert ckpt.Checkpointer(run_dir).manager.all_steps() == [4, 6]
    assert sorted(p.name for p in ckpts.iterdir() if ".corrupt-" not in p.name) == ["4", "6"]
    # the resumed run ends exactly where the uninterrupted one did
    want = _last_losses(full)
    got = _last_losses(run_dir)
    assert got == want and sorted(got) == list(range(1, STEPS + 1))
    jax.tree.map(np.testing.assert_array_equal, _params(run_dir), _params(full))


def test_every_step_damaged_is_exit_2_in_one_line_and_nothing_is_moved(prepared, tmp_path):
    partial, _ = prepared
    run_dir = tmp_path / "run"
    shutil.copytree(partial, run_dir)
    ckpts = run_dir / "checkpoints"
    _truncate(_biggest_array_file(ckpts / "4" / "params"))
    (ckpts / "2" / "meta" / "metadata").write_text("not json")
    before = _files(ckpts), (run_dir / "metrics.jsonl").read_text()
    config_file = tmp_path / "micro_cfg.py"
    config_file.write_text(
        f"import sys\nsys.path.insert(0, {str(ROOT / 'tests')!r})\nfrom helpers import micro_config\n\n\n"
        f"def get_config():\n    c = micro_config({str(run_dir)!r}, steps={STEPS})\n"
        f"    c.train.checkpoint_every, c.train.max_to_keep = {EVERY}, 2\n    return c\n"
    )
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    env.pop("NANOJAX_TRACEBACK", None)
    out = subprocess.run([sys.executable, "-m", "nanojax.train", f"--config={config_file}"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out.stderr
    assert errors[0].startswith(f"error: no usable checkpoint in {ckpts}: step 4 is damaged (params: ")
    assert "step 2 is damaged (meta: metadata is not valid JSON" in errors[0]
    assert "Nothing was moved or deleted" in errors[0]
    # nothing moved, deleted or added, and no step trained from scratch
    assert (_files(ckpts), (run_dir / "metrics.jsonl").read_text()) == before


def test_a_step_that_does_not_fit_the_config_is_an_error_not_damage(prepared, tmp_path):
    partial, _ = prepared
    run_dir = tmp_path / "run"
    shutil.copytree(partial, run_dir)
    before = _files(run_dir / "checkpoints")
    other = _config(run_dir)
    other.model.depth = 3
    with pytest.raises(ckpt.CheckpointError, match=r"checkpoint step 4 in .* does not fit this config \(\d+ diff"):
        run(other)
    assert _files(run_dir / "checkpoints") == before


def test_only_unfinished_orbax_writes_start_from_scratch(tmp_path):
    """A `<step>.orbax-checkpoint-tmp` dir (killed mid-write before any commit) is no checkpoint at all."""
    c = _config(tmp_path / "run", stop_after_steps=1)
    tmp = tmp_path / "run" / "checkpoints" / "2.orbax-checkpoint-tmp"
    (tmp / "params").mkdir(parents=True)
    assert run(c)["step"] == 1
    assert ckpt.Checkpointer(c.run_dir).manager.all_steps() == [1]


@pytest.mark.parametrize("damage", ["garbage meta JSON", "truncated params array"])
def test_read_only_tools_name_the_damaged_step_and_the_good_one(damage, prepared, tmp_path):
    partial, _ = prepared
    run_dir = tmp_path / "run"
    shutil.copytree(partial, run_dir)
    ckpts = run_dir / "checkpoints"
    DAMAGE[damage][0](ckpts)
    (ckpts / "8").mkdir()  # uncommitted: read-only tools skip it
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.load_model(run_dir)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"checkpoint step 4 in {ckpts} is damaged (")
    assert message.endswith("step 2 looks intact: pass --step 2")
    model, _, _ = ckpt.load_model(run_dir, 2)  # the hint works
    assert ckpt.read_meta(run_dir, 2)[1] == 2
    assert sorted(p.name for p in ckpts.iterdir()) == ["2", "4", "8"]  # read-only: nothing moved
    with pytest.raises(FileNotFoundError, match=r"no checkpoint for step 8 .* available: \[2, 4\]"):
        ckpt.read_meta(run_dir, 8)
