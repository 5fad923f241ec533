"""Shared test configs: small enough that a train step compiles and runs in a second on CPU."""
import pathlib

from nanojax import config
from nanojax.config import default_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
# a few repeated sentences: enough for a 300-token BPE, the generation and serving tests' tokenizer
CHAT_TEXT = ["the cat sat on the mat and the dog ran after the cat", "one two three four five six seven eight",
             "to be or not to be that is the question"] * 30


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


def random_weights(model, seed: int = 3, scale: float = 0.5):
    """Every parameter drawn from N(0, scale²), in place: at init the output projections are zero, so every
    logit ties and greedy decoding tests nothing."""
    import jax
    from flax import nnx

    state = nnx.state(model, nnx.Param)
    keys = iter(jax.random.split(jax.random.key(seed), len(jax.tree.leaves(state))))
    nnx.update(model, jax.tree.map(lambda p: scale * jax.random.normal(next(keys), p.shape, p.dtype), state))
    return model


def micro_chat_model(vocab_size: int, seq_len: int):
    """The micro config's model at `vocab_size` and `seq_len` with random weights (generation and serving tests)."""
    from flax import nnx

    from nanojax.model import GPT

    config = micro_config()
    config.model.vocab_size, config.model.seq_len = vocab_size, seq_len
    return random_weights(GPT(config.model, rngs=nnx.Rngs(0)))
