"""What a checkpoint holds, read from Orbax metadata only (no array is loaded).

    python -m nanojax.inspect RUN_DIR_OR_CHECKPOINT [--step N] [--json]
"""
from __future__ import annotations

import argparse
import json
import math
import sys

import jax
import numpy as np

from nanojax.checkpoint import is_committed, read_meta, resolve_step_dir, stored_tree
from nanojax.config import FAMILIES
from nanojax.console import quiet_library_logs
from nanojax.model import param_name


def _leaves(tree):
    out = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        shape = tuple(int(s) for s in (leaf.shape or ()))
        dtype = np.dtype(leaf.dtype)
        sharding = getattr(leaf, "sharding", None)
        spec = getattr(sharding, "partition_spec", None)
        mesh = getattr(sharding, "shape", None)
        out.append({
            "name": param_name(path), "shape": list(shape), "dtype": dtype.name,
            "size": int(math.prod(shape)), "bytes": int(math.prod(shape)) * dtype.itemsize,
            "partition_spec": None if spec is None else
            [list(p) if isinstance(p, (list, tuple)) else p for p in spec],
            "mesh": None if mesh is None else dict(zip(getattr(sharding, "axis_names", []), [int(x) for x in mesh])),
        })
    return out


def inspect_checkpoint(path, step: int | None = None) -> dict:
    ckpts, step = resolve_step_dir(path, step)
    step_dir = ckpts / str(step)
    meta, _ = read_meta(path, step)
    params = _leaves(stored_tree(step_dir / "params"))
    opt = _leaves(stored_tree(step_dir / "opt_state")) if (step_dir / "opt_state").exists() else []
    data_files = sorted(p.name for p in (step_dir / "data").glob("*.json")) if (step_dir / "data").exists() else []
    all_steps = sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit() and is_committed(p))
    return {
        "path": str(step_dir), "step": step, "all_steps": all_steps,
        "num_params": sum(p["size"] for p in params), "param_bytes": sum(p["bytes"] for p in params),
        "opt_state_leaves": len(opt), "opt_state_bytes": sum(p["bytes"] for p in opt),
        "params": params, "data_state_files": data_files,
        "metadata": {k: v for k, v in meta.items() if k != "config"}, "config": meta.get("config", {}),
    }


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024


def format_report(info: dict) -> str:
    cfg = info["config"]
    m, t = cfg.get("model", {}), cfg.get("train", {})
    lines = [
        f"checkpoint  {info['path']}",
        f"step        {info['step']:,} (checkpoints at steps {info['all_steps']})",
        f"run         {cfg.get('run_name', '?')}  data={cfg.get('data', {}).get('kind', '?')}",
        f"model       depth {m.get('depth')} width {m.get('width')} heads {m.get('n_head')}/{m.get('n_kv_head')}"
        f"×{m.get('head_dim')} vocab {m.get('vocab_size')} context {m.get('seq_len')}",
        f"family      {m.get('family', 'launch')}: " + " ".join(f"{k}={m[k]}" for k in FAMILIES["launch"] if k in m),
        f"train       {t.get('num_iterations')} iterations × {t.get('total_batch_size')} tokens, "
        f"init_from={info['metadata'].get('init_from')}",
        f"parameters  {info['num_params']:,} ({_human(info['param_bytes'])})",
        f"optimizer   {info['opt_state_leaves']} arrays ({_human(info['opt_state_bytes'])})"
        if info["opt_state_leaves"] else "optimizer   none saved (parameters-only checkpoint)",
        f"data state  {', '.join(info['data_state_files']) or 'none'}",
        "",
        f"{'parameter':34s} {'shape':>18s} {'dtype':>8s} {'sharding':>28s} {'size':>12s}",
    ]
    for p in info["params"]:
        spec = "replicated" if not p["partition_spec"] or all(s is None for s in p["partition_spec"]) else \
            str(tuple(p["partition_spec"]))
        lines.append(f"{p['name']:34s} {str(tuple(p['shape'])):>18s} {p['dtype']:>8s} {spec:>28s} {p['size']:>12,d}")
    other = {k: v for k, v in info["metadata"].items() if k not in ("init_from",)}
    lines += ["", "metadata    " + json.dumps(other)]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m nanojax.inspect", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", help="run directory, its checkpoints/ directory, or one step directory")
    ap.add_argument("--step", type=int, default=None, help="default: the latest")
    ap.add_argument("--json", action="store_true", help="machine-readable output")
    args = ap.parse_args(argv)
    quiet_library_logs()
    try:
        info = inspect_checkpoint(args.path, args.step)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(info, indent=2) if args.json else format_report(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
