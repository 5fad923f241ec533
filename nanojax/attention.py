"""Causal attention behind one function, with three backends chosen per platform by `model.attention_impl`.

- `xla`: XLA's reference (`jax.nn.dot_product_attention`): stores B·H·T² scores per layer, runs everywhere.
- `cudnn`: cuDNN flash attention on GPU (the same jax.nn call, fused), sliding windows included.
- `splash`: the Pallas splash-attention kernel on TPU (causal or local block-sparse masks, GQA as MQA per kv
  head), run per shard under `shard_map` so the batch and heads stay split over the mesh. Off TPU it runs in
  Pallas interpret mode, which is how the tests check it on CPU.

`auto` picks cuDNN on a 16-bit GPU when a probe compiles, splash on TPU when the shapes tile, XLA otherwise.
Decoding against a KV cache (`cached_attention`) always uses the explicit-mask path: its queries are few.
A window w lets query t see keys t−w … t (nanochat's flash-attention `window_size=(w, 0)`); None sees all.
"""
from __future__ import annotations

import functools
import math
import warnings

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from nanojax.sharding import logical_to_spec

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")
SPLASH_BLOCKS = (512, 256, 128)  # largest first: the kernel's tile along the sequence must divide T

# logical axes of attention inputs (the same names model.py pins them with)
ACT_HEADS = ("batch", None, "heads", None)
ACT_KV_HEADS = ("batch", None, "kv_heads", None)


# -- choosing ------------------------------------------------------------------------------------------
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
                      f"(more memory: remat=auto will recompute more)", stacklevel=2)
        return False


def splash_block(seq_len: int) -> int | None:
    """The kernel's sequence tile for this length (None: no tile divides it, splash cannot run)."""
    return next((b for b in SPLASH_BLOCKS if seq_len % b == 0), None)


def attention_implementation(name: str, dtype, n_head: int = 1, n_kv_head: int = 1, head_dim: int = 128,
                             seq_len: int = 2048) -> str:
    """The backend `name` resolves to on this platform: 'xla', 'cudnn' or 'splash'."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"model.attention_impl={name!r}: expected one of {', '.join(IMPLEMENTATIONS)}")
    if name != "auto":
        return name
    backend = jax.default_backend()
    if backend == "gpu" and jnp.dtype(dtype).itemsize == 2 and \
            _cudnn_attention_works(jnp.dtype(dtype).name, n_head, n_kv_head, head_dim):
        return "cudnn"
    if backend == "tpu" and splash_block(seq_len) is not None and head_dim % 128 == 0:
        return "splash"
    return "xla"


# -- the one training/prefill attention -----------------------------------------------------------------
def causal_attention(q_BTHE, k_BTKE, v_BTKE, window: int | None, implementation: str = "xla") -> jax.Array:
    """Queries and keys are the same T positions (training, evaluation): the chosen backend."""
    if implementation == "splash":
        return splash_attention(q_BTHE, k_BTKE, v_BTKE, window)
    return jax.nn.dot_product_attention(
        q_BTHE, k_BTKE, v_BTKE, scale=1.0 / math.sqrt(q_BTHE.shape[-1]), is_causal=True,
        local_window_size=None if window is None else (window, 0),
        implementation=None if implementation == "xla" else implementation)


def cached_attention(q_BTHE, k_BKSE, v_BKSE, pos_BT, window: int | None) -> jax.Array:
    """Queries at pos_BT against a row's cache slots: slot s is visible to query t when
    pos_BT[b, t] − window <= s <= pos_BT[b, t] (padding past a row's end is never attended)."""
    B, T, H, E = q_BTHE.shape
    K, S = k_BKSE.shape[1], k_BKSE.shape[2]
    slot_S = jnp.arange(S)
    visible_BTS = slot_S[None, None, :] <= pos_BT[:, :, None]
    if window is not None:
        visible_BTS &= slot_S[None, None, :] >= pos_BT[:, :, None] - window
    dtype = q_BTHE.dtype
    q_BKGTE = q_BTHE.reshape(B, T, K, H // K, E).transpose(0, 2, 3, 1, 4)
    att_BKGTS = jnp.einsum("bkgte,bkse->bkgts", q_BKGTE, k_BKSE.astype(dtype), preferred_element_type=jnp.float32)
    att_BKGTS = jnp.where(visible_BTS[:, None, None], att_BKGTS / math.sqrt(E), -jnp.inf)
    att_BKGTS = jax.nn.softmax(att_BKGTS, axis=-1).astype(dtype)
    y_BKGTE = jnp.einsum("bkgts,bkse->bkgte", att_BKGTS, v_BKSE.astype(dtype))
    return y_BKGTE.transpose(0, 3, 1, 2, 4).reshape(B, T, H, E)


# -- splash (TPU) ----------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _splash_kernel(seq_len: int, window: int | None, group: int, interpret: bool):
    """One MQA kernel (a kv head and its `group` query heads); the mask's block sparsity is worked out once."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa  # Pallas: only where splash is used

    shape = (seq_len, seq_len)
    mask = sa.CausalMask(shape) if window is None else sa.LocalMask(shape, (window, 0), offset=0)
    b = splash_block(seq_len)
    if b is None:
        raise ValueError(f"splash attention needs a sequence length divisible by one of {SPLASH_BLOCKS}, "
                         f"got {seq_len}: use --config.model.attention_impl=xla")
    blocks = sa.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                           block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    with jax.ensure_compile_time_eval():  # concrete mask tables, so the cached kernel outlives any trace
        return sa.make_splash_mqa_single_device(sa.MultiHeadMask([mask] * group), block_sizes=blocks,
                                                interpret=interpret)


def _splash_local(q_BTHE, k_BTKE, v_BTKE, window: int | None) -> jax.Array:
    """Splash on arrays local to one device: vmapped over rows and kv heads."""
    B, T, H, E = q_BTHE.shape
    K = k_BTKE.shape[2]
    kernel = _splash_kernel(T, window, H // K, jax.default_backend() != "tpu")
    q_BKGTE = (q_BTHE / math.sqrt(E)).reshape(B, T, K, H // K, E).transpose(0, 2, 3, 1, 4)
    k_BKTE, v_BKTE = k_BTKE.transpose(0, 2, 1, 3), v_BTKE.transpose(0, 2, 1, 3)
    y_BKGTE = jax.vmap(jax.vmap(kernel))(q_BKGTE, k_BKTE, v_BKTE)
    return y_BKGTE.transpose(0, 3, 1, 2, 4).reshape(B, T, H, E).astype(q_BTHE.dtype)


def splash_attention(q_BTHE, k_BTKE, v_BTKE, window: int | None) -> jax.Array:
    """Splash per shard: rows split as the batch is, heads split over `tensor` only when both the query and
    the kv heads divide (a kv head must sit with its query heads); a no-mesh call runs on the whole arrays."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return _splash_local(q_BTHE, k_BTKE, v_BTKE, window)
    q_spec = logical_to_spec(ACT_HEADS, q_BTHE.shape, mesh)
    kv_spec = logical_to_spec(ACT_KV_HEADS, k_BTKE.shape, mesh)
    if q_spec[2] != kv_spec[2]:
        q_spec, kv_spec = P(q_spec[0], None, None, None), P(kv_spec[0], None, None, None)
    fn = jax.shard_map(functools.partial(_splash_local, window=window), in_specs=(q_spec, kv_spec, kv_spec),
                       out_specs=q_spec, check_vma=False)
    return fn(q_BTHE, k_BTKE, v_BTKE)
