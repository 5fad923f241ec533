"""Shared test configs: small enough that a train step compiles and runs in a second on CPU."""
import pathlib

from nanojax import config
from nanojax.config import default_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_config_file(name: str):
    return config.load_config_file(ROOT / "configs" / f"{name}.py")


def micro_config(run_dir=None, *, mesh=(1, 1, 1), steps=4, depth=2):
    """depth 2, width 64 (2 heads of 32), vocab 256, context 32; 8 rows × 32 tokens per step."""
    c = default_config()
    c.run_name = "micro"
    if run_dir is not None:
        c.run_dir = str(run_dir)
    m = c.model
    m.depth, m.aspect_ratio, m.head_dim = depth, 32, 32
    m.vocab_size, m.seq_len, m.loss_chunk_size = 256, 32, 16
    m.compute_dtype = "float32"
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
    c.mesh.num_devices = mesh[0] * mesh[1] * mesh[2]
    dp = mesh[0] * mesh[1]
    c.train.device_batch_size = max(1, 4 // dp)
    c.train.total_batch_size = 8 * 32
    c.train.num_iterations = steps
    c.train.eval_every = 0
    c.train.eval_tokens = 8 * 32
    c.train.log_every = 1
    c.train.checkpoint_every = 0
    c.train.async_checkpointing = False
    c.optim.embedding_lr = 0.05
    c.data.kind = "synthetic"
    return c
