"""nanochat launch d20 RL (scripts/chat_rl.py): chat_d20 -> rl_d20 on GSM8K main train, one epoch.

On-policy REINFORCE ("GRPO" without KL or ratio clipping): 16 questions per step × 16 replies each (256
sequences; temperature 1.0, top-k 50, ≤ 256 new tokens, calculator on), reward 1 when the '#### N' answer is
right, advantage = reward − the question's mean, loss token-level over the step. One epoch = 7,473 // 16 =
467 steps (derived: train.num_iterations=-1, rl.num_epochs=1). LR = base LRs × 0.05, linearly to 0 over the
run; Muon momentum constant 0.95, no weight decay, no gradient clipping (nanochat's RL clips nothing).
pass@1..8 on the first 400 GSM8K test questions (temperature 1.0) at step 0 and every 60 steps; a checkpoint
every 60 steps. nanochat's d20: GSM8K 0.0455 after SFT -> 0.0758 after RL.

Rows of 8 per device per micro-step (nanochat's device batch), padded to a power of two ≥ 64 (prompt + reply:
mostly 512). Local data: --config.data.task_sources="gsm8k=DIR".
"""
from nanojax import paths
from nanojax.config import default_config


def get_config():
    c = default_config()
    c.run_name = "rl_d20"
    c.model.depth = 20
    c.data.kind = "rl"
    c.data.train_tasks = "gsm8k/main:train"
    c.data.val_tasks = "gsm8k/main:test"
    t = c.train
    t.init_from = str(paths.runs_dir() / "chat_d20")
    t.device_batch_size = 8
    t.num_iterations = -1  # rl.num_epochs over the questions
    t.warmdown_ratio = 1.0  # lrm = 1 - step / num_iterations
    t.final_lr_frac = 0.0
    t.grad_clip = 0.0
    t.eval_every = 60
    t.checkpoint_every = 60
    o = c.optim
    o.lr_scale = 0.05
    o.weight_decay = 0.0
    o.muon_momentum_start = o.muon_momentum_end  # constant 0.95
    r = c.rl
    r.examples_per_step, r.num_samples = 16, 16
    r.max_new_tokens, r.temperature, r.top_k = 256, 1.0, 50
    r.num_epochs = 1
    r.eval_examples, r.eval_samples = 400, 8
    return c
