"""Stage 3, reinforcement learning on GSM8K (nanochat's `chat_rl.py`): `python -m nanojax.train
--config=configs/rl_d20.py` (`data.kind=rl`; `nanojax.train.run` hands such a config to `run` here).

nanochat's "GRPO" is on-policy REINFORCE: per question `rl.num_samples` replies (temperature 1, top-k 50, ≤ 256
tokens, calculator on), reward = the task's scoring, advantage = reward − the question's mean reward, loss =
−Σ advantage · log p over the sampled reply tokens / their number over the whole step (token-level), no KL term,
no ratio clipping. `rl.examples_per_step` questions per step, cycling through `data.train_tasks` in order for
`rl.num_epochs`; pass@1..`rl.eval_samples` on the first `rl.eval_examples` questions of `data.val_tasks` at step
0 and every `train.eval_every` steps.

Why a loop of its own: a step's batch is sampled from the parameters being trained and its evaluation samples
too, so `train.train_loop` (an iterator of fixed data, validation loss) would have to bend around both. It
reuses the loop's parts instead: `TrainState` with the policy-gradient loss (the same jitted, accumulated,
Muon + AdamW step), `restore_or_init` (`init_from` the SFT run, or resume), the `StepReporter` sinks,
`StopFlag`, the Checkpointer. The rollout position (questions consumed, PRNG key) is the checkpoint's data
item, so a restart continues exactly.

Every host samples its own share of the questions on its first device, with a whole copy of the parameters
(one all-gather per step), and no collective until the step's batch is assembled.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from nanojax import checkpoint as ckpt
from nanojax import config as cfglib
from nanojax import sharding as shd
from nanojax import train
from nanojax.console import log
from nanojax.data.chat import build_mixture, pad_lengths
from nanojax.engine import Engine
from nanojax.loggers import logger_names
from nanojax.optim import current_lrs
from nanojax.profiling import StepProfiler
from nanojax.rollout import (RolloutPosition, check_generative, pass_at_k, policy_gradient_rows, row_length,
                             sample_groups)
from nanojax.tokenizer import load_for_config


def policy_gradient_loss(params, graphdef, micro_batch):
    """(Σ weight · −log p over counted targets, counted targets) of one micro-batch; the step divides both
    sums over the whole batch, so the loss is −Σ advantage · log p / counted tokens."""
    nll_BT = nnx.merge(graphdef, params).token_losses(micro_batch["inputs"], micro_batch["targets"])
    return jnp.sum(micro_batch["weights"] * nll_BT), jnp.sum(micro_batch["targets"] >= 0).astype(jnp.float32)


def fill_sizes(config, num_questions: int, process_count: int, num_devices: int) -> None:
    """Write the derived sizes into the config (config.json shows them): train.total_batch_size = the step's
    rows (examples_per_step × num_samples) × seq_len, and train.num_iterations=-1 -> num_epochs × questions //
    examples_per_step. ValueError naming the keys for sizes that cannot work."""
    r, t = config.rl, config.train
    problems = []
    data, fsdp, _ = cfglib.mesh_shape(config.mesh, num_devices)
    rows, micro_rows = r.examples_per_step * r.num_samples, t.device_batch_size * data * fsdp
    if rows % micro_rows:
        problems.append(f"rl.examples_per_step × rl.num_samples = {rows} sequences per step must be a multiple of "
                        f"train.device_batch_size {t.device_batch_size} × data-parallel {data * fsdp} = {micro_rows}")
    if r.examples_per_step % process_count:
        problems.append(f"rl.examples_per_step={r.examples_per_step} must be a multiple of the {process_count} "
                        f"processes (each samples its own share of the questions)")
    for key in ("num_samples", "eval_samples"):
        if r.sample_rows < r[key]:
            problems.append(f"rl.sample_rows={r.sample_rows} must be at least rl.{key}={r[key]} (one question's "
                            f"replies share one engine call)")
    steps = r.num_epochs * num_questions // r.examples_per_step
    if t.num_iterations == -1 and steps < 1:
        problems.append(f"rl.num_epochs={r.num_epochs} over {num_questions} questions of data.train_tasks is not "
                        f"one step of rl.examples_per_step={r.examples_per_step} questions")
    if problems:
        raise ValueError("; ".join(problems))
    t.total_batch_size = rows * config.model.seq_len
    if t.num_iterations == -1:
        t.num_iterations = steps


def global_max(value: float) -> float:
    if jax.process_count() == 1:
        return value
    return float(np.max(multihost_utils.process_allgather(np.asarray(value, np.float64))))


class RolloutReporter(train.StepReporter):
    """The step log and metrics of an RL step: reward, pass@k (as evaluations), lengths, and tokens/s of sampling
    and of training apart (the step time less the sampling time)."""

    def _record(self, step: int, m: dict, dt: float, sample_time: float) -> dict:
        self.dt_ema = dt if self.dt_ema is None else 0.9 * self.dt_ema + 0.1 * dt
        train_time = max(dt - sample_time, 1e-9)
        return {"step": step + 1, "reward": float(m["reward"]), "loss": float(m["loss"]),
                "grad_norm": float(m["grad_norm"]), "loss_tokens": int(m["tokens"]),
                "sequence_length": float(m["sequence_length"]), "reply_length": float(m["reply_length"]),
                "sequence_tokens": int(m["sequence_tokens"]),
                "sample_tokens_per_s": float(m["reply_tokens"]) / max(sample_time, 1e-9),
                "train_tokens_per_s": float(m["sequence_tokens"]) / train_time,
                "step_time_s": dt, "sample_time_s": sample_time, **current_lrs(self.config, self.total, step)}

    def _log_line(self, rec: dict, dt: float, sample_time: float):
        eta = (self.total - rec["step"]) * self.dt_ema
        log(f"step {rec['step']:6d}/{self.total} | reward {rec['reward']:.4f} | loss {rec['loss']:+.5f} | gnorm "
            f"{rec['grad_norm']:.3f} | reply {rec['reply_length']:.0f} tok | sample {rec['sample_tokens_per_s']:,.0f}"
            f" tok/s | train {rec['train_tokens_per_s']:,.0f} tok/s | {dt:.1f} s (sampling {sample_time:.1f} s) | "
            f"eta {eta / 60:.1f} min")


class Rollouts:
    """What a step samples and scores: the tasks, the tokenizer, the settings, and a way to a host-local model."""

    def __init__(self, config, state: train.TrainState, tokenizer):
        self.config, self.state, self.tokenizer = config, state, tokenizer
        d, r = config.data, config.rl
        self.train_task = build_mixture(d.train_tasks, d.task_sources, d.mixture_seed)
        check_generative(self.train_task, "data.train_tasks")
        self.eval_task = build_mixture(d.val_tasks, d.task_sources, d.mixture_seed) \
            if d.val_tasks and config.train.eval_every and r.eval_examples else None
        if self.eval_task is not None:
            check_generative(self.eval_task, "data.val_tasks")
        self.lengths = pad_lengths(config.model.seq_len, d.pad_lengths)
        self.pad_id = tokenizer.encode_special("<|assistant_end|>")
        self._replicate = jax.jit(lambda p: p, out_shardings=shd.replicated(state.mesh))
        self.sampling = dict(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_k=r.top_k,
                             sample_rows=r.sample_rows)

    def engine(self, params) -> Engine:
        """An engine on this host's first device with a whole copy of `params` (sampling needs no collective)."""
        local = jax.tree.map(lambda a: a.addressable_data(0), self._replicate(params))
        return Engine(self.state.model(local), self.tokenizer)

    def step_batch(self, params, position: RolloutPosition):
        """(global batch, host metrics, sampling seconds) of the next step; advances `position`."""
        t0 = time.time()
        r, derived = self.config.rl, self.state.derived
        numbers, key = position.next_step(r.examples_per_step, jax.process_index(), jax.process_count())
        groups = sample_groups(self.engine(params), self.tokenizer, self.train_task, numbers, key,
                               num_samples=r.num_samples, **self.sampling)
        sample_time = global_max(time.time() - t0)
        lengths = [len(s) for g in groups for s in g.sequences]
        replies = [len(s) - g.prompt_len for g in groups for s in g.sequences]
        rewards = np.concatenate([g.rewards for g in groups])
        longest = int(global_max(row_length(groups)))
        rows = policy_gradient_rows(groups, self.lengths, self.pad_id, longest)
        local = {k: v.reshape(derived.grad_accum_steps, -1, v.shape[-1]) for k, v in rows.items()}
        batch = train.global_batch(local, self.state.batch_sharding, 1, derived.global_micro_batch)
        n, reward, length, reply = shd.process_sums([len(rewards), rewards.sum(), sum(lengths), sum(replies)])
        stats = {"reward": reward / n, "sequence_length": length / n, "reply_length": reply / n,
                 "sequence_tokens": length, "reply_tokens": reply}
        return batch, stats, sample_time

    def evaluate(self, params, step: int) -> dict:
        """pass@1..eval_samples on the first rl.eval_examples questions of data.val_tasks (each host its share),
        replies seeded by (seed + 1, step) so a resumed run evaluates alike."""
        if self.eval_task is None:
            return {}
        r = self.config.rl
        n = min(r.eval_examples, len(self.eval_task))
        numbers = list(range(jax.process_index(), n, jax.process_count()))
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(self.config.seed + 1), step), jax.process_index())
        counts = pass_at_k(self.engine(params), self.tokenizer, self.eval_task, numbers, key,
                           num_samples=r.eval_samples, **self.sampling)
        totals = shd.process_sums(np.concatenate([[len(numbers)], counts]))
        return {f"pass@{k}": float(totals[k] / max(totals[0], 1)) for k in range(1, r.eval_samples + 1)}


def run(config) -> dict:
    """Run (or resume) the RL stage described by `config`; returns the final metrics. As `train.run`: bad input
    fails before the run's files change."""
    cfglib.validate(config)
    logger_names(config.train.loggers)
    train.setup_jax()
    mesh = shd.make_mesh(config.mesh)
    tokenizer = load_for_config(config)
    if tokenizer is None:
        raise ValueError("data.kind=rl needs a tokenizer (data.tokenizer_dir)")
    questions = len(build_mixture(config.data.train_tasks, config.data.task_sources, config.data.mixture_seed))
    fill_sizes(config, questions, jax.process_count(), mesh.size)
    derived = cfglib.derive(config, mesh.size)
    run_dir = train.run_dir_for(config)
    r = config.rl
    log(f"run {config.run_name} -> {run_dir} (rl: {r.examples_per_step} questions × {r.num_samples} samples per "
        f"step, {questions:,} questions)\n{derived.summary()}\nmesh: {dict(mesh.shape)}")
    log_dir = train.local_log_dir(run_dir, config)
    train.measure_remat(config, mesh, derived)
    state = train.TrainState(config, mesh, derived, loss_fn=policy_gradient_loss)
    rollouts = Rollouts(config, state, tokenizer)
    ckptr = ckpt.Checkpointer(run_dir, config.train.max_to_keep, config.train.async_checkpointing)
    params, opt_state, step, data_state, source = train.restore_or_init(state, ckptr, config)
    if step >= derived.num_iterations:
        log(f"run already complete: step {step} of {derived.num_iterations}")
        ckptr.close()
        return {"step": step}
    if step and not data_state:
        raise ckpt.CheckpointError(f"checkpoint step {step} in {ckptr.directory} holds no rollout position")
    position = RolloutPosition.from_state(data_state) if data_state else RolloutPosition.start(config.seed)
    train.open_run_records(config, log_dir, step if step else -1)  # a fresh run logs step 0's pass@k anew
    reporter = RolloutReporter(config, derived, log_dir, ckptr.latest_step)
    profiler = StepProfiler(config.train.profile, log_dir)
    try:
        with train.StopFlag() as stop:
            step = rl_loop(rollouts, params, opt_state, step, position, ckptr, reporter, stop, profiler,
                           lambda at: train.checkpoint_meta(config, derived, source, tokenizer, at))
    finally:
        profiler.close()
        ckptr.close()
        reporter.close()
    log(f"{'stopped' if step < derived.num_iterations else 'finished'} at step {step}; "
        f"checkpoint in {ckptr.directory}/{step}")
    return {**reporter.last, "step": step, "stopped_by_signal": stop.signum is not None}


def rl_loop(rollouts: Rollouts, params, opt_state, step: int, position: RolloutPosition, ckptr, reporter,
            stop, profiler, meta) -> int:
    """Sample, score, step, until the last iteration or a stop; pass@k at step 0 and every train.eval_every
    steps; checkpoints as `train.train_loop` (the rollout position is the data state). Returns the step reached."""
    state, t = rollouts.state, rollouts.config.train
    total, steps_this_run = state.derived.num_iterations, 0
    if step == 0 and t.eval_every:
        reporter.evaluation(0, rollouts.evaluate(params, 0))
    while step < total:
        batch, stats, sample_time = rollouts.step_batch(params, position)
        profiler.starting(step + 1)
        params, opt_state, metrics = state.train_step(params, opt_state, batch)
        reporter.dispatched(step, {**metrics, **stats}, sample_time)
        reporter.flush()  # the next rollouts need these parameters anyway: nothing to overlap
        step, steps_this_run = step + 1, steps_this_run + 1
        profiler.done(step, metrics)
        if t.eval_every and (step % t.eval_every == 0 or step == total):
            reporter.evaluation(step, rollouts.evaluate(params, step))
        stop_now = stop.should_stop() or 0 < t.stop_after_steps <= steps_this_run
        if step == total or stop_now or (t.checkpoint_every and step % t.checkpoint_every == 0):
            ckptr.save(step, params, opt_state, position.state(), meta(step), force=True)
        if stop_now:
            break
    return step
