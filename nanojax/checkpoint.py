"""Orbax checkpoints: one directory per step holding params, optimizer state, data-iterator state, metadata.

Layout: `<run_dir>/checkpoints/<step>/{params,opt_state,data,meta}`. Restores always target the *current*
mesh's shardings (abstract arrays carry them), so a checkpoint written on 8 devices loads on 1 or 4.
`init_from` (the next training stage) loads parameters only, after checking every shape.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import logging
import pathlib
import re
import sys
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from nanojax import sharding as shd
from nanojax.model import GPT, param_name
from nanojax.tokenizer import load_for_config

# -- per-process data-iterator state ----------------------------------------------------------------


class DataStateHandler(ocp.CheckpointHandler):
    """Writes each process's iterator state (a JSON dict snapshotted at save time) to its own file, with no
    communication between hosts; a restore reads every process's file, so that a data pipeline can resume on
    another process count (`nanojax.data.layout`). `process` = (index, count) to write as (tests simulate
    several processes); by default jax's."""

    def __init__(self, process: tuple[int, int] | None = None):
        self.process = process

    @staticmethod
    def file_name(process_index: int, process_count: int) -> str:
        return f"process_{process_index}-of-{process_count}.json"

    def save(self, directory: epath.Path, args: "DataStateSave"):
        index, count = self.process or (jax.process_index(), jax.process_count())
        (directory / self.file_name(index, count)).write_text(json.dumps(args.state))

    def restore(self, directory: epath.Path, args: "DataStateRestore" = None) -> dict:
        """{"process_states": [state of process 0, 1, ...]}, what every data iterator's `set_state` takes; {}
        when every state is empty (a checkpoint saved without an iterator: nothing to restore)."""
        from nanojax.data.layout import PROCESS_STATES

        saves: dict[int, dict[int, epath.Path]] = {}  # process count -> {process index: file}
        for path in directory.glob("process_*-of-*.json"):
            if m := re.fullmatch(r"process_(\d+)-of-(\d+)\.json", path.name):
                saves.setdefault(int(m[2]), {})[int(m[1])] = path
        found = sorted(p.name for p in directory.iterdir())
        if len(saves) != 1:
            raise FileNotFoundError(f"{'no' if not saves else 'no single'} set of data-iterator states "
                                    f"(process_<i>-of-<n>.json) in {directory} (found {found})")
        count, files = next(iter(saves.items()))
        missing = [self.file_name(i, count) for i in range(count) if i not in files]
        if missing:
            raise FileNotFoundError(f"data-iterator state of {count} processes in {directory} lacks {missing} "
                                    f"(found {found})")
        states = [json.loads(files[i].read_text()) for i in range(count)]
        return {PROCESS_STATES: states} if any(states) else {}

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


# -- paths and integrity ----------------------------------------------------------------------------
#
# A step directory counts only once Orbax has committed it: its write goes to `<step>.orbax-checkpoint-tmp`,
# gets `commit_success.txt` (and a commit time in `_CHECKPOINT_METADATA`), and only then is renamed to
# `<step>` (on GCS, where there is no rename, the commit file alone marks it). Orbax's own step listing takes
# any directory named like a step as finished on a local disk, so a stray or half-copied `<step>` would be
# "the latest checkpoint" to it; everything here checks the commit marker and the items' files first.

ITEMS = ("params", "opt_state", "data", "meta")
_STEP_NAME = re.compile(r"(0|[1-9]\d*)")  # what Orbax's step listing accepts (no prefix, no padding)
_COMMIT_FILE = "commit_success.txt"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as it is (damaged, uncommitted, or written for another config)."""


def checkpoints_dir(path) -> epath.Path:
    """Accept a run directory, its `checkpoints/` directory, or one step directory."""
    p = epath.Path(path)
    if (p / "checkpoints").exists():
        return p / "checkpoints"
    return p


def _step_dirs(ckpts: epath.Path) -> list[tuple[int, epath.Path]]:
    """Every directory Orbax would list as a step (committed or not), newest first."""
    if not ckpts.exists():
        return []
    found = [(int(p.name), p) for p in ckpts.iterdir() if _STEP_NAME.fullmatch(p.name) and p.is_dir()]
    return sorted(found, key=lambda sp: sp[0], reverse=True)


def is_committed(step_dir) -> bool:
    """Whether Orbax finished writing this step: its commit file, or a commit time in its step metadata."""
    step_dir = epath.Path(step_dir)
    if (step_dir / _COMMIT_FILE).exists():
        return True
    try:
        return bool(json.loads((step_dir / "_CHECKPOINT_METADATA").read_text()).get("commit_timestamp_nsecs"))
    except (OSError, ValueError, AttributeError):
        return False


def _meta_file(meta_dir: epath.Path) -> epath.Path | None:
    """The JSON file of the `meta` item (`metadata`, as Orbax's JsonCheckpointHandler names it)."""
    if (meta_dir / "metadata").exists():
        return meta_dir / "metadata"
    others = sorted(p for p in meta_dir.glob("*") if p.name != _COMMIT_FILE and p.is_file()) \
        if meta_dir.is_dir() else []
    return others[0] if others else None


def _json_problem(path: epath.Path) -> str | None:
    try:
        data = path.read_bytes()
        json.loads(data)
    except OSError as e:
        return f"{path.name} is unreadable ({e})"
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return f"{path.name} is not valid JSON ({len(data)} bytes: {e})"
    return None


def step_problem(step_dir, items=ITEMS) -> str | None:
    """Why `step_dir` cannot be used, from its files alone (no array is read); None when it looks intact."""
    step_dir = epath.Path(step_dir)
    if not is_committed(step_dir):
        return f"not committed (no {_COMMIT_FILE}: an interrupted write or a stray directory)"
    for item in items:
        if not (step_dir / item).is_dir():
            return f"{item}: missing"
    if "meta" in items:
        meta = _meta_file(step_dir / "meta")
        if meta is None:
            return "meta: no metadata file"
        if problem := _json_problem(meta):
            return f"meta: {problem}"
    for item in ("params", "opt_state"):
        if item in items:
            if not (step_dir / item / "_METADATA").exists():
                return f"{item}: no _METADATA file"
            if problem := _json_problem(step_dir / item / "_METADATA"):
                return f"{item}: {problem}"
    if "data" in items:
        files = sorted((step_dir / "data").glob("process_*-of-*.json"))
        if not files:
            return "data: no data-iterator state file"
        for f in files:
            if problem := _json_problem(f):
                return f"data: {problem}"
    return None


def _short_error(e: BaseException, step_dir: epath.Path) -> str:
    """One line from an exception: its innermost cause (TensorStore's root error, not the spec dump)."""
    while e.__cause__ is not None:
        e = e.__cause__
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    text = " ".join(text.split()).replace(f"{step_dir}/", "").replace(str(step_dir), ".")
    text = f"{type(e).__name__}: {text}" if not text or isinstance(e, (KeyError, OSError)) else text
    return text[:300] + ("..." if len(text) > 300 else "")


def _is_resource_error(e: BaseException) -> bool:
    """Out of memory is the machine's problem, never a reason to call a checkpoint damaged."""
    while e is not None:
        if isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in str(e) or "Out of memory" in str(e):
            return True
        e = e.__cause__
    return False


def _is_orbax_read_noise(text: str, exc: BaseException | None = None) -> bool:
    return (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed") or "/orbax/checkpoint/" in text \
        or "Encountered error while reading array index" in text


class _AsyncioReadNoise(logging.Filter):
    def filter(self, record) -> bool:
        msg = record.getMessage()
        return not ("exception was never retrieved" in msg and _is_orbax_read_noise(msg))


def _quiet_abandoned_reads(failed: bool = False) -> None:
    """When one array of a restore fails, Orbax abandons the step's other reads: their tasks and TensorStore
    callbacks later print pages of "Task exception was never retrieved" / "Event loop is closed" tracebacks
    (through asyncio's logger and `sys.unraisablehook`), after the failure was already reported in one line.
    Called before a restore that may fail, this drops those echoes, and only those, for the rest of the process;
    `failed=True` then collects the abandoned tasks at once."""
    global _previous_unraisablehook
    if _previous_unraisablehook is None:
        _previous_unraisablehook = sys.unraisablehook

        def hook(unraisable):
            code = getattr(unraisable.object, "cr_code", None)
            where = f"{getattr(code, 'co_filename', '')} {unraisable.exc_value}"
            if not _is_orbax_read_noise(where, unraisable.exc_value):
                _previous_unraisablehook(unraisable)

        sys.unraisablehook = hook
        logging.getLogger("asyncio").addFilter(_AsyncioReadNoise())
    if failed:
        gc.collect()


_previous_unraisablehook = None


def _damaged(ckpts: epath.Path, step: int, problem: str, items) -> CheckpointError:
    """The one-line error of a read-only tool: which step is damaged, and which older step looks intact."""
    good = next((s for s, d in _step_dirs(ckpts) if s < step and step_problem(d, items) is None), None)
    hint = f"step {good} looks intact: pass --step {good}" if good is not None else "no older step looks intact"
    return CheckpointError(f"checkpoint step {step} in {ckpts} is damaged ({problem}); {hint}")


def resolve_step_dir(path, step: int | None = None, items=("params", "meta")) -> tuple[epath.Path, int]:
    """(checkpoints directory, step) for a run dir / checkpoints dir / step dir; the latest committed step when
    `step` is None. Refuses, in one line naming a usable older step, a step whose `items` look damaged."""
    p = epath.Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint path {p} does not exist")
    if (p / "params").exists() and _STEP_NAME.fullmatch(p.name):
        if step is not None and int(p.name) != step:
            raise ValueError(f"{p} is the checkpoint of step {p.name}, not step {step}")
        if problem := step_problem(p, items):
            raise _damaged(p.parent, int(p.name), problem, items)
        return p.parent, int(p.name)
    ckpts = checkpoints_dir(p)
    dirs = _step_dirs(ckpts)
    steps = sorted(s for s, d in dirs if is_committed(d))
    if not steps:
        others = sorted(s for s, _ in dirs)
        raise FileNotFoundError(f"no checkpoints under {ckpts} (expected committed <step>/params directories"
                                + (f"; uncommitted: {others})" if others else ")"))
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise FileNotFoundError(f"no checkpoint for step {step} under {ckpts}; available: {steps}")
    if problem := step_problem(ckpts / str(step), items):
        raise _damaged(ckpts, step, problem, items)
    return ckpts, step


# -- manager ----------------------------------------------------------------------------------------


def _warn(message: str) -> None:
    if jax.process_index() == 0:
        print(f"warning: {message}", file=sys.stderr, flush=True)


def _all_hosts(ok: bool) -> bool:
    """True only if every process says so (a damaged shard may fail on one host only)."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.array(ok))))


class Checkpointer:
    """Thin wrapper over `ocp.CheckpointManager` with nanojax's items."""

    def __init__(self, run_dir, max_to_keep: int = 2, async_save: bool = True):
        self.directory = epath.Path(run_dir) / "checkpoints"
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True
        )
        self.manager = ocp.CheckpointManager(
            self.directory, item_names=ITEMS, options=options
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

    @staticmethod
    def _restore_args(abstract_params, abstract_opt_state) -> dict:
        return dict(
            params=ocp.args.StandardRestore(abstract_params),
            opt_state=ocp.args.StandardRestore(abstract_opt_state),
            data=DataStateRestore(),
            meta=ocp.args.JsonRestore(),
        )

    def restore(self, step: int, abstract_params, abstract_opt_state):
        out = self.manager.restore(step, args=ocp.args.Composite(**self._restore_args(abstract_params,
                                                                                      abstract_opt_state)))
        return out["params"], out["opt_state"], out["data"], out["meta"]

    def _try_restore(self, step: int, abstract_params, abstract_opt_state):
        """(restored tuple, None) or (None, why). A failed restore is retried item by item, which names the
        damaged item and lets a transient read error pass the second time."""
        args = self._restore_args(abstract_params, abstract_opt_state)
        _quiet_abandoned_reads()
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(**args))
            return (out["params"], out["opt_state"], out["data"], out["meta"]), None
        except Exception as e:  # noqa: BLE001 - any failure to read a step makes it unusable
            if _is_resource_error(e):
                raise
        _quiet_abandoned_reads(failed=True)
        got = {}
        for name, arg in args.items():
            try:
                got[name] = self.manager.restore(step, args=ocp.args.Composite(**{name: arg}))[name]
            except Exception as e:  # noqa: BLE001
                if _is_resource_error(e):
                    raise
                _quiet_abandoned_reads(failed=True)
                return None, f"{name}: {_short_error(e, self.directory / str(step))}"
        return (got["params"], got["opt_state"], got["data"], got["meta"]), None

    def _fit_problems(self, step_dir: epath.Path, abstract_params, abstract_opt_state) -> list[str]:
        """Differences between the step's stored shapes and this config's: a config change, not damage."""
        problems = []
        for item, abstract in (("params", abstract_params), ("opt_state", abstract_opt_state)):
            problems += [f"{item}.{p}" for p in _shape_mismatches(abstract, stored_tree(step_dir / item))]
        return problems

    def restore_latest(self, abstract_params, abstract_opt_state):
        """(step, params, opt_state, data_state, meta) of the newest usable step; None when the run has no step
        directory at all (Orbax's unfinished `*.orbax-checkpoint-tmp` writes do not count).

        Steps are tried newest first. One that is uncommitted, misses an item or a file, has unreadable JSON, or
        fails to restore is skipped; once an older step restores, every skipped one is renamed to
        `<step>.corrupt-<time>` (never deleted; Orbax's listing ignores that name) with a one-line warning each.
        If no step restores, nothing is moved and `CheckpointError` lists what was tried. A step whose shapes do
        not fit this config is a config error, not damage: raised at once, nothing moved.
        """
        tried: list[tuple[int, epath.Path, str]] = []
        for step, step_dir in _step_dirs(self.directory):
            problem = step_problem(step_dir)
            if problem is None:
                try:
                    fit = self._fit_problems(step_dir, abstract_params, abstract_opt_state)
                except Exception as e:  # noqa: BLE001 - _METADATA parses but is not a tree Orbax can read
                    fit, problem = [], f"array metadata unreadable: {_short_error(e, step_dir)}"
                if fit:
                    raise CheckpointError(
                        f"checkpoint step {step} in {self.directory} does not fit this config ({len(fit)} "
                        f"differences: {'; '.join(fit[:5])}{'; ...' if len(fit) > 5 else ''}); resume with the "
                        f"config it was written with (its meta item holds it) or use a new run_dir"
                    )
            if not _all_hosts(problem is None):  # every host tries the same steps (restores may synchronise)
                problem = problem or "damaged as another host reads it"
            if problem is None:
                restored, problem = self._try_restore(step, abstract_params, abstract_opt_state)
                if not _all_hosts(problem is None):
                    problem = problem or "failed to restore on another host"
            if problem is None:
                self._move_aside(tried, step)
                return (step, *restored)
            tried.append((step, step_dir, problem))
        if not tried:
            return None
        raise CheckpointError(
            f"no usable checkpoint in {self.directory}: "
            + "; ".join(f"step {s} is damaged ({why})" for s, _, why in tried)
            + ". Nothing was moved or deleted: fix or move these step directories to resume or start over"
        )

    def _move_aside(self, damaged: list[tuple[int, epath.Path, str]], resume_step: int) -> None:
        """Rename each damaged step directory to `<step>.corrupt-<time>` and make Orbax re-list its steps."""
        if not damaged:
            return
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for step, step_dir, why in damaged:
            target = self.directory / f"{step}.corrupt-{stamp}"
            n = 1
            while target.exists():
                target, n = self.directory / f"{step}.corrupt-{stamp}-{n}", n + 1
            if jax.process_index() == 0:
                try:
                    step_dir.rename(target)
                except OSError as e:
                    raise CheckpointError(
                        f"checkpoint step {step} in {self.directory} is damaged ({why}) and could not be moved "
                        f"aside ({e}); move it out of {self.directory} by hand, then rerun"
                    ) from e
            _warn(f"checkpoint step {step} is damaged ({why}); moved to {self.directory.name}/{target.name}, "
                  f"resuming from step {resume_step}")
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("nanojax_checkpoint_move_aside")
        self.manager.reload()  # its step list was read at construction and still holds the moved steps

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def read_meta(path, step: int | None = None) -> tuple[dict, int]:
    ckpts, step = resolve_step_dir(path, step)
    return json.loads(_meta_file(ckpts / str(step) / "meta").read_text()), step


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
    return _restore_checked(ckpts, step, "params", abstract_params, ("params", "meta")), step


def load_opt_state(path, abstract_opt_state, step: int):
    items = ("params", "opt_state", "meta")
    ckpts, step = resolve_step_dir(path, step, items)
    return _restore_checked(ckpts, step, "opt_state", abstract_opt_state, items)


def _restore_checked(ckpts: epath.Path, step: int, item: str, abstract_tree, items):
    """One item's arrays; a read failure (a truncated or missing data file) is a one-line `CheckpointError`."""
    _quiet_abandoned_reads()
    try:
        return _restore_item(ckpts / str(step) / item, abstract_tree)
    except Exception as e:  # noqa: BLE001 - shapes were checked before; what is left is the files
        if _is_resource_error(e):
            raise
        _quiet_abandoned_reads(failed=True)
        raise _damaged(ckpts, step, f"{item}: {_short_error(e, ckpts / str(step))}", items) from e


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
