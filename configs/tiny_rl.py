"""Tiny RL on a CPU: tiny_chat (configs/tiny_sft.py) -> tiny_rl, GSM8K rollouts as configs/rl_d20.py, smaller.

8 questions per step × 8 replies (64 sequences), ≤ 128 new tokens, temperature 1.0, top-k 50, calculator on;
LR = base LRs × 0.05 linearly to 0 (rl_d20's settings); pass@1..4 on the first 32 GSM8K test questions every 10
steps. A 7M-parameter model rarely answers a GSM8K question right, so most steps have reward 0 everywhere and
no gradient (every advantage is 0): this run shows the machinery, not learning. Length: train.num_iterations
(the quickstart's RL_STEPS). Local data: --config.data.task_sources="gsm8k=DIR".
"""
import pathlib

from nanojax import paths
from nanojax.config import load_config_file


def get_config():
    c = load_config_file(pathlib.Path(__file__).with_name("rl_d20.py"))
    tiny = load_config_file(pathlib.Path(__file__).with_name("tiny.py"))
    c.model = tiny.model
    c.data.tokenizer_dir = tiny.data.tokenizer_dir
    c.run_name = "tiny_rl"
    t = c.train
    t.init_from = str(paths.runs_dir() / "tiny_chat")
    t.device_batch_size = 8  # 64 rows: 8 micro-steps on 1 device, 1 on 8
    t.num_iterations = 30
    t.eval_every = 10
    t.checkpoint_every = 10
    t.log_every = 1
    r = c.rl
    r.examples_per_step, r.num_samples = 8, 8
    r.max_new_tokens = 128
    r.sample_rows = 64
    r.eval_examples, r.eval_samples = 32, 4
    return c
