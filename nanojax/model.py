"""nanochat's launch GPT (commit 3a5e0bc) in Flax NNX, and its masked cross-entropy.

Parameter names follow nanochat's state dict (`wte`, `blocks.attn.c_q`, …, `lm_head`) so conversion is a
rename plus a transpose. Kernels are stored (in, out); block parameters are stacked on a leading `layers`
axis whether the layers run under `nnx.scan` or a Python loop, so both modes share checkpoints.
Every parameter carries logical axis names; `nanojax.sharding` maps them onto the mesh.
"""
from __future__ import annotations

import functools
import math
import warnings

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from nanojax.sharding import constrain

Dtype = jnp.dtype


# logical axes of activations (the batch is split over data × fsdp; heads / MLP hidden over tensor)
ACT = ("batch", None, None)
ACT_HEADS = ("batch", None, "heads", None)
ACT_KV_HEADS = ("batch", None, "kv_heads", None)
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


def rope_tables(seq_len: int, head_dim: int, base: float, dtype: Dtype) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape (T, head_dim/2), computed in float32 and cast to the compute dtype (as nanochat)."""
    inv_freq = 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs_TF = jnp.outer(jnp.arange(seq_len, dtype=jnp.float32), inv_freq)
    return jnp.cos(freqs_TF).astype(dtype), jnp.sin(freqs_TF).astype(dtype)


def apply_rope(x_BTHD: jax.Array, cos_TF: jax.Array, sin_TF: jax.Array) -> jax.Array:
    """Rotate-half RoPE exactly as nanochat launch: halves (x1, x2) -> (x1·cos + x2·sin, −x1·sin + x2·cos)."""
    d = x_BTHD.shape[-1] // 2
    x1, x2 = x_BTHD[..., :d], x_BTHD[..., d:]
    cos, sin = cos_TF[None, :, None, :], sin_TF[None, :, None, :]
    return jnp.concatenate([x1 * cos + x2 * sin, x1 * (-sin) + x2 * cos], axis=-1)


@functools.lru_cache(maxsize=None)
def _cudnn_attention_works(dtype_name: str, n_head: int, n_kv_head: int, head_dim: int) -> bool:
    """Compile a small causal cuDNN attention once: old cuDNN/driver or unsupported shapes fall back to XLA."""
    try:
        q = jax.ShapeDtypeStruct((1, 128, n_head, head_dim), jnp.dtype(dtype_name))
        kv = jax.ShapeDtypeStruct((1, 128, n_kv_head, head_dim), jnp.dtype(dtype_name))
        fn = functools.partial(jax.nn.dot_product_attention, is_causal=True, implementation="cudnn")
        jax.jit(jax.grad(lambda a, b, c: fn(a, b, c).astype(jnp.float32).sum(), argnums=(0, 1, 2))).lower(
            q, kv, kv).compile()
        return True
    except Exception as e:  # noqa: BLE001 - any failure means "use the portable path"
        warnings.warn(f"cuDNN attention unavailable ({type(e).__name__}: {str(e)[:200]}); using XLA's attention "
                      f"(more memory: consider --config.model.remat=full)", stacklevel=2)
        return False


def attention_implementation(name: str, dtype: Dtype, n_head: int = 1, n_kv_head: int = 1,
                             head_dim: int = 128) -> str | None:
    """'auto': cuDNN flash attention on GPU in 16-bit when it compiles there, XLA's reference otherwise."""
    if name == "auto":
        if jax.default_backend() == "gpu" and jnp.dtype(dtype).itemsize == 2 and \
                _cudnn_attention_works(jnp.dtype(dtype).name, n_head, n_kv_head, head_dim):
            return "cudnn"
        return None
    if name not in ("xla", "cudnn"):
        raise ValueError(f"model.attention_impl={name!r}: expected auto, xla or cudnn")
    return None if name == "xla" else name


def resolve_remat(cfg, dtype: Dtype) -> str:
    """'auto': recompute whole blocks only where attention is XLA's on an accelerator (its T² scores would
    otherwise be stored for every layer: ~350 GiB/device for d20 at batch 32, 29 GiB with full remat)."""
    if cfg.remat != "auto":
        return cfg.remat
    if jax.default_backend() == "cpu":
        return "none"
    impl = attention_implementation(cfg.attention_impl, dtype, cfg.n_head, cfg.n_kv_head, cfg.head_dim)
    return "none" if impl == "cudnn" else "full"


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
        return jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))


class Attention(nnx.Module):
    def __init__(self, cfg, *, dtype, param_dtype, rngs):
        d, hd = cfg.width, cfg.head_dim
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, hd
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.c_q = Dense(d, cfg.n_head * hd, ("embed", "heads"), **kw)
        self.c_k = Dense(d, cfg.n_kv_head * hd, ("embed", "kv_heads"), **kw)
        self.c_v = Dense(d, cfg.n_kv_head * hd, ("embed", "kv_heads"), **kw)
        self.c_proj = Dense(cfg.n_head * hd, d, ("heads", "embed"), zero_init=True, **kw)
        self.implementation = attention_implementation(cfg.attention_impl, dtype, cfg.n_head, cfg.n_kv_head, hd)

    def __call__(self, x_BTD, cos_TF, sin_TF):
        B, T, _ = x_BTD.shape
        q_BTHD = constrain(self.c_q(x_BTD).reshape(B, T, self.n_head, self.head_dim), ACT_HEADS)
        k_BTKD = constrain(self.c_k(x_BTD).reshape(B, T, self.n_kv_head, self.head_dim), ACT_KV_HEADS)
        v_BTKD = constrain(self.c_v(x_BTD).reshape(B, T, self.n_kv_head, self.head_dim), ACT_KV_HEADS)
        q_BTHD = rms_norm(apply_rope(q_BTHD, cos_TF, sin_TF))
        k_BTKD = rms_norm(apply_rope(k_BTKD, cos_TF, sin_TF))
        y_BTHD = jax.nn.dot_product_attention(
            q_BTHD, k_BTKD, v_BTKD, scale=1.0 / math.sqrt(self.head_dim), is_causal=True,
            implementation=self.implementation,
        )
        return self.c_proj(y_BTHD.reshape(B, T, self.n_head * self.head_dim))


class MLP(nnx.Module):
    def __init__(self, cfg, *, dtype, param_dtype, rngs):
        d, hidden = cfg.width, cfg.mlp_ratio * cfg.width
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.c_fc = Dense(d, hidden, ("embed", "mlp"), **kw)
        self.c_proj = Dense(hidden, d, ("mlp", "embed"), zero_init=True, **kw)

    def __call__(self, x_BTD):
        return self.c_proj(constrain(jnp.square(jax.nn.relu(self.c_fc(x_BTD))), ACT_MLP))


class Block(nnx.Module):
    def __init__(self, cfg, *, dtype, param_dtype, rngs):
        self.attn = Attention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mlp = MLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x_BTD, cos_TF, sin_TF):
        x_BTD = constrain(x_BTD + self.attn(rms_norm(x_BTD), cos_TF, sin_TF), ACT)
        return constrain(x_BTD + self.mlp(rms_norm(x_BTD)), ACT)


_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class GPT(nnx.Module):
    """`GPT(config.model, rngs=nnx.Rngs(seed))`; `model(tokens_BT) -> logits_BTV` (float32, softcapped)."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        from nanojax.config import fill_model_sizes

        cfg = ml_collections.FrozenConfigDict(fill_model_sizes(ml_collections.ConfigDict(cfg)))
        self.cfg = cfg  # frozen: static module attributes must be hashable
        with nnx.use_eager_sharding(False):  # parameters carry logical names; placement is sharding.py's job
            self._build(cfg, rngs)

    def _build(self, cfg, rngs):
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

    # -- trunk -----------------------------------------------------------------------------------
    def hidden(self, tokens_BT: jax.Array) -> jax.Array:
        """Final-normed hidden states (B, T, D) in the compute dtype."""
        cfg = self.cfg
        T = tokens_BT.shape[1]
        if T > cfg.seq_len:
            raise ValueError(f"sequence of length {T} is longer than model.seq_len={cfg.seq_len}")
        cos_TF, sin_TF = rope_tables(T, cfg.head_dim, cfg.rope_base, self.dtype)
        x_BTD = constrain(rms_norm(jnp.take(self.wte[...], tokens_BT, axis=0).astype(self.dtype)), ACT)

        def block_fn(block, x):
            return block(x, cos_TF, sin_TF)

        if self.remat != "none":
            block_fn = nnx.remat(block_fn, policy=_REMAT_POLICIES[self.remat], prevent_cse=not cfg.scan_layers)

        if cfg.scan_layers:
            @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
            def run(block, x):
                return block_fn(block, x)

            x_BTD = run(self.blocks, x_BTD)
        else:
            graphdef, state = nnx.split(self.blocks)
            for i in range(cfg.depth):
                block = nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state))
                x_BTD = block_fn(block, x_BTD)
        return rms_norm(x_BTD)

    def logits(self, h_ND: jax.Array) -> jax.Array:
        """lm_head then the float32 softcap 15·tanh(x/15)."""
        z = jnp.dot(h_ND, self.lm_head[...].astype(self.dtype), preferred_element_type=jnp.float32)
        cap = self.cfg.softcap
        return cap * jnp.tanh(z.astype(jnp.float32) / cap)

    def __call__(self, tokens_BT: jax.Array) -> jax.Array:
        return self.logits(self.hidden(tokens_BT))

    # -- loss --------------------------------------------------------------------------------------
    def token_losses(self, tokens_BT: jax.Array, targets_BT: jax.Array) -> jax.Array:
        """Per-token cross-entropy (nats, float32, shape (B, T)); 0 where the target is −1.

        Logits are computed `loss_chunk_size` positions of every row at a time under a rematerialised scan,
        so neither pass holds float32 logits for the whole batch (17 GB at d20, 32×2048). Chunks run along
        the sequence, never the batch: the batch axis stays sharded over the data-parallel devices.
        """
        B, T = tokens_BT.shape
        h_BTD = self.hidden(tokens_BT)
        K = max(1, min(self.cfg.loss_chunk_size, T))
        pad = (-T) % K
        y_BT = targets_BT
        if pad:
            h_BTD = jnp.pad(h_BTD, ((0, 0), (0, pad), (0, 0)))
            y_BT = jnp.pad(y_BT, ((0, 0), (0, pad)), constant_values=-1)
        C = (T + pad) // K
        h_CBKD = jnp.moveaxis(h_BTD.reshape(B, C, K, -1), 1, 0)
        y_CBK = jnp.moveaxis(y_BT.reshape(B, C, K), 1, 0)
        head = self.lm_head[...].astype(self.dtype)
        cap = self.cfg.softcap

        @jax.checkpoint
        def chunk_loss(h_BKD, y_BK):
            z_BKV = jnp.einsum("bkd,dv->bkv", h_BKD, head, preferred_element_type=jnp.float32)
            z_BKV = constrain(z_BKV, ("batch", None, "vocab"))
            z_BKV = cap * jnp.tanh(z_BKV / cap)
            lse_BK = jax.nn.logsumexp(z_BKV, axis=-1)
            picked_BK = jnp.take_along_axis(z_BKV, jnp.maximum(y_BK, 0)[..., None], axis=-1)[..., 0]
            return jnp.where(y_BK >= 0, lse_BK - picked_BK, 0.0)

        _, loss_CBK = jax.lax.scan(lambda c, xs: (c, chunk_loss(*xs)), None, (h_CBKD, y_CBK))
        return jnp.moveaxis(loss_CBK, 0, 1).reshape(B, C * K)[:, :T]

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


def mean_loss(model: GPT, tokens_BT, targets_BT) -> jax.Array:
    """Cross-entropy averaged over counted tokens (targets of −1 ignored), as F.cross_entropy(ignore_index=-1)."""
    total, count = model.loss(tokens_BT, targets_BT)
    return total / jnp.maximum(count, 1.0)
