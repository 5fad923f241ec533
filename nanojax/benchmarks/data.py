"""Data-pipeline throughput per host: tokens/s of nanojax.data.pretrain with different threads/workers.

    python -m nanojax.benchmarks.data [--dir SHARDS] [--tokenizer DIR] [--configs 1:1:0,2:2:0,2:2:2]

Each config is `read_threads:tokenizer_threads:worker_processes`. Without --dir it uses
$NANOJAX_HOME/data/fineweb when that holds shards, else it writes --mb MB of shards in the dataset's
layout into a temporary directory: documents of ~4.7k characters of generated text
(nanojax.data.synthetic.synthetic_documents, seed 0), or, with --text PATH (a parquet file with a `text`
column), stitched from runs of that text's lines. Without --tokenizer it loads $NANOJAX_HOME/tokenizer,
else trains one with rustbpe on the first 16 MB of the shards' text (65,536 ids or as many as that text
supports). Two baselines bound the pipeline: tiktoken alone on in-memory text, and pyarrow +
tiktoken in a plain loop (no Grain, no packing).
"""
from __future__ import annotations

import argparse
import gc
import json
import pathlib
import random
import re
import sys
import tempfile
import time

import numpy as np
import pyarrow.parquet as pq
from absl import flags

from nanojax import paths
from nanojax.data import fineweb, pretrain
from nanojax.data.synthetic import synthetic_documents
from nanojax.tokenizer import Tokenizer

TOKENIZER_TRAIN_MB = 16.0  # of the shards' text, when a tokenizer is trained here
DEFAULT_CONFIGS = "1:1:0,1:2:0,2:1:0,2:2:0,3:2:0,4:4:0,2:2:1,2:2:2"


def _texts(path) -> list[str]:
    return [t for t in pq.read_table(path, columns=["text"]).column(0).to_pylist() if t]


def synthetic_shards(out_dir: pathlib.Path, text_path, total_mb: float, n_shards: int = 4,
                     mean_chars: int = 4700, seed: int = 0) -> list[str]:
    """FineWeb-layout shards of `total_mb` MB of text: generated documents when `text_path` is None,
    else random runs of lines from that parquet file's text (no exact repeats)."""
    per_shard = total_mb * 1e6 / n_shards
    if text_path is None:
        docs, files = synthetic_documents(int(total_mb * 1e6), seed=seed, mean_chars=mean_chars), []
        bounds = np.searchsorted(np.cumsum([len(d) for d in docs]), per_shard * np.arange(1, n_shards))
        for part in np.split(np.arange(len(docs)), bounds):
            if len(part):  # tiny sizes: fewer documents than shards
                files.append(str(out_dir / fineweb.shard_name(len(files))))
                fineweb.write_shard(files[-1], [docs[i] for i in part])
        return files
    lines = [ln for t in _texts(text_path) for ln in t.splitlines() if ln.strip()]
    rng = random.Random(seed)
    files = []
    for s in range(n_shards):
        docs, size = [], 0
        while size < per_shard:
            want, doc, i = rng.expovariate(1 / mean_chars), [], rng.randrange(len(lines))
            while sum(map(len, doc)) < want:
                doc.append(lines[i % len(lines)])
                i += 1
            docs.append("\n".join(doc))
            size += len(docs[-1])
        path = out_dir / fineweb.shard_name(s)
        fineweb.write_shard(path, docs)
        files.append(str(path))
    return files


def _tokenizer(tok_dir, files):
    """The tokenizer in `tok_dir` (default $NANOJAX_HOME/tokenizer), else one trained on the shards."""
    d = pathlib.Path(tok_dir) if tok_dir else paths.tokenizer_dir()
    if (d / "tokenizer_meta.json").exists():
        return Tokenizer.load(d), f"loaded {d}"
    texts, size = [], 0
    for text in fineweb.iter_parquet_texts(files):
        texts.append(text)
        size += len(text)
        if size >= TOKENIZER_TRAIN_MB * 1e6:
            break
    vocab = 65536
    t0 = time.time()
    try:
        tok = Tokenizer.train(texts, vocab)
    except ValueError as e:  # the text ran out of merges: take the largest size it supports
        m = re.search(r"vocab_size <= (\d+)", str(e))
        if not m:
            raise
        vocab = int(m.group(1))
        tok = Tokenizer.train(texts, vocab)
    return tok, f"trained on {size / 1e6:.1f} MB of the shards, vocab {tok.vocab_size} ({time.time() - t0:.1f}s)"


def _baselines(files, tok, seconds: float) -> dict:
    pf = pq.ParquetFile(files[0])
    texts = pf.read_row_groups(range(min(2, pf.num_row_groups)), columns=["text"]).column(0).to_pylist()
    t0, n = time.time(), 0
    while time.time() - t0 < seconds / 2:
        n += sum(map(len, tok.encoding.encode_ordinary_batch(texts, num_threads=2)))
    raw = n / (time.time() - t0)
    t0, n, chars = time.time(), 0, 0
    for f in files:
        pf = pq.ParquetFile(f)
        for g in range(pf.num_row_groups):
            texts = pf.read_row_group(g, columns=["text"]).column(0).to_pylist()
            ids = tok.encoding.encode_ordinary_batch(texts, num_threads=2)
            n += sum(len(x) + 1 for x in ids)
            chars += sum(map(len, texts))
            if time.time() - t0 > seconds:
                break
        else:
            continue
        break
    dt = time.time() - t0
    return {"tiktoken_2threads_tok_s": raw, "pyarrow_tiktoken_loop_tok_s": n / dt,
            "chars_per_token": chars / n}


def measure(files, tok, *, read_threads, tokenizer_threads, workers, batch_size, seq_len, seconds) -> dict:
    """Tokens/s (inputs, B x T per batch) over `seconds` after the first batch, time to first batch, and
    CPU seconds of this process per million tokens (less sensitive to other load; no workers only)."""
    t0 = time.time()
    it = pretrain.make_pretrain_iterator(files, tok, batch_size=batch_size, seq_len=seq_len,
                                         read_threads=read_threads, tokenizer_threads=tokenizer_threads,
                                         worker_count=workers, prefetch=2)
    next(it)
    first = time.time() - t0
    t1, c1, n = time.time(), time.process_time(), 0
    while time.time() - t1 < seconds:
        n += next(it)["inputs"].size
    rate, cpu = n / (time.time() - t1), (time.process_time() - c1) / n * 1e6
    it.close()
    del it
    gc.collect()
    return {"read_threads": read_threads, "tokenizer_threads": tokenizer_threads, "workers": workers,
            "tok_s": rate, "first_batch_s": first, "cpu_s_per_Mtok": None if workers else cpu}


def stalls(files, tok, *, batch_size, seq_len, step_s: float, steps: int) -> dict:
    """A fake train loop: `step_s` of "compute" per batch; how long does next() block after batch 1?"""
    it = pretrain.make_pretrain_iterator(files, tok, batch_size=batch_size, seq_len=seq_len)
    next(it)
    waits = []
    for _ in range(steps):
        time.sleep(step_s)
        t = time.time()
        next(it)
        waits.append(time.time() - t)
    it.close()
    del it
    gc.collect()
    return {"step_s": step_s, "demand_tok_s": batch_size * seq_len / step_s,
            "mean_wait_ms": 1e3 * float(np.mean(waits)), "max_wait_ms": 1e3 * max(waits)}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(prog="python -m nanojax.benchmarks.data", description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default=None, help="parquet shard directory (default: see module doc)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer directory (default $NANOJAX_HOME/tokenizer)")
    ap.add_argument("--text", default=None,
                    help="parquet file ('text' column) to build the shards and tokenizer from, when there "
                         "is no --dir and no FineWeb in $NANOJAX_HOME (default: generated text)")
    ap.add_argument("--mb", type=float, default=64.0, help="size of the temporary shards in MB of text")
    ap.add_argument("--configs", default=DEFAULT_CONFIGS, help="read_threads:tokenizer_threads:workers,...")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--seconds", type=float, default=4.0, help="measuring time per config per round")
    ap.add_argument("--rounds", type=int, default=3, help="round-robin repeats (shared machines drift)")
    ap.add_argument("--step-ms", type=float, default=84.0,
                    help="fake step time for the stall test (84 ms x 32 x 2048 tokens = 0.78M tok/s, one "
                         "8xH100 d20 host's demand); 0 skips it")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)

    if not flags.FLAGS.is_parsed():  # grain reads an absl flag in its workers
        flags.FLAGS.mark_as_parsed()
    text_path = pathlib.Path(args.text) if args.text else None
    tmp = None
    if args.dir:
        files = fineweb.list_shards(args.dir)
        source = args.dir
    else:
        try:
            files, source = fineweb.list_shards(), str(fineweb.default_dir())
        except FileNotFoundError:
            tmp = tempfile.TemporaryDirectory(prefix="nanojax_bench_data_")
            t0 = time.time()
            files = synthetic_shards(pathlib.Path(tmp.name), text_path, args.mb)
            origin = text_path.name if text_path else "generated text (seed 0)"
            source = f"synthetic {args.mb:g} MB from {origin} ({time.time() - t0:.1f}s to write)"
    tok, tok_info = _tokenizer(args.tokenizer, files)
    print(f"data: {source}: {len(files)} file(s); tokenizer: {tok_info}; "
          f"batch {args.batch_size}x{args.seq_len}")
    specs = [tuple(int(x) for x in spec.split(":")) for spec in args.configs.split(",")]
    rounds, bases = {spec: [] for spec in specs}, []
    for k in range(args.rounds):  # round-robin, so drifting load from other users hits every config alike
        bases.append(_baselines(files, tok, args.seconds))
        b = bases[-1]
        print(f"round {k + 1}/{args.rounds}: tiktoken alone (2 threads) "
              f"{b['tiktoken_2threads_tok_s'] / 1e6:.2f}M "
              f"tok/s, pyarrow+tiktoken loop {b['pyarrow_tiktoken_loop_tok_s'] / 1e6:.2f}M tok/s", flush=True)
        for r, t, w in specs:
            res = measure(files, tok, read_threads=r, tokenizer_threads=t, workers=w,
                          batch_size=args.batch_size, seq_len=args.seq_len, seconds=args.seconds)
            rounds[(r, t, w)].append(res)
            print(f"  {r}:{t}:{w} {res['tok_s'] / 1e6:.2f}M tok/s", flush=True)
    med = lambda xs: float(np.median(xs))  # noqa: E731
    print(f"\nmedian of {args.rounds} round(s), {bases[0]['chars_per_token']:.2f} chars/token; "
          "baselines: tiktoken "
          f"alone {med([b['tiktoken_2threads_tok_s'] for b in bases]) / 1e6:.2f}M, pyarrow+tiktoken loop "
          f"{med([b['pyarrow_tiktoken_loop_tok_s'] for b in bases]) / 1e6:.2f}M tok/s")
    print(f"{'read_thr':>8} {'tok_thr':>7} {'workers':>7} {'M tok/s':>8} {'(best)':>7} {'CPU s/Mtok':>10} "
          f"{'1st batch':>9}")
    results = []
    for (r, t, w), rs in rounds.items():
        cpu = None if w else med([x["cpu_s_per_Mtok"] for x in rs])
        res = {"read_threads": r, "tokenizer_threads": t, "workers": w,
               "tok_s": med([x["tok_s"] for x in rs]),
               "best_tok_s": max(x["tok_s"] for x in rs), "cpu_s_per_Mtok": cpu,
               "first_batch_s": med([x["first_batch_s"] for x in rs])}
        results.append(res)
        print(f"{r:>8} {t:>7} {w:>7} {res['tok_s'] / 1e6:>8.2f} {res['best_tok_s'] / 1e6:>7.2f} "
              f"{'-' if cpu is None else f'{cpu:.3f}':>10} {res['first_batch_s']:>8.2f}s")
    base = {k: med([b[k] for b in bases]) for k in bases[0]}
    if args.step_ms > 0:
        st = stalls(files, tok, batch_size=args.batch_size, seq_len=args.seq_len, step_s=args.step_ms / 1e3,
                    steps=40)
        base["stalls"] = st
        print(f"stall test (defaults 2:2:0, prefetch 2): {args.step_ms:.0f} ms steps = "
              f"{st['demand_tok_s'] / 1e6:.2f}M tok/s demand; next() waited {st['mean_wait_ms']:.2f} ms "
              f"on average, {st['max_wait_ms']:.1f} ms at most (40 steps)")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(
            {"source": source, "tokenizer": tok_info, "baselines": base, "results": results}, indent=1))
    if tmp is not None:
        tmp.cleanup()
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
