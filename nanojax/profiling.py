"""`START:STOP`: a jax.profiler trace of those optimizer steps (1-based, as the step log numbers them), written
under `<dir>/profile/plugins/profile/<time>/` (`*.xplane.pb` for TensorBoard's profile tab and XProf,
`*.trace.json.gz` for Perfetto), so anyone can see where a step's time goes. Used by `nanojax.train`
(`--config.train.profile=START:STOP`) and `bench train` (`--profile=START:STOP` over its timed steps)."""
from __future__ import annotations

import os

import jax

from nanojax.console import log


def parse_range(spec: str) -> tuple[int, int] | None:
    """(start, stop) from "START:STOP" with 1 <= START <= STOP; None for ""; ValueError naming the spec."""
    if not spec:
        return None
    try:
        start, stop = (int(x) for x in spec.split(":"))
    except ValueError:
        raise ValueError(f"profile={spec!r}: expected START:STOP, two step numbers, e.g. 5:8") from None
    if not 1 <= start <= stop:
        raise ValueError(f"profile={spec!r}: expected 1 <= START <= STOP")
    return start, stop


class StepProfiler:
    """Starts the trace before step START runs and stops it once step STOP's results are ready."""

    def __init__(self, spec: str, out_dir: str):
        self.range = parse_range(spec)
        self.dir = os.path.join(out_dir, "profile")
        self.active = False

    def starting(self, step: int) -> None:
        if self.range and step == self.range[0] and not self.active and jax.process_index() == 0:
            jax.profiler.start_trace(self.dir)
            self.active = True

    def done(self, step: int, outputs) -> None:
        if self.active and step >= self.range[1]:
            jax.block_until_ready(outputs)
            self.close()
            log(f"profile of steps {self.range[0]}-{self.range[1]} in {self.dir} (TensorBoard's profile tab, "
                "or the .trace.json.gz in Perfetto)")

    def close(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
