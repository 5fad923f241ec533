"""`python -m nanojax.bench SUBJECT [args]`: measured figures, never assertions (see docs/benchmarks.md).

Subjects:
  train       training step: compile time, tokens/s, MFU, peak memory   (--config=configs/X.py ...)
  data        pretraining pipeline tokens/s per host                    (nanojax.benchmarks.data)
  tokenizer   BPE training time and encode throughput                   (nanojax.benchmarks.tokenizer)
  generation  KV-cache decode tokens/s vs. recomputation                (nanojax.benchmarks.generation)
  serve       OpenAI server tokens/s at 1, 4, 16 concurrent streams      (nanojax.benchmarks.serve)
  plan        predicted step time / MFU / memory on a TPU slice or GPU cluster (--config=… --target=v6e-256)
  nanochat    nanojax's step vs nanochat's compiled PyTorch step, same shape, side by side (--nanochat DIR)
"""
import importlib
import sys

from absl import app

SUBJECTS = ("train", "data", "tokenizer", "generation", "serve", "plan", "nanochat")


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in SUBJECTS:
        print(__doc__)
        return 0 if len(sys.argv) >= 2 and sys.argv[1] in ("-h", "--help") else 2
    subject = sys.argv[1]
    sys.argv = [f"nanojax.bench {subject}", *sys.argv[2:]]
    module = importlib.import_module(f"nanojax.benchmarks.{subject}")
    if subject in ("train", "plan"):  # absl flags (--config=… --config.a.b=v)
        app.run(module.main)
        return 0
    result = module.main(sys.argv[1:])
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
