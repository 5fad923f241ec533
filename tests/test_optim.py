import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import micro_config
from nanojax.model import GPT
from nanojax.optim import build_optimizer, group_of, lr_multiplier, muon_momentum, newton_schulz, param_labels

COEFFS = (3.4445, -4.7750, 2.0315)


@pytest.mark.parametrize("shape", [(64, 128), (128, 64), (3, 48, 96)])
def test_newton_schulz_singular_values_in_band(shape):
    """Five quintic steps push every singular value of a well-conditioned (rectangular Gaussian) matrix
    into roughly [0.5, 1.2] — not exactly 1, by design of the coefficients."""
    G = jax.random.normal(jax.random.key(0), shape)
    O = newton_schulz(G, COEFFS, 5, jnp.float32)
    assert O.shape == G.shape
    s = np.linalg.svd(np.asarray(O).reshape(-1, *shape[-2:]), compute_uv=False)
    assert s.min() > 0.5 and s.max() < 1.25, (s.min(), s.max())
    # the orthogonal factor is preserved: O is close to U V^T
    u, _, vt = np.linalg.svd(np.asarray(G).reshape(-1, *shape[-2:]), full_matrices=False)
    polar = u @ vt
    cos = np.sum(np.asarray(O).reshape(polar.shape) * polar) / (np.linalg.norm(O) * np.linalg.norm(polar))
    assert cos > 0.95


def test_newton_schulz_bf16_close_to_fp32():
    G = jax.random.normal(jax.random.key(1), (64, 96))
    a, b = newton_schulz(G, COEFFS, 5, jnp.bfloat16), newton_schulz(G, COEFFS, 5, jnp.float32)
    assert a.dtype == jnp.bfloat16
    assert float(jnp.max(jnp.abs(a.astype(jnp.float32) - b))) < 0.05


def test_lr_schedule_matches_nanochat():
    n = 100
    assert float(lr_multiplier(0, n, 0.0, 0.2, 0.0)) == 1.0
    assert float(lr_multiplier(80, n, 0.0, 0.2, 0.0)) == 1.0
    np.testing.assert_allclose(float(lr_multiplier(90, n, 0.0, 0.2, 0.0)), 0.5)
    np.testing.assert_allclose(float(lr_multiplier(99, n, 0.0, 0.2, 0.0)), 0.05)
    np.testing.assert_allclose(float(lr_multiplier(90, n, 0.0, 0.2, 0.1)), 0.55)
    np.testing.assert_allclose(float(lr_multiplier(4, n, 0.1, 0.2, 0.0)), 0.5)  # warmup (it+1)/10


def test_muon_momentum_schedule():
    np.testing.assert_allclose(float(muon_momentum(0, 0.85, 0.95, 300)), 0.85)
    np.testing.assert_allclose(float(muon_momentum(150, 0.85, 0.95, 300)), 0.90)
    np.testing.assert_allclose(float(muon_momentum(1000, 0.85, 0.95, 300)), 0.95)


def test_groups_cover_every_parameter():
    model = GPT(micro_config().model, rngs=nnx.Rngs(0))
    labels = param_labels(nnx.state(model, nnx.Param))
    flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(labels)}
    assert sum(v == "muon" for v in flat.values()) == 6
    assert sorted(v for v in flat.values() if v != "muon") == ["embedding", "unembedding"]
    with pytest.raises(ValueError, match="belongs to no optimizer group"):
        group_of("not_a_parameter", 2)


def test_muon_update_is_scaled_and_per_layer():
    """One Muon step moves each stacked layer by lr·√max(1, out/in)·(orthogonalised momentum)."""
    c = micro_config()
    c.train.grad_clip = 0.0
    c.optim.ns_dtype = "float32"
    model = GPT(c.model, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    tx = build_optimizer(c, 100)
    state = tx.init(params)
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(p.size), p.shape, jnp.float32), params)
    updates, _ = tx.update(grads, state, params)
    g = grads["blocks"]["mlp"]["c_fc"]["kernel"][...]  # (layers, in=64, out=256): torch (256, 64) is tall
    u = updates["blocks"]["mlp"]["c_fc"]["kernel"][...]
    for layer in range(g.shape[0]):
        # first step: buf = 0.15 g, nesterov g' = g + 0.85 (buf - g)
        gn = g[layer] + 0.85 * (0.15 * g[layer] - g[layer])
        want = -0.02 * 2.0 * newton_schulz(gn.T, COEFFS, 5, jnp.float32).T
        np.testing.assert_allclose(np.asarray(u[layer]), np.asarray(want), atol=1e-6)


def test_golden_one_step():
    """nanojax's own regression value: one step of the micro config from seed 0 on synthetic data.
    If you change numerics ON PURPOSE, update the constants and say why in the commit message."""
    from nanojax import sharding as shd
    from nanojax.config import derive
    from nanojax.data.synthetic import SyntheticIterator
    from nanojax.train import TrainState

    c = micro_config()
    mesh = shd.make_mesh(c.mesh, devices=jax.devices()[:1])
    state = TrainState(c, mesh, derive(c, 1))
    params = state.init_params()
    opt = state.init_opt_state(params)
    it = SyntheticIterator(batch_size=4, seq_len=32, vocab_size=256)
    losses = []
    for _ in range(3):
        mbs = [next(it) for _ in range(2)]
        batch = {k: np.stack([m[k] for m in mbs]) for k in mbs[0]}
        params, opt, metrics = state.train_step(params, opt, batch)
        losses.append(float(metrics["loss"]))
    np.testing.assert_allclose(losses[0], np.log(256), rtol=5e-6)  # zero lm_head: uniform
    np.testing.assert_allclose(losses, GOLDEN_LOSSES, rtol=2e-5, err_msg="golden losses changed: see docstring")


GOLDEN_LOSSES = [5.545177459716797, 5.063163757324219, 4.349403381347656]
