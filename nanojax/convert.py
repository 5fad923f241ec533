"""nanochat (PyTorch) checkpoints and Hugging Face models <-> nanojax runs.

    python -m nanojax.convert from-nanochat SRC_DIR --step N --out RUN_DIR
    python -m nanojax.convert to-nanochat RUN_DIR [--step N] --out DST_DIR
    python -m nanojax.convert to-hf RUN_DIR [--step N] [--tokenizer DIR] --out DST_DIR   (nanojax.hf)
    python -m nanojax.convert from-hf SRC_DIR --out RUN_DIR

nanochat writes `model_{N:06d}.pt` (state dict, torch (out, in) Linear layout) and `meta_{N:06d}.json`
(`model_config`: sequence_len, vocab_size, n_layer, n_head, n_kv_head, n_embd). The mapping is a rename,
a transpose of every Linear, and stacking the per-layer matrices on the `layers` axis. Reading or writing
`.pt` files needs torch (`pip install torch`); the mapping itself is numpy only.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys

import jax
import numpy as np
from flax import nnx

from nanojax import hf
from nanojax.checkpoint import Checkpointer, load_model, read_meta
from nanojax.config import ModelConfig, default_config
from nanojax.console import quiet_library_logs
from nanojax.model import GPT
from nanojax.model_head import head_extra_keys, head_extras_to_nanochat, nanochat_family, nanochat_head_to_params
from nanojax.tokenizer import load_for_config

BLOCK_MATRICES = ("attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def model_config_from_nanochat(meta_model_config: dict):
    """nanojax config (launch defaults) with the model of a nanochat GPTConfig dict."""
    mc = meta_model_config
    c = default_config()
    m = c.model
    m.depth = int(mc["n_layer"])
    m.width = int(mc["n_embd"])
    m.n_head = int(mc["n_head"])
    m.n_kv_head = int(mc.get("n_kv_head", mc["n_head"]))
    m.head_dim = int(mc["n_embd"]) // int(mc["n_head"])
    m.vocab_size = int(mc["vocab_size"])
    m.seq_len = int(mc["sequence_len"])
    if "window_pattern" in mc:  # nanochat HEAD's GPTConfig (92d63d4 has window_pattern; launch had not)
        m.family, m.window_pattern = "head", str(mc["window_pattern"])
    ModelConfig.of(m)  # validates (e.g. heads that do not group)
    return c


def nanochat_to_params(state_dict: dict[str, np.ndarray], depth: int) -> dict:
    """nanochat state dict (numpy arrays) -> nanojax parameter tree as a nested dict."""
    sd = {re.sub(r"^_orig_mod\.", "", k): np.asarray(v, np.float32) for k, v in state_dict.items()}
    expected = {"transformer.wte.weight", "lm_head.weight"} | {
        f"transformer.h.{i}.{name}.weight" for i in range(depth) for name in BLOCK_MATRICES
    }
    missing, extra = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or extra:
        raise ValueError(f"nanochat state dict does not match a depth-{depth} launch GPT: missing {missing}, "
                         f"unexpected {extra}")
    blocks: dict = {"attn": {}, "mlp": {}}
    for name in BLOCK_MATRICES:
        group, layer = name.split(".")
        stacked = np.stack([sd[f"transformer.h.{i}.{name}.weight"].T for i in range(depth)])
        blocks[group][layer] = {"kernel": stacked}
    return {"wte": sd["transformer.wte.weight"], "blocks": blocks, "lm_head": sd["lm_head.weight"].T}


def params_to_nanochat(params: dict) -> dict[str, np.ndarray]:
    """Inverse of `nanochat_to_params` (nested dict of arrays -> state dict in torch layout)."""
    out = {"transformer.wte.weight": np.asarray(params["wte"]), "lm_head.weight": np.asarray(params["lm_head"]).T}
    depth = np.asarray(params["blocks"]["attn"]["c_q"]["kernel"]).shape[0]
    for name in BLOCK_MATRICES:
        group, layer = name.split(".")
        stacked = np.asarray(params["blocks"][group][layer]["kernel"])
        for i in range(depth):
            out[f"transformer.h.{i}.{name}.weight"] = stacked[i].T
    out.update(head_extras_to_nanochat(params))  # HEAD's value embeddings, gates and scalars, when present
    return out


def fill_state(model, pure: dict):
    """Put a nested dict of arrays into an nnx model's Params (shapes checked)."""
    state = nnx.state(model, nnx.Param)
    want = nnx.to_pure_dict(state)
    for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree_util.tree_leaves_with_path(pure)):
        if tuple(np.shape(a)) != tuple(np.shape(b)):
            raise ValueError(f"{jax.tree_util.keystr(path)}: converted shape {np.shape(b)} vs model {np.shape(a)}")
    nnx.replace_by_pure_dict(state, jax.tree.map(lambda x, ref: np.asarray(x, ref.dtype), pure, want))
    nnx.update(model, state)
    return model


def _torch():
    try:  # optional: only reading/writing .pt files needs it (pip install torch)
        import torch
    except ImportError as e:
        raise SystemExit("reading/writing nanochat .pt files needs torch: pip install torch") from e
    return torch


def write_run(out_dir: str, config, state_dict: dict[str, np.ndarray], step: int, source: dict,
              tokenizer=None) -> str:
    """A nanojax run directory (Orbax checkpoint at `step`, parameters only) from a nanochat-named state dict;
    a given tokenizer is saved beside it (`<out_dir>/tokenizer`) and recorded as the run's."""
    with config.unlocked():
        config.run_name = pathlib.Path(out_dir).name
        config.run_dir = str(out_dir)
        if tokenizer is not None:
            config.data.tokenizer_dir = str(tokenizer.save(pathlib.Path(out_dir) / "tokenizer"))
    mc = ModelConfig.of(config.model)
    pure = nanochat_head_to_params(state_dict, mc) if head_extra_keys(mc) else nanochat_to_params(state_dict, mc.depth)
    model = fill_state(GPT(config.model, rngs=nnx.Rngs(0)), pure)
    params = nnx.state(model, nnx.Param)
    ckptr = Checkpointer(out_dir, max_to_keep=1, async_save=False)
    ckptr.save(step, params, None, None, {
        "step": step, "config": config.to_dict(), "num_params": int(sum(x.size for x in jax.tree.leaves(params))),
        "init_from": source, "tokenizer_dir": config.data.tokenizer_dir or None,
    }, force=True)
    ckptr.close()
    return str(out_dir)


def from_nanochat(src_dir: str, step: int, out_dir: str) -> str:
    """Write a nanojax run directory (Orbax checkpoint at `step`, parameters only) from nanochat files."""
    torch = _torch()
    src = pathlib.Path(src_dir)
    model_path, meta_path = src / f"model_{step:06d}.pt", src / f"meta_{step:06d}.json"
    for p in (model_path, meta_path):
        if not p.exists():
            raise FileNotFoundError(f"{p} not found (nanochat writes model_{{step:06d}}.pt and meta_{{step:06d}}.json)")
    meta = json.loads(meta_path.read_text())
    config = model_config_from_nanochat(meta["model_config"])
    sd = torch.load(model_path, map_location="cpu", weights_only=True)
    sd = {k: v.float().numpy() for k, v in sd.items()}
    return write_run(out_dir, config, sd, step, {"path": str(src), "step": step, "format": "nanochat"})


def to_hf(run_dir: str, step: int | None, out_dir: str, tokenizer_dir: str | None = None) -> str:
    """A Hugging Face NanoChat directory (nanojax.hf) from a run; its tokenizer is the run's unless given."""
    _, step = read_meta(run_dir, step)
    model, tokenizer, config = load_model(run_dir, step)
    if tokenizer_dir:
        tokenizer = load_for_config(config, tokenizer_dir)
    if tokenizer is None:
        raise FileNotFoundError(f"{run_dir} does not record a tokenizer that exists here: pass --tokenizer DIR")
    sd = hf.nanochat_to_hf_names(params_to_nanochat(nnx.to_pure_dict(nnx.state(model, nnx.Param))))
    return str(hf.write_export(out_dir, ModelConfig.of(config.model), sd, tokenizer))


def from_hf(src_dir: str, out_dir: str) -> str:
    config, sd, tokenizer = hf.read_export(src_dir)
    return write_run(out_dir, config, sd, 0, {"path": str(src_dir), "format": "huggingface"}, tokenizer)


def to_nanochat(run_dir: str, step: int | None, out_dir: str) -> str:
    torch = _torch()
    _, step = read_meta(run_dir, step)
    model, _, config = load_model(run_dir, step)
    sd = params_to_nanochat(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    m = ModelConfig.of(config.model)
    meta = {"step": step, "model_config": {"sequence_len": m.seq_len, "vocab_size": m.vocab_size,
                                           "n_layer": m.depth, "n_head": m.n_head, "n_kv_head": m.n_kv_head,
                                           "n_embd": m.width}}
    if nanochat_family(m) == "head":
        meta["model_config"]["window_pattern"] = m.window_pattern
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.save({k: torch.from_numpy(np.array(v, copy=True)) for k, v in sd.items()}, out / f"model_{step:06d}.pt")
    (out / f"meta_{step:06d}.json").write_text(json.dumps(meta, indent=2))
    return str(out)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m nanojax.convert", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("from-nanochat", help="nanochat model_*.pt + meta_*.json -> nanojax run dir")
    a.add_argument("src")
    a.add_argument("--step", type=int, required=True)
    a.add_argument("--out", required=True)
    b = sub.add_parser("to-nanochat", help="nanojax run dir -> nanochat model_*.pt + meta_*.json")
    b.add_argument("run_dir")
    b.add_argument("--step", type=int, default=None)
    b.add_argument("--out", required=True)
    c = sub.add_parser("to-hf", help="nanojax run dir -> Hugging Face NanoChat dir (transformers >= 5)")
    c.add_argument("run_dir")
    c.add_argument("--step", type=int, default=None)
    c.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the one the run records)")
    c.add_argument("--out", required=True)
    d = sub.add_parser("from-hf", help="Hugging Face NanoChat dir -> nanojax run dir (with its tokenizer)")
    d.add_argument("src")
    d.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    quiet_library_logs()
    try:
        if args.cmd == "from-nanochat":
            print(from_nanochat(args.src, args.step, args.out))
        elif args.cmd == "to-nanochat":
            print(to_nanochat(args.run_dir, args.step, args.out))
        elif args.cmd == "to-hf":
            print(to_hf(args.run_dir, args.step, args.out, args.tokenizer))
        else:
            print(from_hf(args.src, args.out))
    except (FileNotFoundError, ValueError) as e:
        ap.exit(2, f"error: {e}\n")


if __name__ == "__main__":
    sys.exit(main())
