"""Tiny midtraining on a CPU: the configs/tiny.py base run -> tiny_mid, on GSM8K conversations packed into
256-token rows (no mask), ≈ one epoch of GSM8K train with the tiny tokenizer; LR schedule and optimizer as
pretraining (the defaults), as configs/mid_d20.py.

Local data (no network): --config.data.task_sources="gsm8k=DIR" with DIR holding train.jsonl / test.jsonl
(or the HF parquet files). With network, the d20 mixture shape works too, e.g.
--config.data.train_tasks="smoltalk:train[:20000], mmlu/auxiliary_train:train[:5000], gsm8k/main:train".
"""
import pathlib

from nanojax import paths
from nanojax.config import load_config_file

def get_config():
    c = load_config_file(pathlib.Path(__file__).with_name("tiny.py"))
    c.run_name = "tiny_mid"
    c.data.kind = "mid"
    c.data.train_tasks = "gsm8k/main:train"
    c.data.val_tasks = "gsm8k/main:test"
    t = c.train
    t.init_from = str(paths.runs_dir() / "tiny")
    t.num_iterations = 160  # ≈ one epoch of GSM8K train (≈1.3M tokens) at 8,192 tokens per step
    t.eval_every = 40
    t.eval_tokens = 8 * 8192
    t.checkpoint_every = 40
    return c
