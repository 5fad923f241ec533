"""configs/gpt2_sft.py's recipe after the tiny_gpt2 run, on a CPU: tiny_gpt2 -> tiny_gpt2_chat on GSM8K, one epoch.

HEAD's SFT (`nanojax.config.use_nanochat_head_sft`: best-fit packed rows, assistant-only loss, LRs × 0.8 with the
last half to 0, Muon momentum 0.85 -> 0.95, no Muon weight decay, momenta warm-started from the base run; ChatCORE
every 200 steps, here GSM8K only) with tiny_gpt2's model, batch and LRs, on GSM8K train; validation on GSM8K test.
Local data: --config.data.task_sources="gsm8k=DIR" (e.g. ../shared/data/gsm8k).
"""
import pathlib

from nanojax import paths
from nanojax.config import load_config_file, use_nanochat_head_sft


def get_config():
    c = use_nanochat_head_sft(load_config_file(pathlib.Path(__file__).with_name("tiny_gpt2.py")))
    c.run_name = "tiny_gpt2_chat"
    c.data.train_tasks, c.data.val_tasks = "gsm8k/main:train", "gsm8k/main:test"
    t = c.train
    t.init_from = str(paths.runs_dir() / "tiny_gpt2")
    t.checkpoint_every = 0
    t.chatcore_tasks = "gsm8k"  # the ChatCORE task with local data here (task_sources); the others need the hub
    return c
