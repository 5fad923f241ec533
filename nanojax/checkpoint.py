"""Orbax checkpoints: one directory per step holding params, optimizer state, data-iterator state, metadata.

Layout: `<run_dir>/checkpoints/<step>/{params,opt_state,data,meta}`. Restores always target the *current*
mesh's shardings (abstract arrays carry them), so a checkpoint written on 8 devices loads on 1 or 4.
`init_from` (the next training stage) loads parameters only, after checking every shape.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from nanojax import sharding as shd
from nanojax.model import GPT, param_name
from nanojax.tokenizer import load_for_config

# -- per-process data-iterator state ----------------------------------------------------------------


class DataStateHandler(ocp.CheckpointHandler):
    """Writes each process's iterator state (a JSON dict snapshotted at save time) to its own file."""

    def save(self, directory: epath.Path, args: "DataStateSave"):
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        (directory / name).write_text(json.dumps(args.state))

    def restore(self, directory: epath.Path, args: "DataStateRestore" = None):
        name = directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        if not name.exists():
            found = sorted(p.name for p in directory.iterdir())
            raise FileNotFoundError(
                f"no data-iterator state {name.name} in {directory} (found {found}): the checkpoint was written "
                f"with a different process count; resume with the same number of hosts"
            )
        return json.loads(name.read_text())

    def metadata(self, directory):
        return None

    def structure(self, directory):
        return None

    def finalize(self, directory):
        pass

    def close(self):
        pass


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
    state: Any


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
    pass


# -- paths ------------------------------------------------------------------------------------------


def checkpoints_dir(path) -> epath.Path:
    """Accept a run directory, its `checkpoints/` directory, or one step directory."""
    p = epath.Path(path)
    if (p / "checkpoints").exists():
        return p / "checkpoints"
    return p


def resolve_step_dir(path, step: int | None = None) -> tuple[epath.Path, int]:
    """(checkpoints directory, step) for a run dir / checkpoints dir / step dir; latest when step is None."""
    p = epath.Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint path {p} does not exist")
    if (p / "params").exists() and p.name.isdigit():
        if step is not None and int(p.name) != step:
            raise ValueError(f"{p} is the checkpoint of step {p.name}, not step {step}")
        return p.parent, int(p.name)
    ckpts = checkpoints_dir(p)
    steps = sorted(int(c.name) for c in ckpts.iterdir() if c.name.isdigit() and (c / "params").exists()) \
        if ckpts.exists() else []
    if not steps:
        raise FileNotFoundError(f"no checkpoints under {ckpts} (expected <step>/params directories)")
    if step is None:
        return ckpts, steps[-1]
    if step not in steps:
        raise FileNotFoundError(f"no checkpoint for step {step} under {ckpts}; available: {steps}")
    return ckpts, step


# -- manager ----------------------------------------------------------------------------------------


class Checkpointer:
    """Thin wrapper over `ocp.CheckpointManager` with nanojax's items."""

    def __init__(self, run_dir, max_to_keep: int = 2, async_save: bool = True):
        self.directory = epath.Path(run_dir) / "checkpoints"
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True
        )
        self.manager = ocp.CheckpointManager(
            self.directory, item_names=("params", "opt_state", "data", "meta"), options=options
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, params, opt_state, data_state: dict | None, meta: dict, force: bool = False) -> bool:
        """Save a step; `opt_state=None` writes parameters only (converted or exported models)."""
        items = dict(params=ocp.args.StandardSave(params), data=DataStateSave(data_state or {}),
                     meta=ocp.args.JsonSave(meta))
        if opt_state is not None:
            items["opt_state"] = ocp.args.StandardSave(opt_state)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, step: int, abstract_params, abstract_opt_state):
        items = dict(
            params=ocp.args.StandardRestore(abstract_params),
            opt_state=ocp.args.StandardRestore(abstract_opt_state),
            data=DataStateRestore(),
            meta=ocp.args.JsonRestore(),
        )
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        return out["params"], out["opt_state"], out["data"], out["meta"]

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def read_meta(path, step: int | None = None) -> tuple[dict, int]:
    ckpts, step = resolve_step_dir(path, step)
    meta_dir = ckpts / str(step) / "meta"
    files = list(meta_dir.glob("*")) if meta_dir.exists() else []
    if not files:
        raise FileNotFoundError(f"checkpoint {ckpts / str(step)} has no metadata")
    return json.loads(files[0].read_text()), step


# -- parameters only ---------------------------------------------------------------------------------


# One item of a step is read through its handler, not a Checkpointer: a Checkpointer looks for step metadata
# inside the item's directory (the manager writes it one level up) and warns about it on every load.
def stored_tree(item_dir):
    """The array metadata tree (shapes, dtypes, shardings) of one saved item, without reading any array."""
    meta = ocp.StandardCheckpointHandler().metadata(epath.Path(item_dir))
    return getattr(meta, "tree", meta)


def _restore_item(item_dir, abstract_tree):
    return ocp.StandardCheckpointHandler().restore(epath.Path(item_dir), args=ocp.args.StandardRestore(abstract_tree))


def _shape_mismatches(abstract_params, stored_meta) -> list[str]:
    want = {param_name(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(abstract_params)}
    have = {param_name(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(stored_meta)}
    problems = []
    for name in sorted(set(want) | set(have)):
        if name not in have:
            problems.append(f"{name}: missing from the checkpoint (model wants {want[name]})")
        elif name not in want:
            problems.append(f"{name}: in the checkpoint {have[name]} but not in the model")
        elif want[name] != have[name]:
            problems.append(f"{name}: checkpoint {have[name]} vs model {want[name]}")
    return problems


def load_params(path, abstract_params, step: int | None = None):
    """Parameters only, sharded as `abstract_params` says; refuses any shape mismatch, listing them all."""
    ckpts, step = resolve_step_dir(path, step)
    params_dir = ckpts / str(step) / "params"
    problems = _shape_mismatches(abstract_params, stored_tree(params_dir))
    if problems:
        raise ValueError(
            f"checkpoint {params_dir} does not fit this model ({len(problems)} mismatches):\n  "
            + "\n  ".join(problems[:50])
        )
    return _restore_item(params_dir, abstract_params), step


def load_opt_state(path, abstract_opt_state, step: int):
    ckpts, step = resolve_step_dir(path, step)
    return _restore_item(ckpts / str(step) / "opt_state", abstract_opt_state)


def load_model(run_dir_or_ckpt, step: int | None = None, mesh=None):
    """(model, tokenizer_or_None, config) from a run directory or checkpoint, sharded on `mesh` (or 1 device)."""
    meta, step = read_meta(run_dir_or_ckpt, step)
    config = ml_collections.ConfigDict(meta["config"])
    if mesh is None:
        with config.unlocked():
            config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 1, 1
        mesh = shd.make_mesh(config.mesh, devices=jax.devices()[:1])
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: GPT(config.model, rngs=nnx.Rngs(0)))
    graphdef, abstract_params, rest = nnx.split(abstract, nnx.Param, ...)
    target = shd.abstract_arrays(abstract_params, shd.param_shardings(abstract_params, mesh))
    params, _ = load_params(run_dir_or_ckpt, target, step)
    model = nnx.merge(graphdef, params, rest)
    tok_dir = meta.get("tokenizer_dir")  # the run's own record; absent here (a copied run): the caller picks one
    tokenizer = load_for_config(config, tok_dir) if tok_dir and pathlib.Path(tok_dir).exists() else None
    return model, tokenizer, config
