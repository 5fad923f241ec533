"""nanochat launch d20 midtraining: base_d20 -> mid_d20 on SmolTalk + MMLU auxiliary + GSM8K, one epoch.

Mixture (568K conversations, shuffled once with seed 42): SmolTalk train 460K + MMLU auxiliary_train 100K +
GSM8K main train 7.5K; validation: SmolTalk test 24K + MMLU test[:5200] + GSM8K test[:420]. Conversations
are rendered and packed into continuous 2048-token rows with no loss mask (nanochat v0 `mid_train.py`).
Base LRs (×1.0), constant for 80% then linearly to 0 (nanochat after fix b8076dd), Muon momentum 0.85→0.95
over 300 steps, 524,288 tokens per step.

num_iterations: nanochat stopped at the end of the epoch (~700 steps at d20 in published runs). Our loop
needs the number up front; for your tokenizer get the exact one-epoch count with
  python -m nanojax.data.chat count --config=configs/mid_d20.py
and pass it as --config.train.num_iterations=N (a small overshoot wraps into a few rows of epoch 2).
Offline / local data: --config.data.task_sources="smoltalk=DIR, mmlu=DIR, gsm8k=DIR" (HF column layout).
"""
from nanojax import paths
from nanojax.config import default_config

ROWS_PER_EPOCH = 460_000 + 99_842 + 7_473  # nanochat's mixture (the MMLU auxiliary_train split has 99,842 rows)


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
    t.total_batch_size = 524_288
    t.device_batch_size = 32
    t.num_iterations = 700  # ≈ one epoch; see the docstring for the exact count
    t.warmup_ratio = 0.0
    t.warmdown_ratio = 0.2
    t.final_lr_frac = 0.0
    t.eval_every = 150
    t.eval_tokens = 20 * 524_288
    t.checkpoint_every = 0  # the final checkpoint (and on SIGTERM)
    return c
