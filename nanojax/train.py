"""The one training loop for every stage: `python -m nanojax.train --config=configs/X.py [--config.a.b=v]`.

Pretraining, midtraining and SFT differ only in their config (data pipeline, `init_from`, LRs). Re-running
the same command resumes from the run's latest checkpoint, including the data iterator's position.
"""
from __future__ import annotations

import functools
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
from flax import nnx
from jax.experimental import multihost_utils
from ml_collections import config_flags

from nanojax import checkpoint as ckpt
from nanojax import cli
from nanojax import config as cfglib
from nanojax import paths
from nanojax import sharding as shd
from nanojax.console import log, quiet_library_logs
from nanojax.data import canonical_kind, make_iterator
from nanojax.data.kinds import EPOCH_KINDS
from nanojax.data.chat import fill_epoch_iterations
from nanojax.loggers import MetricsLoggers, logger_names
from nanojax.model import GPT, eval_sums
from nanojax.optim import build_optimizer, current_lrs, current_muon_momentum
from nanojax.profiling import StepProfiler
from nanojax.remat import choose_remat, peak_bytes
from nanojax.tokenizer import load_for_config, tokenizer_dir_for
from nanojax.train_evals import LoopEvals


def setup_jax():
    """Persistent compilation cache under $NANOJAX_HOME, and multi-host start-up when asked for."""
    shd.start_distributed()
    jax.config.update("jax_compilation_cache_dir", str(paths.home() / "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def run_dir_for(config) -> str:
    """Where a run's checkpoints go: `run_dir`, or $NANOJAX_HOME/runs/<run_name>."""
    return config.run_dir or str(paths.runs_dir() / config.run_name)


def local_log_dir(run_dir: str, config) -> str:
    """Where config.json and metrics.jsonl go: the run dir, or for a gs:// run (checkpoints in the bucket,
    no appendable files there) $NANOJAX_HOME/runs/<run_name> on the host that logs."""
    return str(paths.runs_dir() / config.run_name) if "://" in run_dir else run_dir


# -- the jitted steps (module-level; TrainState binds their static parts) ---------------------------
def micro_batch_loss(params, graphdef, micro_batch):
    """(sum of token losses, counted targets) of one micro-batch."""
    return nnx.merge(graphdef, params).loss(micro_batch["inputs"], micro_batch["targets"])


def accumulate_gradients(graphdef, param_shardings, params, batch, loss_fn=micro_batch_loss):
    """Summed float32 gradients, loss and counted targets over the micro-batches (the leading batch axis);
    `loss_fn(params, graphdef, micro_batch) -> (summed loss, counted targets)` (RL: `nanojax.rl`)."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def add(carry, micro_batch):
        g_acc, loss_acc, n_acc = carry
        (loss, n), g = grad_fn(params, graphdef, micro_batch)
        g_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
        return (jax.lax.with_sharding_constraint(g_acc, param_shardings), loss_acc + loss, n_acc + n), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    (g, loss, n), _ = jax.lax.scan(add, (zeros, 0.0, 0.0), batch)
    return g, loss, n


def train_step(graphdef, tx, param_shardings, abstract_mesh, loss_fn, params, opt_state, batch):
    """One optimizer step on the token-weighted mean gradient of the whole accumulated batch (not a mean of
    micro-batch means). The abstract mesh lets the model pin activation shardings by logical names."""
    with jax.sharding.use_abstract_mesh(abstract_mesh):
        g, loss, n = accumulate_gradients(graphdef, param_shardings, params, batch, loss_fn)
        denom = jnp.maximum(n, 1.0)
        g = jax.tree.map(lambda x: x / denom, g)
        updates, opt_state = tx.update(g, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = {"loss": loss / denom, "grad_norm": optax.tree.norm(g), "update_norm": optax.tree.norm(updates),
                   "tokens": n}
        return params, opt_state, metrics


def eval_step(graphdef, abstract_mesh, params, inputs, targets, token_bytes):
    with jax.sharding.use_abstract_mesh(abstract_mesh):
        return eval_sums(nnx.merge(graphdef, params), inputs, targets, token_bytes)


class TrainState:
    """What the loop needs besides the arrays: model graph, shardings, abstract shapes and the jitted steps.
    `loss_fn` is the micro-batch loss the step differentiates (cross-entropy; RL: the policy gradient)."""

    def __init__(self, config, mesh, derived, loss_fn=micro_batch_loss):
        self.config, self.mesh, self.derived = config, mesh, derived
        abstract_model = nnx.eval_shape(lambda: GPT(config.model, rngs=nnx.Rngs(config.seed)))
        self.graphdef, abstract_params = nnx.split(abstract_model, nnx.Param)
        self.model_dtype = abstract_model.dtype
        self.param_shardings = shd.param_shardings(abstract_params, mesh)
        self.abstract_params = shd.abstract_arrays(abstract_params, self.param_shardings)
        self.tx = build_optimizer(config, derived.num_iterations)
        abstract_opt = jax.eval_shape(self.tx.init, self.abstract_params)
        rep = shd.replicated(mesh)
        self.opt_shardings = shd.like_params(abstract_opt, self.abstract_params, rep)
        self.abstract_opt = shd.abstract_arrays(abstract_opt, self.opt_shardings)
        self.batch_sharding = shd.batch_sharding(mesh, ndim=3, batch_axis=1)  # (accum, rows, T)
        self.eval_sharding = shd.batch_sharding(mesh, ndim=2)
        self.train_step = jax.jit(
            functools.partial(train_step, self.graphdef, self.tx, self.param_shardings, mesh.abstract_mesh, loss_fn),
            in_shardings=(self.param_shardings, self.opt_shardings, self.batch_sharding),
            out_shardings=(self.param_shardings, self.opt_shardings, rep),
            donate_argnums=(0, 1),
        )
        self.eval_step = jax.jit(
            functools.partial(eval_step, self.graphdef, mesh.abstract_mesh),
            in_shardings=(self.param_shardings, self.eval_sharding, self.eval_sharding, rep), out_shardings=rep,
        )

    def init_params(self):
        seed, model_cfg = self.config.seed, self.config.model
        fn = jax.jit(lambda: nnx.state(GPT(model_cfg, rngs=nnx.Rngs(seed)), nnx.Param),
                     out_shardings=self.param_shardings)
        return fn()

    def init_opt_state(self, params):
        return jax.jit(self.tx.init, in_shardings=(self.param_shardings,), out_shardings=self.opt_shardings)(params)

    def model(self, params) -> GPT:
        return nnx.merge(self.graphdef, params)

    def compile_abstract(self):
        """The train step lowered and compiled on abstract arrays (nothing allocated): compile time and XLA's
        memory analysis for shapes too big to run here, and `model.remat=auto`'s measurement."""
        shape = (self.derived.grad_accum_steps, self.derived.global_micro_batch, self.config.model.seq_len)
        tokens = jax.ShapeDtypeStruct(shape, np.int32, sharding=self.batch_sharding)
        return self.train_step.lower(self.abstract_params, self.abstract_opt,
                                     {"inputs": tokens, "targets": tokens}).compile()


def measure_remat(config, mesh, derived) -> str:
    """`model.remat=auto` → the cheapest policy whose compiled step fits the device (nanojax.remat)."""
    return choose_remat(config, lambda c: peak_bytes(TrainState(c, mesh, derived).compile_abstract()))


# -- state restored or initialised ------------------------------------------------------------------
def reset_step_counts(opt_state):
    """Zero every optimizer `count` (Adam bias correction, schedules, Muon momentum warm-up), keep the rest."""
    def one(path, x):
        last = path[-1] if path else None
        name = getattr(last, "name", getattr(last, "key", None))
        return jnp.zeros_like(x) if name == "count" else x

    return jax.tree_util.tree_map_with_path(one, opt_state)


INHERITED = ("model.seq_len", "train.device_batch_size", "train.total_batch_size", "optim.embedding_lr",
             "optim.unembedding_lr", "optim.matrix_lr")  # what nanochat HEAD's SFT takes from its base checkpoint


def note_changed_settings(config, source_config: dict) -> None:
    """Say which of the settings HEAD's SFT inherits differ from the run this stage starts from (this config's
    values are used: configs such as gpt2_sft.py copy them from the pretraining config)."""
    for key in INHERITED:
        section, name = key.split(".")
        was, now = source_config.get(section, {}).get(name), config[section][name]
        if was is not None and was != now:
            log(f"note: {key}={now} here, {was} in {config.train.init_from}")


def restore_or_init(state: TrainState, ckptr: ckpt.Checkpointer, config):
    """(params, opt_state, step, data_state, source): the run's latest checkpoint, else fresh parameters or
    those of `train.init_from` (the previous stage), whose momenta carry over only if asked for. A damaged
    newest step is moved aside and the one before it used (`Checkpointer.restore_latest`); when the run has step
    directories but none is usable, that is a `CheckpointError`, never a silent fresh start."""
    found = ckptr.restore_latest(state.abstract_params, state.abstract_opt)
    if found is not None:
        latest, params, opt_state, data_state, meta = found
        log(f"resumed from {ckptr.directory}/{latest}")
        return params, opt_state, latest, data_state, meta.get("init_from")
    t = config.train
    params, source = state.init_params(), None
    if t.init_from:
        params, src_step = ckpt.load_params(t.init_from, state.abstract_params,
                                            None if t.init_from_step < 0 else t.init_from_step)
        source = {"path": str(t.init_from), "step": src_step}
        log(f"initialised parameters from {t.init_from} (step {src_step})")
        note_changed_settings(config, ckpt.read_meta(t.init_from, src_step)[0].get("config") or {})
    if t.init_from and t.init_optimizer_state:
        # momenta carry over; step counters restart so this stage's LR/momentum schedules start at step 0
        opt_state = reset_step_counts(ckpt.load_opt_state(t.init_from, state.abstract_opt, source["step"]))
    else:
        opt_state = state.init_opt_state(params)
    return params, opt_state, 0, None, source


def checkpoint_meta(config, derived, source, tokenizer, step: int) -> dict:
    return {"step": step, "config": config.to_dict(), "num_params": derived.num_params, "init_from": source,
            "tokenizer_dir": str(tokenizer_dir_for(config)) if tokenizer is not None else None, "time": time.time()}


# -- data -------------------------------------------------------------------------------------------
def global_batch(local_arrays: dict, sharding, global_rows_axis: int, global_rows: int) -> dict:
    """This host's rows -> one global array per key (each host passes only what it read)."""
    out = {}
    for k, v in local_arrays.items():
        shape = list(v.shape)
        shape[global_rows_axis] = global_rows
        out[k] = jax.make_array_from_process_local_data(sharding, v, tuple(shape))
    return out


def stack_micro_batches(micro: list[dict]) -> dict:
    """(accum, rows, T) arrays; micro-batches of different lengths (SFT buckets) are padded to the longest,
    inputs with token 0 and targets with −1, which changes no loss."""
    T = max(mb["inputs"].shape[1] for mb in micro)
    fill = {"inputs": 0, "targets": -1}

    def pad(a, k):
        return np.pad(a, ((0, 0), (0, T - a.shape[1])), constant_values=fill.get(k, 0)) if a.shape[1] < T else a

    return {k: np.stack([pad(mb[k], k) for mb in micro]) for k in micro[0]}


def next_train_batch(it, state: TrainState) -> dict:
    """The global (accum, rows, T) batch of one optimizer step, from this host's iterator."""
    d = state.derived
    local = stack_micro_batches([next(it) for _ in range(d.grad_accum_steps)])
    return global_batch(local, state.batch_sharding, 1, d.global_micro_batch)


def validation_metrics(state: TrainState, params, tokenizer) -> dict:
    """Validation loss and bits per byte over `train.eval_tokens` tokens of the validation split. Each process
    reads its own data stream of it, so the rows scored depend on the process count (`nanojax.evaluate`'s bpb,
    one stream on every host, does not)."""
    config, rows = state.config, state.derived.global_micro_batch
    local_rows = rows // jax.process_count()
    steps = max(1, config.train.eval_tokens // (rows * config.model.seq_len))
    it = make_iterator(config, split="val", batch_size=local_rows, process_index=jax.process_index(),
                       process_count=jax.process_count(), tokenizer=tokenizer)
    token_bytes = jnp.asarray(tokenizer.token_bytes if tokenizer is not None else
                              np.zeros(config.model.vocab_size), jnp.int32)  # on the device once per evaluation
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
            if jax.process_count() > 1:  # many queued cross-process programs deadlock CPU collectives (gloo)
                totals = jax.block_until_ready(totals)
    finally:
        it.close()
    if totals is None:
        return {}
    totals = jax.device_get(totals)
    result = {"val_loss": float(totals["loss_sum"] / max(totals["count"], 1))}
    if totals["bytes"] > 0:
        result["val_bpb"] = float(totals["nats_with_bytes"] / (math.log(2) * totals["bytes"]))
    return result


# -- reporting --------------------------------------------------------------------------------------
class StepReporter:
    """The step log and the metrics sinks (metrics.jsonl, TensorBoard, W&B: `nanojax.loggers`). Each step's
    device metrics are read one step late (`dispatched`), so the host never waits for the device before queuing
    the next step; `flush` reads the last one. Loss EMA, tokens/s, MFU, ETA and learning rates are computed
    here; a non-finite loss, gradient or update stops the run before anything is saved."""

    def __init__(self, config, derived, log_dir: str, last_good_step):
        self.config, self.derived, self.total = config, derived, derived.num_iterations
        self.last_good_step = last_good_step  # () -> the step of the newest checkpoint, for the error message
        self.sinks = MetricsLoggers(log_dir, config, enabled=jax.process_index() == 0)
        self.device_kind = jax.devices()[0].device_kind
        self.pending = None  # (step, device metrics, data wait) not read yet
        self.ema = self.dt_ema = None
        self.last: dict = {}
        self.restart_clock()

    def restart_clock(self):
        """Time between reports is step time; call after anything else (eval, saving) that takes a while."""
        self.clock = time.time()

    def dispatched(self, step: int, metrics, data_wait: float):
        self.flush()
        self.pending = (step, metrics, data_wait)

    def flush(self):
        if self.pending is not None:
            self._report(*self.pending)
            self.pending = None

    def write(self, record: dict):
        self.sinks.write(record)

    def evaluation(self, step: int, results: dict):
        if results:
            self.write({"step": step, **results})
            self.last.update(results)
            log(f"step {step:6d} | " + " | ".join(f"{k} {v:.4f}" for k, v in results.items()))
        self.restart_clock()

    def _report(self, step: int, device_metrics, data_wait: float):
        m = jax.device_get(device_metrics)  # blocks until that step is done
        now = time.time()
        dt, self.clock = now - self.clock, now
        bad = [k for k in ("loss", "grad_norm", "update_norm") if not math.isfinite(float(m[k]))]
        if bad:
            raise FloatingPointError(
                f"non-finite {', '.join(bad)} at step {step + 1} (loss {float(m['loss'])}); stopping without "
                f"saving: the last good checkpoint (step {self.last_good_step()}) is untouched")
        rec = self._record(step, m, dt, data_wait)
        self.write(rec)
        self.last.update(rec)
        if (step + 1) % self.config.train.log_every == 0 or step == 0 or step + 1 == self.total:
            self._log_line(rec, dt, data_wait)

    def _record(self, step: int, m: dict, dt: float, data_wait: float) -> dict:
        config, loss = self.config, float(m["loss"])
        self.ema = loss if self.ema is None else 0.9 * self.ema + 0.1 * loss
        self.dt_ema = dt if self.dt_ema is None else 0.9 * self.dt_ema + 0.1 * dt
        tok_s = config.train.total_batch_size / dt
        rec = {"step": step + 1, "loss": loss, "grad_norm": float(m["grad_norm"]), "tokens_per_s": tok_s,
               "loss_tokens": int(m["tokens"]),  # targets that counted (SFT: assistant tokens only)
               "step_time_s": dt, "data_wait_s": data_wait, **current_lrs(config, self.total, step),
               "muon_momentum": current_muon_momentum(config, self.total, step)}
        mfu = self.derived.mfu(tok_s, self.device_kind)
        if mfu is not None:
            rec["mfu"] = mfu
        return rec

    def _log_line(self, rec: dict, dt: float, data_wait: float):
        o = self.config.optim
        eta = (self.total - rec["step"]) * self.dt_ema
        mfu = f" | mfu {rec['mfu'] * 100:.1f}%" if "mfu" in rec else ""
        lr_mult = rec["lr_matrix"] / max(o.matrix_lr * o.lr_scale, 1e-30)
        log(f"step {rec['step']:6d}/{self.total} | loss {rec['loss']:.4f} (ema {self.ema:.4f}) | lr×{lr_mult:.3f}"
            f" | gnorm {rec['grad_norm']:.3f} | {rec['tokens_per_s']:,.0f} tok/s{mfu} | {dt * 1000:.0f} ms"
            f" (data {data_wait * 1000:.0f} ms) | eta {eta / 60:.1f} min")

    def close(self):
        self.sinks.close()


class StopFlag:
    """SIGTERM / SIGINT ask for a checkpoint after the current step, then a clean exit (a second: at once)."""

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
        if self.signum is not None:  # second signal: give up at once, one line and no traceback
            self.exit_now(signum)
        self.signum = signum
        where = f" (process {jax.process_index()})" if jax.process_count() > 1 else ""  # whichever host got it
        print(f"\nreceived {signal.Signals(signum).name}{where}: saving a checkpoint after this step, then exiting",
              flush=True)

    @staticmethod
    def exit_now(signum):
        """Exit with status 128 + signum (130 SIGINT, 143 SIGTERM) without unwinding: no traceback, no save, no
        waiting for a checkpoint in flight (an unfinished one never counts; the same command resumes from the
        last finished one). os.write, not print: the signal may have interrupted a print to the same stream."""
        try:
            sys.stdout.flush()
        except Exception:  # noqa: BLE001 - a reentrant flush must not stop the exit
            pass
        os.write(2, f"received {signal.Signals(signum).name} again: exiting now without saving; the same command "
                    "resumes from the last checkpoint\n".encode())
        os._exit(128 + signum)

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)

    def should_stop(self) -> bool:
        flag = self.signum is not None
        if jax.process_count() > 1:  # every host must agree, or the ones that save would wait forever
            flag = bool(np.any(multihost_utils.process_allgather(np.array(flag))))
        return flag


# -- the loop ---------------------------------------------------------------------------------------
def open_run_records(config, log_dir: str, step: int) -> None:
    """config.json written (a changed one kept aside) and metrics.jsonl cut back to `step`, the step the run
    continues from; on process 0, once the run's inputs are known to be good."""
    if jax.process_index() != 0:
        return
    kept = cfglib.save_run_config(config, log_dir)
    if kept:
        log(f"config changed since the last run of {config.run_name}: the previous one is kept as {kept}")
    dropped = MetricsLoggers.drop_steps_after(log_dir, step)
    if dropped:
        log(f"metrics.jsonl: dropped {dropped} record(s) past step {step}, which runs again")


def epoch_length(config, tokenizer, run_dir: str) -> None:
    """train.num_iterations=-1 in a conversation stage: the epoch length the run started with (its newest
    checkpoint's config), else counted now by rendering the mixture (`fill_epoch_iterations`, minutes for
    HEAD's ~790K conversations), so a resume neither waits for the count nor changes the LR schedule."""
    if config.train.num_iterations != -1 or canonical_kind(config.data.kind) not in EPOCH_KINDS:
        return
    try:
        saved = ckpt.read_meta(run_dir)[0].get("config", {}).get("train", {}).get("num_iterations", -1)
    except (FileNotFoundError, ValueError):  # no checkpoint yet (or a damaged newest one): count
        saved = -1
    if saved > 0:
        config.train.num_iterations = saved
        log(f"one epoch = {saved:,} steps (counted when the run started)")
    else:
        fill_epoch_iterations(config, tokenizer)


def run(config) -> dict:
    """Train (or resume) the run described by `config`; returns the final metrics. Bad input (a config value, a
    data file, a tokenizer) fails before the run's files change: config.json and metrics.jsonl are written only
    once the model, the checkpoint and the data iterator are ready. `data.kind=rl` runs stage 3 (`nanojax.rl`)."""
    cfglib.validate(config)  # every bad value in one line, before anything is built
    if canonical_kind(config.data.kind) == "rl":
        from nanojax import rl  # imported here: rl builds on this module's parts

        return rl.run(config)
    logger_names(config.train.loggers)  # a typo fails before anything is built
    setup_jax()
    mesh = shd.make_mesh(config.mesh)
    tokenizer = load_for_config(config)
    epoch_length(config, tokenizer, run_dir_for(config))
    derived = cfglib.derive(config, mesh.size)
    run_dir = run_dir_for(config)
    log(f"run {config.run_name} -> {run_dir}\n{derived.summary()}\nmesh: {dict(mesh.shape)}")
    log_dir = local_log_dir(run_dir, config)
    measure_remat(config, mesh, derived)
    state = TrainState(config, mesh, derived)
    ckptr = ckpt.Checkpointer(run_dir, config.train.max_to_keep, config.train.async_checkpointing)
    t0 = time.time()
    params, opt_state, step, data_state, source = restore_or_init(state, ckptr, config)
    log(f"state ready in {time.time() - t0:.1f}s")
    if step >= derived.num_iterations:
        log(f"run already complete: step {step} of {derived.num_iterations}")
        ckptr.close()
        return {"step": step}
    evals = LoopEvals.from_config(config, tokenizer)  # CORE bundle and chat tasks ready, or one clear error
    it = make_iterator(config, split="train", batch_size=derived.global_micro_batch // jax.process_count(),
                       process_index=jax.process_index(), process_count=jax.process_count(), tokenizer=tokenizer)
    if data_state:
        it.set_state(data_state)
    open_run_records(config, log_dir, step)  # the inputs held: now the run's own records change
    reporter = StepReporter(config, derived, log_dir, ckptr.latest_step)
    profiler = StepProfiler(config.train.profile, log_dir)
    try:
        with StopFlag() as stop:
            step = train_loop(state, params, opt_state, step, it, ckptr, reporter, stop,
                              lambda at: checkpoint_meta(config, derived, source, tokenizer, at), tokenizer, profiler,
                              evals)
    finally:  # pending async saves of good checkpoints complete even when the run fails
        profiler.close()
        ckptr.close()
        it.close()
        reporter.close()
    log(f"{'stopped' if step < derived.num_iterations else 'finished'} at step {step}; "
        f"checkpoint in {ckptr.directory}/{step}")
    return {**reporter.last, "step": step, "stopped_by_signal": stop.signum is not None}


def train_loop(state: TrainState, params, opt_state, step: int, it, ckptr, reporter: StepReporter,
               stop: StopFlag, meta, tokenizer, profiler: StepProfiler | None = None,
               evals: LoopEvals | None = None) -> int:
    """Steps until the last iteration or a stop (signal, `train.stop_after_steps`); evaluates and saves on
    schedule, and never checkpoints a state whose loss has not been checked. Returns the step reached."""
    t, total = state.config.train, state.derived.num_iterations
    steps_this_run = 0
    while step < total:
        t_data = time.time()
        batch = next_train_batch(it, state)
        wait = time.time() - t_data
        if profiler:
            profiler.starting(step + 1)
        params, opt_state, metrics = state.train_step(params, opt_state, batch)
        reporter.dispatched(step, metrics, wait)
        step, steps_this_run = step + 1, steps_this_run + 1
        if profiler:
            profiler.done(step, metrics)
        if t.eval_every and (step % t.eval_every == 0 or step == total):
            reporter.flush()
            reporter.evaluation(step, validation_metrics(state, params, tokenizer))
        if evals is not None and evals(step, total):
            reporter.flush()
            reporter.evaluation(step, evals.run(state.model(params), step, total))
        stop_now = stop.should_stop() or 0 < t.stop_after_steps <= steps_this_run
        if step == total or stop_now or (t.checkpoint_every and step % t.checkpoint_every == 0):
            reporter.flush()
            ckptr.save(step, params, opt_state, it.get_state(), meta(step), force=True)
            if hasattr(it, "stats"):  # documents, empty/bad rows, truncations, epoch
                reporter.write({"step": step, "data_stats": it.stats})
        if stop_now:
            break
    reporter.flush()
    return step


def main(argv):
    """Bad input of any kind (flag, config value, file, data, tokenizer) is one `error:` line and exit status 2,
    before the run's files change; a non-finite loss or running out of memory is exit status 1."""
    if len(argv) > 1:
        cli.fail(f"unexpected arguments {argv[1:]}: every setting is a flag, e.g. --config.train.num_iterations=10")
    if flags.FLAGS.config is None:
        cli.fail("--config=configs/<name>.py is required")
    if not flags.FLAGS["verbosity"].present:  # --verbosity=0 (or NANOJAX_VERBOSE=1) shows the libraries' lines
        quiet_library_logs()
    try:
        run(flags.FLAGS.config)
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except (FileNotFoundError, ValueError, KeyError) as e:  # bad input: the message says what and where
        if os.environ.get("NANOJAX_TRACEBACK"):
            raise
        cli.fail(e)  # one line (NANOJAX_TRACEBACK=1 shows the traceback)
    except KeyboardInterrupt:  # Ctrl-C outside the loop's handler (compiling, restoring, closing)
        print("interrupted: exiting now; the same command resumes from the last checkpoint", file=sys.stderr)
        sys.exit(130)
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
    app.run(main, flags_parser=cli.parse_flags)  # flag errors: one line, exit status 2
