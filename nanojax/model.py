"""nanochat's launch GPT (commit 3a5e0bc) in Flax NNX: one forward for training, prefill and decode.

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

    @classmethod
    def empty(cls, cfg: ModelConfig, rows: int, length: int, dtype: Dtype) -> KVCache:
        shape = (cfg.depth, rows, cfg.n_kv_head, length, cfg.head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((rows,), jnp.int32))

    def write(self, layer, k_BTKE: jax.Array, v_BTKE: jax.Array) -> KVCache:
        """Layer `layer`'s new keys and values at each row's positions pos..pos+T−1."""
        return self._replace(k=_write_rows(self.k, layer, k_BTKE, self.pos),
                             v=_write_rows(self.v, layer, v_BTKE, self.pos))


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
        self.implementation = attention_implementation(cfg.attention_impl, dtype, cfg.n_head, cfg.n_kv_head, E,
                                                      cfg.seq_len)

    def __call__(self, x_BTD, at: Positions, *, window: int | None = None, cache: KVCache | None = None,
                 layer=0) -> tuple[jax.Array, KVCache | None]:
        """(output, cache): with a cache, this layer's keys/values are written at the rows' positions and
        the queries attend to the cache; without one, to the call's own positions (training)."""
        B, T, _ = x_BTD.shape
        H, K, E = self.n_head, self.n_kv_head, self.head_dim
        q_BTHE = constrain(self.c_q(x_BTD).reshape(B, T, H, E), ACT_HEADS)
        k_BTKE = constrain(self.c_k(x_BTD).reshape(B, T, K, E), ACT_KV_HEADS)
        v_BTKE = constrain(self.c_v(x_BTD).reshape(B, T, K, E), ACT_KV_HEADS)
        q_BTHE = rms_norm(apply_rope(q_BTHE, at.cos_BTF, at.sin_BTF))
        k_BTKE = rms_norm(apply_rope(k_BTKE, at.cos_BTF, at.sin_BTF))
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
                 layer=0) -> tuple[jax.Array, KVCache | None]:
        a_BTD, cache = self.attn(rms_norm(x_BTD), at, window=window, cache=cache, layer=layer)
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
        V, d = cfg.vocab_size, cfg.width
        self.wte = nnx.Param(jax.random.normal(rngs.params(), (V, d), param_dtype), out_sharding=("vocab", "embed"))

        @nnx.split_rngs(splits=cfg.depth)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(r):
            return Block(cfg, dtype=self.dtype, param_dtype=param_dtype, rngs=r)

        self.blocks = make_blocks(rngs)
        self.lm_head = nnx.Param(jnp.zeros((d, V), param_dtype), out_sharding=("embed", "vocab"))

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
        x_BTD = constrain(rms_norm(jnp.take(self.wte[...], tokens_BT, axis=0).astype(self.dtype)), ACT)
        x_BTD, new_cache = self._run_blocks(x_BTD, at, cache)
        if cache is None:
            return rms_norm(x_BTD)
        return rms_norm(x_BTD), new_cache._replace(pos=cache.pos + T)

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

    def logits(self, h_ND: jax.Array) -> jax.Array:
        """lm_head then the float32 softcap 15·tanh(x/15)."""
        z_NV = linear(h_ND, self.lm_head[...].astype(self.dtype), jnp.float32)
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
            z_BPV = linear(h_BPD, head_DV, jnp.float32)
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
