"""nanojax with model.family=head equals nanochat HEAD (92d63d4) on the same weights: logits across sliding
windows with value embeddings, smear, backout and GQA; loss; KV-cache decode; FLOPs; parameter count; init.

The golden values were produced by nanochat HEAD's own gpt.py / engine.KVCache in float32 on CPU; see
tests/fixtures/nanochat_head/README.md.
"""
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import micro_config

from nanojax import optim
from nanojax.config import ModelConfig, default_config
from nanojax.convert import fill_state
from nanojax.model import GPT, param_name
from nanojax.model_head import nanochat_head_to_params

GOLDEN = pathlib.Path(__file__).parent / "fixtures" / "nanochat_head" / "golden.npz"


@pytest.fixture(scope="module")
def golden():
    return np.load(GOLDEN)


def _model_config(golden, **overrides):
    g = json.loads(str(golden["config_json"]))
    m = default_config().model
    m.family = "head"
    m.depth, m.width, m.n_head, m.n_kv_head = g["n_layer"], g["n_embd"], g["n_head"], g["n_kv_head"]
    m.head_dim = g["n_embd"] // g["n_head"]
    m.vocab_size, m.seq_len, m.window_pattern = g["vocab_size"], g["sequence_len"], g["window_pattern"]
    m.compute_dtype = "float32"
    for k, v in overrides.items():
        setattr(m, k, v)
    return m


def _model(golden, **overrides):
    m = _model_config(golden, **overrides)
    sd = {k[len("param/"):]: golden[k] for k in golden.files if k.startswith("param/")}
    return fill_state(GPT(m, rngs=nnx.Rngs(0)), nanochat_head_to_params(sd, ModelConfig.of(m)))


def test_windows_and_layers_follow_head(golden):
    mc = ModelConfig.of(_model_config(golden))
    want = [None if w >= mc.seq_len else int(w) for w in golden["window_sizes"]]
    assert list(mc.layer_windows()) == want == [128, 128, 128, None, 128, None]
    assert mc.ve_layers() == (1, 3, 5) and mc.padded_vocab == 128
    assert (mc.rope_base, mc.qk_scale) == (100000.0, 1.2)


@pytest.mark.parametrize("scan", [True, False])
def test_logits_and_loss_match_head(golden, scan):
    model = _model(golden, scan_layers=scan, loss_chunk_size=64)
    tokens = jnp.asarray(golden["tokens"])
    logits = model(tokens)
    assert logits.shape == golden["logits"].shape  # padded vocabulary sliced back
    np.testing.assert_allclose(np.asarray(logits), golden["logits"], atol=1e-4, rtol=0)
    total, count = model.loss(tokens, jnp.asarray(golden["targets"]))
    np.testing.assert_allclose(float(total / count), float(golden["loss"]), atol=1e-5, rtol=0)


def test_cached_decode_equals_forward_and_head(golden):
    """Prefill, then one token at a time: smear reads the previous token from the cache, windows apply."""
    model = _model(golden)
    tokens = jnp.asarray(golden["tokens"])
    B, T = tokens.shape
    P = int(golden["prefill_len"])
    cache = model.empty_cache(B, T)
    logits, cache = model(tokens[:, :P], cache)
    steps = [logits]
    step = jax.jit(lambda m, t, c: m(t, c))
    for t in range(P, T):
        logits, cache = step(model, tokens[:, t:t + 1], cache)
        steps.append(logits)
    decoded = np.asarray(jnp.concatenate(steps, axis=1))
    np.testing.assert_allclose(decoded, golden["decode_logits"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(decoded, np.asarray(model(tokens)), atol=1e-4, rtol=0)


def test_smear_needs_the_cache_tokens(golden):
    model = _model(golden)
    cache = model.empty_cache(1, 8)._replace(tokens=None)
    with pytest.raises(ValueError, match="model.smear"):
        model(jnp.zeros((1, 1), jnp.int32), cache)


def test_flops_and_param_count_match_head(golden):
    mc = ModelConfig.of(_model_config(golden))
    assert mc.flops_per_token() == int(golden["estimate_flops"])
    assert mc.num_matmul_params() == int(golden["num_matmul_params"])
    assert mc.param_counts()[0] == int(golden["num_params"])
    params = nnx.state(GPT(_model_config(golden), rngs=nnx.Rngs(0)), nnx.Param)
    assert sum(x.size for x in jax.tree.leaves(params)) == int(golden["num_params"])


def test_init_matches_head(golden):
    """Deterministic tensors equal HEAD's init; random ones have its distribution (range and std)."""
    mc = ModelConfig.of(_model_config(golden))
    model = GPT(_model_config(golden), rngs=nnx.Rngs(0))
    for name in ("resid_lambdas", "x0_lambdas", "smear_lambda", "backout_lambda"):
        np.testing.assert_allclose(np.asarray(getattr(model, name)[...]), golden[f"init/{name}"], atol=1e-7)
    for block in ("attn.c_proj", "mlp.c_proj"):
        assert not np.any(golden[f"init_stats/transformer.h.0.{block}.weight"])
        assert not np.any(np.asarray(model.blocks.attn.c_proj.kernel[...] if block == "attn.c_proj"
                                     else model.blocks.mlp.c_proj.kernel[...]))
    ours = {"transformer.wte.weight": model.wte, "lm_head.weight": model.lm_head,
            "transformer.h.0.attn.c_q.weight": model.blocks.attn.c_q.kernel,
            "transformer.h.0.mlp.c_fc.weight": model.blocks.mlp.c_fc.kernel,
            f"value_embeds.{mc.ve_layers()[0]}.weight": model.value_embeds,
            f"transformer.h.{mc.ve_layers()[0]}.attn.ve_gate.weight": model.ve_gate,
            "smear_gate.weight": model.smear_gate}
    for key, param in ours.items():
        _, _, mean, std = golden[f"init_stats/{key}"]
        w = np.asarray(param[...])
        rtol = 0.1 if w.size > 1000 else 0.3  # sampling noise of HEAD's and our std
        np.testing.assert_allclose(w.std(), std, rtol=rtol, err_msg=key)
        assert abs(w.mean() - mean) <= 0.3 * std, key
        if "wte" not in key and "lm_head" not in key:  # uniform(a, b): a, b = mean ∓ √3·std of HEAD's tensor
            a, b = mean - 3**0.5 * std, mean + 3**0.5 * std
            assert a - rtol * (b - a) <= w.min() and w.max() <= b + rtol * (b - a), key


def test_head_params_have_axes_and_adamw_groups(golden):
    params = nnx.state(GPT(_model_config(golden), rngs=nnx.Rngs(0)), nnx.Param)
    groups = {param_name(p): optim.group_of(param_name(p), x.ndim)
              for p, x in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(params))}
    for name in ("value_embeds", "ve_gate", "resid_lambdas", "x0_lambdas", "smear_gate", "smear_lambda",
                 "backout_lambda"):
        assert groups[name] == "embedding", name
    for path, var in jax.tree_util.tree_leaves_with_path(params, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        assert len(var.get_metadata().get("out_sharding", ())) == var[...].ndim, param_name(path)


def test_family_keys_mix_and_reject_bad_values():
    m = default_config().model
    m.family, m.smear = "head", 0
    mc = ModelConfig.of(m)
    assert mc.value_embeds and not mc.smear and mc.window_pattern == "SSSL" and mc.vocab_multiple == 64
    launch = ModelConfig.of(default_config().model)
    assert (launch.window_pattern, launch.rope_base, launch.padded_vocab) == ("L", 10000.0, 65536)
    with pytest.raises(ValueError, match="model.family"):
        ModelConfig.of({"family": "tail"})
    with pytest.raises(ValueError, match="model.window_pattern"):
        ModelConfig.of({"family": "head", "window_pattern": "SXL"})
    with pytest.raises(ValueError, match="model.backout"):
        ModelConfig.of({"backout": 2})


def _head_micro(mesh):
    c = micro_config(mesh=mesh, steps=4, depth=5)
    c.model.family = "head"
    c.model.seq_len = 256  # HEAD's short window is 128: layers 0-2 windowed
    c.optim.ns_dtype = "float32"  # bf16 Newton–Schulz rounds differently per mesh
    c.optim.adam_eps = 1e-6  # near-zero gradients: eps 1e-10 turns their float noise into ±lr steps
    c.train.total_batch_size = 4 * 256
    c.train.device_batch_size = 4 // (mesh[0] * mesh[1])
    return c


def test_head_train_step_same_on_one_device_and_sharded():
    """The jitted train step (a scan over pattern periods, new parameters sharded by their logical axes)
    gives one device's numbers on an fsdp × tensor mesh."""
    from nanojax import sharding as shd
    from nanojax.config import derive
    from nanojax.train import TrainState

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, size=(1, 4, 257)).astype(np.int32)
    results = []
    for mesh_shape in ((1, 1, 1), (1, 2, 4)):
        config = _head_micro(mesh_shape)
        devices = jax.devices()[:int(np.prod(mesh_shape))]
        mesh = shd.make_mesh(config.mesh, devices=devices)
        state = TrainState(config, mesh, derive(config, len(devices)))
        params = jax.device_get(state.init_params())  # + noise: at HEAD's init (zero c_proj) the backout and
        noise = np.random.default_rng(1)  # lambda gradients are exactly 0, and Adam's first step is their sign
        params = jax.tree.map(lambda p: p + 0.05 * noise.standard_normal(p.shape).astype(p.dtype), params)
        params = jax.device_put(params, state.param_shardings)
        opt_state = state.init_opt_state(params)
        batch = jax.device_put({"inputs": jnp.asarray(tokens[..., :-1]), "targets": jnp.asarray(tokens[..., 1:])},
                               state.batch_sharding)
        params, _, metrics = state.train_step(params, opt_state, batch)
        results.append((jax.device_get(nnx.to_pure_dict(params)), jax.device_get(metrics)))
    (p1, m1), (p8, m8) = results
    assert np.isfinite(m1["loss"]) and m1["grad_norm"] > 0
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
    np.testing.assert_allclose(m8["grad_norm"], m1["grad_norm"], rtol=1e-4)
    for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(p1), jax.tree_util.tree_leaves_with_path(p8)):
        np.testing.assert_allclose(b, a, atol=1e-4, err_msg=jax.tree_util.keystr(path))


def test_engine_generates_as_full_recompute():
    """The engine's right-padded batched prefill, replicated rows and decode keep smear and windows exact:
    greedy tokens equal recomputing the whole sequence each step (a prompt longer than the 128 window)."""
    from nanojax.engine import Engine, generate_naive
    from nanojax.tokenizer import Tokenizer

    tok = Tokenizer.from_ranks({bytes([i]): i for i in range(256)})
    c = _head_micro((1, 1, 1)).model
    c.vocab_size = 265  # 256 bytes + 9 specials
    model = GPT(c, rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    keys = iter(jax.random.split(jax.random.key(1), 64))
    nnx.update(model, jax.tree.map(lambda x: x + 0.3 * jax.random.normal(next(keys), x.shape, x.dtype), state))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 256, n).tolist() for n in (5, 140, 17)]
    stops = {tok.bos_token_id, tok.encode_special("<|assistant_end|>")}
    out, _ = Engine(model, tok).generate_batch(prompts, max_tokens=8, temperature=0.0)
    for prompt, got in zip(prompts, out):
        want = [t for t in generate_naive(model, prompt, 8, stop_tokens=stops) if t not in stops]
        assert got[len(prompt):] == want


def test_convert_head_checkpoint_round_trip(golden, tmp_path):
    """from-nanochat on HEAD .pt/.json files (meta with window_pattern) gives HEAD's logits; to-nanochat gives
    the same state dict and meta back."""
    torch = pytest.importorskip("torch")
    from nanojax import convert
    from nanojax.checkpoint import load_model

    src = tmp_path / "nanochat"
    src.mkdir()
    sd = {k[len("param/"):]: torch.from_numpy(golden[k].copy()) for k in golden.files if k.startswith("param/")}
    torch.save(sd, src / "model_000007.pt")
    model_config = json.loads(str(golden["config_json"]))
    (src / "meta_000007.json").write_text(json.dumps({"model_config": model_config}))
    convert.main(["from-nanochat", str(src), "--step", "7", "--out", str(tmp_path / "run")])
    model, _, config = load_model(tmp_path / "run")
    assert config.model.family == "head" and config.model.window_pattern == "SSSL"
    with nnx.use_eager_sharding(False):
        logits = model(jnp.asarray(golden["tokens"]))
    np.testing.assert_allclose(np.asarray(logits), golden["logits"], atol=1e-4, rtol=0)
    convert.main(["to-nanochat", str(tmp_path / "run"), "--step", "7", "--out", str(tmp_path / "back")])
    back = torch.load(tmp_path / "back" / "model_000007.pt", weights_only=True)
    assert set(back) == set(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k].numpy(), sd[k].numpy(), err_msg=k)
    meta = json.loads((tmp_path / "back" / "meta_000007.json").read_text())
    assert meta["model_config"] == model_config
    from nanojax import hf  # transformers' NanoChat is the launch architecture: to-hf refuses, naming options

    assert "model.family='head'" in hf.unrepresentable(ModelConfig.of(config.model))


def test_head_forward_with_splash_equals_xla():
    """Per-layer static windows reach the splash kernel (a local mask on layer 0, causal on layer 1)."""
    c = _head_micro((1, 1, 1)).model
    c.depth = 2
    tokens = jax.random.randint(jax.random.key(0), (1, 256), 0, 256)
    logits = {}
    for impl in ("xla", "splash"):
        c.attention_impl = impl
        model = GPT(c, rngs=nnx.Rngs(0))
        state = nnx.state(model, nnx.Param)
        keys = iter(jax.random.split(jax.random.key(1), 64))
        nnx.update(model, jax.tree.map(lambda x: x + 0.3 * jax.random.normal(next(keys), x.shape, x.dtype), state))
        logits[impl] = model(tokens)
    np.testing.assert_allclose(logits["splash"], logits["xla"], atol=1e-4)  # logits up to ~10, 5 random layers


def test_head_remat_policies_give_the_same_gradients():
    """Rematerialised blocks (inside the period scan and in the unrolled tail) recompute the same gradients."""
    tokens = jax.random.randint(jax.random.key(0), (2, 32), 0, 256)
    grads = {}
    for remat in ("none", "full", "dots"):
        c = _head_micro((1, 1, 1)).model
        c.remat = remat
        model = GPT(c, rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(model, nnx.Param)

        def loss(p):
            total, count = nnx.merge(graphdef, p).loss(tokens[:, :-1], tokens[:, 1:])
            return total / count

        grads[remat] = jax.jit(jax.grad(loss))(params)
    for remat in ("full", "dots"):
        for a, b in zip(jax.tree.leaves(grads["none"]), jax.tree.leaves(grads[remat])):
            np.testing.assert_allclose(b, a, atol=1e-6)
