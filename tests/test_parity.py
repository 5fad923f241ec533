"""nanojax equals nanochat (launch commit 3a5e0bc) on the same weights: logits, loss and two optimizer steps.

The golden values were produced by nanochat's own gpt.py / muon.py / torch AdamW; see
tests/fixtures/nanochat_v0/README.md for how (and the casts that make it an fp32 CPU comparison).
"""
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nanojax import convert
from nanojax import sharding as shd
from nanojax.config import derive
from nanojax.model import GPT
from nanojax.train import TrainState

GOLDEN = pathlib.Path(__file__).parent / "fixtures" / "nanochat_v0" / "golden.npz"


@pytest.fixture(scope="module")
def golden():
    return np.load(GOLDEN)


def _config(golden, ns_dtype="float32", mesh=(1, 1, 1)):
    c = convert.model_config_from_nanochat(json.loads(str(golden["config_json"])))
    c.model.compute_dtype = "float32"
    c.model.loss_chunk_size = 8  # several chunks: the chunked loss must equal nanochat's plain mean
    c.optim.ns_dtype = ns_dtype
    c.train.num_iterations = 1000  # LR multiplier 1.0 at steps 0 and 1, as in the golden run
    c.train.device_batch_size = 2 // (mesh[0] * mesh[1])
    c.train.total_batch_size = 2 * 16
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
    with c.model.unlocked():
        c.model.seq_len = 16
    return c


def _params(golden, depth):
    sd = {k[len("param/"):]: golden[k] for k in golden.files if k.startswith("param/")}
    return convert.nanochat_to_params(sd, depth)


def _model(golden, config):
    return convert.fill_state(GPT(config.model, rngs=nnx.Rngs(0)), _params(golden, config.model.depth))


def test_logits_and_loss_match_nanochat(golden):
    config = _config(golden)
    model = _model(golden, config)
    logits = model(jnp.asarray(golden["tokens"]))
    np.testing.assert_allclose(np.asarray(logits), golden["logits"], atol=1e-4, rtol=0)
    total, count = model.loss(jnp.asarray(golden["tokens"]), jnp.asarray(golden["targets"]))
    np.testing.assert_allclose(float(total / count), float(golden["loss"]), atol=1e-5, rtol=0)


def test_param_count_and_flops_match_nanochat(golden):
    from nanojax.config import count_params, flops_per_token

    config = _config(golden)
    config.model.seq_len = json.loads(str(golden["config_json"]))["sequence_len"]
    assert count_params(config.model)[0] == int(golden["num_params"])
    assert flops_per_token(config.model) == int(golden["estimate_flops"])


def _two_steps(golden, config, devices):
    mesh = shd.make_mesh(config.mesh, devices=devices)
    state = TrainState(config, mesh, derive(config, len(devices)))
    params = jax.device_put(nnx.state(_model(golden, config), nnx.Param), state.param_shardings)
    opt_state = state.init_opt_state(params)
    out = []
    for tokens, targets in (("tokens", "targets"), ("tokens2", "targets2")):
        batch = {"inputs": jnp.asarray(golden[tokens])[None], "targets": jnp.asarray(golden[targets])[None]}
        batch = jax.device_put(batch, state.batch_sharding)
        params, opt_state, metrics = state.train_step(params, opt_state, batch)
        out.append((convert.params_to_nanochat(jax.device_get(nnx.to_pure_dict(params))), jax.device_get(metrics)))
    return out


@pytest.mark.parametrize("mesh", [(1, 1, 1), (1, 2, 4)], ids=["1device", "fsdp2-tensor4"])
def test_two_optimizer_steps_match_nanochat(golden, mesh):
    """Muon (fp32 Newton–Schulz variant) + AdamW + clipping, through the real jitted train step."""
    config = _config(golden, "float32", mesh)
    n = mesh[0] * mesh[1] * mesh[2]
    steps = _two_steps(golden, config, jax.devices()[:n])
    for i, (sd, metrics) in enumerate(steps, start=1):
        np.testing.assert_allclose(metrics["loss"], golden[f"fp32ns_loss{i}"], atol=1e-5)
        np.testing.assert_allclose(metrics["grad_norm"], golden[f"fp32ns_grad_norm{i}"], rtol=1e-5)
        for key, value in sd.items():
            np.testing.assert_allclose(value, golden[f"fp32ns_step{i}/{key}"], atol=1e-4, rtol=0,
                                       err_msg=f"step {i}: {key}")


def test_bf16_newton_schulz_close_to_nanochat(golden):
    """nanochat's own bf16 Newton–Schulz: bf16 rounding differs between backends, so only a loose check
    of the first step (the fp32 variant above is the exact one)."""
    sd, _ = _two_steps(golden, _config(golden, "bfloat16"), jax.devices()[:1])[0]
    for key, value in sd.items():
        np.testing.assert_allclose(value, golden[f"step1/{key}"], atol=5e-3, rtol=0, err_msg=key)


def test_conversion_round_trip(golden):
    sd = {k[len("param/"):]: golden[k] for k in golden.files if k.startswith("param/")}
    back = convert.params_to_nanochat(convert.nanochat_to_params(sd, 2))
    assert set(back) == set(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k])


def test_conversion_rejects_wrong_depth(golden):
    sd = {k[len("param/"):]: golden[k] for k in golden.files if k.startswith("param/")}
    with pytest.raises(ValueError, match="missing"):
        convert.nanochat_to_params(sd, 3)


def test_convert_cli_round_trip_through_nanochat_files(golden, tmp_path):
    """from-nanochat on real .pt/.json files gives nanochat's logits; to-nanochat gives the files back."""
    torch = pytest.importorskip("torch")
    from nanojax.checkpoint import load_model

    src = tmp_path / "nanochat"
    src.mkdir()
    sd = {k[len("param/"):]: torch.from_numpy(golden[k].copy()) for k in golden.files if k.startswith("param/")}
    torch.save(sd, src / "model_000005.pt")
    (src / "meta_000005.json").write_text(json.dumps({"model_config": json.loads(str(golden["config_json"]))}))
    convert.main(["from-nanochat", str(src), "--step", "5", "--out", str(tmp_path / "run")])
    model, _, config = load_model(tmp_path / "run")
    assert config.model.n_kv_head == 2
    with nnx.use_eager_sharding(False):
        logits = model(jnp.asarray(golden["tokens"]))
    np.testing.assert_allclose(np.asarray(logits), golden["logits"], atol=1e-4)
    convert.main(["to-nanochat", str(tmp_path / "run"), "--step", "5", "--out", str(tmp_path / "back")])
    back = torch.load(tmp_path / "back" / "model_000005.pt", weights_only=True)
    assert set(back) == set(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k].numpy(), sd[k].numpy())
