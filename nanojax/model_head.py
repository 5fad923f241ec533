"""The parameters nanochat HEAD (92d63d4) adds to the launch GPT, their init, and the smear.

Each is an option of `nanojax.model.GPT` (keys in `config.model`, filled by `model.family`): value embeddings
with input-dependent gates on alternating layers, per-layer `resid_lambdas` / `x0_lambdas`, the smear (each
embedding mixed with the previous token's) and the backout. Names follow HEAD's state dict: `value_embeds`
(stacked over `ModelConfig.ve_layers()`, HEAD's `value_embeds.{layer}.weight`), `ve_gate` (HEAD's
`transformer.h.{layer}.attn.ve_gate.weight`, stacked the same way), `resid_lambdas`, `x0_lambdas`,
`smear_gate`, `smear_lambda`, `backout_lambda`. Kernels are stored (in, out) as everywhere in nanojax.
"""
from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nanojax.config import FAMILIES, SMEAR_CHANNELS, VE_GATE_CHANNELS, ModelConfig


def _uniform(key, shape, lo, hi, dtype):
    return jax.random.uniform(key, shape, dtype, lo, hi)


def head_params(cfg: ModelConfig, *, param_dtype, rngs: nnx.Rngs) -> dict[str, nnx.Param]:
    """The optional parameters with HEAD's init, each present only when its option is on (so launch
    checkpoints are unchanged); the GPT holds them as attributes under these names."""
    L, V, KE = cfg.depth, cfg.padded_vocab, cfg.n_kv_head * cfg.head_dim
    s = math.sqrt(3) / math.sqrt(cfg.width)  # HEAD: uniform with the std of N(0, 1/width)
    n_ve, out = len(cfg.ve_layers()), {}
    if n_ve:
        out["value_embeds"] = nnx.Param(_uniform(rngs.params(), (n_ve, V, KE), -s, s, param_dtype),
                                        out_sharding=("layers", "vocab", "value_embed"))
        out["ve_gate"] = nnx.Param(_uniform(rngs.params(), (n_ve, VE_GATE_CHANNELS, cfg.n_kv_head), 0.0, 0.02,
                                            param_dtype), out_sharding=("layers", None, None))
    if cfg.layer_lambdas:
        ramp = jnp.arange(L, dtype=param_dtype) / max(L - 1, 1)
        out["resid_lambdas"] = nnx.Param(1.15 - 0.10 * ramp, out_sharding=("layers",))
        out["x0_lambdas"] = nnx.Param(0.20 - 0.15 * ramp, out_sharding=("layers",))
    if cfg.smear:
        out["smear_gate"] = nnx.Param(_uniform(rngs.params(), (SMEAR_CHANNELS, 1), 0.0, 0.02, param_dtype),
                                      out_sharding=(None, None))
        out["smear_lambda"] = nnx.Param(jnp.zeros((1,), param_dtype), out_sharding=(None,))
    if cfg.backout:
        out["backout_lambda"] = nnx.Param(jnp.full((1,), 0.2, param_dtype), out_sharding=(None,))
    return out


def head_init_blocks(blocks, cfg: ModelConfig, rngs: nnx.Rngs) -> None:
    """HEAD's init_weights for the stacked blocks: c_q/c_k/c_v uniform ±√3/√width, c_fc 0.4× that, both
    c_proj zero (they are zero already)."""
    s = math.sqrt(3) / math.sqrt(cfg.width)
    for module, scale in ((blocks.attn.c_q, 1.0), (blocks.attn.c_k, 1.0), (blocks.attn.c_v, 1.0),
                          (blocks.mlp.c_fc, 0.4)):
        w = module.kernel[...]
        module.kernel[...] = _uniform(rngs.params(), w.shape, -s * scale, s * scale, w.dtype)


def smear(x_BTD, prev_BTD, has_prev_BT, gate_kernel, smear_lambda, linear):
    """x + λ·sigmoid(x[..., :24]·W)·x_prev where a previous token exists (HEAD's smear; `prev` is the normed
    embedding of the token before each position)."""
    gate_BT1 = smear_lambda.astype(x_BTD.dtype) * jax.nn.sigmoid(
        linear(x_BTD[..., :SMEAR_CHANNELS], gate_kernel.astype(x_BTD.dtype)))
    return x_BTD + jnp.where(has_prev_BT[..., None], gate_BT1 * prev_BTD, 0).astype(x_BTD.dtype)


def gated_value_embedding(xn_BTD, ve_BTKE, gate_kernel, linear):
    """3·sigmoid(x[..., :12]·W) per kv head times the layer's value embedding (added to v; HEAD's ResFormer)."""
    gate_BTK = 3 * jax.nn.sigmoid(linear(xn_BTD[..., :VE_GATE_CHANNELS], gate_kernel.astype(xn_BTD.dtype)))
    return gate_BTK[..., None] * ve_BTKE


# -- nanochat HEAD state dict <-> nanojax parameters (the extras; blocks, wte, lm_head are convert.py's) --------
def head_extras_from_nanochat(sd: dict, cfg: ModelConfig) -> dict:
    """The HEAD-only entries of a nanochat state dict as nanojax's pure-dict parameters (torch (out, in) ->
    (in, out))."""
    out = {}
    ve_layers = cfg.ve_layers()
    if ve_layers:
        out["value_embeds"] = np.stack([sd[f"value_embeds.{i}.weight"] for i in ve_layers])
        out["ve_gate"] = np.stack([sd[f"transformer.h.{i}.attn.ve_gate.weight"].T for i in ve_layers])
    if cfg.layer_lambdas:
        out["resid_lambdas"], out["x0_lambdas"] = sd["resid_lambdas"], sd["x0_lambdas"]
    if cfg.smear:
        out["smear_gate"], out["smear_lambda"] = sd["smear_gate.weight"].T, sd["smear_lambda"]
    if cfg.backout:
        out["backout_lambda"] = sd["backout_lambda"]
    return out


def head_extra_keys(cfg: ModelConfig) -> set[str]:
    """The state-dict keys HEAD has beyond the launch model's, for this config's options."""
    keys = {f"value_embeds.{i}.weight" for i in cfg.ve_layers()}
    keys |= {f"transformer.h.{i}.attn.ve_gate.weight" for i in cfg.ve_layers()}
    keys |= {"resid_lambdas", "x0_lambdas"} if cfg.layer_lambdas else set()
    keys |= {"smear_gate.weight", "smear_lambda"} if cfg.smear else set()
    return keys | ({"backout_lambda"} if cfg.backout else set())


def nanochat_head_to_params(state_dict: dict, cfg: ModelConfig) -> dict:
    """A whole nanochat HEAD state dict -> nanojax's pure-dict parameters (launch keys via convert.py)."""
    from nanojax import convert  # lazy: convert is a tool-side module

    sd = {re.sub(r"^_orig_mod\.", "", k): np.asarray(v, np.float32) for k, v in state_dict.items()}
    extra = head_extra_keys(cfg)
    missing = sorted(extra - set(sd))
    if missing:
        raise ValueError(f"nanochat state dict lacks {missing} of a HEAD GPT with this config")
    launch = {k: v for k, v in sd.items() if k not in extra}  # convert.py rejects anything unexpected
    return {**convert.nanochat_to_params(launch, cfg.depth), **head_extras_from_nanochat(sd, cfg)}


def head_extras_to_nanochat(params: dict) -> dict:
    """Inverse of `head_extras_from_nanochat` for whichever extras `params` holds (torch layout)."""
    depth = np.asarray(params["blocks"]["attn"]["c_q"]["kernel"]).shape[0]
    out = {}
    if "value_embeds" in params:
        ve_layers = [i for i in range(depth) if i % 2 == (depth - 1) % 2]
        for j, i in enumerate(ve_layers):
            out[f"value_embeds.{i}.weight"] = np.asarray(params["value_embeds"][j])
            out[f"transformer.h.{i}.attn.ve_gate.weight"] = np.asarray(params["ve_gate"][j]).T
    for name in ("resid_lambdas", "x0_lambdas", "smear_lambda", "backout_lambda"):
        if name in params:
            out[name] = np.asarray(params[name])
    if "smear_gate" in params:
        out["smear_gate.weight"] = np.asarray(params["smear_gate"]).T
    return out


def nanochat_family(cfg: ModelConfig) -> str:
    """'launch' or 'head': the nanochat version whose GPT this config is (ValueError for a mix of options that
    neither version has, which therefore cannot be written as a nanochat checkpoint)."""
    for family, preset in FAMILIES.items():
        same = all(getattr(cfg, k) == v for k, v in preset.items() if k != "window_pattern")
        if same and (family == "head" or set(cfg.window_pattern) == {"L"}):
            return family
    raise ValueError(f"model options {({k: getattr(cfg, k) for k in FAMILIES['head']})} are neither nanochat's "
                     f"launch nor its HEAD model: no nanochat checkpoint can hold them")
