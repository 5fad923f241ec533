"""nanochat's GPT in Flax NNX: one forward for training, prefill and decode.

`model.family` picks the nanochat version: "launch" (3a5e0bc, the default) or "head" (92d63d4), whose options
(per-layer sliding windows, value embeddings, smear, backout, per-layer lambdas, QK scale, padded vocabulary,
init) are read by these same blocks; their parameters and helpers live in `nanojax.model_head`.

`model(tokens_BT) -> logits_BTV` trains and evaluates; `model(tokens_BT, cache) -> (logits_BTV, cache)` runs the
same blocks on tokens appended at each row's cache position (prefill: many tokens, decode: one), as nanochat's
`Block.forward(x, cos_sin, kv_cache)` and the Flax gemma example do. Attention takes the positions of its
queries and a window (None: every earlier position), so sliding-window layers are an argument, not a second path.

Parameter names follow nanochat's state dict (`wte`, `blocks.attn.c_q`, …, `lm_head`) so conversion is a
rename plus a transpose. Kernels are stored (in, out); block parameters are stacked on a leading `layers`
axis whether the layers run under `nnx.scan` or a Python loop, so both modes share checkpoints.
Every parameter carries logical axis names; `nanojax.sharding` maps them onto the mesh.
Shape letters in names (`x_BTD`) are defined once, in `nanojax.config.ModelConfig`.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from nanojax.attention import ACT_HEADS, ACT_KV_HEADS, attention_implementation, cached_attention, causal_attention
from nanojax.config import ModelConfig
from nanojax.model_head import gated_value_embedding, head_init_blocks, head_params, smear
from nanojax.sharding import constrain, logical_to_spec

Dtype = jnp.dtype

# logical axes of activations (the batch is split over data × fsdp; heads / MLP hidden over tensor)
ACT = ("batch", None, None)
ACT_MLP = ("batch", None, "mlp")


def param_name(path) -> str:
    """'blocks.attn.c_q.kernel' for a jax key path into params (nnx.State or a plain nested dict)."""
    parts = []
    for k in path:
        key = getattr(k, "key", getattr(k, "name", getattr(k, "idx", None)))
        if key is not None and key != "value":
            parts.append(str(key))
    return ".".join(parts)


def resolve_dtype(name: str) -> Dtype:
    """'auto' is float32 on CPU (exact comparisons) and bfloat16 on accelerators."""
    if name == "auto":
        return jnp.dtype(jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)
    return jnp.dtype(name)


def rms_norm(x: jax.Array) -> jax.Array:
    """Parameter-free RMSNorm with torch's default eps (the dtype's machine epsilon), as F.rms_norm."""
    eps = jnp.finfo(x.dtype).eps
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)


# -- positions -----------------------------------------------------------------------------------------
class Positions(NamedTuple):
    """Where the queries of one call sit, and their RoPE rotations; computed once, shared by every layer."""
    pos_BT: jax.Array  # int32 absolute positions ((1, T) in training: every row starts at 0)
    cos_BTF: jax.Array
    sin_BTF: jax.Array


def positions(pos_BT: jax.Array, head_dim: int, base: float, dtype: Dtype) -> Positions:
    """RoPE angles pos·base^(−2f/E) in float32, cos/sin cast to the compute dtype (as nanochat)."""
    inv_freq_F = 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs_BTF = pos_BT.astype(jnp.float32)[..., None] * inv_freq_F
    return Positions(pos_BT, jnp.cos(freqs_BTF).astype(dtype), jnp.sin(freqs_BTF).astype(dtype))


def apply_rope(x_BTHE: jax.Array, cos_BTF: jax.Array, sin_BTF: jax.Array) -> jax.Array:
    """Rotate-half RoPE exactly as nanochat launch: halves (x1, x2) -> (x1·cos + x2·sin, −x1·sin + x2·cos).
    cos/sin are (T, F) or (B, T, F); they broadcast over the heads."""
    d = x_BTHE.shape[-1] // 2
    x1, x2 = x_BTHE[..., :d], x_BTHE[..., d:]
    cos, sin = cos_BTF[..., None, :], sin_BTF[..., None, :]
    return jnp.concatenate([x1 * cos + x2 * sin, x1 * (-sin) + x2 * cos], axis=-1)


# -- the KV cache --------------------------------------------------------------------------------------
class KVCache(NamedTuple):
    """Keys and values of every layer for a batch of rows, and how many positions each row holds.

    Layout (L, B, K, S, E): batch axes leading and the contraction last, the layout XLA:CPU runs decode
    attention fastest in (~4x a (B, S, K, E) one). Travels whole through the layer scan, updated in place.
    """
    k: jax.Array  # (L, B, K, S, E)
    v: jax.Array  # (L, B, K, S, E)
    pos: jax.Array  # (B,) int32: positions already written per row
    tokens: jax.Array | None = None  # (B, S) int32 token ids per slot, kept when the model smears (the
    # previous token of a decode step is read back from here, so right-padded prefills and slot moves stay exact)

    @classmethod
    def empty(cls, cfg: ModelConfig, rows: int, length: int, dtype: Dtype) -> KVCache:
        shape = (cfg.depth, rows, cfg.n_kv_head, length, cfg.head_dim)
        tokens = jnp.zeros((rows, length), jnp.int32) if cfg.smear else None
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((rows,), jnp.int32), tokens)

    def write(self, layer, k_BTKE: jax.Array, v_BTKE: jax.Array) -> KVCache:
        """Layer `layer`'s new keys and values at each row's positions pos..pos+T−1."""
        return self._replace(k=_write_rows(self.k, layer, k_BTKE, self.pos),
                             v=_write_rows(self.v, layer, v_BTKE, self.pos))

    def write_tokens(self, tokens_BT: jax.Array) -> KVCache:
        """The call's token ids at each row's positions pos..pos+T−1 (only when the cache keeps tokens)."""
        new_BT = tokens_BT.astype(jnp.int32)
        rows = jax.vmap(lambda c, n, p: jax.lax.dynamic_update_slice(c, n, (p,)))(self.tokens, new_BT, self.pos)
        return self._replace(tokens=rows)


def _write_rows(c_LBKSE: jax.Array, layer, new_BTKE: jax.Array, pos_B: jax.Array) -> jax.Array:
    B, T = new_BTKE.shape[:2]
    if T == 1:  # decode: one slot per row, a small scatter
        return c_LBKSE.at[layer, jnp.arange(B), :, pos_B, :].set(new_BTKE[:, 0].astype(c_LBKSE.dtype))
    new_BKTE = new_BTKE.transpose(0, 2, 1, 3).astype(c_LBKSE.dtype)
    layer_BKSE = jax.vmap(lambda c, n, p: jax.lax.dynamic_update_slice(c, n, (0, p, 0)))(
        c_LBKSE[layer], new_BKTE, pos_B)
    return jax.lax.dynamic_update_index_in_dim(c_LBKSE, layer_BKSE, layer, 0)


# -- remat ---------------------------------------------------------------------------------------------
def resolve_remat(cfg: ModelConfig, dtype: Dtype) -> str:
    """The policy for `auto` when nothing measured it (training and `bench train` replace `auto` with the
    cheapest policy that fits, from XLA's memory analysis: `nanojax.remat`): recompute whole blocks only where
    attention is XLA's on an accelerator (its T² scores would otherwise be stored for every layer: ~350
    GiB/device for d20 at batch 32, 29 GiB with full remat)."""
    if cfg.remat != "auto":
        return cfg.remat
    if jax.default_backend() == "cpu":
        return "none"
    impl = attention_implementation(cfg.attention_impl, dtype, cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.seq_len)
    return "full" if impl == "xla" else "none"


# -- the one matmul of every weight -------------------------------------------------------------------------
def linear(x_ND: jax.Array, w_DF: jax.Array, out_dtype=None) -> jax.Array:
    """x @ w over x's last axis (any leading axes), optionally accumulated and returned in `out_dtype`; the
    output is tagged "linear" so that the `dots` remat policy keeps it."""
    return checkpoint_name(_linear(x_ND, w_DF, out_dtype), "linear")


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _linear(x_ND, w_DF, out_dtype):
    """Its gradient is written out (dx = g·wᵀ, dw = xᵀ·g contracting every leading axis) because autodiff's
    generic transpose of `dot_general` ends in a transpose that XLA's CPU backend folds into its operands: a
    copy of the (tokens × vocab) cotangent and a strided matmul, 2.4× slower for the lm_head's backward."""
    return jnp.dot(x_ND, w_DF, preferred_element_type=out_dtype)


def _linear_fwd(x_ND, w_DF, out_dtype):
    return jnp.dot(x_ND, w_DF, preferred_element_type=out_dtype), (x_ND, w_DF)


def _linear_bwd(out_dtype, res, g_NF):
    x_ND, w_DF = res
    lead = tuple(range(x_ND.ndim - 1))
    dx_ND = jax.lax.dot_general(g_NF.astype(w_DF.dtype), w_DF, (((g_NF.ndim - 1,), (1,)), ((), ())),
                                preferred_element_type=jnp.float32)
    dw_DF = jax.lax.dot_general(x_ND, g_NF.astype(x_ND.dtype), ((lead, lead), ((), ())),
                                preferred_element_type=jnp.float32)
    return dx_ND.astype(x_ND.dtype), dw_DF.astype(w_DF.dtype)


_linear.defvjp(_linear_fwd, _linear_bwd)


# -- layers --------------------------------------------------------------------------------------------
def linear_std(fan_in: int, fan_out: int) -> float:
    """nanochat launch init for every Linear: 1/√fan_in · min(1, √(fan_out/fan_in))."""
    return 1.0 / math.sqrt(fan_in) * min(1.0, math.sqrt(fan_out / fan_in))


class Dense(nnx.Module):
    """Bias-free linear layer with an (in, out) kernel, fp32 storage, cast to the compute dtype on use."""

    def __init__(self, fan_in, fan_out, axes, *, zero_init=False, dtype, param_dtype, rngs: nnx.Rngs):
        if zero_init:
            w = jnp.zeros((fan_in, fan_out), param_dtype)
        else:
            std = linear_std(fan_in, fan_out)
            w = std * jax.random.normal(rngs.params(), (fan_in, fan_out), param_dtype)
        self.kernel = nnx.Param(w, out_sharding=axes)
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        return linear(x.astype(self.dtype), self.kernel[...].astype(self.dtype))


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs):
        d, E = cfg.width, cfg.head_dim
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, E
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.c_q = Dense(d, cfg.n_head * E, ("embed", "heads"), **kw)
        self.c_k = Dense(d, cfg.n_kv_head * E, ("embed", "kv_heads"), **kw)
        self.c_v = Dense(d, cfg.n_kv_head * E, ("embed", "kv_heads"), **kw)
        self.c_proj = Dense(cfg.n_head * E, d, ("heads", "embed"), zero_init=True, **kw)
        self.qk_scale = cfg.qk_scale
        self.implementation = attention_implementation(cfg.attention_impl, dtype, cfg.n_head, cfg.n_kv_head, E,
                                                      cfg.seq_len)

    def __call__(self, x_BTD, at: Positions, *, window: int | None = None, cache: KVCache | None = None,
                 layer=0, v_add_BTKE=None) -> tuple[jax.Array, KVCache | None]:
        """(output, cache): with a cache, this layer's keys/values are written at the rows' positions and
        the queries attend to the cache; without one, to the call's own positions (training).
        `v_add_BTKE` (the gated value embedding) is added to the values."""
        B, T, _ = x_BTD.shape
        H, K, E = self.n_head, self.n_kv_head, self.head_dim
        q_BTHE = constrain(self.c_q(x_BTD).reshape(B, T, H, E), ACT_HEADS)
        k_BTKE = constrain(self.c_k(x_BTD).reshape(B, T, K, E), ACT_KV_HEADS)
        v_BTKE = constrain(self.c_v(x_BTD).reshape(B, T, K, E), ACT_KV_HEADS)
        if v_add_BTKE is not None:
            v_BTKE = v_BTKE + v_add_BTKE.astype(v_BTKE.dtype)
        q_BTHE = rms_norm(apply_rope(q_BTHE, at.cos_BTF, at.sin_BTF))
        k_BTKE = rms_norm(apply_rope(k_BTKE, at.cos_BTF, at.sin_BTF))
        if self.qk_scale != 1.0:
            q_BTHE, k_BTKE = q_BTHE * self.qk_scale, k_BTKE * self.qk_scale
        if cache is None:
            y_BTHE = causal_attention(q_BTHE, k_BTKE, v_BTKE, window, self.implementation)
        else:
            cache = cache.write(layer, k_BTKE, v_BTKE)
            y_BTHE = cached_attention(q_BTHE, cache.k[layer], cache.v[layer], at.pos_BT, window)
        return self.c_proj(y_BTHE.reshape(B, T, H * E)), cache


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs):
        d, hidden = cfg.width, cfg.mlp_ratio * cfg.width
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.c_fc = Dense(d, hidden, ("embed", "mlp"), **kw)
        self.c_proj = Dense(hidden, d, ("mlp", "embed"), zero_init=True, **kw)

    def __call__(self, x_BTD):
        return self.c_proj(constrain(jnp.square(jax.nn.relu(self.c_fc(x_BTD))), ACT_MLP))


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs):
        self.attn = Attention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mlp = MLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x_BTD, at: Positions, *, window: int | None = None, cache: KVCache | None = None,
                 layer=0, ve=None) -> tuple[jax.Array, KVCache | None]:
        """`ve`: None, or (this layer's value embedding (B, T, K, E), its gate kernel (12, K))."""
        xn_BTD = rms_norm(x_BTD)
        v_add_BTKE = None if ve is None else gated_value_embedding(xn_BTD, *ve, linear)
        a_BTD, cache = self.attn(xn_BTD, at, window=window, cache=cache, layer=layer, v_add_BTKE=v_add_BTKE)
        x_BTD = constrain(x_BTD + a_BTD, ACT)
        return constrain(x_BTD + self.mlp(rms_norm(x_BTD)), ACT), cache


LOGITS_BUDGET = 256 * 2**20  # bytes of float32 logits per device kept whole for the backward (loss_chunk_size=0)

_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.save_from_both_policies(  # weight matmuls (`linear`) and any other
        jax.checkpoint_policies.save_only_these_names("linear"),  # batch-free dot
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable),
}


class GPT(nnx.Module):
    """`GPT(config.model, rngs=nnx.Rngs(seed))`; `model(tokens_BT) -> logits_BTV` (float32, softcapped);
    `model(tokens_BT, cache) -> (logits_BTV, cache)` for generation."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        cfg = ModelConfig.of(cfg)
        self.cfg = cfg
        with nnx.use_eager_sharding(False):  # parameters carry logical names; placement is sharding.py's job
            self._build(cfg, rngs)

    def _build(self, cfg: ModelConfig, rngs):
        self.dtype = resolve_dtype(cfg.compute_dtype)
        self.remat = resolve_remat(cfg, self.dtype)
        param_dtype = jnp.dtype(cfg.param_dtype)
        V, d, head_init = cfg.padded_vocab, cfg.width, cfg.init == "head"
        wte_std = 0.8 if head_init else 1.0  # HEAD: N(0, 0.8²); launch: N(0, 1)
        self.wte = nnx.Param(wte_std * jax.random.normal(rngs.params(), (V, d), param_dtype),
                             out_sharding=("vocab", "embed"))

        @nnx.split_rngs(splits=cfg.depth)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(r):
            return Block(cfg, dtype=self.dtype, param_dtype=param_dtype, rngs=r)

        self.blocks = make_blocks(rngs)
        if head_init:
            head_init_blocks(self.blocks, cfg, rngs)
        lm_head = 0.001 * jax.random.normal(rngs.params(), (d, V), param_dtype) if head_init else \
            jnp.zeros((d, V), param_dtype)  # HEAD: N(0, 0.001²); launch: zeros
        self.lm_head = nnx.Param(lm_head, out_sharding=("embed", "vocab"))
        for name, param in head_params(cfg, param_dtype=param_dtype, rngs=rngs).items():
            setattr(self, name, param)

    def empty_cache(self, rows: int, length: int) -> KVCache:
        return KVCache.empty(self.cfg, rows, length, self.dtype)

    # -- trunk -----------------------------------------------------------------------------------
    def hidden(self, tokens_BT: jax.Array, cache: KVCache | None = None):
        """Final-normed hidden states (B, T, D) in the compute dtype; with a cache, (hidden, new cache):
        the tokens sit at positions cache.pos[b] + t, and pos advances by T."""
        cfg = self.cfg
        T = tokens_BT.shape[1]
        if cache is None:
            if T > cfg.seq_len:
                raise ValueError(f"sequence of length {T} is longer than model.seq_len={cfg.seq_len}")
            pos_BT = jnp.arange(T, dtype=jnp.int32)[None, :]
        else:
            pos_BT = cache.pos[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
        at = positions(pos_BT, cfg.head_dim, cfg.rope_base, self.dtype)
        x_BTD = constrain(self.embed(tokens_BT), ACT)
        if cfg.smear:
            x_BTD = self._smear(x_BTD, tokens_BT, cache)
            if cache is not None:
                cache = cache.write_tokens(tokens_BT)
        if self._uniform_layers():
            x_BTD, new_cache = self._run_blocks(x_BTD, at, cache)
        else:
            x_BTD, new_cache = self._run_head_blocks(x_BTD, tokens_BT, at, cache)
        if cache is None:
            return rms_norm(x_BTD)
        return rms_norm(x_BTD), new_cache._replace(pos=cache.pos + T)

    def embed(self, tokens_BT: jax.Array) -> jax.Array:
        """RMS-normed token embeddings in the compute dtype."""
        return rms_norm(jnp.take(self.wte[...], tokens_BT, axis=0).astype(self.dtype))

    def _smear(self, x_BTD, tokens_BT, cache: KVCache | None):
        """HEAD's smear: each position mixes in the previous token's normed embedding; the first position of a
        cached call reads its previous token from the cache (none at position 0)."""
        T = tokens_BT.shape[1]
        if cache is None:
            prev_B1D = jnp.zeros_like(x_BTD[:, :1])
            has_prev_BT = jnp.broadcast_to(jnp.arange(T) > 0, tokens_BT.shape)
        else:
            if cache.tokens is None:
                raise ValueError("model.smear needs a cache that keeps token ids: build it with model.empty_cache "
                                 "and keep its `tokens` field when copying or rebuilding it")
            before_B1 = jnp.take_along_axis(cache.tokens, jnp.maximum(cache.pos - 1, 0)[:, None], axis=1)
            prev_B1D = self.embed(before_B1)
            has_prev_BT = (cache.pos[:, None] + jnp.arange(T)[None, :]) > 0
        prev_BTD = jnp.concatenate([prev_B1D, x_BTD[:, :-1]], axis=1)
        return smear(x_BTD, prev_BTD, has_prev_BT, self.smear_gate[...], self.smear_lambda[...], linear)

    def _uniform_layers(self) -> bool:
        """Every layer alike (the launch model): one block function under nnx.scan."""
        cfg = self.cfg
        return not (cfg.value_embeds or cfg.layer_lambdas or cfg.backout) and set(cfg.layer_windows()) == {None}

    def _run_blocks(self, x_BTD, at: Positions, cache: KVCache | None):
        """Every block in order, under nnx.scan or a Python loop; the cache rides along in the carry."""
        def block_fn(block, x, cache, layer):
            return block(x, at, cache=cache, layer=layer)

        if self.remat != "none":
            block_fn = nnx.remat(block_fn, policy=_REMAT_POLICIES[self.remat], prevent_cse=not self.cfg.scan_layers)
        if self.cfg.scan_layers:
            @nnx.scan(in_axes=(0, nnx.Carry, 0), out_axes=nnx.Carry)
            def run(block, carry, layer):
                return block_fn(block, *carry, layer)

            return run(self.blocks, (x_BTD, cache), jnp.arange(self.cfg.depth))
        graphdef, state = nnx.split(self.blocks)
        for i in range(self.cfg.depth):
            block = nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state))
            x_BTD, cache = block_fn(block, x_BTD, cache, i)
        return x_BTD, cache

    def _run_head_blocks(self, x_BTD, tokens_BT, at: Positions, cache: KVCache | None):
        """Layers that differ (windows, value embeddings, per-layer lambdas, backout). With scan_layers, a
        jax.lax.scan over whole periods of the pattern (the layers at one place of every period are alike:
        the same static window, a value embedding or not), then the rest unrolled (a partial period and the
        last layer, always full); without it, every layer unrolled. Both run the same per-layer function."""
        cfg, (B, T) = self.cfg, tokens_BT.shape
        L, windows, backout_at = cfg.depth, cfg.layer_windows(), cfg.depth // 2
        graphdef, state = nnx.split(self.blocks)
        x0_BTD = x_BTD
        lambdas = (self.resid_lambdas[...], self.x0_lambdas[...]) if cfg.layer_lambdas else None
        ve_tables = (self.value_embeds[...], self.ve_gate[...]) if cfg.value_embeds else None
        has_ve = set(cfg.ve_layers())
        block_fns = {(w, scanned): self._block_fn(w, scanned) for w in set(windows) for scanned in (False, True)}

        def run_layer(block_state, x, cache, layer, place, lam, ve, scanned=False):
            """Layer `layer` (maybe traced), alike to the static layer index `place`."""
            if lam is not None:
                x = lam[0].astype(x.dtype) * x + lam[1].astype(x.dtype) * x0_BTD
            if ve is not None:
                table, gate = ve  # (padded vocab, K·E), (12, K)
                ve = (jnp.take(table, tokens_BT, axis=0).astype(self.dtype).reshape(
                    B, T, cfg.n_kv_head, cfg.head_dim), gate)
            return block_fns[windows[place], scanned](nnx.merge(graphdef, block_state), x, at, cache, layer, ve)

        period = math.lcm(len(cfg.window_pattern), 2 if cfg.value_embeds else 1)
        periods = (L - 1) // period if cfg.scan_layers else 0
        first = periods * period
        x_back = jnp.zeros_like(x_BTD) if cfg.backout else None
        if periods:
            def by_period(a):
                return a[:first].reshape(periods, period, *a.shape[1:])

            xs = {"k": jnp.arange(periods), "state": jax.tree.map(by_period, state),
                  "lam": None if lambdas is None else tuple(by_period(a) for a in lambdas),
                  "ve": None if ve_tables is None else tuple(
                      a[:first // 2].reshape(periods, period // 2, *a.shape[1:]) for a in ve_tables)}

            def body(carry, xs):
                x, cache, x_back = carry
                for p in range(period):
                    lam = None if xs["lam"] is None else (xs["lam"][0][p], xs["lam"][1][p])
                    ve = (xs["ve"][0][p // 2], xs["ve"][1][p // 2]) if p in has_ve else None
                    x, cache = run_layer(jax.tree.map(lambda a, p=p: a[p], xs["state"]), x, cache,
                                         xs["k"] * period + p, p, lam, ve, scanned=True)
                    if x_back is not None and backout_at < first and p == backout_at % period:
                        x_back = jnp.where(xs["k"] == backout_at // period, x, x_back)
                return (x, cache, x_back), None

            (x_BTD, cache, x_back), _ = jax.lax.scan(body, (x_BTD, cache, x_back), xs)
        for i in range(first, L):
            lam = None if lambdas is None else (lambdas[0][i], lambdas[1][i])
            ve = (ve_tables[0][i // 2], ve_tables[1][i // 2]) if i in has_ve else None
            x_BTD, cache = run_layer(jax.tree.map(lambda a, i=i: a[i], state), x_BTD, cache, i, i, lam, ve)
            if i == backout_at and x_back is not None:
                x_back = x_BTD
        if x_back is not None:  # HEAD's backout: remove the mid-layer residual before the final norm
            x_BTD = x_BTD - self.backout_lambda[...].astype(x_BTD.dtype) * x_back
        return x_BTD, cache

    def _block_fn(self, window: int | None, scanned: bool):
        """A block call with a static window (what cuDNN and splash need), rematerialised per model.remat
        (outside a scan, with CSE prevented so XLA cannot merge the recomputation back into the forward)."""
        def block_fn(block, x, at, cache, layer, ve):
            return block(x, at, window=window, cache=cache, layer=layer, ve=ve)

        if self.remat == "none":
            return block_fn
        return nnx.remat(block_fn, policy=_REMAT_POLICIES[self.remat], prevent_cse=not scanned)

    def logits(self, h_ND: jax.Array) -> jax.Array:
        """lm_head then the float32 softcap 15·tanh(x/15)."""
        z_NV = linear(h_ND, self.lm_head[...].astype(self.dtype), jnp.float32)[..., :self.cfg.vocab_size]
        cap = self.cfg.softcap
        return cap * jnp.tanh(z_NV.astype(jnp.float32) / cap)

    def __call__(self, tokens_BT: jax.Array, cache: KVCache | None = None):
        if cache is None:
            return self.logits(self.hidden(tokens_BT))
        h_BTD, cache = self.hidden(tokens_BT, cache)
        return self.logits(h_BTD), cache

    # -- loss --------------------------------------------------------------------------------------
    def token_losses(self, tokens_BT: jax.Array, targets_BT: jax.Array) -> jax.Array:
        """Per-token cross-entropy (nats, float32, shape (B, T)); 0 where the target is −1.

        Where a device's float32 logits fit `LOGITS_BUDGET` the whole sequence is one chunk, kept for the
        backward. Otherwise (17 GB at d20, 32×2048) logits are computed `P` positions of every row at a time
        under a rematerialised scan, so neither pass holds them whole; chunks run along the sequence, never
        the batch, which stays sharded over the data-parallel devices.
        """
        B, T = tokens_BT.shape
        h_BTD = self.hidden(tokens_BT)
        P = self.loss_chunk(B, T)
        pad = (-T) % P
        y_BT = targets_BT
        if pad:
            h_BTD = jnp.pad(h_BTD, ((0, 0), (0, pad), (0, 0)))
            y_BT = jnp.pad(y_BT, ((0, 0), (0, pad)), constant_values=-1)
        C = (T + pad) // P
        head_DV = self.lm_head[...].astype(self.dtype)
        cap = self.cfg.softcap

        def chunk_loss(h_BPD, y_BP):
            z_BPV = linear(h_BPD, head_DV, jnp.float32)[..., :self.cfg.vocab_size]  # padded rows dropped
            z_BPV = constrain(z_BPV, ("batch", None, "vocab"))
            z_BPV = cap * jnp.tanh(z_BPV / cap)
            lse_BP = jax.nn.logsumexp(z_BPV, axis=-1)
            picked_BP = jnp.take_along_axis(z_BPV, jnp.maximum(y_BP, 0)[..., None], axis=-1)[..., 0]
            return jnp.where(y_BP >= 0, lse_BP - picked_BP, 0.0)

        if C == 1:
            return chunk_loss(h_BTD, y_BT)[:, :T]
        h_CBPD = jnp.moveaxis(h_BTD.reshape(B, C, P, -1), 1, 0)
        y_CBP = jnp.moveaxis(y_BT.reshape(B, C, P), 1, 0)
        _, loss_CBP = jax.lax.scan(lambda c, xs: (c, jax.checkpoint(chunk_loss)(*xs)), None, (h_CBPD, y_CBP))
        return jnp.moveaxis(loss_CBP, 0, 1).reshape(B, C * P)[:, :T]

    def loss_chunk(self, B: int, T: int) -> int:
        """Positions per loss chunk: `model.loss_chunk_size`, or for 0 (auto) the whole sequence when this
        device's rows of float32 logits fit LOGITS_BUDGET, else 128."""
        if self.cfg.loss_chunk_size > 0:
            return max(1, min(self.cfg.loss_chunk_size, T))
        mesh = jax.sharding.get_abstract_mesh()
        shards = 1
        if not mesh.empty:
            spec = logical_to_spec(("batch",), (B,), mesh)[0]
            shards = math.prod(mesh.shape[a] for a in ((spec,) if isinstance(spec, str) else spec or ()))
        return T if (B // shards) * T * self.cfg.vocab_size * 4 <= LOGITS_BUDGET else min(128, T)

    def loss(self, tokens_BT: jax.Array, targets_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(sum of per-token losses over counted targets, number of counted targets)."""
        losses_BT = self.token_losses(tokens_BT, targets_BT)
        return jnp.sum(losses_BT), jnp.sum(targets_BT >= 0).astype(jnp.float32)


def eval_sums(model: GPT, tokens_BT, targets_BT, token_bytes_V) -> dict:
    """Sums behind validation loss and bits per byte (nanochat's loss_eval): loss over counted targets, their
    count, and the nats and bytes of targets with a byte length > 0 (special tokens have 0 bytes).
    bits per byte = nats_with_bytes / (ln 2 · bytes)."""
    losses_BT = model.token_losses(tokens_BT, targets_BT)
    valid_BT = targets_BT >= 0
    nbytes_BT = jnp.where(valid_BT, token_bytes_V[jnp.maximum(targets_BT, 0)], 0)
    return {
        "loss_sum": jnp.sum(jnp.where(valid_BT, losses_BT, 0.0)),
        "count": jnp.sum(valid_BT).astype(jnp.float32),
        "nats_with_bytes": jnp.sum(jnp.where(nbytes_BT > 0, losses_BT, 0.0)),
        "bytes": jnp.sum(nbytes_BT).astype(jnp.float32),
    }
