import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import ROOT, micro_config
from nanojax import checkpoint as ckpt
from nanojax.train import run


def _losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r["loss"] for r in map(json.loads, f) if "loss" in r]


def test_tiny_model_overfits_a_fixed_batch():
    from nanojax import sharding as shd
    from nanojax.config import derive
    from nanojax.train import TrainState

    c = micro_config(mesh=(2, 2, 2))
    c.train.num_iterations = 1000  # constant LR over the 40 steps below
    state = TrainState(c, shd.make_mesh(c.mesh), derive(c, 8))
    params = state.init_params()
    opt = state.init_opt_state(params)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, (1, 8, 33)).astype(np.int32)
    batch = {"inputs": tokens[..., :-1], "targets": tokens[..., 1:]}
    losses = []
    for _ in range(40):
        params, opt, metrics = state.train_step(params, opt, batch)
        losses.append(float(metrics["loss"]))
    assert losses[0] > 5.0 and losses[-1] < 0.5, losses[::5]


def test_resume_is_bit_identical(tmp_path):
    """Stopping after 3 steps and re-running the same config gives exactly the losses of one 6-step run."""
    full = micro_config(tmp_path / "full", steps=6)
    run(full)
    parted = micro_config(tmp_path / "parted", steps=6)
    parted.train.stop_after_steps = 3
    first = run(parted)
    assert first["step"] == 3
    assert ckpt.Checkpointer(parted.run_dir).latest_step() == 3
    parted.train.stop_after_steps = -1
    second = run(parted)
    assert second["step"] == 6
    assert _losses(parted.run_dir) == _losses(full.run_dir)
    assert len(_losses(full.run_dir)) == 6
    again = run(parted)  # nothing left to do
    assert again["step"] == 6


def test_checkpoint_from_8_devices_loads_on_1(tmp_path):
    c = micro_config(tmp_path / "run8", mesh=(2, 2, 2), steps=2)
    run(c)
    model, tokenizer, config = ckpt.load_model(c.run_dir)
    assert tokenizer is None and config.model.depth == 2
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert all(len(x.sharding.device_set) == 1 for x in leaves)
    # same values as the 8-device arrays
    from nanojax.model import GPT
    from nanojax import sharding as shd

    mesh = shd.make_mesh(c.mesh)
    abstract = nnx.eval_shape(lambda: GPT(c.model, rngs=nnx.Rngs(0)))
    _, abs_params = nnx.split(abstract, nnx.Param)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abs_params,
                          shd.param_shardings(abs_params, mesh))
    params8, step = ckpt.load_params(c.run_dir, target)
    assert step == 2
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 params8, nnx.state(model, nnx.Param))
    x = jnp.arange(16).reshape(1, 16)
    assert np.isfinite(np.asarray(model(x))).all()


def test_init_from_loads_parameters_only(tmp_path):
    base = micro_config(tmp_path / "base", steps=2)
    run(base)
    base_model, _, _ = ckpt.load_model(base.run_dir)
    nxt = micro_config(tmp_path / "next", steps=1)
    nxt.train.init_from = base.run_dir
    nxt.optim.matrix_lr = nxt.optim.embedding_lr = nxt.optim.unembedding_lr = 0.0
    run(nxt)
    model, _, _ = ckpt.load_model(nxt.run_dir)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 nnx.state(model, nnx.Param), nnx.state(base_model, nnx.Param))
    meta, _ = ckpt.read_meta(nxt.run_dir)
    assert meta["init_from"] == {"path": base.run_dir, "step": 2}


def test_init_from_refuses_a_different_architecture(tmp_path):
    base = micro_config(tmp_path / "base", steps=1)
    run(base)
    other = micro_config(tmp_path / "other", steps=1, depth=3)
    other.model.vocab_size = 512
    other.train.init_from = base.run_dir
    want = r"mismatches.*\n.*blocks.attn.c_k.kernel: checkpoint \(2, 64, 64\) vs model \(3, 96, 96\)"
    with pytest.raises(ValueError, match=want):
        run(other)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ckpt.load_params(tmp_path / "nothing", None)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    c = micro_config(tmp_path / "run", steps=2)
    run(c)
    before = ckpt.load_model(c.run_dir)[0]
    c.train.num_iterations = 5
    c.train.checkpoint_every = 1
    c.optim.matrix_lr = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite update_norm at step 3"):
        run(c)
    assert ckpt.Checkpointer(c.run_dir).latest_step() == 2
    after = ckpt.load_model(c.run_dir)[0]
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 nnx.state(before, nnx.Param), nnx.state(after, nnx.Param))


def test_metrics_and_eval_are_logged(tmp_path):
    c = micro_config(tmp_path / "run", steps=4)
    c.train.eval_every = 2
    run(c)
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert [r["step"] for r in evals] == [2, 4]
    assert {"tokens_per_s", "lr_matrix", "grad_norm", "data_wait_s", "muon_momentum"} <= set(train[0])
    assert json.load(open(tmp_path / "run" / "config.json"))["model"]["depth"] == 2


@pytest.mark.slow
def test_sigterm_saves_and_the_same_command_resumes(tmp_path):
    """A real process: SIGTERM mid-run -> checkpoint + clean exit; the same command then finishes the run."""
    run_dir = tmp_path / "run"
    def command(iterations):
        return [sys.executable, "-m", "nanojax.train", f"--config={ROOT / 'configs' / 'tiny.py'}",
               "--config.data.kind=synthetic", f"--config.run_dir={run_dir}", "--config.model.depth=2",
               "--config.model.vocab_size=256", "--config.model.seq_len=32", "--config.model.aspect_ratio=32",
               "--config.model.head_dim=32", "--config.train.total_batch_size=256",
               "--config.train.device_batch_size=4",
               "--config.mesh.fsdp=1", f"--config.train.num_iterations={iterations}", "--config.train.eval_every=0",
               "--config.train.checkpoint_every=0", "--config.train.log_every=1"]

    cmd = command(100_000)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    deadline = time.time() + 120
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step      3/"):
            proc.send_signal(signal.SIGTERM)
            break
        assert time.time() < deadline, "".join(lines)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, "".join(lines) + out
    assert "received SIGTERM" in out
    step = ckpt.Checkpointer(run_dir).latest_step()
    assert step is not None and step >= 3
    out = subprocess.run(command(step + 2), cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"resumed from {run_dir}/checkpoints/{step}" in out.stdout
    assert f"finished at step {step + 2}" in out.stdout


def test_micro_batches_of_different_lengths_are_padded_without_changing_the_loss():
    from nanojax.train import stack_micro_batches

    a = {"inputs": np.ones((2, 4), np.int32), "targets": np.ones((2, 4), np.int32)}
    b = {"inputs": np.ones((2, 6), np.int32), "targets": np.ones((2, 6), np.int32)}
    out = stack_micro_batches([a, b])
    assert out["inputs"].shape == (2, 2, 6)
    assert (out["targets"][0, :, 4:] == -1).all() and (out["inputs"][0, :, 4:] == 0).all()
    assert (out["targets"][1] == 1).all()


def test_bad_input_is_one_clear_line_not_a_traceback(tmp_path):
    env = {**os.environ, "NANOJAX_HOME": str(tmp_path), "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    env.pop("NANOJAX_TRACEBACK", None)
    out = subprocess.run([sys.executable, "-m", "nanojax.train", f"--config={ROOT / 'configs' / 'tiny.py'}"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "error: no tokenizer at" in out.stderr and "python -m nanojax.tokenizer train" in out.stderr
    assert "Traceback" not in out.stderr


def test_init_optimizer_state_carries_momenta_but_restarts_schedules(tmp_path):
    import optax

    from nanojax import sharding as shd
    from nanojax.config import derive
    from nanojax.train import TrainState

    base = micro_config(tmp_path / "base", steps=3)
    run(base)
    nxt = micro_config(tmp_path / "next", steps=1)
    nxt.train.init_from = base.run_dir
    nxt.train.init_optimizer_state = True
    run(nxt)
    state = TrainState(nxt, shd.make_mesh(nxt.mesh, jax.devices()[:1]), derive(nxt, 1))
    counts = {}
    for name, run_dir, step in (("base", base.run_dir, 3), ("next", nxt.run_dir, 1)):
        opt = ckpt.load_opt_state(run_dir, state.abstract_opt, step)
        found = optax.tree_utils.tree_get_all_with_path(opt, "count")
        assert found, "no step counters in the optimizer state"
        counts[name] = {int(v) for _, v in found}
    assert counts == {"base": {3}, "next": {1}}
