"""nanochat launch d20 SFT: mid_d20 -> chat_d20 on ARC + GSM8K + SmolTalk[:10K], one epoch.

Mixture (20,843 conversations, shuffled once with seed 42): ARC-Easy train 2,251 + ARC-Challenge train 1,119
+ GSM8K main train 7,473 + SmolTalk train[:10,000]; validation loss on SmolTalk test. One conversation per
row, loss on assistant tokens only (targets −1 elsewhere), rows padded to a power-of-two length.
32 conversations per step (total_batch_size = 32 rows × 2048; 4 rows per device: no accumulation on 8
devices, 8 micro-steps on 1), one epoch = 20,843 // 32 = 651 steps. LR = base LRs × 0.02, linearly to 0
over the whole run; Muon momentum constant 0.95 (nanochat's SFT sets no momentum schedule). Everything else
(model d20, context 2048, optimizer) is the default (nanojax.config.default_config). As nanochat, MMLU and ARC-Easy
(1,024 problems) and GSM8K and HumanEval (64) are scored every 200 steps and at the end (train.chatcore_every).

The seed's two-stage path (skip midtraining): --config.train.init_from=$NANOJAX_HOME/runs/base_d20
"""
from nanojax import paths
from nanojax.config import default_config

EXAMPLES_PER_STEP = 32
ROWS_PER_EPOCH = 2_251 + 1_119 + 7_473 + 10_000


def get_config():
    c = default_config()
    c.run_name = "chat_d20"
    c.model.depth = 20
    seq_len = c.model.seq_len
    c.data.kind = "sft"
    c.data.train_tasks = "arc_easy:train, arc_challenge:train, gsm8k/main:train, smoltalk:train[:10000]"
    c.data.val_tasks = "smoltalk:test"
    c.data.skip_bad_rows = True  # explicit: a malformed SmolTalk row is skipped and counted, not fatal
    t = c.train
    t.init_from = str(paths.runs_dir() / "mid_d20")
    t.total_batch_size = EXAMPLES_PER_STEP * seq_len  # = 32 conversations per step
    t.device_batch_size = 4
    t.num_iterations = ROWS_PER_EPOCH // EXAMPLES_PER_STEP  # one epoch: 651
    t.warmdown_ratio = 1.0  # linear decay to 0 from the first step (nanochat: lrm = 1 - step / num_iterations)
    t.eval_every = 100
    t.eval_tokens = 100 * EXAMPLES_PER_STEP * seq_len  # 100 batches of 32 conversations (nanochat: 100 × 4 × 8)
    t.checkpoint_every = 0
    # nanochat's chat_sft.py every 200 steps and at the end: MMLU and ARC-Easy (1,024 problems), GSM8K and HumanEval
    t.chatcore_every, t.chatcore_tasks = 200, "mmlu, arc_easy, gsm8k, humaneval"  # (64): chat_<task> in metrics
    t.chatcore_max_categorical, t.chatcore_max_generative = 1024, 64
    o = c.optim
    o.lr_scale = 0.02
    o.muon_momentum_start = o.muon_momentum_end  # constant 0.95
    return c
