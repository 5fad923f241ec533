"""configs/tiny.py's shape with nanochat HEAD's recipe (model family, MuonAdamW, best-fit packing): a CPU run of
the current nanochat in minutes. Same data as tiny (--config.data.path=FILE_OR_DIR for any parquet with `text`)
and its 8,192-token tokenizer; the batch is fixed (HEAD's automatic size is for GPUs)."""
import pathlib

from nanojax.config import load_config_file, use_nanochat_head


def get_config():
    c = use_nanochat_head(load_config_file(pathlib.Path(__file__).with_name("tiny.py")))
    c.run_name = "tiny_gpt2"
    c.model.vocab_size = 8192
    c.data.dataset = "fineweb"  # tiny's shard; --config.data.dataset=climbmix for ClimbMix's
    c.train.total_batch_size = 8192
    c.train.num_iterations = 200
    return c
