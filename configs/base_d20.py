"""nanochat launch d20 ("$100 tier"): 560,988,160 parameters, 21,400 steps × 524,288 tokens on FineWeb-Edu."""
from nanojax.config import default_config


def get_config():
    c = default_config()
    c.run_name = "base_d20"
    c.model.depth = 20
    c.data.kind = "fineweb"
    c.train.core_every = 2000  # CORE on 500 examples per task every 2000 steps and at the end (base_train.py)
    c.train.device_batch_size = 32  # 8×H100: no accumulation; fewer devices accumulate automatically
    return c
