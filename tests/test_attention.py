"""Every attention backend against one explicit-mask reference, forward and gradients, full and sliding
windows, MHA and GQA; splash (TPU's Pallas kernel) runs here in interpret mode, alone and sharded over a
mesh; `auto`'s choice per platform; `model.remat=auto` decided from XLA's memory analysis."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding

from nanojax import attention
from nanojax import config as cfglib
from nanojax import sharding as shd
from nanojax.attention import attention_implementation, causal_attention
from nanojax.model import GPT
from nanojax.remat import choose_remat, peak_bytes
from nanojax.train import TrainState, stack_micro_batches
from nanojax.data.synthetic import SyntheticIterator
from tests.helpers import micro_config

WEIGHTS = jnp.cos(jnp.arange(16.0))  # a fixed, uneven read-out so gradients differ per position and channel


def qkv(B, T, H, K, E, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(keys[0], (B, T, H, E)), jax.random.normal(keys[1], (B, T, K, E)),
            jax.random.normal(keys[2], (B, T, K, E)))


def reference(q, k, v, window):
    """Softmax over keys j ≤ t with t − j ≤ window, written out: what every backend must compute."""
    B, T, H, E = q.shape
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    allowed = (j <= i) & ((i - j <= window) if window is not None else True)
    kr, vr = jnp.repeat(k, H // k.shape[2], axis=2), jnp.repeat(v, H // v.shape[2], axis=2)
    s = jnp.einsum("bthe,bshe->bhts", q, kr) / np.sqrt(E)
    return jnp.einsum("bhts,bshe->bthe", jax.nn.softmax(jnp.where(allowed, s, -jnp.inf), -1), vr)


def read_out(fn):
    """A scalar of the attention output whose gradient reaches every query, key and value."""
    return lambda q, k, v: jnp.sum(fn(q, k, v) * WEIGHTS[: q.shape[-1]])


@pytest.mark.parametrize("impl", ["xla", "splash"])
@pytest.mark.parametrize("window", [None, 40])
@pytest.mark.parametrize("heads", [(2, 2), (4, 2)], ids=["mha", "gqa"])
def test_backend_matches_reference_forward_and_gradients(impl, window, heads):
    H, K = heads
    q, k, v = qkv(2, 256, H, K, 16)
    got = jax.jit(lambda *a: causal_attention(*a, window, impl))(q, k, v)
    np.testing.assert_allclose(got, reference(q, k, v, window), atol=2e-5, rtol=2e-5)
    g_got = jax.jit(jax.grad(read_out(lambda *a: causal_attention(*a, window, impl)), argnums=(0, 1, 2)))(q, k, v)
    g_want = jax.grad(read_out(lambda *a: reference(*a, window)), argnums=(0, 1, 2))(q, k, v)
    for name, a, b in zip("qkv", g_got, g_want):
        np.testing.assert_allclose(a, b, atol=5e-5, rtol=5e-5, err_msg=f"d{name}")


@pytest.mark.parametrize("mesh_shape,heads", [((2, 2, 2), (4, 2)), ((2, 1, 4), (4, 2))],
                         ids=["heads-split", "kv-heads-indivisible"])
def test_splash_sharded_over_a_mesh_equals_one_device(mesh_shape, heads):
    """Under shard_map each device runs the kernel on its rows (and heads when both head counts divide)."""
    H, K = heads
    mesh = shd.make_mesh(micro_config(mesh=mesh_shape).mesh)
    q, k, v = qkv(4, 128, H, K, 16, seed=1)
    q_sh = NamedSharding(mesh, shd.logical_to_spec(attention.ACT_HEADS, q.shape, mesh))
    kv_sh = NamedSharding(mesh, shd.logical_to_spec(attention.ACT_KV_HEADS, k.shape, mesh))

    def loss(q, k, v):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return read_out(lambda *a: causal_attention(*a, 32, "splash"))(q, k, v)

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)), in_shardings=(q_sh, kv_sh, kv_sh))
    value, grads = fn(q, k, v)
    want_value, want_grads = jax.value_and_grad(read_out(lambda *a: reference(*a, 32)), argnums=(0, 1, 2))(q, k, v)
    np.testing.assert_allclose(value, want_value, rtol=1e-5)
    for a, b in zip(grads, want_grads):
        np.testing.assert_allclose(a, b, atol=5e-5, rtol=5e-5)


def test_splash_train_step_on_a_mesh_equals_xla():
    """A whole optimizer step (2×2×2 mesh, GQA) with splash attention gives XLA attention's loss and params."""
    results = {}
    for impl in ("xla", "splash"):
        c = micro_config(mesh=(2, 2, 2))
        c.model.seq_len, c.model.loss_chunk_size, c.model.aspect_ratio = 128, 64, 64  # width 128: 4 heads
        c.model.n_kv_head = 2
        c.model.attention_impl = impl
        c.train.total_batch_size = 8 * 128
        mesh = shd.make_mesh(c.mesh)
        state = TrainState(c, mesh, cfglib.derive(c, mesh.size))
        params = state.init_params()
        opt = state.init_opt_state(params)
        it = SyntheticIterator(batch_size=state.derived.global_micro_batch, seq_len=128, vocab_size=256)
        batch = jax.device_put(stack_micro_batches([next(it) for _ in range(state.derived.grad_accum_steps)]),
                               state.batch_sharding)
        params, _, metrics = state.train_step(params, opt, batch)
        results[impl] = (float(metrics["loss"]), jax.tree.map(np.asarray, params))
    assert results["splash"][0] == pytest.approx(results["xla"][0], rel=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-5),
                 results["splash"][1], results["xla"][1])


def test_auto_choice_per_platform(monkeypatch):
    bf16, f32 = jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)
    assert attention_implementation("auto", f32) == "xla"  # CPU
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert attention_implementation("auto", bf16, 16, 16, 128, 2048) == "splash"
    assert attention_implementation("auto", bf16, 16, 16, 128, 1000) == "xla"  # no kernel tile divides 1000
    assert attention_implementation("auto", bf16, 16, 16, 64, 2048) == "xla"  # lanes: head_dim % 128
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(attention, "_cudnn_attention_works", lambda *a: True)
    assert attention_implementation("auto", bf16) == "cudnn"
    assert attention_implementation("auto", f32) == "xla"  # cuDNN's flash kernels are 16-bit
    monkeypatch.setattr(attention, "_cudnn_attention_works", lambda *a: False)
    assert attention_implementation("auto", bf16) == "xla"
    with pytest.raises(ValueError, match="model.attention_impl='flash'"):
        attention_implementation("flash", bf16)


def test_splash_refuses_a_length_no_tile_divides():
    q, k, v = qkv(1, 100, 2, 2, 16)
    with pytest.raises(ValueError, match="divisible by one of .* got 100.*attention_impl=xla"):
        causal_attention(q, k, v, None, "splash")


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN flash attention needs an NVIDIA GPU")
@pytest.mark.parametrize("window", [None, 40])
def test_cudnn_matches_reference_on_gpu(window):
    q, k, v = (x.astype(jnp.bfloat16) for x in qkv(2, 256, 4, 2, 64))
    got = causal_attention(q, k, v, window, "cudnn").astype(jnp.float32)
    want = reference(*(x.astype(jnp.float32) for x in (q, k, v)), window)
    np.testing.assert_allclose(got, want, atol=3e-2)
    g_got = jax.grad(read_out(lambda *a: causal_attention(*a, window, "cudnn").astype(jnp.float32)),
                     argnums=(0, 1, 2))(q, k, v)
    g_want = jax.grad(read_out(lambda *a: reference(*a, window)), argnums=(0, 1, 2))(
        *(x.astype(jnp.float32) for x in (q, k, v)))
    for a, b in zip(g_got, g_want):
        np.testing.assert_allclose(a.astype(jnp.float32), b, atol=5e-2)


def test_model_forward_with_splash_equals_xla():
    c = micro_config()
    c.model.seq_len = 128
    tokens = jax.random.randint(jax.random.key(0), (2, 128), 0, 256)
    logits = {}
    for impl in ("xla", "splash"):
        c.model.attention_impl = impl
        logits[impl] = GPT(c.model, rngs=nnx.Rngs(0))(tokens)
    np.testing.assert_allclose(logits["splash"], logits["xla"], atol=1e-5)


# -- remat=auto from XLA's memory analysis ------------------------------------------------------------------
def _remat_case():
    """A config, its step's measured peak per policy (each compiled once), and the policies asked for."""
    c = micro_config()
    mesh = shd.make_mesh(c.mesh)
    derived = cfglib.derive(c, mesh.size)
    measured, compiled = [], {}

    def step_peak(cfg):
        measured.append(cfg.model.remat)
        if cfg.model.remat not in compiled:
            compiled[cfg.model.remat] = peak_bytes(TrainState(cfg, mesh, derived).compile_abstract())
        return compiled[cfg.model.remat]

    return c, step_peak, measured


def test_remat_auto_picks_the_cheapest_policy_that_fits():
    c, step_peak, measured = _remat_case()
    peaks = {}
    for policy in ("none", "full"):
        c.model.remat = policy
        peaks[policy] = step_peak(c)
    assert peaks["full"] < peaks["none"], peaks  # recomputing the blocks must save memory, or auto is moot
    measured.clear()

    c.model.remat = "auto"
    assert choose_remat(c, step_peak, limit_bytes=10 * peaks["none"]) == "none"
    assert measured == ["none"] and c.model.remat == "none"  # the first that fits ends the search

    c.model.remat = "auto"
    chosen = choose_remat(c, step_peak, limit_bytes=int((peaks["none"] - 1) / 0.95))
    assert chosen in ("dots", "full") and c.model.remat == chosen

    c.model.remat, measured[:] = "auto", []
    assert choose_remat(c, step_peak, limit_bytes=1) == "full"  # nothing fits: the smallest, with advice
    assert measured == ["none", "dots", "full"]


def test_remat_auto_on_cpu_and_explicit_policies_compile_nothing():
    c, step_peak, measured = _remat_case()
    assert choose_remat(c, step_peak) == "none" and c.model.remat == "auto"  # CPU: no limit
    c.model.remat = "dots"
    assert choose_remat(c, step_peak, limit_bytes=1) == "dots"
    assert measured == []
