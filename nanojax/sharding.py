"""Mesh construction and the one rules table that maps logical axis names onto mesh axes; multi-host start-up.

Parameters are annotated with logical names in `model.py` (`embed`, `heads`, `mlp`, `vocab`, `layers`, …).
Changing how a model is split is a change to `RULES` or to the mesh shape in the config, never to the model.
A dimension that the mesh axes do not divide stays replicated rather than failing, so every config runs on
every device count.
"""
from __future__ import annotations

import math
import os

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from nanojax.config import mesh_shape

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or tuple of mesh axes, or None for replicated)
RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "layers": None,
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "vocab": "tensor",
    "value_embed": "fsdp",  # HEAD's value-embedding rows (n_kv_head·head_dim wide): split as embed is
    "seq": None,
}


def start_distributed() -> None:
    """`jax.distributed.initialize()` when NANOJAX_DISTRIBUTED=1 or JAX_COORDINATOR_ADDRESS is set; call it before
    anything touches a device. On a cluster (SLURM, Cloud TPU) jax finds the coordinator, process count and index
    itself; JAX_NUM_PROCESSES and JAX_PROCESS_ID (with JAX_COORDINATOR_ADDRESS, which jax reads) give them where
    nothing else does: several processes on one machine."""
    if os.environ.get("NANOJAX_DISTRIBUTED") != "1" and not os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return
    if jax.distributed.is_initialized():
        return
    args = {}
    for name, key in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
        value = os.environ.get(name, "")
        if value:
            if not value.isdigit():
                raise ValueError(f"{name}={value!r} is not a non-negative integer")
            args[key] = int(value)
    jax.distributed.initialize(**args)


def devices_for(mesh_cfg) -> list:
    """Every device, or the first `mesh.num_devices` (e.g. a 1-device run on a bigger host)."""
    devices = jax.devices()
    if mesh_cfg.num_devices > 0:
        if mesh_cfg.num_devices > len(devices):
            raise ValueError(f"mesh.num_devices={mesh_cfg.num_devices} but only {len(devices)} devices exist")
        devices = devices[: mesh_cfg.num_devices]
    return devices


def make_mesh(mesh_cfg, devices=None) -> Mesh:
    """Mesh ('data', 'fsdp', 'tensor') from the config over `devices` (default: `devices_for(mesh_cfg)`);
    −1 takes the rest of the devices.

    Axes are `Auto` (GSPMD propagation): parameters are placed by the rules table, and the model pins the
    few activations whose sharding propagation would otherwise guess (`constrain`).
    """
    devices = list(devices if devices is not None else devices_for(mesh_cfg))
    shape = mesh_shape(mesh_cfg, len(devices))
    try:
        grid = mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # odd topologies / fake CPU devices: plain order is fine
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(logical_axes, shape, mesh: Mesh, rules=None) -> P:
    """PartitionSpec for an array with these logical axes; undivisible or reused mesh axes stay replicated."""
    rules = RULES if rules is None else rules
    used: set[str] = set()
    spec = []
    for name, dim in zip(logical_axes, shape):
        if name is not None and name not in rules:
            raise KeyError(f"logical axis {name!r} has no entry in the sharding rules {sorted(rules)}")
        target = rules.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if mesh.shape[a] > 1 and a not in used)
        size = math.prod(mesh.shape[a] for a in axes)
        if not axes or dim % size:
            spec.append(None)
            continue
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else axes)
    return P(*spec)


def constrain(x: jax.Array, logical_axes) -> jax.Array:
    """Pin an activation's sharding by logical names when a mesh is in scope (`use_abstract_mesh`), so
    GSPMD keeps the batch split over data × fsdp instead of guessing; a no-op without a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes, x.shape, mesh))


def param_shardings(abstract_state, mesh: Mesh):
    """NamedSharding for every leaf of an nnx.State whose Variables carry `out_sharding` logical names."""
    def one(var):
        names = var.get_metadata().get("out_sharding") or (None,) * var.ndim
        return var.replace(NamedSharding(mesh, logical_to_spec(names, var.shape, mesh)))

    return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def abstract_arrays(tree, shardings):
    """ShapeDtypeStructs carrying their shardings: restore and compile targets, nothing allocated."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def like_params(tree, abstract_params, default):
    """Shardings for optimizer state: a leaf whose path ends with a parameter's path (and has its shape)
    is sharded like that parameter (momenta, Adam moments); everything else (counters) gets `default`."""
    by_path = {
        jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(abstract_params)
    }

    def one(path, leaf):
        name = jax.tree_util.keystr(path)
        for pname, p in by_path.items():
            if name.endswith(pname) and tuple(leaf.shape) == tuple(p.shape):
                return p.sharding
        return default

    return jax.tree_util.tree_map_with_path(one, tree)


def batch_sharding(mesh: Mesh, ndim: int = 2, batch_axis: int = 0) -> NamedSharding:
    """Batches split their row axis over data × fsdp; the rest replicated."""
    spec = [None] * ndim
    spec[batch_axis] = ("data", "fsdp")
    return NamedSharding(mesh, P(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def process_sums(values) -> np.ndarray:
    """Element-wise sums of each process's `values` (float64), the same on every process: counts that each host
    gathered over its own share of examples."""
    values = np.asarray(values, np.float64)
    if jax.process_count() == 1:
        return values
    return np.asarray(multihost_utils.process_allgather(values)).sum(axis=0)
