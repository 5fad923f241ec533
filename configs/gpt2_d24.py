"""nanochat HEAD's "time to GPT-2" speedrun (runs/speedrun.sh at 92d63d4): d24 with its model family, MuonAdamW,
ClimbMix + best-fit packing, data:param ratio 8, the automatic batch size; 8×H100 or a TPU slice.
(FP8, which the speedrun turns on with --fp8, is not part of nanojax.)"""
from nanojax.config import default_config, use_nanochat_head


def get_config():
    c = use_nanochat_head(default_config())
    c.run_name = "gpt2_d24"
    c.model.depth = 24
    c.data.kind = "fineweb"  # the pretraining pipeline; data.dataset=climbmix picks the shards
    # "": the dataset's tokenizer, $NANOJAX_HOME/tokenizer-climbmix (HEAD's 32,768 ids), beside launch's tokenizer/:
    # python -m nanojax.tokenizer train --dataset climbmix
    c.data.tokenizer_dir = ""
    c.train.target_param_data_ratio = 8.0
    c.train.device_batch_size = 16
    c.train.core_every = 2000  # CORE on 500 examples per task every 2000 steps and at the end (base_train.py)
    return c
