"""The one training loop for every stage: `python -m nanojax.train --config=configs/X.py [--config.a.b=v]`.

Pretraining, midtraining and SFT differ only in their config (data pipeline, `init_from`, LRs). Re-running
the same command resumes from the run's latest checkpoint, including the data iterator's position.
"""
from __future__ import annotations

import json
import math
import os
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from absl import logging as absl_logging
from flax import nnx
from ml_collections import config_flags

from nanojax import checkpoint as ckpt
from nanojax import config as cfglib
from nanojax import paths
from nanojax import sharding as shd
from nanojax.data import make_iterator
from nanojax.model import GPT, eval_sums
from nanojax.optim import build_optimizer, current_lrs, muon_momentum

def log(*args):
    if jax.process_index() == 0:
        print(*args, flush=True)


def setup_jax():
    """Persistent compilation cache under $NANOJAX_HOME, and multi-host start-up when asked for."""
    if os.environ.get("NANOJAX_DISTRIBUTED") == "1" or os.environ.get("JAX_COORDINATOR_ADDRESS"):
        if not jax.distributed.is_initialized():
            jax.distributed.initialize()
    jax.config.update("jax_compilation_cache_dir", str(paths.home() / "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def run_dir_of(config) -> str:
    return config.run_dir or str(paths.runs_dir() / config.run_name)


def local_log_dir(run_dir: str, config) -> str:
    """Where config.json and metrics.jsonl go: the run dir, or for a gs:// run (checkpoints in the bucket,
    no appendable files there) $NANOJAX_HOME/runs/<run_name> on the host that logs."""
    return str(paths.runs_dir() / config.run_name) if "://" in run_dir else run_dir


# -- state construction -----------------------------------------------------------------------------


class TrainState:
    """Everything the loop needs: model graph, sharded params/optimizer state and jitted steps."""

    def __init__(self, config, mesh, derived):
        self.config, self.mesh, self.derived = config, mesh, derived
        abstract_model = nnx.eval_shape(lambda: GPT(config.model, rngs=nnx.Rngs(config.seed)))
        self.graphdef, abstract_params = nnx.split(abstract_model, nnx.Param)
        self.model_dtype = abstract_model.dtype
        self.param_shardings = shd.param_shardings(abstract_params, mesh)
        self.abstract_params = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_params, self.param_shardings
        )
        self.tx = build_optimizer(config, derived.num_iterations)
        abstract_opt = jax.eval_shape(self.tx.init, self.abstract_params)
        rep = shd.replicated(mesh)
        self.opt_shardings = shd.like_params(abstract_opt, self.abstract_params, rep)
        self.abstract_opt = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_opt, self.opt_shardings
        )
        self.batch_sharding = shd.batch_sharding(mesh, ndim=3, batch_axis=1)  # (accum, rows, T)
        self.eval_sharding = shd.batch_sharding(mesh, ndim=2)
        self._build_steps()

    def init_params(self):
        seed, model_cfg = self.config.seed, self.config.model
        fn = jax.jit(lambda: nnx.state(GPT(model_cfg, rngs=nnx.Rngs(seed)), nnx.Param),
                     out_shardings=self.param_shardings)
        return fn()

    def init_opt_state(self, params):
        return jax.jit(self.tx.init, in_shardings=(self.param_shardings,), out_shardings=self.opt_shardings)(params)

    def model(self, params) -> GPT:
        return nnx.merge(self.graphdef, params)

    def _build_steps(self):
        graphdef, tx = self.graphdef, self.tx
        p_shard = self.param_shardings

        abstract_mesh = self.mesh.abstract_mesh

        def train_step(params, opt_state, batch):
            with jax.sharding.use_abstract_mesh(abstract_mesh):  # lets the model pin activation shardings
                return _train_step(params, opt_state, batch)

        def _train_step(params, opt_state, batch):
            def micro(carry, mb):
                g_acc, loss_acc, n_acc = carry

                def f(p):
                    return nnx.merge(graphdef, p).loss(mb["inputs"], mb["targets"])

                (s, n), g = jax.value_and_grad(f, has_aux=True)(params)
                g_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
                return (jax.lax.with_sharding_constraint(g_acc, p_shard), loss_acc + s, n_acc + n), None

            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
            (g, s, n), _ = jax.lax.scan(micro, (zeros, 0.0, 0.0), batch)
            # token-weighted mean over the whole accumulated batch (not a mean of micro-batch means)
            denom = jnp.maximum(n, 1.0)
            g = jax.tree.map(lambda x: x / denom, g)
            grad_norm = optax.tree.norm(g)
            updates, opt_state = tx.update(g, opt_state, params)
            params = optax.apply_updates(params, updates)
            metrics = {"loss": s / denom, "grad_norm": grad_norm, "update_norm": optax.tree.norm(updates), "tokens": n}
            return params, opt_state, metrics

        rep = shd.replicated(self.mesh)
        self.train_step = jax.jit(
            train_step,
            in_shardings=(self.param_shardings, self.opt_shardings, self.batch_sharding),
            out_shardings=(self.param_shardings, self.opt_shardings, rep),
            donate_argnums=(0, 1),
        )

        def eval_step(params, inputs, targets, token_bytes):
            with jax.sharding.use_abstract_mesh(abstract_mesh):
                return eval_sums(nnx.merge(graphdef, params), inputs, targets, token_bytes)

        self.eval_step = jax.jit(
            eval_step, in_shardings=(self.param_shardings, self.eval_sharding, self.eval_sharding, rep),
            out_shardings=rep,
        )


# -- data -------------------------------------------------------------------------------------------


def global_batch(local_arrays: dict, sharding, global_rows_axis: int, global_rows: int) -> dict:
    """This host's rows -> one global array per key (each host passes only what it read)."""
    out = {}
    for k, v in local_arrays.items():
        shape = list(v.shape)
        shape[global_rows_axis] = global_rows
        out[k] = jax.make_array_from_process_local_data(sharding, v, tuple(shape))
    return out


def reset_step_counts(opt_state):
    """Zero every optimizer `count` (Adam bias correction, schedules, Muon momentum warm-up), keep the rest."""
    def one(path, x):
        last = path[-1] if path else None
        name = getattr(last, "name", getattr(last, "key", None))
        return jnp.zeros_like(x) if name == "count" else x

    return jax.tree_util.tree_map_with_path(one, opt_state)


def stack_micro_batches(micro: list[dict]) -> dict:
    """(accum, rows, T) arrays; micro-batches of different lengths (SFT buckets) are padded to the longest,
    inputs with token 0 and targets with −1, which changes no loss."""
    T = max(mb["inputs"].shape[1] for mb in micro)
    fill = {"inputs": 0, "targets": -1}

    def pad(a, k):
        return np.pad(a, ((0, 0), (0, T - a.shape[1])), constant_values=fill.get(k, 0)) if a.shape[1] < T else a

    return {k: np.stack([pad(mb[k], k) for mb in micro]) for k in micro[0]}


def load_tokenizer(config):
    if config.data.kind == "synthetic":
        return None
    from nanojax.tokenizer import Tokenizer

    tok = Tokenizer.load(config.data.tokenizer_dir or paths.tokenizer_dir())
    if tok.vocab_size != config.model.vocab_size:
        raise ValueError(
            f"tokenizer has {tok.vocab_size:,} tokens but model.vocab_size={config.model.vocab_size:,}; "
            f"set --config.model.vocab_size={tok.vocab_size} or point data.tokenizer_dir at the right tokenizer"
        )
    return tok


def evaluate(state: TrainState, params, config, derived, tokenizer) -> dict:
    """Validation loss and bits per byte over `train.eval_tokens` tokens of the validation split."""
    rows = derived.global_micro_batch
    local_rows = rows // jax.process_count()
    steps = max(1, config.train.eval_tokens // (rows * config.model.seq_len))
    it = make_iterator(config, split="val", batch_size=local_rows, process_index=jax.process_index(),
                       process_count=jax.process_count(), tokenizer=tokenizer)
    if tokenizer is not None:
        token_bytes = jnp.asarray(np.asarray(tokenizer.token_bytes, np.int32))
    else:
        token_bytes = jnp.zeros((config.model.vocab_size,), jnp.int32)
    totals = None
    try:
        for _ in range(steps):
            try:
                local = next(it)
            except StopIteration:
                if jax.process_count() == 1:
                    break
                # other hosts may still have data: keep stepping (eval_step is collective) on rows that count 0
                shape = (local_rows, config.model.seq_len)
                local = {"inputs": np.zeros(shape, np.int32), "targets": np.full(shape, -1, np.int32)}
            batch = global_batch(local, state.eval_sharding, 0, rows)
            out = state.eval_step(params, batch["inputs"], batch["targets"], token_bytes)
            totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    finally:
        it.close()
    if totals is None:
        return {}
    totals = jax.device_get(totals)
    result = {"val_loss": float(totals["loss_sum"] / max(totals["count"], 1))}
    if totals["bytes"] > 0:
        result["val_bpb"] = float(totals["nats_with_bytes"] / (math.log(2) * totals["bytes"]))
    return result


# -- the loop ---------------------------------------------------------------------------------------


class _StopFlag:
    def __init__(self):
        self.signum = None
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread (e.g. called from a test thread)
                pass
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:  # second signal: give up at once
            raise KeyboardInterrupt
        self.signum = signum
        log(f"\nreceived {signal.Signals(signum).name}: saving a checkpoint after this step, then exiting")

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)

    def should_stop(self) -> bool:
        flag = self.signum is not None
        if jax.process_count() > 1:  # every host must agree, or the ones that save would wait forever
            from jax.experimental import multihost_utils

            flag = bool(np.any(multihost_utils.process_allgather(np.array(flag))))
        return flag


def run(config) -> dict:
    """Train (or resume) the run described by `config`; returns the final metrics."""
    setup_jax()
    devices = jax.devices()
    if config.mesh.num_devices > 0:
        if config.mesh.num_devices > len(devices):
            raise ValueError(f"mesh.num_devices={config.mesh.num_devices} but only {len(devices)} devices exist")
        devices = devices[: config.mesh.num_devices]
    mesh = shd.make_mesh(config.mesh, devices)
    derived = cfglib.derive(config, len(devices))
    run_dir = run_dir_of(config)
    log(f"run {config.run_name} -> {run_dir}\n{derived.summary()}\nmesh: {dict(mesh.shape)}")
    log_dir = local_log_dir(run_dir, config)
    if jax.process_index() == 0:
        os.makedirs(log_dir, exist_ok=True)
        with open(os.path.join(log_dir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))

    tokenizer = load_tokenizer(config)
    state = TrainState(config, mesh, derived)
    ckptr = ckpt.Checkpointer(run_dir, config.train.max_to_keep, config.train.async_checkpointing)
    t0 = time.time()
    step, data_state, source = 0, None, None
    latest = ckptr.latest_step()
    if latest is not None:
        params, opt_state, data_state, meta = ckptr.restore(latest, state.abstract_params, state.abstract_opt)
        step, source = latest, meta.get("init_from")
        log(f"resumed from {ckptr.directory}/{latest}")
    else:
        params = state.init_params()
        if config.train.init_from:
            from_step = None if config.train.init_from_step < 0 else config.train.init_from_step
            params, src_step = ckpt.load_params(config.train.init_from, state.abstract_params, from_step)
            source = {"path": str(config.train.init_from), "step": src_step}
            log(f"initialised parameters from {config.train.init_from} (step {src_step})")
        if config.train.init_optimizer_state and config.train.init_from:
            # momenta carry over; step counters restart so this stage's LR/momentum schedules start at step 0
            opt_state = reset_step_counts(
                ckpt.load_opt_state(config.train.init_from, state.abstract_opt, source["step"]))
        else:
            opt_state = state.init_opt_state(params)
    log(f"state ready in {time.time() - t0:.1f}s")

    total_steps = derived.num_iterations
    if step >= total_steps:
        log(f"run already complete: step {step} of {total_steps}")
        ckptr.close()
        return {"step": step}

    local_rows = derived.global_micro_batch // jax.process_count()
    it = make_iterator(config, split="train", batch_size=local_rows, process_index=jax.process_index(),
                       process_count=jax.process_count(), tokenizer=tokenizer)
    if data_state:
        it.set_state(data_state)

    def meta(at_step):
        return {
            "step": at_step, "config": config.to_dict(), "num_params": derived.num_params,
            "init_from": source, "tokenizer_dir": str(config.data.tokenizer_dir or paths.tokenizer_dir())
            if tokenizer is not None else None, "time": time.time(),
        }

    def save(at_step, force=False):
        ckptr.save(at_step, params, opt_state, it.get_state(), meta(at_step), force=force)

    metrics_file = open(os.path.join(log_dir, "metrics.jsonl"), "a") if jax.process_index() == 0 else None

    def write(record):
        if metrics_file:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()

    peak = cfglib.peak_flops(jax.devices()[0].device_kind)
    accum = derived.grad_accum_steps
    pending = None  # (step, device metrics, data_wait) fetched one step late: never blocks dispatch
    last = {"step": step}
    ema, ema_beta, dt_ema = None, 0.9, None
    steps_this_run = 0
    stopped_by_signal = False

    clock = {"done": time.time()}  # when the last reported step finished on device

    def report(p_step, p_metrics, p_wait):
        nonlocal ema, dt_ema
        m = jax.device_get(p_metrics)  # blocks until step p_step is done
        now = time.time()
        p_dt, clock["done"] = now - clock["done"], now
        loss = float(m["loss"])
        bad = [k for k in ("loss", "grad_norm", "update_norm") if not math.isfinite(float(m[k]))]
        if bad:
            raise FloatingPointError(
                f"non-finite {', '.join(bad)} at step {p_step + 1} (loss {loss}); stopping without saving: the "
                f"last good checkpoint (step {ckptr.latest_step()}) is untouched"
            )
        ema = loss if ema is None else ema_beta * ema + (1 - ema_beta) * loss
        dt_ema = p_dt if dt_ema is None else 0.9 * dt_ema + 0.1 * p_dt
        tok_s = config.train.total_batch_size / p_dt
        lrs = current_lrs(config, total_steps, p_step)
        rec = {"step": p_step + 1, "loss": loss, "grad_norm": float(m["grad_norm"]), "tokens_per_s": tok_s,
               "loss_tokens": int(m["tokens"]),  # targets that counted (SFT: assistant tokens only)
               "step_time_s": p_dt, "data_wait_s": p_wait, **lrs,
               "muon_momentum": float(muon_momentum(p_step, config.optim.muon_momentum_start,
                                                    config.optim.muon_momentum_end,
                                                    config.optim.muon_momentum_warmup_steps))}
        if peak:
            rec["mfu"] = derived.flops_per_token * tok_s / (peak * derived.num_devices)
        write(rec)
        last.update(rec)
        if (p_step + 1) % config.train.log_every == 0 or p_step == 0 or p_step + 1 == total_steps:
            eta = (total_steps - p_step - 1) * dt_ema
            mfu = f" | mfu {rec['mfu'] * 100:.1f}%" if "mfu" in rec else ""
            lr_mult = lrs["lr_matrix"] / max(config.optim.matrix_lr * config.optim.lr_scale, 1e-30)
            log(f"step {p_step + 1:6d}/{total_steps} | loss {loss:.4f} (ema {ema:.4f}) | lr×{lr_mult:.3f}"
                f" | gnorm {rec['grad_norm']:.3f} | {tok_s:,.0f} tok/s{mfu} | {p_dt * 1000:.0f} ms"
                f" (data {p_wait * 1000:.0f} ms) | eta {eta / 60:.1f} min")

    try:
        with _StopFlag() as stop:
            while step < total_steps:
                t_data = time.time()
                local = stack_micro_batches([next(it) for _ in range(accum)])
                batch = global_batch(local, state.batch_sharding, 1, derived.global_micro_batch)
                wait = time.time() - t_data
                params, opt_state, metrics = state.train_step(params, opt_state, batch)
                if pending is not None:
                    report(*pending)
                pending = (step, metrics, wait)
                step += 1
                steps_this_run += 1
                if config.train.eval_every and (step % config.train.eval_every == 0 or step == total_steps):
                    report(*pending)
                    pending = None
                    ev = evaluate(state, params, config, derived, tokenizer)
                    if ev:
                        write({"step": step, **ev})
                        last.update(ev)
                        log(f"step {step:6d} | " + " | ".join(f"{k} {v:.4f}" for k, v in ev.items()))
                    clock["done"] = time.time()
                stop_now = stop.should_stop() or (0 < config.train.stop_after_steps <= steps_this_run)
                if step == total_steps or stop_now or (
                    config.train.checkpoint_every and step % config.train.checkpoint_every == 0
                ):
                    if pending is not None:  # never checkpoint a state whose loss has not been checked
                        report(*pending)
                        pending = None
                    save(step, force=True)
                    if hasattr(it, "stats"):  # documents, empty/bad rows, truncations, epoch
                        write({"step": step, "data_stats": it.stats})
                if stop_now:
                    stopped_by_signal = stop.signum is not None
                    break
            if pending is not None:
                report(*pending)
    finally:  # pending async saves of good checkpoints complete even when the run fails
        ckptr.close()
        it.close()
        if metrics_file:
            metrics_file.close()
    log(f"{'stopped' if step < total_steps else 'finished'} at step {step}; checkpoint in {ckptr.directory}/{step}")
    last["step"] = step
    last["stopped_by_signal"] = stopped_by_signal
    return last


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if flags.FLAGS.config is None:
        raise app.UsageError("--config=configs/<name>.py is required")
    if not flags.FLAGS["verbosity"].present:  # Orbax/JAX INFO lines would drown the step log
        absl_logging.set_verbosity(absl_logging.WARNING)
    try:
        run(flags.FLAGS.config)
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except (FileNotFoundError, ValueError, KeyError) as e:  # bad input: the message says what and where
        if os.environ.get("NANOJAX_TRACEBACK"):
            raise
        print(f"error: {e}\n(set NANOJAX_TRACEBACK=1 for the traceback)", file=sys.stderr)
        sys.exit(2)
    except Exception as e:
        if "RESOURCE_EXHAUSTED" in str(e) or "Out of memory" in str(e):
            c = flags.FLAGS.config
            print(f"\nerror: out of device memory ({type(e).__name__}). Options, cheapest first: "
                  f"--config.model.remat=dots or =full (recompute activations; full cuts d20's per-device peak "
                  f"about 12x), --config.train.device_batch_size={max(1, c.train.device_batch_size // 2)} (gradient "
                  f"accumulation keeps the step at {c.train.total_batch_size:,} tokens), or more fsdp devices.",
                  file=sys.stderr)
            sys.exit(1)
        raise


if __name__ == "__main__":
    # defined here, not at import, so other tools can import this module and define their own --config
    config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.", lock_config=True)
    app.run(main)
