"""nanojax's training step against nanochat's own PyTorch step on the same shape, measured side by side.

    python -m nanojax.bench nanochat --nanochat DIR [--rounds 3] [--steps 10] [--record docs/benchmarks.md]

DIR is a nanochat checkout (`git archive 3a5e0bc | tar -x -C DIR`: launch; HEAD works too where its GPT
takes the same config). Each round runs nanojax (`bench train`, synthetic data, one device) then nanochat
(`torch_nanochat.py`, under `torch.compile`) in fresh processes, alternately, so both see the same machine
load; the ratio is of the medians. Shape: nanochat's tiny (depth 4, width 256, 2 heads of 128, vocab 8,192,
T 256, batch 8, no accumulation), Muon + AdamW, float32.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys

from nanojax.benchmarks.train import machine

HERE = os.path.dirname(os.path.abspath(__file__))


def nanojax_cmd(args) -> list[str]:
    return [sys.executable, "-m", "nanojax.bench", "train", "--config=configs/tiny.py", "--json",
            f"--steps={args.steps}", "--config.data.kind=synthetic", f"--config.model.depth={args.depth}",
            f"--config.model.vocab_size={args.vocab}", f"--config.model.seq_len={args.seq}",
            f"--config.train.device_batch_size={args.batch}",
            f"--config.train.total_batch_size={args.batch * args.seq}", "--config.mesh.num_devices=1",
            *args.nanojax_flags]


def torch_cmd(args) -> list[str]:
    return [args.torch_python, os.path.join(HERE, "torch_nanochat.py"), f"--nanochat={args.nanochat}",
            f"--depth={args.depth}", f"--vocab={args.vocab}", f"--seq={args.seq}", f"--batch={args.batch}",
            f"--steps={args.steps}"]


def last_json(cmd: list[str], env: dict) -> dict:
    """The last JSON line a benchmark process prints (its other output is progress)."""
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        raise SystemExit(f"{' '.join(cmd[:4])} … failed ({out.returncode}):\n{out.stderr[-3000:]}")
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise SystemExit(f"{' '.join(cmd[:4])} … printed no JSON result:\n{out.stdout[-2000:]}")
    return json.loads(lines[-1])


def main(argv) -> int:
    p = argparse.ArgumentParser(prog="nanojax.bench nanochat", description=__doc__.splitlines()[0])
    p.add_argument("--nanochat", required=True, help="nanochat checkout directory")
    p.add_argument("--torch_python", default=sys.executable, help="a Python with torch (default: this one)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--label", default="", help="what this nanojax is (a commit, a change) for the record")
    p.add_argument("--record", default="", help="append a markdown row to this file")
    p.add_argument("nanojax_flags", nargs="*", help="extra --config.x=y overrides for the nanojax side")
    args = p.parse_args(argv)
    if not os.path.isfile(os.path.join(args.nanochat, "nanochat", "gpt.py")):
        p.error(f"--nanochat {args.nanochat}: no nanochat/gpt.py there")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one plain CPU device for nanojax
    env["JAX_PLATFORMS"] = "cpu"
    ours, theirs = [], []
    for r in range(args.rounds):
        ours.append(last_json(nanojax_cmd(args), env)["tokens_per_s"])
        theirs.append(last_json(torch_cmd(args), env)["tokens_per_s"])
        print(f"round {r + 1}/{args.rounds}: nanojax {ours[-1]:,.0f} tok/s, nanochat compiled {theirs[-1]:,.0f} tok/s",
              flush=True)
    a, b = statistics.median(ours), statistics.median(theirs)
    result = {"nanojax_tokens_per_s": ours, "nanochat_tokens_per_s": theirs, "ratio": a / b,
              "machine": machine(), "load": os.getloadavg()[0]}
    print(json.dumps(result))
    row = (f"| {datetime.date.today()} | {result['machine']} | {args.label or '–'} | "
           f"{' / '.join(f'{x:,.0f}' for x in ours)} | {' / '.join(f'{x:,.0f}' for x in theirs)} | "
           f"**{a / b:.2f}×** |")
    print(row)
    if args.record:
        with open(args.record, "a") as f:
            f.write(row + "\n")
    return 0
