import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import micro_config
from nanojax import sharding as shd
from nanojax.attention import cached_attention, causal_attention
from nanojax import model as model_lib
from nanojax.model import GPT, KVCache, apply_rope, linear


def mean_loss(model, tokens_BT, targets_BT):
    """Cross-entropy averaged over counted tokens (targets of −1 ignored), as F.cross_entropy(ignore_index=-1)."""
    total, count = model.loss(tokens_BT, targets_BT)
    return total / jnp.maximum(count, 1.0)


def _random_model(config, seed=0):
    """nanochat zero-initialises lm_head and the output projections; randomise them so tests see signal."""
    model = GPT(config.model, rngs=nnx.Rngs(seed))
    state = nnx.state(model, nnx.Param)
    keys = iter(jax.random.split(jax.random.key(seed + 1), 64))
    state = jax.tree.map(lambda x: 0.3 * jax.random.normal(next(keys), x.shape, x.dtype), state)
    nnx.update(model, state)
    return model


def _tokens(shape, seed=0, vocab=256):
    return jax.random.randint(jax.random.key(seed), shape, 0, vocab)


def test_init_follows_nanochat():
    c = micro_config()
    model = GPT(c.model, rngs=nnx.Rngs(0))
    assert np.all(np.asarray(model.lm_head[...]) == 0)
    assert np.all(np.asarray(model.blocks.attn.c_proj.kernel[...]) == 0)
    assert np.all(np.asarray(model.blocks.mlp.c_proj.kernel[...]) == 0)
    assert abs(float(jnp.std(model.wte[...])) - 1.0) < 0.05
    fc = np.asarray(model.blocks.mlp.c_fc.kernel[...])  # fan_in 64, fan_out 256: std 1/8
    assert abs(fc.std() - 1 / 8) < 0.01
    logits = model(_tokens((2, 8)))
    assert np.all(np.asarray(logits) == 0)  # zero lm_head: uniform prediction
    loss = mean_loss(model, _tokens((2, 8)), _tokens((2, 8), 1))
    assert abs(float(loss) - np.log(256)) < 1e-5


def test_causality():
    model = _random_model(micro_config())
    x = _tokens((2, 16))
    y = x.at[:, 10].set((x[:, 10] + 1) % 256)
    a, b = model(x), model(y)
    np.testing.assert_array_equal(np.asarray(a[:, :10]), np.asarray(b[:, :10]))
    assert not np.allclose(np.asarray(a[:, 10:]), np.asarray(b[:, 10:]))


def test_softcap_bounds_logits():
    c = micro_config()
    model = _random_model(c)
    state = nnx.state(model, nnx.Param)
    state["lm_head"] = nnx.Param(state["lm_head"][...] * 1000)
    nnx.update(model, state)
    logits = np.asarray(model(_tokens((2, 16))))
    assert logits.dtype == np.float32
    assert np.abs(logits).max() <= 15.0 and np.abs(logits).max() > 14.0


def test_ignored_targets_do_not_count():
    model = _random_model(micro_config())
    x, y = _tokens((2, 16)), _tokens((2, 16), 1)
    masked = y.at[:, :5].set(-1)
    logits = model(x)
    logp = jax.nn.log_softmax(logits, -1)
    nll = -jnp.take_along_axis(logp, jnp.maximum(masked, 0)[..., None], -1)[..., 0]
    want = jnp.sum(jnp.where(masked >= 0, nll, 0)) / jnp.sum(masked >= 0)
    np.testing.assert_allclose(float(mean_loss(model, x, masked)), float(want), rtol=1e-6)
    all_masked = jnp.full_like(y, -1)
    assert float(mean_loss(model, x, all_masked)) == 0.0


@pytest.mark.parametrize("chunk", [0, 1, 7, 32, 10_000])
def test_chunked_loss_equals_full_logits(chunk):
    c = micro_config()
    c.model.loss_chunk_size = chunk
    model = _random_model(c)
    x, y = _tokens((2, 16)), _tokens((2, 16), 1)
    logp = jax.nn.log_softmax(model(x), -1)
    want = -jnp.take_along_axis(logp, y[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(model.token_losses(x, y)), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_loss_chunk_auto_keeps_small_logits_whole_and_chunks_large_ones(monkeypatch):
    """loss_chunk_size=0: one chunk while a device's float32 logits fit the budget; chunks of 128 beyond it,
    counting rows per device (the batch is sharded over data × fsdp)."""
    c = micro_config()
    c.model.loss_chunk_size = 0
    model = GPT(c.model, rngs=nnx.Rngs(0))
    monkeypatch.setattr(model_lib, "LOGITS_BUDGET", 8 * 256 * 256 * 4)  # 8 rows of T 256, vocab 256
    assert model.loss_chunk(8, 256) == 256
    assert model.loss_chunk(16, 256) == 128
    mesh = shd.make_mesh(micro_config(mesh=(2, 1, 1)).mesh)
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        assert model.loss_chunk(16, 256) == 256  # 8 rows on each of the 2 devices


@pytest.mark.parametrize("shape", [(6, 5), (2, 3, 5)])
@pytest.mark.parametrize("dtype,out_dtype", [(jnp.float32, None), (jnp.bfloat16, jnp.float32)])
def test_linear_gradient_equals_autodiff(shape, dtype, out_dtype):
    """The written-out backward of every weight matmul is autodiff's, in value and dtype."""
    x = jax.random.normal(jax.random.key(0), shape, dtype)
    w = jax.random.normal(jax.random.key(1), (5, 4), dtype)
    read_out = jax.random.normal(jax.random.key(2), (*shape[:-1], 4))

    def loss(fn):
        return lambda x, w: jnp.sum(fn(x, w).astype(jnp.float32) * read_out)

    got = jax.grad(loss(lambda x, w: linear(x, w, out_dtype)), argnums=(0, 1))(x, w)
    want = jax.grad(loss(lambda x, w: jnp.dot(x, w, preferred_element_type=out_dtype)), argnums=(0, 1))(x, w)
    tol = 1e-6 if dtype == jnp.float32 else 2e-2
    for a, b in zip(got, want):
        assert a.dtype == b.dtype == dtype
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol)


def _loss_and_grads(model, x, y):
    graphdef, params = nnx.split(model, nnx.Param)
    return jax.value_and_grad(lambda p: mean_loss(nnx.merge(graphdef, p), x, y))(params)


@pytest.mark.parametrize("remat", ["none", "full", "dots"])
def test_scan_equals_python_loop(remat):
    c = micro_config(depth=3)
    c.model.remat = remat
    scanned = _random_model(c)
    c2 = micro_config(depth=3)
    c2.model.scan_layers = False
    looped = GPT(c2.model, rngs=nnx.Rngs(5))
    nnx.update(looped, nnx.state(scanned, nnx.Param))
    x, y = _tokens((2, 16)), _tokens((2, 16), 1)
    np.testing.assert_allclose(np.asarray(scanned(x)), np.asarray(looped(x)), atol=1e-5, rtol=1e-5)
    (la, ga), (lb, gb) = _loss_and_grads(scanned, x, y), _loss_and_grads(looped, x, y)
    np.testing.assert_allclose(float(la), float(lb), rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-4), ga, gb)


def test_grouped_kv_heads():
    c = micro_config()
    c.model.aspect_ratio, c.model.head_dim, c.model.n_head, c.model.n_kv_head = 64, 16, 8, 2
    model = _random_model(c)
    assert model.blocks.attn.c_k.kernel.shape == (2, 128, 32)
    x = _tokens((2, 16))
    assert model(x).shape == (2, 16, 256)


def test_sequence_longer_than_context_is_an_error():
    model = GPT(micro_config().model, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="longer than model.seq_len=32"):
        model(_tokens((1, 33)))


def test_rope_is_a_rotation():
    x = jax.random.normal(jax.random.key(0), (1, 5, 2, 8))
    ang = jnp.arange(5)[:, None] * jnp.ones(4)
    y = apply_rope(x, jnp.cos(ang), jnp.sin(ang))
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(y[:, 0]), np.asarray(x[:, 0]))  # position 0 unrotated


def test_sharded_equals_single_device():
    """data=2, fsdp=2, tensor=2 on 8 devices gives the loss and gradients of one device."""
    c = micro_config(mesh=(2, 2, 2))
    model = _random_model(c)
    x, y = _tokens((8, 32)), _tokens((8, 32), 1)
    loss1, grads1 = _loss_and_grads(model, x, y)

    mesh = shd.make_mesh(c.mesh)
    graphdef, params = nnx.split(model, nnx.Param)
    shardings = shd.param_shardings(params, mesh)
    params = jax.device_put(params, shardings)
    specs = {str(v.sharding.spec) for v in jax.tree.leaves(params)}
    assert any("tensor" in s for s in specs) and any("fsdp" in s for s in specs)
    bs = shd.batch_sharding(mesh)
    x8, y8 = jax.device_put(x, bs), jax.device_put(y, bs)

    @jax.jit
    def f(p, a, b):
        return jax.value_and_grad(lambda q: mean_loss(nnx.merge(graphdef, q), a, b))(p)

    loss8, grads8 = f(params, x8, y8)
    np.testing.assert_allclose(float(loss8), float(loss1), rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-4),
                 grads8, grads1)


def test_rules_table_leaves_undivisible_axes_replicated():
    c = micro_config(mesh=(1, 2, 4))
    mesh = shd.make_mesh(c.mesh)
    assert shd.logical_to_spec(("embed", "vocab"), (64, 256), mesh) == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert shd.logical_to_spec(("embed", "vocab"), (63, 254), mesh) == jax.sharding.PartitionSpec(None, None)
    with pytest.raises(KeyError, match="nonsense"):
        shd.logical_to_spec(("nonsense",), (4,), mesh)


# -- the same forward with a cache (prefill, decode) ------------------------------------------------------
def _decode_with_cache(model, prompt, steps, cache_len=32, pad_to=16):
    """Right-padded prefill, then greedy decoding one token at a time through model(tokens, cache)."""
    ids = np.zeros((1, pad_to), np.int32)
    ids[0, :len(prompt)] = prompt
    logits, cache = model(jnp.asarray(ids), model.empty_cache(1, cache_len))
    prefill = np.asarray(logits[0, :len(prompt)])
    cache = cache._replace(pos=jnp.asarray([len(prompt)], jnp.int32))  # the padding is overwritten next
    seq, last, decoded = list(prompt), logits[0, len(prompt) - 1], []
    for _ in range(steps):
        seq.append(int(jnp.argmax(last)))
        logits, cache = model(jnp.asarray([[seq[-1]]], jnp.int32), cache)
        last = logits[0, 0]
        decoded.append(np.asarray(last))
    return prefill, np.stack(decoded), seq


@pytest.mark.parametrize("scan", [True, False])
def test_cached_forward_equals_uncached(scan):
    c = micro_config()
    c.model.scan_layers = scan
    model = _random_model(c)
    prompt = np.asarray(_tokens((11,), seed=3)).tolist()
    prefill, decoded, seq = _decode_with_cache(model, prompt, steps=12)
    full = np.asarray(model(jnp.asarray([seq]))[0])
    np.testing.assert_allclose(prefill, full[:len(prompt)], atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(decoded, full[len(prompt):], atol=2e-5, rtol=1e-5)
    assert [int(t) for t in np.argmax(full[len(prompt) - 1:-1], -1)] == seq[len(prompt):]  # token for token


def test_cached_forward_with_grouped_kv_heads():
    c = micro_config()
    c.model.aspect_ratio, c.model.head_dim, c.model.n_head, c.model.n_kv_head = 64, 16, 8, 2
    model = _random_model(c)
    prompt = np.asarray(_tokens((7,), seed=4)).tolist()
    prefill, decoded, seq = _decode_with_cache(model, prompt, steps=6)
    full = np.asarray(model(jnp.asarray([seq]))[0])
    np.testing.assert_allclose(np.concatenate([prefill, decoded]), full, atol=2e-5, rtol=1e-5)


def test_cache_rows_keep_their_own_positions():
    """Two rows at different positions in one decode step equal each row decoded alone."""
    model = _random_model(micro_config())
    a, b = np.asarray(_tokens((5,), 1)).tolist(), np.asarray(_tokens((9,), 2)).tolist()
    ids = np.zeros((2, 16), np.int32)
    ids[0, :5], ids[1, :9] = a, b
    _, cache = model(jnp.asarray(ids), model.empty_cache(2, 32))
    cache = cache._replace(pos=jnp.asarray([5, 9], jnp.int32))
    both, cache = model(jnp.asarray([[3], [4]], jnp.int32), cache)
    assert cache.pos.tolist() == [6, 10]
    for row, (prompt, tok) in enumerate(((a, 3), (b, 4))):
        alone = model(jnp.asarray([prompt + [tok]]))[0, -1]
        np.testing.assert_allclose(np.asarray(both[row, 0]), np.asarray(alone), atol=2e-5, rtol=1e-5)


def test_empty_cache_layout():
    c = micro_config()
    model = GPT(c.model, rngs=nnx.Rngs(0))
    cache = model.empty_cache(3, 24)
    assert isinstance(cache, KVCache)
    assert cache.k.shape == cache.v.shape == (2, 3, 2, 24, 32)  # (L, B, K, S, E)
    assert cache.pos.tolist() == [0, 0, 0]


@pytest.mark.parametrize("window", [None, 0, 3, 7])
def test_sliding_window_attention_cached_equals_uncached(window):
    """The one attention with a window: fused (no cache) and cached paths agree with an explicit mask."""
    B, T, H, K, E = 2, 12, 4, 2, 8
    q = jax.random.normal(jax.random.key(0), (B, T, H, E))
    k = jax.random.normal(jax.random.key(1), (B, T, K, E))
    v = jax.random.normal(jax.random.key(2), (B, T, K, E))
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    allowed = (j <= i) & ((i - j <= window) if window is not None else True)
    kr, vr = jnp.repeat(k, H // K, axis=2), jnp.repeat(v, H // K, axis=2)
    s = jnp.einsum("bthe,bshe->bhts", q, kr) / np.sqrt(E)
    want = jnp.einsum("bhts,bshe->bthe", jax.nn.softmax(jnp.where(allowed, s, -jnp.inf), -1), vr)
    fused = causal_attention(q, k, v, window, "xla")
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    cached = cached_attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), pos, window)
    np.testing.assert_allclose(np.asarray(fused), np.asarray(want), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(cached), np.asarray(want), atol=1e-5, rtol=1e-5)
