"""nanochat HEAD (92d63d4)'s optimizer, MuonAdamW, in Optax, with HEAD's schedules and depth scaling.

HEAD (nanochat/optim.py, grouped by `GPT.setup_optimizer`, scheduled and scaled by scripts/base_train.py) puts
every matrix inside the blocks, value-embedding gates included, on Muon: Nesterov momentum, MuonEq row
equilibration, Polar Express orthogonalisation, Muon+ renormalisation, NorMuon variance reduction and cautious
weight decay on a cosine schedule. Six AdamW groups with their own betas, LRs and decay take the rest (lm_head,
wte, value_embeds, resid_lambdas, x0_lambdas, smear/backout scalars). No gradient clipping.

HEAD stacks same-shape matrices only to batch them: every operation is per matrix, and nanojax's parameters are
already stacked over layers, so the same math over the last two axes is the whole trick. Orthogonalisation runs
in torch's (out, in) layout (nanojax stores kernels (in, out)), so "rows", "tall" and the reduced axis of the
variance are the ones HEAD sees. Selected by `optim.kind="head"` (nanojax.optim.build_optimizer).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from nanojax.config import ModelConfig
from nanojax.data.kinds import EPOCH_KINDS, canonical_kind
from nanojax.model import GPT, param_name
from nanojax.optim import clip_by_global_norm_torch, lr_multiplier_steps

# -- parameter groups -------------------------------------------------------------------------------

GROUPS = ("muon", "unembedding", "embedding", "value_embeds", "resid", "x0", "smear")
ADAMW = {  # HEAD's GPT.setup_optimizer: (beta1, beta2), weight decay; eps 1e-10 for all
    "unembedding": ((0.8, 0.96), 0.01),
    "embedding": ((0.8, 0.995), 0.001),
    "value_embeds": ((0.8, 0.995), 0.01),
    "resid": ((0.8, 0.95), 0.05),
    "x0": ((0.96, 0.95), 0.0),
    "smear": ((0.8, 0.95), 0.0),
}
ADAM_EPS = 1e-10
SMEAR_LR = 0.2  # a constant in HEAD: not scaled by width or batch
_BY_NAME = {"wte": "embedding", "lm_head": "unembedding", "value_embeds": "value_embeds", "ve_gate": "muon",
            "resid_lambdas": "resid", "x0_lambdas": "x0", "smear_gate": "smear", "smear_lambda": "smear",
            "backout_lambda": "smear"}


def head_group_of(name: str, ndim: int) -> str:
    """HEAD's group of a nanojax parameter; `ve_gate` lives in HEAD's transformer.h, hence on Muon."""
    if name in _BY_NAME:
        return _BY_NAME[name]
    if name.startswith("blocks.") and ndim >= 2:
        return "muon"
    raise ValueError(f"parameter {name!r} (ndim {ndim}) belongs to no optimizer group of HEAD's MuonAdamW; "
                     f"add it to optim_head.head_group_of")


def head_param_labels(params):
    return jax.tree_util.tree_map_with_path(lambda p, x: head_group_of(param_name(p), x.ndim), params)


# -- Muon, HEAD's muon_step_fused, on (..., rows, cols) = torch (out, in) ------------------------------

POLAR_EXPRESS_COEFFS = (  # arXiv 2505.16932, num_iters=5, safety_factor=2e-2, cushion=2 (HEAD's table)
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


def _frobenius(x):
    return jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=(-2, -1), keepdims=True))


def row_equilibrate(X):
    """MuonEq: every row rescaled to the matrix's mean row norm (‖X‖_F / √rows)."""
    target = _frobenius(X) / X.shape[-2] ** 0.5
    row_norm = jnp.sqrt(jnp.sum(jnp.square(X.astype(jnp.float32)), axis=-1, keepdims=True))
    return X * (target / jnp.maximum(row_norm, 1e-6)).astype(X.dtype)


def polar_express(X, steps: int):
    """Polar Express: X/(1.01‖X‖+1e-6), then per-step quintic coefficients; tall matrices iterate on XᵀX.
    Products accumulate in float32 and round to X's dtype (bf16 GPU matmul semantics, as newton_schulz)."""
    dtype = X.dtype

    def mm(x, y):
        return jnp.matmul(x, y, preferred_element_type=jnp.float32).astype(dtype)

    X = X / (_frobenius(X).astype(dtype) * 1.01 + 1e-6)
    tall = X.shape[-2] > X.shape[-1]
    for a, b, c in POLAR_EXPRESS_COEFFS[:steps]:
        if tall:
            A = mm(jnp.swapaxes(X, -1, -2), X)
            X = a * X + mm(X, b * A + c * mm(A, A))
        else:
            A = mm(X, jnp.swapaxes(X, -1, -2))
            X = a * X + mm(b * A + c * mm(A, A), X)
    return X


def renormalise(g):
    """Muon+: Frobenius norm snapped to √min(rows, cols), that of an exactly semi-orthogonal matrix."""
    target = min(g.shape[-2], g.shape[-1]) ** 0.5
    return g * (target / jnp.maximum(_frobenius(g), 1e-6))


def variance_reduction(g, v, beta2):
    """NorMuon: per-row (rows ≥ cols) or per-column second moment `v`, rescaled to keep ‖g‖_F. → (g, v)."""
    axis = -1 if g.shape[-2] >= g.shape[-1] else -2
    n = g.shape[axis]
    v_mean = jnp.mean(jnp.square(g), axis=axis, keepdims=True)
    v_norm = jnp.sqrt(jnp.sum(v_mean, axis=(-2, -1), keepdims=True) * n)
    v = v + (1 - beta2) * (v_mean - v)
    step = jax.lax.rsqrt(jnp.maximum(v, 1e-10))
    v_norm_new = jnp.sqrt(jnp.sum(v_mean * n * jnp.square(step), axis=(-2, -1), keepdims=True))
    return g * (step * (v_norm / jnp.maximum(v_norm_new, 1e-10))), v


def second_moment_shape(shape) -> tuple[int, ...]:
    """NorMuon's state in nanojax's (..., in, out) layout: (..., 1, out) when out ≥ in, else (..., in, 1)."""
    *lead, cols, rows = shape
    return (*lead, 1, rows) if rows >= cols else (*lead, cols, 1)


class MuonHeadState(NamedTuple):
    count: jax.Array
    momentum: Any
    second_momentum: Any


def muon_head(lr_schedule, momentum_schedule, weight_decay_schedule, beta2: float, ns_steps: int,
              ns_dtype) -> optax.GradientTransformation:
    """The whole Muon step, LR and cautious weight decay included (decay needs the update's sign):
    p ← p − lr·√max(1, out/in)·(u + wd·p·[u·p ≥ 0])."""
    def init_fn(params):
        zeros = lambda shape: jnp.zeros(shape, jnp.float32)  # noqa: E731
        return MuonHeadState(jnp.zeros([], jnp.int32), jax.tree.map(lambda p: zeros(p.shape), params),
                             jax.tree.map(lambda p: zeros(second_moment_shape(p.shape)), params))

    def update_fn(updates, state, params):
        lr, beta = lr_schedule(state.count), momentum_schedule(state.count)
        wd = weight_decay_schedule(state.count)
        T = lambda x: jnp.swapaxes(x, -1, -2)  # noqa: E731  nanojax (in, out) <-> torch (out, in)

        def one(g, p, buf, v):
            g = g.astype(jnp.float32)
            buf = buf + (1 - beta) * (g - buf)
            g = g + beta * (buf - g)  # Nesterov
            X = polar_express(row_equilibrate(T(g).astype(ns_dtype)), ns_steps).astype(jnp.float32)
            u, v = variance_reduction(renormalise(X), T(v), beta2)
            u, v = T(u), T(v)
            lr_p = lr * max(1.0, p.shape[-1] / p.shape[-2]) ** 0.5
            p32 = p.astype(jnp.float32)
            return -(lr_p * u + lr_p * wd * p32 * (u * p32 >= 0)), buf, v

        out = jax.tree.map(one, updates, params, state.momentum, state.second_momentum)
        is_out = lambda x: isinstance(x, tuple) and len(x) == 3  # noqa: E731
        part = lambda i: jax.tree.map(lambda t: t[i], out, is_leaf=is_out)  # noqa: E731
        return part(0), MuonHeadState(optax.safe_increment(state.count), part(1), part(2))

    return optax.GradientTransformation(init_fn, update_fn)


# -- schedules (scripts/base_train.py) ----------------------------------------------------------------


def head_lr_multiplier(step, num_iterations: int, warmup_steps: int, warmdown_ratio: float, final_lr_frac: float):
    """get_lr_multiplier: warmup in steps, constant, linear warmdown over round(ratio·n) to final_lr_frac."""
    return lr_multiplier_steps(step, num_iterations, warmup_steps, round(warmdown_ratio * num_iterations),
                               final_lr_frac)


def head_muon_momentum(step, num_iterations: int, warmdown_ratio: float, start: float, peak: float, final: float,
                       warmup_steps: int):
    """get_muon_momentum: start → peak over warmup_steps, held, then peak → final over the LR warmdown."""
    step = jnp.asarray(step, jnp.float32)
    warmdown = round(warmdown_ratio * num_iterations)
    frac = step / max(warmup_steps, 1)
    progress = (step - (num_iterations - warmdown)) / max(warmdown, 1)
    down = jnp.where(step >= num_iterations - warmdown, peak * (1 - progress) + final * progress, peak)
    return jnp.where(step < warmup_steps, (1 - frac) * start + frac * peak, down)


def head_weight_decay(step, num_iterations: int, weight_decay: float):
    """get_weight_decay: cosine from weight_decay to 0 over the run."""
    return weight_decay * 0.5 * (1 + jnp.cos(jnp.pi * jnp.asarray(step, jnp.float32) / num_iterations))


# -- batch size, LR and weight decay with depth (scripts/base_train.py) ---------------------------------

B_REF = 2**19  # HEAD: the optimal batch at the d12 reference, in tokens
REF_DEPTH = 12


def scaling_param_count(model_cfg) -> int:
    """HEAD's get_scaling_params: transformer matrices (the Muon group) + lm_head, from the model's shapes."""
    return _scaling_param_count(ModelConfig.of(model_cfg))


@functools.lru_cache(maxsize=8)  # the LR readout asks on every logged step
def _scaling_param_count(model_cfg: ModelConfig) -> int:
    abstract = nnx.eval_shape(lambda: GPT(model_cfg, rngs=nnx.Rngs(0)))
    leaves = jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))
    return sum(math.prod(x.shape) for path, x in leaves
               if head_group_of(param_name(path), len(x.shape)) in ("muon", "unembedding"))


def reference_model(model_cfg: ModelConfig) -> ModelConfig:
    """HEAD's build_model_meta(12): width rounded up to a multiple of head_dim, no grouped heads."""
    width = -(-REF_DEPTH * model_cfg.aspect_ratio // model_cfg.head_dim) * model_cfg.head_dim
    return dataclasses.replace(model_cfg, depth=REF_DEPTH, width=width, n_head=width // model_cfg.head_dim,
                               n_kv_head=width // model_cfg.head_dim)


@dataclasses.dataclass(frozen=True)
class BatchScaling:
    target_tokens: int  # target_param_data_ratio × scaling params
    reference_tokens: float  # the same for the d12 reference (HEAD's D_REF)
    total_batch_size: int  # tokens per step: given, or 2^round(log2(B_REF·(D/D_REF)^0.383))
    lr_scale: float  # √(B/B_REF), for every LR but the smear group's
    weight_decay_scale: float  # √(B/B_REF)·D_REF/D
    num_iterations: int  # HEAD's horizon from the ratio: D // B


def head_batch_scaling(model_cfg, target_param_data_ratio: float, total_batch_size: int = -1) -> BatchScaling:
    """base_train.py's scaling laws: horizon ∝ scaling params, batch ∝ D^0.383 (Power Lines), LR ∝ √B,
    weight decay keeping B/(η·λ·D) constant; total_batch_size -1 chooses the batch."""
    if not target_param_data_ratio > 0:
        raise ValueError(f"train.target_param_data_ratio={target_param_data_ratio}: optim.kind='head' scales the "
                         f"batch, LRs and weight decay from it; it must be > 0")
    model_cfg = ModelConfig.of(model_cfg)
    target = int(target_param_data_ratio * scaling_param_count(model_cfg))
    d_ref = target_param_data_ratio * scaling_param_count(reference_model(model_cfg))
    if total_batch_size == -1:
        total_batch_size = 2 ** round(math.log2(B_REF * (target / d_ref) ** 0.383))
    ratio = total_batch_size / B_REF
    return BatchScaling(target, d_ref, total_batch_size, ratio**0.5, math.sqrt(ratio) * (d_ref / target),
                        target // total_batch_size)


# -- the optimizer ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class HeadRecipe:
    """Everything HEAD's optimizer needs, after scaling: peak LRs per group (Muon's before its per-shape
    √max(1, out/in)), Muon's peak weight decay, the schedules' horizons and Muon's hyperparameters."""
    lrs: dict
    muon_weight_decay: float
    num_iterations: int
    warmup_steps: int
    warmdown_ratio: float
    final_lr_frac: float
    momentum: tuple[float, float, float, int]  # start, peak, final, warmup steps
    muon_beta2: float = 0.9
    ns_steps: int = 5
    ns_dtype: str = "bfloat16"
    grad_clip: float = 0.0  # HEAD clips nothing; > 0 adds launch's torch-style global-norm clip


def head_recipe(config, num_iterations: int) -> HeadRecipe:
    """From config: HEAD's setup_optimizer LRs (AdamW × (width/768)^-0.5), × the batch LR scale (base_train.py;
    not in chat_sft.py: optim.scale_lr_by_batch), × lr_scale."""
    o, t = config.optim, config.train
    if o.ns_steps > len(POLAR_EXPRESS_COEFFS):
        raise ValueError(f"optim.ns_steps={o.ns_steps}: HEAD's Polar Express has {len(POLAR_EXPRESS_COEFFS)} steps")
    m = ModelConfig.of(config.model)
    s = head_batch_scaling(m, t.target_param_data_ratio, t.total_batch_size)
    width = (m.width / 768) ** -0.5 if o.scale_lr_by_width else 1.0
    b = (s.lr_scale if o.get("scale_lr_by_batch", True) else 1.0) * o.lr_scale
    lrs = dict(muon=o.matrix_lr * b, unembedding=o.unembedding_lr * width * b, embedding=o.embedding_lr * width * b,
               value_embeds=o.embedding_lr * width * 0.5 * b, resid=o.scalar_lr * 0.01 * b, x0=o.scalar_lr * b,
               smear=SMEAR_LR * o.lr_scale)
    warmup = o.warmup_steps if o.warmup_steps >= 0 else round(t.warmup_ratio * num_iterations)
    momentum = (o.muon_momentum_start, o.muon_momentum_end, o.muon_momentum_final, o.muon_momentum_warmup_steps)
    return HeadRecipe(lrs, o.weight_decay * s.weight_decay_scale, num_iterations, warmup, t.warmdown_ratio,
                      t.final_lr_frac, momentum, o.muon_beta2, o.ns_steps, o.ns_dtype, t.grad_clip)


def head_optimizer(r: HeadRecipe) -> optax.GradientTransformation:
    """Muon + the six AdamW groups, every schedule a function of the optimizer's own step count."""
    def schedule(base_lr):
        return lambda count: base_lr * head_lr_multiplier(count, r.num_iterations, r.warmup_steps,
                                                          r.warmdown_ratio, r.final_lr_frac)

    def adamw(group):
        (b1, b2), wd = ADAMW[group]
        parts = [optax.scale_by_adam(b1=b1, b2=b2, eps=ADAM_EPS)]
        if wd:
            parts.append(optax.add_decayed_weights(wd))  # × lr below: torch's decoupled p·(1 − lr·wd)
        return optax.chain(*parts, optax.scale_by_learning_rate(schedule(r.lrs[group])))

    start, peak, final, warmup = r.momentum
    muon = muon_head(schedule(r.lrs["muon"]),
                     lambda c: head_muon_momentum(c, r.num_iterations, r.warmdown_ratio, start, peak, final, warmup),
                     lambda c: head_weight_decay(c, r.num_iterations, r.muon_weight_decay),
                     r.muon_beta2, r.ns_steps, jnp.dtype(r.ns_dtype))
    groups = {"muon": muon, **{g: adamw(g) for g in ADAMW}}
    tx = optax.multi_transform(groups, head_param_labels)
    return optax.chain(clip_by_global_norm_torch(r.grad_clip), tx) if r.grad_clip > 0 else tx


def build_head_optimizer(config, num_iterations: int) -> optax.GradientTransformation:
    return head_optimizer(head_recipe(config, num_iterations))


def current_head_lrs(config, num_iterations: int, step: int) -> dict[str, float]:
    """Each group's learning rate at `step` (for the log)."""
    r = head_recipe(config, num_iterations)
    mult = float(head_lr_multiplier(step, num_iterations, r.warmup_steps, r.warmdown_ratio, r.final_lr_frac))
    return {f"lr_{'matrix' if group == 'muon' else group}": lr * mult for group, lr in r.lrs.items()}


def current_head_muon_momentum(config, num_iterations: int, step: int) -> float:
    r = head_recipe(config, num_iterations)
    start, peak, final, warmup = r.momentum
    return float(head_muon_momentum(step, num_iterations, r.warmdown_ratio, start, peak, final, warmup))


def fill_head_batch(config) -> None:
    """Write HEAD's automatic batch size (train.total_batch_size = -1) and its horizon (train.num_iterations
    = -1: target_param_data_ratio × scaling params // batch; a conversation stage counts its epoch instead,
    `nanojax.data.chat.fill_epoch_iterations`) into the config, so config.json shows them."""
    t = config.train
    s = head_batch_scaling(config.model, t.target_param_data_ratio, t.total_batch_size)
    t.total_batch_size = s.total_batch_size
    if t.num_iterations == -1 and canonical_kind(config.data.kind) not in EPOCH_KINDS:
        t.num_iterations = s.num_iterations
