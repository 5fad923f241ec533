"""Accelerator facts in one place: the MFU peak of `bench train` and the roofline of `bench plan` read them.

Each figure is the vendor's published one (dense bf16 FLOP/s without sparsity; HBM capacity and bandwidth;
interconnect bandwidth per chip), with its source. Interconnect figures are per direction:
  * NVLink 4 (H100/H200): 900 GB/s per GPU in both directions together → 450 GB/s each way; NVLink 3 (A100)
    600 → 300. Between nodes, one 400 Gb/s NDR InfiniBand NIC per GPU (DGX/HGX H100) → 50 GB/s; A100 (HDR) 25.
  * TPU ICI: Google gives one "interchip interconnect bandwidth" per chip for all its links together; a ring
    collective runs along one torus dimension, i.e. over half of them, so half the figure is used.
"""
from __future__ import annotations

import dataclasses
import re


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    peak_flops: float  # dense bf16 FLOP/s
    hbm_bytes: float | None = None
    hbm_bytes_per_s: float | None = None
    fast_bytes_per_s: float | None = None  # per direction, within a node (NVLink) or a slice (ICI)
    slow_bytes_per_s: float | None = None  # per direction, between nodes (InfiniBand) or slices (DCN)
    domain: int = 8  # chips that share the fast interconnect (GPUs per node; chips per TPU slice)
    source: str = ""


GB, GIB = 1e9, 2**30
CHIPS = {
    "H100": Chip("H100 SXM", 989e12, 80 * GB, 3.35e12, 450 * GB, 50 * GB, 8,
                 "NVIDIA H100 Tensor Core GPU datasheet (SXM5); DGX H100 user guide (8x ConnectX-7 400 Gb/s)"),
    "H200": Chip("H200 SXM", 989e12, 141 * GB, 4.8e12, 450 * GB, 50 * GB, 8, "NVIDIA H200 datasheet"),
    "A100": Chip("A100 SXM 80GB", 312e12, 80 * GB, 2.039e12, 300 * GB, 25 * GB, 8, "NVIDIA A100 datasheet"),
    "TPU v6e": Chip("TPU v6e (Trillium)", 918e12, 32 * GB, 1640 * GB, 3584e9 / 8 / 2, None, 256,
                    "cloud.google.com/tpu/docs/v6e: 918 TFLOP/s bf16, 32 GB HBM at 1,640 GB/s, ICI 3,584 Gbps"),
    "TPU v5p": Chip("TPU v5p", 459e12, 95 * GB, 2765 * GB, 4800e9 / 8 / 2, None, 8960,
                    "cloud.google.com/tpu/docs/v5p: 459 TFLOP/s bf16, 95 GB HBM at 2,765 GB/s, ICI 4,800 Gbps"),
    "TPU v5 lite": Chip("TPU v5e", 197e12, 16 * GB, 819 * GB, 1600e9 / 8 / 2, None, 256,
                        "cloud.google.com/tpu/docs/v5e: 197 TFLOP/s bf16, 16 GB HBM at 819 GB/s, ICI 1,600 Gbps"),
    # peak only (MFU of `bench train`); add bandwidths with a source before planning on them
    "L40S": Chip("L40S", 362e12), "A10G": Chip("A10G", 125e12), "RTX 4090": Chip("RTX 4090", 165e12),
    "TPU v4": Chip("TPU v4", 275e12), "TPU v3": Chip("TPU v3", 123e12),
}
ALIASES = {"v6e": "TPU v6e", "v5p": "TPU v5p", "v5e": "TPU v5 lite", "TPU v5e": "TPU v5 lite", "v4": "TPU v4"}


def chip_for(device_kind: str) -> Chip | None:
    """The chip whose key is part of a `jax.devices()[0].device_kind` (e.g. "NVIDIA H100 80GB HBM3")."""
    kind = device_kind.lower()
    for key, chip in CHIPS.items():
        if key.lower() in kind:
            return chip
    for alias, key in ALIASES.items():
        if alias.lower() in kind:
            return CHIPS[key]
    return None


def peak_flops(device_kind: str) -> float | None:
    chip = chip_for(device_kind)
    return chip.peak_flops if chip else None


@dataclasses.dataclass(frozen=True)
class Target:
    """A machine to plan for: `count` chips of one kind."""
    chip: Chip
    count: int
    name: str


def parse_target(spec: str) -> Target:
    """'v6e-256', 'v5e-64', 'v5p-128' (a TPU slice), '8xH100', '4x8xH100' (nodes x GPUs), 'H100' (one)."""
    s = spec.strip()
    m = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", s, re.I)
    if m:
        key = ALIASES.get(m.group(1).lower())
        if key is None:
            raise ValueError(f"unknown TPU generation {m.group(1)!r} in target {spec!r}; known: v5e, v5p, v6e")
        return Target(CHIPS[key], int(m.group(2)), s)
    m = re.fullmatch(r"(?:(\d+)x)?(?:(\d+)x)?([A-Za-z]\w*)", s)
    if m and m.group(3).upper() in {k.upper() for k in CHIPS}:
        chip = next(c for k, c in CHIPS.items() if k.upper() == m.group(3).upper())
        nodes, per_node = (int(m.group(1) or 1), int(m.group(2))) if m.group(2) else (1, int(m.group(1) or 1))
        if chip.hbm_bytes_per_s is None:
            raise ValueError(f"{chip.name} has no bandwidth figures in nanojax.chips yet; plan for another chip")
        return Target(chip, nodes * per_node, s)
    raise ValueError(f"target {spec!r}: expected e.g. v6e-256, v5e-64, 8xH100, 4x8xH100")
