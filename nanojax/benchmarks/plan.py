"""Scale on paper: predict step time, tokens/s, MFU and memory for a config on a TPU slice or GPU cluster that
this machine does not have, from the program XLA actually compiles for it.

    python -m nanojax.bench plan --config=configs/base_d20.py --target=v6e-256 [--mesh=data=1,fsdp=256,tensor=1]
        [--device_batch=N] [--remat=full] [--json] [--sweep]
    python -m nanojax.bench plan --config=configs/base_d20.py --targets=v5e-64,v6e-256,8xH100,4x8xH100
    python -m nanojax.bench plan --config=configs/tiny.py --target=cpu --measure     (calibration on this machine)

The real train step (`nanojax.train.TrainState`, bf16 compute) is lowered and compiled for the target's device
count on fake CPU devices (`bench train --compile_only` does the same); nothing runs. From the compiled HLO
(`nanojax.hlo`): matmul FLOPs, HBM bytes and every collective with its size and device groups, each counted as
often as its loops run. With the chip's facts (`nanojax.chips`), a roofline per device and step:
  compute = FLOPs / peak;  memory = the matmuls' bytes / HBM bandwidth (elementwise work fused into them);
  communication = Σ collectives: bytes·(n−1)/n (×2 for all-reduce) / link bandwidth, where the link is the fast
  one (NVLink, ICI) if the group stays inside a node or slice, else the slow one (InfiniBand);
  step = max(compute, memory, communication) if XLA overlaps collectives with compute, max(compute, memory) +
  communication if it does not: both are printed; the binding resource is the largest term.
MFU counts the model FLOPs of nanochat's formula (`ModelConfig.flops_per_token`), as the train loop does.
Memory is XLA's per-device figure for the CPU compile (argument + temporaries), against the chip's HBM.
Each target compiles in its own process (the fake device count is fixed per process).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
from absl import app, flags

from nanojax import chips, hlo
from nanojax import config as cfglib
from nanojax import sharding as shd
from nanojax.benchmarks.train import benchmark  # also defines --config and --json (shared)
from nanojax.remat import peak_bytes

flags.DEFINE_string("target", "", "one target: v6e-256, v5e-64, 8xH100, 4x8xH100, cpu")
flags.DEFINE_string("targets", "", "comma-separated targets (each in its own process)")
flags.DEFINE_string("mesh", "", "data=…,fsdp=…,tensor=… (default: the config's, fsdp taking the rest)")
flags.DEFINE_integer("device_batch", 0, "rows per device per micro-step (0: the config's, lowered until it divides)")
flags.DEFINE_string("remat", "full", "remat policy to plan with (full: what XLA attention needs at d20+)")
flags.DEFINE_bool("sweep", False, "rank meshes x device batches that fit the target")
flags.DEFINE_bool("measure", False, "target=cpu: also run real steps here and print measured vs predicted")
FLAGS = flags.FLAGS
_CHILD = "NANOJAX_PLAN_CHILD"


# -- compiling for the target --------------------------------------------------------------------------
def planned_config(config, devices: int, mesh: str, device_batch: int, remat: str, dtype: str = "bfloat16"):
    """The config as it would run on the target: its dtype, the given mesh/remat, a device batch that divides."""
    c = config.copy_and_resolve_references()
    with c.unlocked():
        c.model.compute_dtype, c.model.remat, c.data.kind = dtype, remat, "synthetic"
        c.mesh.num_devices = devices
        if mesh:
            sizes = dict(kv.split("=") for kv in mesh.split(","))
            c.mesh.data, c.mesh.fsdp, c.mesh.tensor = (int(sizes.get(k, 1)) for k in ("data", "fsdp", "tensor"))
        data, fsdp, _ = cfglib.mesh_shape(c.mesh, devices)
        rows = c.train.total_batch_size // c.model.seq_len // (data * fsdp)
        if rows < 1:
            raise ValueError(f"total_batch_size {c.train.total_batch_size:,} tokens is less than one {c.model.seq_len}"
                             f"-token row per data-parallel device ({data * fsdp}): raise it or use tensor parallelism")
        want = device_batch or c.train.device_batch_size
        c.train.device_batch_size = max(b for b in range(1, min(want, rows) + 1) if rows % b == 0)
    return c


def compile_step(config, devices):
    from nanojax.train import TrainState  # imported here: a parent process that only spawns never needs it

    mesh = shd.make_mesh(config.mesh, devices=devices)
    derived = cfglib.derive(config, mesh.size)
    state = TrainState(config, mesh, derived)
    shape = (derived.grad_accum_steps, derived.global_micro_batch, config.model.seq_len)
    sds = jax.ShapeDtypeStruct(shape, np.int32, sharding=state.batch_sharding)
    t0 = time.time()
    batch = {"inputs": sds, "targets": sds}
    compiled = state.train_step.lower(state.abstract_params, state.abstract_opt, batch).compile()
    return compiled, derived, mesh, time.time() - t0


# -- the roofline --------------------------------------------------------------------------------------
def collective_seconds(c: hlo.Collective, chip: chips.Chip) -> tuple[float, bool]:
    """(seconds for all `c.count` runs, whether its groups leave a node/slice) under the ring model."""
    n = c.groups.shape[1]
    if n <= 1 or c.bytes == 0:
        return 0.0, False
    crosses = bool(np.any(c.groups // chip.domain != (c.groups[:, :1] // chip.domain)))
    bandwidth = chip.slow_bytes_per_s if crosses else chip.fast_bytes_per_s
    if bandwidth is None:
        raise ValueError(f"a collective spans more than {chip.domain} {chip.name} chips and nanojax.chips has no "
                         "bandwidth between slices for it")
    moved = c.bytes if c.kind == "collective-permute" else c.bytes * (n - 1) / n * (2 if c.kind == "all-reduce" else 1)
    return c.count * moved / bandwidth, crosses


def roofline(costs: hlo.ProgramCosts, chip: chips.Chip, derived, config, memory_bytes: float | None) -> dict:
    compute = costs.flops / chip.peak_flops
    memory = costs.matmul_bytes / chip.hbm_bytes_per_s
    comm, comm_bytes, slow = 0.0, {}, 0.0
    for c in costs.collectives:
        seconds, crosses = collective_seconds(c, chip)
        comm += seconds
        slow += seconds if crosses else 0.0
        comm_bytes[c.kind] = comm_bytes.get(c.kind, 0) + c.bytes * c.count
    overlap, serial = max(compute, memory, comm), max(compute, memory) + comm
    terms = {"compute (matmul FLOPs)": compute, "memory (HBM bytes)": memory,
             "communication" + (" (between nodes)" if slow > comm / 2 else ""): comm}
    tokens = config.train.total_batch_size
    model_flops = derived.flops_per_token * tokens / derived.num_devices
    return {
        "xla_flops_per_device": costs.flops, "model_flops_per_device": model_flops,
        "hbm_bytes_per_device": costs.matmul_bytes, "hbm_bytes_as_cpu_fused": costs.bytes_accessed,
        "collective_bytes_per_device": comm_bytes,
        "compute_s": compute, "memory_s": memory, "communication_s": comm,
        "step_s_overlapped": overlap, "step_s_serial": serial, "bound": max(terms, key=terms.get),
        "tokens_per_s_overlapped": tokens / overlap, "tokens_per_s_serial": tokens / serial,
        "mfu_overlapped": model_flops / (overlap * chip.peak_flops),
        "mfu_serial": model_flops / (serial * chip.peak_flops),
        "memory_gib_per_device": memory_bytes / 2**30 if memory_bytes else None,
        "hbm_gib": chip.hbm_bytes / 2**30 if chip.hbm_bytes else None,
        "fits": None if not (memory_bytes and chip.hbm_bytes) else bool(memory_bytes <= chip.hbm_bytes),
    }


def measured_cpu_chip(size: int = 2048) -> chips.Chip:
    """This machine as a 'chip': peak = a float32 matmul's FLOP/s (CPU runs float32), bandwidth = an array copy's."""
    a = jax.random.normal(jax.random.key(0), (size, size), jax.numpy.float32)
    mm = jax.jit(lambda x: x @ x)
    mm(a).block_until_ready()
    t = time.perf_counter()
    for _ in range(5):
        mm(a).block_until_ready()
    flops = 5 * 2 * size**3 / (time.perf_counter() - t)
    big = jax.numpy.ones((64 << 20) // 4, jax.numpy.float32)
    copy = jax.jit(lambda x: x + 1.0)
    copy(big).block_until_ready()
    t = time.perf_counter()
    for _ in range(5):
        copy(big).block_until_ready()
    bw = 5 * 2 * big.nbytes / (time.perf_counter() - t)
    return chips.Chip("this CPU (measured)", flops, None, bw, bw, None, 1, "measured by bench plan")


def plan_one(config, target_spec: str, mesh: str, device_batch: int, remat: str, measure: bool = False) -> dict:
    if target_spec == "cpu":
        target = chips.Target(measured_cpu_chip(), 1, "cpu")
    else:
        target = chips.parse_target(target_spec)
    devices = jax.devices()[:target.count]
    if len(devices) < target.count:
        raise ValueError(f"{target.count} devices needed, {len(devices)} here: run through `bench plan` (it sets "
                         f"--xla_force_host_platform_device_count)")
    dtype = "float32" if target_spec == "cpu" else "bfloat16"  # what each computes in
    c = planned_config(config, target.count, mesh, device_batch, remat, dtype)
    compiled, derived, mesh_obj, compile_s = compile_step(c, devices)
    costs = hlo.program_costs(compiled.as_text(), target.count)
    result = {"config": config.run_name, "target": target.name, "chip": target.chip.name, "devices": target.count,
              "mesh": dict(mesh_obj.shape), "device_batch": c.train.device_batch_size,
              "grad_accum": derived.grad_accum_steps, "remat": remat, "params": derived.num_params,
              "tokens_per_step": c.train.total_batch_size, "compile_s": round(compile_s, 1),
              **roofline(costs, target.chip, derived, c, peak_bytes(compiled))}
    if measure:
        result["measured_step_s"] = benchmark(c, steps=3)["step_s"]
    return result


def sweep(config, target_spec: str, remat: str) -> list[dict]:
    """Every mesh (tensor 1-8, data 1 or one per node/slice) x device batch 1-32 that compiles, fitting ones
    first, fastest first (progress on stderr)."""
    target = chips.parse_target(target_spec)
    n, heads = target.count, cfglib.ModelConfig.of(config.model).n_head
    results = []
    for tensor in (t for t in (1, 2, 4, 8) if n % t == 0 and heads % t == 0):
        for data in sorted({1, max(1, n // (tensor * target.chip.domain))}):
            if (n // tensor) % data:
                continue
            mesh = f"data={data},fsdp={n // (tensor * data)},tensor={tensor}"
            for batch in (1, 2, 4, 8, 16, 32):
                try:
                    r = plan_one(config, target_spec, mesh, batch, remat)
                except ValueError:
                    continue
                if r["device_batch"] == batch:
                    results.append(r)
                    print(f"# {json.dumps(_brief(r))}", file=sys.stderr, flush=True)
    return sorted(results, key=lambda r: (not r["fits"], r["step_s_overlapped"]))


# -- printing ---------------------------------------------------------------------------------------
def _brief(r: dict) -> dict:
    keys = ("target", "mesh", "device_batch", "grad_accum", "step_s_overlapped", "step_s_serial", "mfu_overlapped",
            "bound", "memory_gib_per_device", "fits")
    return {k: r[k] for k in keys}


def table(results: list[dict]) -> str:
    head = ("| config | target | mesh (data×fsdp×tensor) · batch · accum | compute | memory | comm | step "
            "(overlapped / serial) | tokens/s | MFU | bound | mem/device | fits |\n|" + "---|" * 12)
    rows = []
    for r in results:
        m = r["mesh"]
        mem = f"{r['memory_gib_per_device']:.1f} / {r['hbm_gib']:.0f} GiB" if r.get("hbm_gib") else "–"
        rows.append(
            f"| {r['config']} | {r['target']} | {m['data']}×{m['fsdp']}×{m['tensor']} · {r['device_batch']} · "
            f"{r['grad_accum']} | {r['compute_s']:.3f} s | {r['memory_s']:.3f} s | {r['communication_s']:.3f} s | "
            f"{r['step_s_overlapped']:.3f} / {r['step_s_serial']:.3f} s | {r['tokens_per_s_overlapped']:,.0f} | "
            f"{r['mfu_overlapped'] * 100:.0f}–{r['mfu_serial'] * 100:.0f} % | {r['bound']} | {mem} | "
            f"{'–' if r['fits'] is None else ('yes' if r['fits'] else 'NO')} |")
    return "\n".join([head, *rows])


def _in_child(target_spec: str) -> list[dict]:
    """Run this command for one target in a process with that many fake devices; its JSON results."""
    count = 1 if target_spec == "cpu" else chips.parse_target(target_spec).count
    argv = [a for a in sys.argv[1:] if not a.startswith(("--targets", "--target=", "--json"))]
    env = {**os.environ, _CHILD: "1", "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={count}"}
    out = subprocess.run([sys.executable, "-m", "nanojax.bench", "plan", *argv, f"--target={target_spec}", "--json"],
                         env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"planning {target_spec} failed:\n{out.stderr[-3000:]}")
    results = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return results if FLAGS.sweep else results[-1:]


def main(argv):
    del argv
    config = FLAGS.config
    if config is None:
        raise app.UsageError("--config=configs/<name>.py is required")
    targets = [t for t in (FLAGS.targets or FLAGS.target).split(",") if t]
    if not targets:
        raise app.UsageError("--target=… or --targets=… is required (e.g. v6e-256, 8xH100, 4x8xH100, cpu)")
    if os.environ.get(_CHILD) != "1":  # the parent: one process per target, then one table
        results = [r for t in targets for r in _in_child(t)]
        print("\n".join(json.dumps(r) for r in results) if FLAGS.json else table(results))
        return
    if FLAGS.sweep:
        for r in sweep(config, targets[0], FLAGS.remat):
            print(json.dumps(r))
        return
    result = plan_one(config, targets[0], FLAGS.mesh, FLAGS.device_batch, FLAGS.remat, FLAGS.measure)
    print(json.dumps(result))


if __name__ == "__main__":
    app.run(main)

