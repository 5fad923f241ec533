"""Conversation batches: assistant-only targets, padding lengths, padding-invariant loss, per-process split,
exact resume, midtraining packing, bad rows, the make_iterator dispatch."""
import json
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from helpers import ROOT, micro_config
from nanojax.data import make_iterator
from nanojax.data.chat import count_epoch, make_mid_iterator, make_sft_iterator, pad_lengths, round_up, sft_batch
from nanojax.model import GPT
from nanojax.tasks.common import BadRowError, Task
from nanojax.tokenizer import Tokenizer

WORDS = "the cat sat on a mat while one dog ran to it and two birds sang in that tree".split()


def _text(rng, n):
    return " ".join(rng.choice(WORDS, n))


@pytest.fixture(scope="module")
def tok():
    rng = np.random.default_rng(0)
    texts = [_text(rng, 30) + f" {i} + {i * 7} = {i * 8}" for i in range(300)]
    return Tokenizer.train(texts, 320)


class Convs(Task):
    """Deterministic multi-turn conversations with tool parts; `q<i>` marks conversation i."""

    def __init__(self, n, bad=(), long=(), **kw):
        super().__init__(**kw)
        self.n, self.bad, self.long = n, set(bad), set(long)

    def num_examples(self):
        return self.n

    def get_example(self, i):
        rng = np.random.default_rng(i)
        if i in self.bad:
            return {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": ""}]}
        answer = [{"type": "text", "text": _text(rng, 3 + i % 5) + " "},
                  {"type": "python", "text": f"{i}*2"}, {"type": "python_output", "text": f"{i * 2}"},
                  {"type": "text", "text": f" so {i * 2}"}]
        turns = [{"role": "user", "content": f"q{i} " + _text(rng, 2 + i % 7)},
                 {"role": "assistant", "content": answer}]
        if i % 2:
            turns += [{"role": "user", "content": _text(rng, 4)}, {"role": "assistant", "content": _text(rng, 2)}]
        if i in self.long:
            turns[0]["content"] += " " + _text(rng, 400)
        return {"messages": turns}


def _marker_ids(tok, batch):
    out = []
    for row in batch["inputs"]:
        m = re.search(r"q(\d+)", tok.decode([int(t) for t in row]))
        out.append(int(m.group(1)))
    return out


def test_targets_are_assistant_tokens_only(tok):
    conv = Convs(4)[1]  # two assistant turns, python call + output
    ids, mask = tok.render_conversation(conv)
    b = sft_batch([(ids, mask)], pad_lengths(256), tok.encode_special("<|assistant_end|>"))
    n = len(ids) - 1
    assert b["inputs"].shape == (1, 64) and b["inputs"].dtype == np.int32
    np.testing.assert_array_equal(b["inputs"][0, :n], ids[:-1])
    expected = [t if m else -1 for t, m in zip(ids[1:], mask[1:])]
    np.testing.assert_array_equal(b["targets"][0, :n], expected)
    assert (b["targets"][0, n:] == -1).all() and (b["inputs"][0, n:] == tok.encode_special("<|assistant_end|>")).all()
    # which tokens are trained: assistant text, python call (with its delimiters) and assistant_end
    sp = {name: tok.encode_special(name) for name in ("<|user_start|>", "<|user_end|>", "<|assistant_start|>",
                                                      "<|assistant_end|>", "<|python_start|>", "<|python_end|>",
                                                      "<|output_start|>", "<|output_end|>")}
    trained = [int(t) for t in b["targets"][0] if t >= 0]
    for name in ("<|assistant_end|>", "<|python_start|>", "<|python_end|>"):
        assert sp[name] in trained
    for name in ("<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|output_start|>", "<|output_end|>"):
        assert sp[name] not in trained
    assert trained.count(sp["<|assistant_end|>"]) == 2
    # the tool output "2" between output_start/end is never a target
    start = ids.index(sp["<|output_start|>"])
    end = ids.index(sp["<|output_end|>"])
    assert all(b["targets"][0, j - 1] == -1 for j in range(start, end + 1))
    # the first user text is never a target
    assert all(b["targets"][0, j] == -1 for j in range(ids.index(sp["<|user_end|>"])))


def test_pad_lengths_are_a_small_fixed_set():
    assert pad_lengths(2048) == [64, 128, 256, 512, 1024, 2048]
    assert pad_lengths(256) == [64, 128, 256]
    assert pad_lengths(100) == [64, 100]
    assert pad_lengths(256, "100, 200") == [100, 200, 256]
    assert round_up(1, [64, 128]) == 64 and round_up(65, [64, 128]) == 128 and round_up(128, [64, 128]) == 128
    with pytest.raises(ValueError):
        round_up(129, [64, 128])
    with pytest.raises(ValueError):
        pad_lengths(256, "512")


def test_padding_never_changes_the_loss(tok):
    cfg = micro_config().model
    cfg.vocab_size, cfg.seq_len = tok.vocab_size, 256
    model = GPT(cfg, rngs=nnx.Rngs(0))
    loss = nnx.jit(lambda m, x, y: m.loss(x, y))
    pad_id = tok.encode_special("<|assistant_end|>")
    rendered = [tok.render_conversation(Convs(3)[i]) for i in range(3)]
    singles_sum = singles_count = 0.0
    for ids, mask in rendered:  # each conversation alone, unpadded
        b = sft_batch([(ids, mask)], [len(ids) - 1], pad_id)
        s, n = loss(model, jnp.asarray(b["inputs"]), jnp.asarray(b["targets"]))
        singles_sum, singles_count = singles_sum + float(s), singles_count + float(n)
    for lengths in ([64, 128, 256], [256]):  # bucketed, and padded all the way
        b = sft_batch(rendered, lengths, pad_id)
        s, n = loss(model, jnp.asarray(b["inputs"]), jnp.asarray(b["targets"]))
        assert float(n) == singles_count
        np.testing.assert_allclose(float(s), singles_sum, rtol=2e-5)
    # a different pad token (what train.py pads micro-batches with) changes nothing either
    b2 = sft_batch(rendered, [256], 0)
    np.testing.assert_allclose(float(loss(model, jnp.asarray(b2["inputs"]), jnp.asarray(b2["targets"]))[0]),
                               singles_sum, rtol=2e-5)


def test_accumulated_loss_is_token_weighted(tok):
    """Two micro-batches with very different target counts: the step's loss is Σ losses / Σ tokens."""
    from nanojax import sharding as shd
    from nanojax.config import derive
    from nanojax.train import TrainState, stack_micro_batches

    c = micro_config(mesh=(1, 1, 1))
    c.model.vocab_size, c.model.seq_len = tok.vocab_size, 128
    c.train.device_batch_size, c.train.total_batch_size = 2, 2 * 2 * 128  # 2 micro-steps of 2 rows
    state = TrainState(c, shd.make_mesh(c.mesh, jax.devices()[:1]), derive(c, 1))
    params = state.init_params()
    opt = state.init_opt_state(params)
    pad_id = tok.encode_special("<|assistant_end|>")
    conv = Convs(8)
    mb1 = sft_batch([tok.render_conversation(conv[i]) for i in (0, 2)], [64, 128], pad_id)  # short
    mb2 = sft_batch([tok.render_conversation(conv[i]) for i in (1, 3)], [64, 128], pad_id)  # longer
    for _ in range(3):  # learn mb1 a little, so the two micro-batches have very different mean losses
        params, opt, _ = state.train_step(params, opt, stack_micro_batches([mb1, mb1]))
    loss = jax.jit(lambda p, x, y: state.model(p).loss(x, y))
    batch = stack_micro_batches([mb1, mb2])  # padded to one length: one compiled shape below
    sums, counts = zip(*[(float(s), float(n)) for s, n in (loss(params, batch["inputs"][k], batch["targets"][k])
                                                           for k in range(2))])
    assert counts[0] != counts[1]
    _, _, metrics = state.train_step(params, opt, batch)
    np.testing.assert_allclose(float(metrics["loss"]), sum(sums) / sum(counts), rtol=1e-5)
    assert abs(float(metrics["loss"]) - np.mean(np.array(sums) / np.array(counts))) > 1e-4
    assert float(metrics["tokens"]) == sum(counts)


def test_processes_split_without_overlap_and_val_is_finite(tok):
    data = Convs(43, long={7, 20})
    seen, shapes = [], []
    for p in range(3):
        it = make_sft_iterator(data, tok, batch_size=2, seq_len=256, process_index=p, process_count=3,
                               finite=True)
        batches = list(it)
        assert len(batches) == 43 // 6  # the same count on every process
        ids = [i for b in batches for i in _marker_ids(tok, b)]
        assert ids == list(range(p, 43, 3))[: len(ids)]
        seen += ids
        shapes.append([b["inputs"].shape for b in batches])
        assert all(b["inputs"].shape[1] in (64, 128, 256) for b in batches)
    assert len(seen) == len(set(seen)) == 42
    # every process pads each micro-batch to the same length (one global array), though their rows differ
    assert shapes[0] == shapes[1] == shapes[2] and len({s[1] for s in shapes[0]}) > 1
    alone = [b["inputs"].shape for b in make_sft_iterator(data, tok, batch_size=2, seq_len=256, finite=True,
                                                          process_index=0, process_count=1)]
    assert alone != shapes[0][: len(alone)]  # (the lengths do depend on the other processes' rows)


def test_sft_resume_is_exact_and_counts_truncation(tok):
    data = Convs(9, long={4})
    it = make_sft_iterator(data, tok, batch_size=2, seq_len=128)
    for _ in range(3):
        next(it)
    state = it.get_state()
    json.dumps(state)
    expected = [next(it) for _ in range(6)]  # crosses the epoch boundary
    it2 = make_sft_iterator(data, tok, batch_size=2, seq_len=128, prefetch=0)
    it2.set_state(json.loads(json.dumps(state)))
    for want in expected:
        got = next(it2)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    assert it2.get_state() == it.get_state()
    assert it.stats["truncated"] >= 1 and it.stats["epoch"] == 2 and it.stats["conversations"] == 18
    it.close(), it2.close()


def test_bad_rows_fail_or_are_skipped_and_counted(tok):
    data = Convs(6, bad={3})
    it = make_sft_iterator(data, tok, batch_size=2, seq_len=256)
    next(it)
    with pytest.raises(BadRowError, match=r"position 3: message 1 \(assistant\) has empty content.*skip_bad_rows"):
        next(it)
    it = make_sft_iterator(data, tok, batch_size=2, seq_len=256, skip_bad_rows=True)
    ids = [i for _ in range(3) for i in _marker_ids(tok, next(it))]
    assert ids == [0, 1, 2, 4, 5, 0] and it.stats["bad_rows"] == 1
    it.close()


def test_mid_packs_the_stream_without_mask_and_resumes(tok):
    data = Convs(10, bad={6})
    it = make_mid_iterator(data, tok, batch_size=2, seq_len=64, skip_bad_rows=True)
    b = next(it)
    stream = []
    for i in range(10):
        if i != 6:
            stream += tok.render_conversation(data[i])[0]
    flat = np.asarray(stream[: 2 * 64 + 1])
    np.testing.assert_array_equal(b["inputs"], flat[:-1].reshape(2, 64))
    np.testing.assert_array_equal(b["targets"], flat[1:].reshape(2, 64))  # every token trained
    nxt = next(it)
    np.testing.assert_array_equal(nxt["inputs"].reshape(-1)[:10], stream[129:139])  # 2·64+1 tokens per batch
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(8)]  # wraps around the epoch
    it2 = make_mid_iterator(data, tok, batch_size=2, seq_len=64, skip_bad_rows=True)
    it2.set_state(state)
    for want in expected:
        got = next(it2)
        np.testing.assert_array_equal(got["inputs"], want["inputs"])
        np.testing.assert_array_equal(got["targets"], want["targets"])
    assert it2.get_state() == it.get_state() and it.stats["epoch"] >= 1
    it.close(), it2.close()


def _gsm_config(tmp_path, kind):
    rows = [{"question": f"What is {i} + {i * 7}?", "answer": f"It is <<{i}+{i * 7}={i * 8}>>{i * 8}.\n#### {i * 8}"}
            for i in range(40)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:9]))
    c = micro_config()
    c.model.seq_len = 128
    c.data.kind = kind
    c.data.train_tasks, c.data.val_tasks = "gsm8k/main:train", "gsm8k/main:test"
    c.data.task_sources = f"gsm8k={tmp_path}"
    return c


def test_make_iterator_dispatches_on_kind(tok, tmp_path):
    c = _gsm_config(tmp_path, "sft")
    it = make_iterator(c, split="train", batch_size=4, process_index=0, process_count=1, tokenizer=tok)
    b = next(it)
    assert b["inputs"].shape[0] == 4 and b["inputs"].shape[1] in (64, 128)
    assert (b["targets"] >= 0).any() and (b["targets"] == -1).any()
    val = make_iterator(c, split="val", batch_size=4, process_index=0, process_count=1, tokenizer=tok)
    assert len(list(val)) == 2
    c.data.kind = "mid"
    it = make_iterator(c, split="train", batch_size=4, process_index=1, process_count=2, tokenizer=tok)
    b = next(it)
    assert b["inputs"].shape == (4, 128) and (b["targets"] >= 0).all()
    c.data.val_tasks = ""
    with pytest.raises(ValueError, match="data.val_tasks is empty"):
        make_iterator(c, split="val", batch_size=4, process_index=0, process_count=1, tokenizer=tok)


def test_old_kind_chat_is_sft(tok, tmp_path):
    """A run config saved before the rename (data.kind "chat") builds the very same SFT iterator."""
    new = _gsm_config(tmp_path, "sft")
    old = ml_collections.ConfigDict({**new.to_dict(), "data": {**new.data.to_dict(), "kind": "chat"}})
    its = [make_iterator(c, split="train", batch_size=4, process_index=0, process_count=1, tokenizer=tok)
           for c in (new, old)]
    for _ in range(3):
        a, b = (next(it) for it in its)
        np.testing.assert_array_equal(a["inputs"], b["inputs"])
        np.testing.assert_array_equal(a["targets"], b["targets"])
    assert its[0].get_state() == its[1].get_state()
    assert count_epoch(old, tok) == count_epoch(new, tok)
    old.data.kind = "sftt"
    with pytest.raises(ValueError, match=r"data.kind='sftt' is not a known data pipeline; did you mean 'sft'\? "
                                         r"\(known: synthetic, fineweb, mid, sft, rl; old names: chat = sft\)"):
        make_iterator(old, split="train", batch_size=4, process_index=0, process_count=1, tokenizer=tok)


def test_count_cli_loads_the_configs_tokenizer(tok, tmp_path):
    """`python -m nanojax.data.chat count` on an old-spelling SFT config: rows, tokens, steps of one epoch."""
    c = _gsm_config(tmp_path, "chat")
    tok.save(tmp_path / "tok")
    cmd = [sys.executable, "-m", "nanojax.data.chat", "count", f"--config={ROOT / 'configs' / 'tiny_sft.py'}",
           "--config.data.kind=chat", f"--config.data.task_sources={c.data.task_sources}",
           f"--config.data.tokenizer_dir={tmp_path / 'tok'}", "--config.model.vocab_size=320",
           "--config.model.seq_len=128", f"--config.train.total_batch_size={4 * 128}"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    c.train.total_batch_size = 4 * 128
    assert f"one epoch: --config.train.num_iterations={count_epoch(c, tok)['steps_per_epoch']}" in out.stdout
    assert "RuntimeWarning" not in out.stderr  # run as __main__ without a second copy of the module
