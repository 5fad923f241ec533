"""Serving benchmark: generated tokens/s through the OpenAI server (HTTP, SSE, continuous batching) at 1, 4
and 16 concurrent streams.

    python -m nanojax.bench serve [--depth 4] [--seq_len 512] [--slots 16] [--new_tokens 128]
        [--streams 1,4,16] [--repeats 2]

The model is `bench generation`'s (the tiny config's shape, random weights, zero lm_head so greedy decoding
never stops early) with a byte-level tokenizer; the server runs in this process on 127.0.0.1 and every stream
is a real HTTP client (httpx) reading server-sent events. A warm-up request compiles first. Prints a JSON
line: tokens/s per concurrency (all streams' tokens over the wall time of the slowest) and the ratio to one
stream.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import time
from typing import Sequence

import jax

from nanojax.batcher import Batcher
from nanojax.benchmarks.generation import _model
from nanojax.serve import ServerThread, create_app
from nanojax.tokenizer import Tokenizer


def _stream(url: str, new_tokens: int, i: int) -> int:
    import httpx

    body = {"prompt": f"stream {i}: hello", "max_tokens": new_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    used = 0
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: {") and '"usage"' in line:
                used = json.loads(line[6:])["usage"]["completion_tokens"]
    return used


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--seq_len", type=int, default=512)
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--new_tokens", type=int, default=128)
    ap.add_argument("--streams", default="1,4,16")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    tok = Tokenizer.from_ranks({bytes([i]): i for i in range(256)})
    model = _model(args.depth, tok.vocab_size, args.seq_len)
    batcher = Batcher(model, tok, slots=args.slots, use_tool=False)
    server = ServerThread(create_app(batcher, tok, "bench"))
    result = {"backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind),
              "cpu": platform.processor() or platform.machine(), "load_avg_1m": round(os.getloadavg()[0], 2),
              "depth": args.depth, "width": int(model.cfg.width), "seq_len": args.seq_len, "slots": args.slots,
              "new_tokens": args.new_tokens}
    try:
        t0 = time.perf_counter()
        _stream(server.url, 4, 0)  # compiles the prefill bucket and the decode step
        result["warmup_s"] = round(time.perf_counter() - t0, 2)
        for n in (int(x) for x in args.streams.split(",")):
            best = 0.0
            for _ in range(args.repeats):
                t = time.perf_counter()
                with concurrent.futures.ThreadPoolExecutor(n) as pool:
                    tokens = sum(pool.map(lambda i: _stream(server.url, args.new_tokens, i), range(n)))
                best = max(best, tokens / (time.perf_counter() - t))
            result[f"tokens_per_s_{n}"] = round(best, 1)
            print(json.dumps({"streams": n, "tokens_per_s": round(best, 1)}), flush=True)
        for n in args.streams.split(",")[1:]:
            result[f"ratio_{n}_vs_1"] = round(result[f"tokens_per_s_{n}"] / result["tokens_per_s_1"], 2)
    finally:
        server.stop()
        batcher.close()
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
