"""Training-step benchmark for any config: compile time, tokens/s, MFU, peak memory (XLA's own analysis).

    python -m nanojax.bench train --config=configs/tiny.py [--config.a.b=v] [--steps 10] [--record docs/benchmarks.md]

Synthetic data (no I/O), real optimizer, the same jitted step as `nanojax.train`.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import time

import jax
from absl import app, flags
from ml_collections import config_flags

from nanojax import config as cfglib
from nanojax import paths
from nanojax import sharding as shd
from nanojax.config import ModelConfig
from nanojax.data.synthetic import SyntheticIterator
from nanojax.attention import attention_implementation
from nanojax.model import resolve_remat
from nanojax.profiling import StepProfiler, parse_range
from nanojax.remat import peak_bytes
from nanojax.train import TrainState, measure_remat, setup_jax, stack_micro_batches

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/*.py file", lock_config=True)
flags.DEFINE_integer("steps", 10, "timed steps (after one warm-up step)")
flags.DEFINE_string("record", "", "append the result as a markdown table row to this file")
flags.DEFINE_string("profile", "", "START:STOP: after timing, trace those steps (jax.profiler) under "
                    "$NANOJAX_HOME/bench/<run_name>/profile")
flags.DEFINE_bool("json", False, "also print the result as one JSON line (launch/device_check.sh reads it)")
flags.DEFINE_bool("compile_only", False, "lower + compile on abstract arrays (no allocation, nothing runs): "
                  "compile time and XLA's per-device memory for configs too big for this machine")
FLAGS = flags.FLAGS


def machine() -> str:
    dev = jax.devices()[0]
    if dev.platform == "cpu":
        cpu = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        return f"CPU {cpu}, {os.cpu_count()} cores, {jax.device_count()} XLA device(s)"
    return f"{jax.device_count()}× {dev.device_kind}"


def choices(config, dtype) -> dict:
    """What `auto` resolved to: the attention implementation and the remat policy."""
    m = ModelConfig.of(config.model)
    impl = attention_implementation(m.attention_impl, dtype, m.n_head, m.n_kv_head, m.head_dim, m.seq_len)
    return {"attention": impl, "remat": resolve_remat(m, dtype)}


def benchmark(config, steps: int, compile_only: bool = False, profile: str = "") -> dict:
    setup_jax()
    mesh = shd.make_mesh(config.mesh)
    derived = cfglib.derive(config, mesh.size)
    print(derived.summary(), flush=True)
    if not compile_only:  # compile-only keeps the fixed fallback rule: one compile, for configs too big to run
        measure_remat(config, mesh, derived)
    state = TrainState(config, mesh, derived)
    if compile_only:
        t0 = time.time()
        compiled = state.compile_abstract()
        return {"config": config.run_name, "params": derived.num_params, "devices": mesh.size,
                "mesh": dict(mesh.shape), "tokens_per_step": config.train.total_batch_size,
                "grad_accum": derived.grad_accum_steps, "compute_dtype": str(state.model_dtype),
                "compile_s": time.time() - t0, "step_s": None, "tokens_per_s": None, "mfu": None,
                "peak_bytes_per_device": peak_bytes(compiled), "loss": None, "machine": machine(),
                **choices(config, state.model_dtype)}
    params = state.init_params()
    opt = state.init_opt_state(params)
    it = SyntheticIterator(batch_size=derived.global_micro_batch, seq_len=config.model.seq_len,
                           vocab_size=config.model.vocab_size)
    batch = jax.device_put(stack_micro_batches([next(it) for _ in range(derived.grad_accum_steps)]),
                           state.batch_sharding)
    t0 = time.time()
    lowered = state.train_step.lower(params, opt, batch)
    compiled = lowered.compile()
    compile_s = time.time() - t0
    peak = peak_bytes(compiled)
    params, opt, m = compiled(params, opt, batch)  # warm-up
    jax.block_until_ready(m)
    t0 = time.time()
    for _ in range(steps):
        params, opt, m = compiled(params, opt, batch)
    jax.block_until_ready(m)
    dt = (time.time() - t0) / steps
    if profile:  # after the timing, which the trace would disturb: steps 1..STOP again, START..STOP traced
        profiler = StepProfiler(profile, str(paths.home() / "bench" / config.run_name))
        for i in range(1, profiler.range[1] + 1):
            profiler.starting(i)
            params, opt, m = compiled(params, opt, batch)
            profiler.done(i, m)
    tok_s = config.train.total_batch_size / dt
    return {
        "config": config.run_name, "params": derived.num_params, "devices": mesh.size,
        "mesh": dict(mesh.shape), "tokens_per_step": config.train.total_batch_size,
        "grad_accum": derived.grad_accum_steps, "compute_dtype": str(state.model_dtype),
        "compile_s": compile_s, "step_s": dt, "tokens_per_s": tok_s,
        "mfu": derived.mfu(tok_s, jax.devices()[0].device_kind),
        "peak_bytes_per_device": peak, "loss": float(m["loss"]), "machine": machine(),
        **choices(config, state.model_dtype),
    }


def markdown_row(r: dict) -> str:
    if r["step_s"] is None:
        mfu = step = tok = "(compile only)"
    else:
        mfu = f"{r['mfu'] * 100:.1f}%" if r["mfu"] is not None else "n/a (no peak for this device)"
        step, tok = f"{r['step_s'] * 1000:.0f} ms", f"{r['tokens_per_s']:,.0f}"
    mem = f"{r['peak_bytes_per_device'] / 2**30:.2f} GiB" if r["peak_bytes_per_device"] else "n/a"
    return (f"| {datetime.date.today()} | {r['machine']} | {r['config']} ({r['params']:,} params) | "
            f"{r['mesh']} accum {r['grad_accum']} | {r['compute_dtype']} | {r['compile_s']:.1f} s | "
            f"{step} | {tok} | {mfu} | {mem} |")


def main(argv):
    del argv
    if _CONFIG.value is None:
        raise app.UsageError("--config=configs/<name>.py is required")
    parse_range(FLAGS.profile)  # a bad range fails now, not after the timing
    r = benchmark(_CONFIG.value, FLAGS.steps, FLAGS.compile_only, FLAGS.profile)
    row = markdown_row(r)
    if FLAGS.json:
        print(json.dumps(r))
    print("| date | machine | config | mesh | dtype | compile | step | tokens/s | MFU | peak mem/device |")
    print(row)
    if FLAGS.record:
        with open(FLAGS.record, "a") as f:
            f.write(row + "\n")


if __name__ == "__main__":
    app.run(main)
