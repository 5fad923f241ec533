"""nanochat launch d32 ("$1000 tier", run1000.sh): 1,879,048,192 parameters."""
from nanojax.config import default_config


def get_config():
    c = default_config()
    c.run_name = "base_d32"
    c.model.depth = 32
    c.data.kind = "fineweb"
    c.train.core_every = 2000  # CORE on 500 examples per task every 2000 steps and at the end (base_train.py)
    c.train.device_batch_size = 8  # as run1000.sh (grad accumulation 4 on 8 devices)
    return c
