"""nanochat's launch optimizer in Optax: Muon for every block matrix, AdamW for the embedding and lm_head.

Groups are assigned from parameter paths with an exhaustive check, so a new parameter can never land in
the wrong optimizer silently. Schedules (LR multiplier, Muon momentum) are functions of the step count kept
in the optimizer state, so nothing recompiles as they change and a restored state continues exactly.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from nanojax.config import ModelConfig
from nanojax.model import param_name

# -- schedules ---------------------------------------------------------------------------------------


def lr_multiplier(step, num_iterations: int, warmup_ratio: float, warmdown_ratio: float, final_lr_frac: float):
    """nanochat base_train: linear warmup, constant, linear warmdown to `final_lr_frac` (step is 0-based)."""
    return lr_multiplier_steps(step, num_iterations, round(warmup_ratio * num_iterations),
                               round(warmdown_ratio * num_iterations), final_lr_frac)


def lr_multiplier_steps(step, num_iterations: int, warmup: int, warmdown: int, final_lr_frac: float):
    """The same schedule with warmup and warmdown given in steps (nanochat HEAD's warmup is a step count)."""
    step = jnp.asarray(step, jnp.float32)
    ramp = (step + 1) / max(warmup, 1)
    progress = (num_iterations - step) / max(warmdown, 1)
    down = progress + (1 - progress) * final_lr_frac
    out = jnp.where(step <= num_iterations - warmdown, 1.0, down)
    return jnp.where(step < warmup, ramp, out)


def muon_momentum(step, start: float, end: float, warmup_steps: int):
    """Linear from `start` to `end` over the first `warmup_steps` steps, then held."""
    frac = jnp.minimum(jnp.asarray(step, jnp.float32) / max(warmup_steps, 1), 1.0)
    return (1 - frac) * start + frac * end


# -- Muon -------------------------------------------------------------------------------------------


def newton_schulz(G: jax.Array, coeffs, steps: int, dtype) -> jax.Array:
    """Quintic Newton–Schulz orthogonalisation over the last two axes (any leading batch axes).

    Follows nanochat's `zeropower_via_newtonschulz5` step for step, on the torch (out, in) layout:
    cast, transpose tall matrices, divide by the Frobenius norm + 1e-7, iterate X ← aX + (bA + cA²)X.
    """
    a, b, c = coeffs
    X = G.astype(dtype)
    tall = G.shape[-2] > G.shape[-1]
    if tall:
        X = jnp.swapaxes(X, -1, -2)
    norm = jnp.sqrt(jnp.sum(jnp.square(X.astype(jnp.float32)), axis=(-2, -1), keepdims=True))
    X = X / (norm + 1e-7).astype(dtype)
    def mm(x, y):  # products accumulate in float32 and round to `dtype`, as bf16 matmuls do on a GPU;
        return jnp.matmul(x, y, preferred_element_type=jnp.float32).astype(dtype)  # 2.5x faster on CPU

    for _ in range(steps):
        A = mm(X, jnp.swapaxes(X, -1, -2))
        B = b * A + c * mm(A, A)
        X = a * X + mm(B, X)
    if tall:
        X = jnp.swapaxes(X, -1, -2)
    return X


class MuonState(NamedTuple):
    count: jax.Array
    momentum: Any


def scale_by_muon(momentum_schedule, ns_coeffs, ns_steps: int, ns_dtype) -> optax.GradientTransformation:
    """Nesterov momentum → Newton–Schulz → × √max(1, out/in); the learning rate is applied after.

    Kernels are stored (in, out); the orthogonalisation runs on the transpose so that every operation,
    including which side is "tall", is the one nanochat's (out, in) torch weights see.
    """

    def init_fn(params):
        return MuonState(jnp.zeros([], jnp.int32), jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params))

    def update_fn(updates, state, params=None):
        del params
        beta = momentum_schedule(state.count)

        def one(g, buf):
            g = g.astype(jnp.float32)
            buf = buf + (1 - beta) * (g - buf)  # buf.lerp_(g, 1 - beta)
            g = g + beta * (buf - g)  # Nesterov: g.lerp_(buf, beta)
            G_torch = jnp.swapaxes(g, -1, -2)  # (out, in)
            O = newton_schulz(G_torch, ns_coeffs, ns_steps, ns_dtype)
            scale = max(1.0, G_torch.shape[-2] / G_torch.shape[-1]) ** 0.5
            return jnp.swapaxes(O, -1, -2).astype(jnp.float32) * scale, buf

        pairs = jax.tree.map(one, updates, state.momentum)
        is_pair = lambda x: isinstance(x, tuple) and len(x) == 2  # noqa: E731
        new_updates = jax.tree.map(lambda p: p[0], pairs, is_leaf=is_pair)
        new_momentum = jax.tree.map(lambda p: p[1], pairs, is_leaf=is_pair)
        return new_updates, MuonState(optax.safe_increment(state.count), new_momentum)

    return optax.GradientTransformation(init_fn, update_fn)


# -- clipping ---------------------------------------------------------------------------------------


def clip_by_global_norm_torch(max_norm: float) -> optax.GradientTransformation:
    """torch.nn.utils.clip_grad_norm_: scale by max_norm / (norm + 1e-6) when that is below 1."""

    def update_fn(updates, state, params=None):
        del params
        norm = optax.tree.norm(updates)
        coef = jnp.minimum(1.0, max_norm / (norm + 1e-6))
        return jax.tree.map(lambda g: (g * coef).astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)


# -- parameter groups -------------------------------------------------------------------------------

GROUPS = ("muon", "embedding", "unembedding")


def group_of(name: str, ndim: int) -> str:
    if name == "wte":
        return "embedding"
    if name == "lm_head":
        return "unembedding"
    if name.startswith("blocks.") and ndim >= 2:
        return "muon"
    # nanochat HEAD's extras, on the launch optimizer's AdamW groups until HEAD's optimizer gives them their own
    # (nanojax.optim_head): lookup tables with the embedding; gates and per-layer scalars never on Muon
    if name in ("value_embeds", "ve_gate", "resid_lambdas", "x0_lambdas", "smear_gate", "smear_lambda",
                "backout_lambda"):
        return "embedding"
    raise ValueError(f"parameter {name!r} (ndim {ndim}) belongs to no optimizer group; add it to optim.group_of")


def param_labels(params):
    return jax.tree_util.tree_map_with_path(lambda p, x: group_of(param_name(p), x.ndim), params)


def base_lrs(config) -> dict[str, float]:
    """Each group's peak learning rate: AdamW groups scaled by (width/768)^-0.5 as nanochat, all × lr_scale."""
    o = config.optim
    width_scale = (ModelConfig.of(config.model).width / 768) ** -0.5 if o.scale_lr_by_width else 1.0
    return {"muon": o.matrix_lr * o.lr_scale, "embedding": o.embedding_lr * width_scale * o.lr_scale,
            "unembedding": o.unembedding_lr * width_scale * o.lr_scale}


def build_optimizer(config, num_iterations: int) -> optax.GradientTransformation:
    """The full optimizer: torch-style global-norm clip, then Muon / AdamW per group, with schedules.
    `optim.kind="head"` is nanochat HEAD's MuonAdamW instead (nanojax.optim_head)."""
    if config.optim.get("kind", "launch") == "head":
        from nanojax.optim_head import build_head_optimizer  # imports this module

        return build_head_optimizer(config, num_iterations)
    o, t = config.optim, config.train
    lrs = base_lrs(config)

    def schedule(base_lr):
        return lambda count: base_lr * lr_multiplier(
            count, num_iterations, t.warmup_ratio, t.warmdown_ratio, t.final_lr_frac
        )

    def adamw(lr):
        parts = [optax.scale_by_adam(b1=o.adam_b1, b2=o.adam_b2, eps=o.adam_eps)]
        if o.weight_decay:
            parts.append(optax.add_decayed_weights(o.weight_decay))
        parts.append(optax.scale_by_learning_rate(schedule(lr)))
        return optax.chain(*parts)

    muon = optax.chain(
        scale_by_muon(
            lambda c: muon_momentum(c, o.muon_momentum_start, o.muon_momentum_end, o.muon_momentum_warmup_steps),
            tuple(o.ns_coeffs), o.ns_steps, jnp.dtype(o.ns_dtype),
        ),
        optax.scale_by_learning_rate(schedule(lrs["muon"])),
    )
    groups = {"muon": muon, "embedding": adamw(lrs["embedding"]), "unembedding": adamw(lrs["unembedding"])}
    parts = []
    if t.grad_clip and t.grad_clip > 0:
        parts.append(clip_by_global_norm_torch(t.grad_clip))
    parts.append(optax.multi_transform(groups, param_labels))
    return optax.chain(*parts)


def current_lrs(config, num_iterations: int, step: int) -> dict[str, float]:
    """Each group's learning rate at `step` (for the log)."""
    if config.optim.get("kind", "launch") == "head":
        from nanojax.optim_head import current_head_lrs

        return current_head_lrs(config, num_iterations, step)
    t = config.train
    mult = float(lr_multiplier(step, num_iterations, t.warmup_ratio, t.warmdown_ratio, t.final_lr_frac))
    return {f"lr_{'matrix' if group == 'muon' else group}": lr * mult for group, lr in base_lrs(config).items()}


def current_muon_momentum(config, num_iterations: int, step: int) -> float:
    """Muon's momentum at `step` (for the log), by the recipe's own schedule."""
    o = config.optim
    if o.get("kind", "launch") == "head":
        from nanojax.optim_head import current_head_muon_momentum

        return current_head_muon_momentum(config, num_iterations, step)
    return float(muon_momentum(step, o.muon_momentum_start, o.muon_momentum_end, o.muon_momentum_warmup_steps))
