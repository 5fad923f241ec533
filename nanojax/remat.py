"""`model.remat=auto` decided by measurement: the cheapest policy whose compiled train step fits the device.

Recomputing costs compute (full remat ≈ one more forward, a third more per step); storing costs memory. Which
one a run needs depends on the attention backend, the mesh, the batch and the device, so instead of a fixed
rule `choose_remat` compiles the step on abstract arrays (nothing allocated) for none, then dots, then full,
and keeps the first whose peak (XLA's memory analysis) fits under the device's memory limit. The persistent
compilation cache makes the chosen step's real compile a cache hit. CPUs keep `none` (host memory, no limit).
"""
from __future__ import annotations

from typing import Callable

import jax

from nanojax.console import log

CANDIDATES = ("none", "dots", "full")  # cheapest compute first
HEADROOM = 0.95  # of the device's limit: the allocator fragments, the data pipeline holds a batch


def peak_bytes(compiled) -> int | None:
    """XLA's per-device figure: arguments + temporaries + outputs, less what is aliased (donated)."""
    mem = compiled.memory_analysis()
    if mem is None:
        return None
    return (getattr(mem, "temp_size_in_bytes", 0) + getattr(mem, "argument_size_in_bytes", 0)
            + getattr(mem, "output_size_in_bytes", 0) - getattr(mem, "alias_size_in_bytes", 0))


def device_memory_limit() -> int | None:
    """Bytes the first local device may allocate (None where the backend does not say, e.g. CPU)."""
    try:
        stats = jax.local_devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001 - backends without memory stats
        return None
    return stats.get("bytes_limit")


def choose_remat(config, step_peak: Callable[[object], int | None], limit_bytes: int | None = None) -> str:
    """Set `config.model.remat` from `auto` to the cheapest policy that fits and return it (the config is
    changed in place so every model built from it agrees). `step_peak(config)` is the compiled train step's
    peak bytes per device (`peak_bytes(TrainState(...).compile_abstract())`); `limit_bytes` defaults to
    the device's limit."""
    if config.model.remat != "auto":
        return config.model.remat
    limit = limit_bytes if limit_bytes is not None else device_memory_limit()
    if limit is None:  # CPU: nothing to fit into; `auto` stays in the config and resolves to none
        log("remat auto -> none (no device memory limit: CPU)")
        return "none"
    peaks = {}
    for policy in CANDIDATES:
        with config.unlocked():
            config.model.remat = policy
        peaks[policy] = step_peak(config)
        if peaks[policy] is not None and peaks[policy] <= HEADROOM * limit:
            break
    chosen = next((p for p, b in peaks.items() if b is not None and b <= HEADROOM * limit), "full")
    with config.unlocked():
        config.model.remat = chosen
    gib = ", ".join(f"{p} {b / 2**30:.1f} GiB" if b is not None else f"{p} unknown" for p, b in peaks.items())
    note = "" if chosen in peaks and (peaks[chosen] or 0) <= HEADROOM * limit else \
        "; even full remat does not fit: lower train.device_batch_size or add devices"
    log(f"remat auto -> {chosen} (peak per device: {gib}; limit {HEADROOM:.0%} of {limit / 2**30:.1f} GiB{note})")
    return chosen
