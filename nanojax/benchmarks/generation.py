"""Generation benchmark: decode tokens/s with the KV-cache engine vs recomputing the sequence every step.

    python -m nanojax.benchmarks.generation [--depth 4] [--vocab 8192] [--seq_len 512] [--prompt 16]
        [--new_tokens 256] [--batch 1] [--repeats 3]

The model is the tiny config's shape (depth 4 -> width 256, 2 heads of 128, vocab 8,192) with random
weights and a zero lm_head, so greedy decoding never hits a stop token and always runs `--new_tokens`
steps. `seq_len` defaults to 512 so a 16-token prompt plus 256 new tokens fits. Compilation is done
before timing (a warm-up run of both decoders). The no-cache decoder pads the growing sequence to a
multiple of 64 tokens, so it recompiles only a few shapes and does about half the work of a fixed-length
buffer: a conservative baseline. Prints a JSON line of the figures.

    python -m nanojax.benchmarks.generation --eval_timing gsm8k=PATH,humaneval=PATH [--seq_len 256]
        [--max_per_task N] [--eval_batch 8]

times the full generative evals (GSM8K with the calculator, HumanEval in the sandbox) through
`nanojax.evaluate` on the same random tiny model with a BPE tokenizer of `--vocab` ids trained on the
tasks' own text. With its zero lm_head the model never emits a stop token, so every problem decodes its
whole budget (min(512, seq_len - prompt) tokens): an upper bound on a trained tiny model's eval time.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from typing import Sequence

import jax
import numpy as np
from flax import nnx

from nanojax.config import default_config
from nanojax.engine import Engine, generate_naive
from nanojax.model import GPT
from nanojax.tokenizer import Tokenizer


def _model(depth: int, vocab: int, seq_len: int, seed: int = 0):
    c = default_config().model
    c.depth, c.vocab_size, c.seq_len = depth, vocab, seq_len
    c.compute_dtype = "auto"
    model = GPT(c, rngs=nnx.Rngs(seed))
    # output projections are zero at init: give the blocks real work; lm_head stays zero (argmax = 0)
    state = nnx.state(model, nnx.Param)
    keys = iter(jax.random.split(jax.random.key(seed + 1), 64))
    def init(path, x):
        if "lm_head" in jax.tree_util.keystr(path):
            return x
        return 0.02 * jax.random.normal(next(keys), x.shape, x.dtype)

    state = jax.tree_util.tree_map_with_path(init, state)
    nnx.update(model, state)
    return model


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq_len", type=int, default=512)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--new_tokens", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1, help="samples decoded together by the cached engine")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip_naive", action="store_true")
    ap.add_argument("--eval_timing", default="", help="gsm8k=PATH,humaneval=PATH: time the full generative evals")
    ap.add_argument("--max_per_task", type=int, default=-1)
    ap.add_argument("--eval_batch", type=int, default=8)
    args = ap.parse_args(argv)
    if args.eval_timing:
        return eval_timing(args)

    if args.prompt + args.new_tokens > args.seq_len:
        ap.error(f"--prompt + --new_tokens = {args.prompt + args.new_tokens} exceeds --seq_len {args.seq_len}")
    model = _model(args.depth, args.vocab, args.seq_len)
    tok = Tokenizer.from_ranks({bytes([i]): i for i in range(256)})
    engine = Engine(model, tok, use_tool=False)
    prompt = np.random.default_rng(0).integers(0, 256, args.prompt).tolist()

    def cached():
        out, _ = engine.generate_batch(prompt, num_samples=args.batch, max_tokens=args.new_tokens, temperature=0.0)
        return sum(len(r) - len(prompt) for r in out)

    def naive():
        return len(generate_naive(model, prompt, args.new_tokens))

    fns = {"cached": cached} if args.skip_naive else {"cached": cached, "naive": naive}
    t0 = time.perf_counter()
    for fn in fns.values():
        fn()  # compile every shape first
    compile_wall = time.perf_counter() - t0
    rates = {k: [] for k in fns}
    counts = {}
    for _ in range(args.repeats):  # interleaved, so both see the same machine load; best of each
        for k, fn in fns.items():
            t = time.perf_counter()
            counts[k] = fn()
            rates[k].append(counts[k] / (time.perf_counter() - t))
    result = {
        "backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind),
        "cpu": platform.processor() or platform.machine(), "load_avg_1m": round(os.getloadavg()[0], 2),
        "params": int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))),
        "depth": args.depth, "width": int(model.cfg.width), "vocab": args.vocab, "seq_len": args.seq_len,
        "prompt_tokens": args.prompt, "new_tokens": args.new_tokens, "batch": args.batch,
        "cached_tokens_per_s": round(max(rates["cached"]), 1), "cached_tokens": counts["cached"],
        "warmup_compile_s": round(compile_wall, 2),
    }
    if "naive" in rates:
        result["naive_tokens_per_s"] = round(max(rates["naive"]), 1)
        # per-sequence speed-up (the cached engine's rate counts every row of the batch)
        result["speedup_per_sequence"] = round(max(rates["cached"]) / args.batch / max(rates["naive"]), 2)
    print(json.dumps(result))
    return result


def eval_timing(args) -> dict:
    from nanojax import evaluate as ev  # only this mode needs the tasks (and their hub client)
    from nanojax.tasks.registry import eval_task

    sources = dict(item.split("=", 1) for item in args.eval_timing.split(",") if item)
    tasks = {name: eval_task(name, sources) for name in sources}
    texts = []
    for task in tasks.values():
        for i in range(len(task)):
            for msg in task[i]["messages"]:
                c = msg["content"]
                texts.append(c if isinstance(c, str) else " ".join(p["text"] for p in c))
    t0 = time.perf_counter()
    tok = Tokenizer.train(texts * 4, args.vocab)
    result = {"backend": jax.default_backend(), "vocab": args.vocab, "seq_len": args.seq_len,
              "tokenizer_train_s": round(time.perf_counter() - t0, 1), "eval_batch": args.eval_batch}
    model = _model(args.depth, args.vocab, args.seq_len)
    for name, task in tasks.items():
        n = len(task) if args.max_per_task < 0 else min(len(task), args.max_per_task)
        t0 = time.perf_counter()
        r = ev.evaluate_generative(model, tok, task, max_problems=n, batch_size=args.eval_batch,
                                   max_new_tokens=512, desc=name)
        result[name] = {"problems": n, "seconds": round(time.perf_counter() - t0, 1), "passed": r["passed"]}
        print(json.dumps({name: result[name]}), flush=True)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
