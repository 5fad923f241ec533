"""Checkpoints written by an earlier nanojax (tests/fixtures/checkpoint_v1, see its make_fixture.py) still load,
give the same logits, resume to the same losses, and inspect."""
import importlib.util
import json
import pathlib
import shutil

import jax.numpy as jnp
import numpy as np

from nanojax import inspect as nj_inspect
from nanojax import train
from nanojax.checkpoint import load_model

FIXTURE = pathlib.Path(__file__).resolve().parent / "fixtures" / "checkpoint_v1"
MADE_BY = json.loads((FIXTURE / "made_by.json").read_text())


def _fixture_module():
    spec = importlib.util.spec_from_file_location("make_fixture", FIXTURE / "make_fixture.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _copy(tmp_path) -> pathlib.Path:
    run = tmp_path / "run"
    shutil.copytree(FIXTURE / "run", run)
    return run


def test_old_checkpoint_loads_with_the_same_logits(tmp_path):
    model, tokenizer, config = load_model(_copy(tmp_path))
    golden = np.load(FIXTURE / "golden.npz")
    logits = np.asarray(model(jnp.asarray(golden["tokens"])))
    np.testing.assert_allclose(logits, golden["logits"], rtol=1e-5, atol=1e-5,
                               err_msg=f"a checkpoint written by nanojax {MADE_BY['commit']} no longer gives the "
                                       f"logits it gave then")
    assert tokenizer is None and config.data.kind == "synthetic"


def test_old_checkpoint_resumes_to_the_uninterrupted_losses(tmp_path):
    run = _copy(tmp_path)
    config = _fixture_module().fixture_config()
    config.run_dir, config.train.stop_after_steps = str(run), -1
    result = train.run(config)
    assert result["step"] == 4
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = {str(r["step"]): r["loss"] for r in records if "loss" in r}
    assert sorted(losses) == ["3", "4"]  # resumed at step 2, not restarted
    for step, want in MADE_BY["uninterrupted_losses"].items():
        np.testing.assert_allclose(losses[step], want, rtol=1e-5, err_msg=f"step {step}")


def test_old_checkpoint_inspects(tmp_path):
    info = nj_inspect.inspect_checkpoint(_copy(tmp_path))
    assert info["step"] == MADE_BY["step"]
    assert info["num_params"] == MADE_BY["num_params"]
    assert info["opt_state_leaves"] > 0 and info["data_state_files"] == ["process_0-of-1.json"]
