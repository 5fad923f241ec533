"""Tiny SFT on a CPU: tiny_mid (or the tiny base run) -> tiny_chat on GSM8K, assistant-only loss.

32 conversations per step (32 rows × 256, 4 per device as configs/tiny.py), one epoch of GSM8K train =
7,473 // 32 = 233 steps, LR linearly to 0 and Muon momentum constant 0.95 as configs/sft_d20.py, validation loss
on GSM8K test. Local data: --config.data.task_sources="gsm8k=DIR".

The LRs are the base LRs (lr_scale 1), not d20's × 0.02: nanochat's small SFT LR fine-tunes a model that has
read 11B tokens, while the tiny base has read ~1.2M and has everything to learn about the chat format. From a
200-step base on the KJV text, 60 steps with lr_scale 0.02 took the loss from 10.24 only to 8.66 (uniform: 9.01),
replies rambling; 0.5 reached 2.84 with no '#### N' answers; 1.0 reached 2.51 (100 steps: 2.31), with 17 of 20
GSM8K replies ending by themselves and 6 (100 steps: 10) in the '#### N' form, calculator calls included.
From the base run directly: --config.train.init_from=$NANOJAX_HOME/runs/tiny
"""
import pathlib

from nanojax import paths
from nanojax.config import load_config_file

def get_config():
    c = load_config_file(pathlib.Path(__file__).with_name("tiny.py"))
    c.run_name = "tiny_chat"
    c.data.kind = "sft"
    c.data.train_tasks = "gsm8k/main:train"
    c.data.val_tasks = "gsm8k/main:test"
    t = c.train
    t.init_from = str(paths.runs_dir() / "tiny_mid")
    t.total_batch_size = 32 * c.model.seq_len  # 32 conversations per step
    t.num_iterations = 7_473 // 32
    t.warmdown_ratio = 1.0
    t.eval_tokens = 32 * 4 * c.model.seq_len  # 32 batches of 4 conversations
    o = c.optim
    o.lr_scale = 1.0
    o.muon_momentum_start = o.muon_momentum_end  # constant 0.95
    return c
