"""nanochat launch d26 ("$300 tier", ~GPT-2 CORE): 1,081,999,360 parameters."""
from nanojax.config import default_config


def get_config():
    c = default_config()
    c.run_name = "base_d26"
    c.model.depth = 26
    c.data.kind = "fineweb"
    c.train.core_every = 2000  # CORE on 500 examples per task every 2000 steps and at the end (base_train.py)
    c.train.device_batch_size = 16  # as nanochat's d26 recipe (80 GB devices)
    return c
