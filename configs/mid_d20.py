"""nanochat launch d20 midtraining: base_d20 -> mid_d20 on SmolTalk + MMLU auxiliary + GSM8K, one epoch.

Mixture (568K conversations, shuffled once with seed 42): SmolTalk train 460K + MMLU auxiliary_train 100K +
GSM8K main train 7.5K; validation: SmolTalk test 24K + MMLU test[:5200] + GSM8K test[:420]. Conversations
are rendered and packed into continuous 2048-token rows with no loss mask (nanochat v0 `mid_train.py`).
Everything else is the pretraining default (nanojax.config.default_config): base LRs (×1.0), constant for 80%
then linearly to 0 (nanochat after fix b8076dd), Muon momentum 0.85→0.95 over 300 steps, 524,288 tokens per
step (32 rows of 2048 per device), validation on 20 × 524,288 tokens.

num_iterations: nanochat stopped at the end of the epoch (~700 steps at d20 in published runs). Our loop
needs the number up front; for your tokenizer get the exact one-epoch count with
  python -m nanojax.data.chat count --config=configs/mid_d20.py
and pass it as --config.train.num_iterations=N (a small overshoot wraps into a few rows of epoch 2), or pass
--config.train.num_iterations=-1 and the run counts the same epoch when it starts.
Offline / local data: --config.data.task_sources="smoltalk=DIR, mmlu=DIR, gsm8k=DIR" (HF column layout).
"""
from nanojax import paths
from nanojax.config import default_config


def get_config():
    c = default_config()
    c.run_name = "mid_d20"
    c.model.depth = 20
    c.data.kind = "mid"
    c.data.train_tasks = "smoltalk:train, mmlu/auxiliary_train:train, gsm8k/main:train"
    c.data.val_tasks = "smoltalk:test, mmlu/all:test[:5200], gsm8k/main:test[:420]"
    c.data.skip_bad_rows = True  # explicit: a malformed SmolTalk row is skipped and counted, not fatal
    t = c.train
    t.init_from = str(paths.runs_dir() / "base_d20")
    t.num_iterations = 700  # ≈ one epoch; see the docstring for the exact count
    t.eval_every = 150
    t.checkpoint_every = 0  # the final checkpoint (and on SIGTERM)
    return c
