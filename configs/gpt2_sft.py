"""nanochat HEAD's SFT (scripts/chat_sft.py at 92d63d4, runs/speedrun.sh) after configs/gpt2_d24.py:
gpt2_d24 -> gpt2_chat, one epoch.

Mixture (HEAD's defaults, shuffled once with seed 42): SmolTalk train (460K) + MMLU auxiliary_train × 3
(--mmlu-epochs) + GSM8K main train × 4 (--gsm8k-epochs); validation: SmolTalk test + MMLU test[:5200] + GSM8K
test[:420]. Conversations packed best-fit into full rows (data.packing=bestfit: a 100-conversation buffer,
BOS padding instead of cropping), loss on assistant tokens only. One epoch: train.num_iterations=-1 renders
the mixture once at start-up and counts the steps its packed rows fill (`python -m nanojax.data.chat count
--config=configs/gpt2_sft.py` prints it beforehand).

Kept from the pretraining config, as HEAD inherits them from its checkpoint: the model (d24, context 2048),
device_batch_size 16, the total batch size (HEAD's automatic one for d24 at ratio 8) and the embedding,
unembedding and matrix LRs. The run logs a note for any of them that differs from the checkpoint it starts
from (a pretraining run launched with other values needs the same flags here). What SFT changes is
`nanojax.config.use_nanochat_head_sft`: LRs × 0.8 and not scaled by the batch, no warmup, the last half
linearly to 0, Muon weight decay 0, Muon momentum 0.85 -> 0.95 over 300 steps, momenta warm-started from the
base checkpoint. Validation bpb every 200 steps on 40 × 524,288 tokens, and ChatCORE (ARC-E/C, MMLU, GSM8K,
HumanEval: every categorical problem, 24 generative ones) every 200 steps and at the end, as HEAD
(train.chatcore_every); the full evaluation of the result: python -m nanojax.evaluate $NANOJAX_HOME/runs/gpt2_chat
"""
import pathlib

from nanojax import paths
from nanojax.config import load_config_file, use_nanochat_head_sft


def get_config():
    c = use_nanochat_head_sft(load_config_file(pathlib.Path(__file__).with_name("gpt2_d24.py")))
    c.run_name = "gpt2_chat"
    d = c.data
    d.train_tasks = "smoltalk:train, mmlu/auxiliary_train:trainx3, gsm8k/main:trainx4"
    d.val_tasks = "smoltalk:test, mmlu/all:test[:5200], gsm8k/main:test[:420]"
    d.skip_bad_rows = True  # explicit: a malformed SmolTalk row is skipped and counted, not fatal
    t = c.train
    t.init_from = str(paths.runs_dir() / "gpt2_d24")
    t.eval_every, t.eval_tokens = 200, 40 * 524_288
    t.checkpoint_every = 0  # the final checkpoint (and on SIGTERM)
    return c
