"""A ~7M-parameter model that trains on a laptop CPU in minutes, through the same code as d20.

depth 4 -> width 256, 2 heads of 128; vocab 8,192; context 256; 8,192 tokens per step.
"""
from nanojax import paths
from nanojax.config import default_config


def get_config():
    c = default_config()
    c.run_name = "tiny"
    c.model.depth = 4
    c.model.vocab_size = 8192
    c.model.seq_len = 256
    c.train.total_batch_size = 8192
    c.train.device_batch_size = 4  # 1 device: 8 micro-steps; 8 devices: none
    c.train.num_iterations = 200
    c.train.log_every = 10
    c.train.eval_every = 50
    c.train.eval_tokens = 16 * 8192
    c.train.checkpoint_every = 50
    c.data.kind = "fineweb"
    c.data.num_shards = 1  # shard 0 + the validation shard (~200 MB)
    c.data.tokenizer_dir = str(paths.home() / "tokenizer-8k")  # keeps the d20 tokenizer's place free
    return c
