"""nanochat's own training step, timed: the PyTorch side of `python -m nanojax.bench nanochat`.

Run as a script in a torch environment, against a nanochat checkout (never vendored into nanojax):

    python nanojax/benchmarks/torch_nanochat.py --nanochat DIR [--depth 4 --vocab 8192 --seq 256 --batch 8]

nanochat's `GPT`, `setup_optimizers` (Muon + fused AdamW) and the step of `scripts/base_train.py` (forward, backward,
clip 1.0, both optimizers, zero_grad) under `torch.compile(model, dynamic=False)` as base_train does. CPU
changes, as in tests/fixtures/nanochat_v0: no bf16 autocast (CUDA only) and the bf16 token embedding cast to
float32. Prints one JSON line: tokens/s over the timed steps, the first (compiling) step's time.
"""
import argparse
import json
import os
import sys
import time


def build(args):
    sys.path.insert(0, args.nanochat)
    import torch
    from nanochat.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    width = args.depth * 64  # nanochat: model_dim = depth × 64, heads of 128
    cfg = GPTConfig(sequence_len=args.seq, vocab_size=args.vocab, n_layer=args.depth,
                    n_head=max(1, width // 128), n_kv_head=max(1, width // 128), n_embd=width)
    model = GPT(cfg)
    model.init_weights()
    model.transformer.wte.to(dtype=torch.float32)
    optimizers = model.setup_optimizers()
    compiled = torch.compile(model, dynamic=False) if args.compile else model
    return torch, model, compiled, optimizers


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nanochat", required=True, help="a nanochat checkout (e.g. git archive 3a5e0bc)")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--no-compile", dest="compile", action="store_false")
    args = p.parse_args(argv)
    if not os.path.isfile(os.path.join(args.nanochat, "nanochat", "gpt.py")):
        p.error(f"--nanochat {args.nanochat}: no nanochat/gpt.py there")
    torch, model, compiled, optimizers = build(args)
    x = torch.randint(0, args.vocab, (args.batch, args.seq))
    y = torch.randint(0, args.vocab, (args.batch, args.seq))

    def step():
        loss = compiled(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        return loss.item()

    t0 = time.perf_counter()
    step()
    first_s = time.perf_counter() - t0
    step()  # a second warm-up: Muon's compiled Newton–Schulz meets each matrix shape on the first steps
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    dt = (time.perf_counter() - t0) / args.steps
    print(json.dumps({"side": "nanochat", "compiled": args.compile, "step_s": dt,
                      "tokens_per_s": args.batch * args.seq / dt, "first_step_s": first_s, "loss": loss,
                      "torch": torch.__version__, "threads": torch.get_num_threads()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
