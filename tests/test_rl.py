"""Stage 3 (nanojax.rl, nanojax.rollout): REINFORCE on a toy task with a known optimum, the loss's gradient by
hand, what carries weight, exact resume."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import micro_config, random_weights
from nanojax import checkpoint as ckpt
from nanojax import report
from nanojax.model import GPT
from nanojax.rl import fill_sizes, policy_gradient_loss
from nanojax.rollout import Group, RolloutPosition, policy_gradient_rows, sample_groups
from nanojax.tasks import registry
from nanojax.tasks.common import Task
from nanojax.tokenizer import Tokenizer
from nanojax.train import accumulate_gradients, run

VOCAB = 265  # 256 bytes + 9 specials


class ParityTask(Task):
    """The question is a digit; a reply passes when it starts with a digit of the same parity (optimum: 1)."""

    eval_type = "generative"

    def __init__(self, split="train", source=None, **kwargs):
        super().__init__(**kwargs)
        self.digits = np.random.default_rng(0 if split == "train" else 1).integers(0, 10, 512)

    def num_examples(self):
        return len(self.digits)

    def get_example(self, index):
        d = str(int(self.digits[index]))
        return {"messages": [{"role": "user", "content": d}, {"role": "assistant", "content": d}]}

    def evaluate(self, conversation, completion):
        question = int(conversation["messages"][0]["content"])
        return completion[:1] in tuple("0123456789") and int(completion[0]) % 2 == question % 2


@pytest.fixture
def tok():
    return Tokenizer.from_ranks({bytes([i]): i for i in range(256)})


@pytest.fixture
def parity_config(tmp_path, tok, monkeypatch):
    """A config factory: the micro model on the parity task (registered as a real task), 8 questions × 8 replies."""
    monkeypatch.setitem(registry.TASKS, "parity", registry.TaskInfo(ParityTask, "Parity"))
    tok.save(tmp_path / "tokenizer")

    def make(name, steps, mesh=(1, 1, 1)):
        c = micro_config(tmp_path / name, steps=steps, mesh=mesh)
        c.model.vocab_size = VOCAB
        c.data.kind = "rl"
        c.data.train_tasks, c.data.val_tasks = "parity:train", "parity:test"
        c.data.tokenizer_dir = str(tmp_path / "tokenizer")
        c.train.device_batch_size = 32 // (mesh[0] * mesh[1])  # 64 rows per step: 2 micro-batches
        c.train.warmdown_ratio = 0.0
        c.train.grad_clip = 0.0
        r = c.rl
        r.examples_per_step, r.num_samples, r.max_new_tokens, r.sample_rows = 8, 8, 2, 64
        r.eval_examples, r.eval_samples = 8, 2
        return c

    return make


def _records(run_dir):
    with open(f"{run_dir}/metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def test_mean_reward_rises_on_a_task_with_a_known_optimum(parity_config):
    """From a fresh model (replies uniform over 265 tokens: ~2% pass; optimum 1) the mean reward climbs: ~0.5 within
    20 steps over seeds 0-4 (a digit first; parity comes later)."""
    c = parity_config("run", steps=20)
    c.train.eval_every = 0
    run(c)  # through nanojax.train's dispatch, as `python -m nanojax.train --config=...` does
    rewards = [r["reward"] for r in _records(c.run_dir) if "reward" in r]
    assert len(rewards) == 20
    first, last = np.mean(rewards[:5]), np.mean(rewards[-5:])
    assert last > first + 0.25, rewards

    text = report.main([c.run_dir]).read_text()  # the report card shows the stage and its reward curve
    assert "## run (rl)" in text
    assert f"| reward first / final / max | {rewards[0]:.4f} / {rewards[-1]:.4f} / {max(rewards):.4f} |" in text
    assert "RL mean reward" in text or "matplotlib is not installed" in text


def test_loss_gradient_is_the_reinforce_gradient_by_hand():
    """Two replies, advantages +0.75 (2 counted tokens) and −0.25 (1 counted token), masked positions between:
    the step's gradient equals −(1/3) Σ A ∇log p over the 3 counted tokens (not per row, not per position), on
    lm_head by the closed form and on every parameter by per-token autodiff of the plain forward."""
    c = micro_config()
    model = random_weights(GPT(c.model, rngs=nnx.Rngs(0)), scale=0.3)
    graphdef, params = nnx.split(model, nnx.Param)
    inputs = jnp.array([[5, 6, 7], [8, 9, 10]], jnp.int32)
    targets = jnp.array([[-1, 11, 13], [-1, -1, 12]], jnp.int32)
    weights = jnp.array([[0.0, 0.75, 0.75], [0.0, 0.0, -0.25]], jnp.float32)
    batch = {"inputs": inputs[None], "targets": targets[None], "weights": weights[None]}
    shardings = jax.tree.map(lambda p: p.sharding, params)
    step_grads = jax.jit(lambda p, b: accumulate_gradients(graphdef, shardings, p, b, policy_gradient_loss))
    g, loss_sum, n = step_grads(params, batch)
    assert float(n) == 3.0
    g = jax.tree.map(lambda x: x / n, g)  # what train_step applies

    counted = [(0, 1, 11, 0.75), (0, 2, 13, 0.75), (1, 2, 12, -0.25)]
    h = np.asarray(model.hidden(inputs), np.float64)
    W = np.asarray(model.lm_head[...], np.float64)
    cap = c.model.softcap
    want_W = np.zeros_like(W)
    for row, pos, y, adv in counted:
        u = h[row, pos] @ W
        z = cap * np.tanh(u / cap)
        p = np.exp(z - z.max())
        p /= p.sum()
        dlogp_dz = -p
        dlogp_dz[y] += 1.0
        want_W -= adv * np.outer(h[row, pos], dlogp_dz * (1 - np.tanh(u / cap) ** 2)) / 3
    np.testing.assert_allclose(np.asarray(g["lm_head"][...]), want_W, rtol=1e-4, atol=1e-7)

    def logp(p, row, pos, y):
        return jax.nn.log_softmax(nnx.merge(graphdef, p)(inputs)[row, pos])[y]

    want = jax.tree.map(jnp.zeros_like, params)
    grad_logp = jax.jit(jax.grad(logp))
    for row, pos, y, adv in counted:
        grad = grad_logp(params, row, pos, y)
        want = jax.tree.map(lambda w, x, a=adv: w - a * x / 3, want, grad)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=1e-6)
    want_loss = -sum(adv * float(logp(params, row, pos, y)) for row, pos, y, adv in counted) / 3
    assert float(loss_sum / n) == pytest.approx(want_loss, rel=1e-4)


def test_prompt_padding_and_tool_output_carry_no_weight():
    """Weights = the reply's advantage on sampled targets only; the prompt, the forced tool output and the padding
    get target −1 and weight 0, and padding to a longer length changes neither loss nor gradient."""
    prompt = [1, 2, 3]
    call, forced, tail = [20, 21], [30, 31, 32], [40]
    seq_a = prompt + call + forced + tail  # 9 tokens: 2 sampled, 3 forced, 1 sampled
    seq_b = prompt + [50]  # a short reply
    group = Group(3, [seq_a, seq_b], [[0] * 3 + [1, 1] + [0, 0, 0] + [1], [0, 0, 0, 1]],
                  np.array([1.0, 0.0], np.float32))
    rows = policy_gradient_rows([group], [4, 8, 16], pad_id=99)
    assert rows["inputs"].shape == (2, 8)  # longest row 8 inputs -> padded to 8
    assert rows["targets"][0].tolist() == [-1, -1, 20, 21, -1, -1, -1, 40]
    assert rows["weights"][0].tolist() == [0, 0, 0.5, 0.5, 0, 0, 0, 0.5]  # advantage 1 − mean 0.5
    assert rows["targets"][1].tolist() == [-1, -1, 50] + [-1] * 5
    assert rows["weights"][1].tolist() == [0, 0, -0.5] + [0] * 5
    assert rows["inputs"][1].tolist() == [1, 2, 3] + [99] * 5

    c = micro_config()
    graphdef, params = nnx.split(random_weights(GPT(c.model, rngs=nnx.Rngs(0))), nnx.Param)
    longer = policy_gradient_rows([group], [16], pad_id=7)
    assert longer["inputs"].shape == (2, 16)
    grad = jax.jit(jax.value_and_grad(policy_gradient_loss, has_aux=True), static_argnums=1)
    (l8, n8), g8 = grad(params, graphdef, {k: jnp.asarray(v) for k, v in rows.items()})
    (l16, n16), g16 = grad(params, graphdef, {k: jnp.asarray(v) for k, v in longer.items()})
    assert float(n8) == float(n16) == 4.0
    assert float(l8) == pytest.approx(float(l16), rel=1e-5)
    for a, b in zip(jax.tree.leaves(g8), jax.tree.leaves(g16)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)


def test_replies_share_a_question_and_are_scored_by_the_task(tok):
    """sample_groups: each question's replies come back together, rewards from the task, advantages centred."""
    c = micro_config()
    c.model.vocab_size = VOCAB
    from nanojax.engine import Engine

    engine = Engine(random_weights(GPT(c.model, rngs=nnx.Rngs(1))), tok)
    task = ParityTask()
    groups = sample_groups(engine, tok, task, [0, 1, 2], jax.random.key(0), num_samples=4, max_new_tokens=3,
                           temperature=1.0, top_k=0, sample_rows=8)  # 2 questions per engine call
    assert [len(g.sequences) for g in groups] == [4, 4, 4]
    for i, g in enumerate(groups):
        conv = task[i]
        prompt = tok.render_for_completion(conv)
        assert g.prompt_len == len(prompt) and all(s[:len(prompt)] == prompt for s in g.sequences)
        assert g.rewards.tolist() == [float(task.evaluate(conv, tok.decode(s[len(prompt):]))) for s in g.sequences]
        assert abs(float(g.advantages.sum())) < 1e-6


def test_resume_continues_exactly(parity_config):
    """4 steps straight vs 2, stop, resume for 2 (on a 2-device mesh): the same parameters and the same rewards,
    losses and pass@k; the rollout position is in the checkpoint."""
    straight = parity_config("straight", steps=4, mesh=(1, 2, 1))
    straight.train.eval_every = 2
    run(straight)
    parted = parity_config("parted", steps=4, mesh=(1, 2, 1))
    parted.train.eval_every = 2
    parted.train.stop_after_steps = 2
    assert run(parted)["step"] == 2
    with open(f"{parted.run_dir}/checkpoints/2/data/process_0-of-1.json") as f:
        position = RolloutPosition.from_state(json.load(f))
    assert position.questions_consumed == 2 * 8 and len(position.state()["key"]) == 2
    parted.train.stop_after_steps = -1
    assert run(parted)["step"] == 4

    keys = ("step", "reward", "loss", "grad_norm", "loss_tokens", "sequence_length", "pass@1", "pass@2")
    def strip(records):
        return [{k: r[k] for k in keys if k in r} for r in records]
    assert strip(_records(parted.run_dir)) == strip(_records(straight.run_dir))
    assert sum("pass@1" in r for r in _records(straight.run_dir)) == 3  # steps 0, 2, 4
    a, _, _ = ckpt.load_model(straight.run_dir)
    b, _, _ = ckpt.load_model(parted.run_dir)
    for x, y in zip(jax.tree.leaves(nnx.state(a, nnx.Param)), jax.tree.leaves(nnx.state(b, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_sizes_are_derived_and_bad_ones_named(parity_config):
    c = parity_config("sizes", steps=-1)
    fill_sizes(c, num_questions=100, process_count=1, num_devices=1)
    assert c.train.total_batch_size == 8 * 8 * c.model.seq_len and c.train.num_iterations == 100 // 8
    bad = parity_config("bad", steps=-1)
    bad.rl.examples_per_step, bad.rl.sample_rows = 6, 1
    with pytest.raises(ValueError) as e:
        fill_sizes(bad, num_questions=100, process_count=4, num_devices=1)
    assert "rl.examples_per_step=6" in str(e.value) and "rl.sample_rows=1" in str(e.value)
    assert "48 sequences per step must be a multiple of train.device_batch_size 32" in str(e.value)
    bad.rl.examples_per_step, bad.rl.sample_rows = 200, 64
    with pytest.raises(ValueError, match="rl.num_epochs=1 over 100 questions"):
        fill_sizes(bad, num_questions=100, process_count=1, num_devices=1)
