"""The tools that read a run, on one micro run of nanochat HEAD's family (`model.family=head`, `optim.kind=head`):
inspect, evaluate, the chat CLI / engine and the report, each on the checkpoint that `nanojax.train` wrote.

The run has real text (parquet shards and a tiny BPE, so the checkpoint records its tokenizer and chat works) and
a context of 256, so that HEAD's short window (128) is shorter than the context: layer 0 is windowed ("SL"),
layer 1 full with a value embedding, plus smear, backout and the per-layer lambdas.
"""
import json
import math
import os
import pathlib
import random
import subprocess
import sys
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from helpers import CHAT_TEXT, ROOT, load_config_file, micro_config
from nanojax import chat_cli, report
from nanojax import engine as eng
from nanojax import evaluate as ev
from nanojax import inspect as nj_inspect
from nanojax.chat_session import ChatSession
from nanojax.checkpoint import load_model, read_meta
from nanojax.config import ModelConfig
from nanojax.data import fineweb
from nanojax.engine import generate_naive
from nanojax.model import GPT
from nanojax.tokenizer import Tokenizer
from nanojax.train import run

SEQ_LEN, STEPS, WINDOW = 256, 20, 128
# a user message long enough that the chat prompt passes the 128-token window (checked in the test)
LONG_MESSAGE = "one two three four five six seven eight " * 7


@pytest.fixture(scope="module")
def head_run(tmp_path_factory):
    """One trained HEAD-family micro run: {"dir", "tok", "config", "root"}. Its own NANOJAX_HOME while training (the
    per-test one of conftest does not exist yet for a module fixture)."""
    root = tmp_path_factory.mktemp("head_run")
    tok = Tokenizer.train(CHAT_TEXT, 300)
    tok.save(root / "tokenizer")
    rng = random.Random(0)
    docs = [" ".join(rng.choice(CHAT_TEXT).split()[:rng.randint(3, 13)]) for _ in range(900)]
    shards = root / "shards"
    shards.mkdir()
    fineweb.write_shard(shards / fineweb.shard_name(0), docs[:300], row_group_size=50)
    fineweb.write_shard(shards / fineweb.shard_name(fineweb.VAL_SHARD), docs[300:], row_group_size=50)

    c = micro_config(root / "run", steps=STEPS)
    c.run_name = "head_micro"
    c.model.family, c.model.window_pattern = "head", "SL"  # value_embeds, smear, ... left at the family's (on)
    c.model.seq_len, c.model.vocab_size = SEQ_LEN, tok.vocab_size
    c.optim.kind = "head"
    c.optim.lr_scale = 10.0  # HEAD's LRs at this size barely move the loss in 20 steps; greedy would be near-ties
    c.train.grad_clip = 0.0
    c.train.total_batch_size = c.train.device_batch_size * SEQ_LEN  # fixed, not HEAD's automatic -1
    assert c.train.target_param_data_ratio > 0  # HEAD's optimizer scales its LRs and weight decay by it
    c.train.eval_every, c.train.eval_tokens = 10, c.train.device_batch_size * SEQ_LEN
    c.data.kind, c.data.dataset, c.data.packing = "fineweb", "fineweb", "bestfit"
    c.data.path, c.data.tokenizer_dir = str(shards), str(root / "tokenizer")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOJAX_HOME", str(root / "home"))
        run(c)
    return {"dir": root / "run", "tok": tok, "config": c, "root": root}


@pytest.fixture(scope="module")
def metrics(head_run):
    return [json.loads(line) for line in (head_run["dir"] / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def one_device(head_run):
    """(model, tokenizer, config) loaded on one device, as chat loads it."""
    return load_model(str(head_run["dir"]))


@pytest.fixture(scope="module")
def evaluated(head_run):
    """`python -m nanojax.evaluate` on the run (bpb, a categorical and a generative task from local files), on
    all 8 devices; returns (results, the model evaluate loaded). Writes eval_results.* into the run (report)."""
    root = head_run["root"]
    mmlu = root / "mmlu.jsonl"
    mmlu.write_text("".join(json.dumps({"question": f"q{i}", "choices": ["a", "b", "c", "d"], "answer": i % 4,
                                        "subject": "x"}) + "\n" for i in range(3)))
    gsm = root / "gsm8k.jsonl"
    gsm.write_text(json.dumps({"question": "1+1?", "answer": "1+1=<<1+1=2>>2\n#### 2"}) + "\n")
    loaded = []
    real_load = ev.load_model

    def spy(*args, **kwargs):
        loaded.append(real_load(*args, **kwargs))
        return loaded[-1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ev, "load_model", spy)
        out = ev.main([str(head_run["dir"]), "--tasks=bpb,mmlu,gsm8k", "--max-per-task=2",
                       f"--sources=mmlu={mmlu},gsm8k={gsm}", "--max-new-tokens=4", "--bpb-tokens=2048"])
    assert len(loaded) == 1
    return out, loaded[0][0]


@partial(jax.jit, static_argnames="graphdef")
def _forward(graphdef, state, ids_BT):
    return nnx.merge(graphdef, state)(ids_BT)


def _full_logits(model, ids):
    """Logits of one forward (no cache) over the whole right-padded sequence, at its positions."""
    graphdef, state = nnx.split(model)
    x = np.zeros((1, SEQ_LEN), np.int32)
    x[0, :len(ids)] = ids
    return np.asarray(_forward(graphdef, state, jnp.asarray(x))[0, :len(ids)])


def _gpt_with(model_config, weights):
    """nanojax.model.GPT built from `model_config` (a checkpoint's config.model) holding `weights`."""
    model = nnx.eval_shape(lambda: GPT(model_config, rngs=nnx.Rngs(1)))
    nnx.update(model, weights)
    return model


def _long_text_ids(tok):
    text = " ".join(["one two three four five six seven eight"] * 6 + [CHAT_TEXT[0]] * 2)
    return [tok.bos_token_id] + tok.encode(text)


# ----------------------------------------------------------------------------------------------- training
def test_the_run_is_head_family_and_learnt(head_run, metrics):
    saved = json.loads((head_run["dir"] / "config.json").read_text())
    m = saved["model"]
    assert (m["family"], m["window_pattern"], m["value_embeds"], m["smear"], m["backout"], m["layer_lambdas"]) == \
        ("head", "SL", 1, 1, 1, 1)
    assert saved["optim"]["kind"] == "head" and saved["train"]["total_batch_size"] == 4 * SEQ_LEN
    mc = ModelConfig.of(m)
    assert mc.layer_windows() == (WINDOW, None) and mc.ve_layers() == (1,) and mc.padded_vocab == 320
    losses = [r["loss"] for r in metrics if "loss" in r]
    assert len(losses) == STEPS and losses[-1] < losses[0] - 2  # a model whose greedy choices are not near-ties
    assert "lr_value_embeds" in metrics[0] and "lr_smear" in metrics[0]  # HEAD's optimizer groups


# ----------------------------------------------------------------------------------------------- inspect
def test_inspect_shows_the_head_architecture_from_metadata_only(head_run, capsys, monkeypatch):
    def no_reads(*a, **k):
        raise AssertionError("inspect read an array")

    for cls in (ocp.StandardCheckpointHandler, ocp.PyTreeCheckpointHandler, ocp.CheckpointManager):
        monkeypatch.setattr(cls, "restore", no_reads)
    capsys.readouterr()
    assert nj_inspect.main([str(head_run["dir"])]) == 0
    text = capsys.readouterr().out
    assert f"step        {STEPS:,} (checkpoints at steps [{STEPS}])" in text
    assert "depth 2 width 64 heads 2/2×32 vocab 300 context 256" in text
    assert "family      head: " in text and "window_pattern=SL" in text and "value_embeds=1" in text
    assert "smear=1" in text and "vocab_multiple=64" in text
    # HEAD's parameters, the vocabulary padded to 64: one value embedding (layer 1) and its gate, smear, backout,
    # per-layer lambdas
    rows = {line.split()[0]: line for line in text.splitlines() if line.strip()}
    for name, shape in (("wte", "(320, 64)"), ("lm_head", "(64, 320)"), ("value_embeds", "(1, 320, 64)"),
                        ("ve_gate", "(1, 12, 2)"), ("smear_gate", "(24, 1)"), ("smear_lambda", "(1,)"),
                        ("backout_lambda", "(1,)"), ("resid_lambdas", "(2,)"), ("x0_lambdas", "(2,)"),
                        ("blocks.attn.c_q.kernel", "(2, 64, 64)")):
        assert name in rows and shape in rows[name], name
    assert nj_inspect.main([str(head_run["dir"]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    mc = ModelConfig.of(info["config"]["model"])
    assert info["num_params"] == mc.param_counts()[0] == info["metadata"]["num_params"]
    assert info["config"]["model"]["family"] == "head" and info["config"]["optim"]["kind"] == "head"
    assert info["metadata"]["tokenizer_dir"] == head_run["config"].data.tokenizer_dir
    assert info["opt_state_leaves"] > 0 and info["data_state_files"] == ["process_0-of-1.json"]


# ----------------------------------------------------------------------------------------------- evaluate
def test_evaluate_loads_the_head_model_and_gives_finite_numbers(evaluated, one_device, head_run, metrics):
    out, model = evaluated
    assert math.isfinite(out["bpb"]["bpb"]) and 0 < out["bpb"]["bpb"] < 4  # uniform over 300 tokens: ~4.3
    assert out["bpb"]["tokens"] == 8 * SEQ_LEN and out["bpb"]["bytes"] > 0
    assert out["mmlu"]["total"] == 2 and 0 <= out["mmlu"]["accuracy"] <= 1
    assert out["gsm8k"]["total"] == 1 and 0 <= out["gsm8k"]["accuracy"] <= 1
    saved = json.loads((head_run["dir"] / "eval_results.json").read_text())
    assert saved["bpb"]["bpb"] == pytest.approx(out["bpb"]["bpb"]) and saved["mmlu"]["total"] == 2

    # the model evaluate loaded (sharded over 8 devices) is the HEAD model: the checkpoint's config rebuilt by
    # GPT with the loaded weights, and the same logits as the one-device load
    assert model.cfg.family == "head" and model.cfg.layer_windows() == (WINDOW, None)
    assert len(jax.tree.leaves(nnx.state(model, nnx.Param))[0].sharding.device_set) == 8
    meta, _ = read_meta(str(head_run["dir"]))
    weights = jax.device_get(nnx.state(model, nnx.Param))
    rebuilt = _gpt_with(meta["config"]["model"], weights)
    ids = _long_text_ids(head_run["tok"])
    assert len(ids) > WINDOW + 16
    want = _full_logits(rebuilt, ids)
    np.testing.assert_allclose(_full_logits(model, ids), want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(_full_logits(one_device[0], ids), want, rtol=1e-4, atol=1e-4)

    # the same bpb on one device; and the training loop's validation bpb (its 4 rows) from evaluate's code
    one_model, tok, config = one_device
    assert ev.evaluate_bpb(one_model, tok, config, tokens=2048)["bpb"] == pytest.approx(out["bpb"]["bpb"], rel=1e-4)
    last_val = [r["val_bpb"] for r in metrics if "val_bpb" in r][-1]
    assert ev.evaluate_bpb(one_model, tok, config, tokens=4 * SEQ_LEN, batch_rows=4)["bpb"] == \
        pytest.approx(last_val, rel=1e-4)


# ----------------------------------------------------------------------------------------------- decode
def test_chat_cli_reply_is_greedy_full_recompute(head_run, one_device, capsys):
    """The chat CLI's greedy reply (loaded from the checkpoint, decoded through the KV cache) equals greedy decoding
    by a full forward per token, on a prompt longer than the window. Token-level: this model's greedy choices
    are confident enough that they survive dropping the window, smear or value embeddings, so the next test
    compares the logits themselves."""
    model, tok, _ = one_device
    session = ChatSession(model, tok)
    messages = [{"role": "user", "content": LONG_MESSAGE}]
    ids, dropped = session.prompt(messages, 8)
    assert dropped == 0 and WINDOW < len(ids) <= SEQ_LEN - 8
    stops = set(session.engine.stop_tokens)
    want = generate_naive(model, ids, 8, stop_tokens=stops)
    reply = [t for t in want if t not in stops]
    assert len(reply) >= 4  # enough decode steps to mean something
    capsys.readouterr()
    assert chat_cli.main([str(head_run["dir"]), "-p", LONG_MESSAGE, "--temperature", "0", "--max-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert "Assistant: " + tok.decode(reply) + "\n" in out
    assert ("(reply cut at --max-tokens 8)" in out) == (len(reply) == 8)


def test_cached_decode_logits_equal_full_forwards(head_run, one_device):
    """The engine's jitted prefill (a right-padded batch: a short prompt and the chat prompt, longer than the
    window) and single-token decode steps give, at every step, the logits of a full forward over the sequence so
    far. The same comparison tells the window, the smear and the value embeddings apart (each changes these
    logits by far more than the tolerance); at depth 2 HEAD's backout layer is the last one, a no-op under the
    final norm, so it is not among them."""
    model, tok, _ = one_device
    chat_ids, _ = ChatSession(model, tok).prompt([{"role": "user", "content": LONG_MESSAGE}], 8)
    prompts, K = [_long_text_ids(tok)[:20], chat_ids], 8
    assert len(chat_ids) > WINDOW
    seqs = [p + generate_naive(model, p, K) for p in prompts]  # the greedy continuations, fed back one by one
    graphdef, params = nnx.split(model)
    ids = np.full((2, 192), tok.bos_token_id, np.int32)
    for i, p in enumerate(prompts):
        ids[i, :len(p)] = p
    key, temp = jax.random.key(0), jnp.float32(0)
    _, logits, cache = eng._prefill(graphdef, params, jnp.asarray(ids), jnp.asarray([len(p) for p in prompts]),
                                    key, 0, temp, cache_len=SEQ_LEN, repeat=1, top_k=None, greedy=True)
    got = [np.asarray(logits)]
    for k in range(K - 1):
        column = jnp.asarray([seq[len(p) + k] for seq, p in zip(seqs, prompts)], jnp.int32)
        _, logits, cache = eng._decode(graphdef, params, column, cache, key, k + 1, temp, top_k=None, greedy=True)
        got.append(np.asarray(logits))
    got = np.stack(got, axis=1)  # (row, step, vocab)
    wants = [_full_logits(model, seq)[len(p) - 1:len(p) - 1 + K] for seq, p in zip(seqs, prompts)]
    for row in range(2):
        np.testing.assert_allclose(got[row], wants[row], rtol=1e-4, atol=1e-4, err_msg=f"row {row}")
    # negative controls on the long row: without the window, smear or value embeddings the logits move
    meta, _ = read_meta(str(head_run["dir"]))
    mc, weights = meta["config"]["model"], jax.device_get(nnx.state(model, nnx.Param))
    zeroed = lambda name: jax.tree_util.tree_map_with_path(  # noqa: E731
        lambda path, a: np.zeros_like(a) if name in jax.tree_util.keystr(path) else a, weights)
    for what, other in (("window", _gpt_with(dict(mc, window_pattern="L"), weights)),
                        ("smear", _gpt_with(mc, zeroed("smear_lambda"))),
                        ("value embeddings", _gpt_with(mc, zeroed("value_embeds")))):
        moved = np.abs(_full_logits(other, seqs[1])[len(prompts[1]) - 1:len(prompts[1]) - 1 + K] - wants[1]).max()
        assert moved > 1e-2, what


# ----------------------------------------------------------------------------------------------- report
def test_report_renders_the_head_run(head_run, evaluated, metrics, tmp_path):
    out, _ = evaluated
    path = report.main([str(head_run["dir"]), "--out", str(tmp_path / "card" / "report.md")])
    text = path.read_text()
    mc = ModelConfig.of(json.loads((head_run["dir"] / "config.json").read_text())["model"])
    train = [r for r in metrics if "loss" in r]
    vals = [r["val_bpb"] for r in metrics if "val_bpb" in r]
    assert "## run (base)" in text
    assert ("| model | depth 2, width 64, 2 heads of 32, vocab 300, context 256; nanochat HEAD family, windows SL |"
            in text)
    assert f"| parameters | {mc.param_counts()[0]:,} |" in text  # HEAD's count: padded vocab, value embeds, gates
    assert f"| FLOPs per token | {mc.flops_per_token():.4e} |" in text  # with the short window's attention
    assert f"| iterations | {STEPS} |" in text and f"| tokens trained | {STEPS * 4 * SEQ_LEN:,} |" in text
    assert f"| loss first / final / min | {train[0]['loss']:.4f} / {train[-1]['loss']:.4f} / " in text
    assert f"| val bpb final / min | {vals[-1]:.4f} / {min(vals):.4f} |" in text
    assert f"| tokenizer | vocab 300, `{head_run['config'].data.tokenizer_dir}`" in text
    assert f"| val bpb | {out['bpb']['bpb']:.4f} |" in text and "| MMLU |" in text and "| GSM8K |" in text
    assert "![training loss](loss.png)" in text or "matplotlib is not installed" in text


@pytest.mark.slow
def test_tiny_gpt2_config_trains_and_resumes_through_the_cli(head_run, tmp_path):
    """`python -m nanojax.train --config=configs/tiny_gpt2.py` as a user runs it (only the data, its tokenizer's
    size and the step count overridden): stopped after 2 steps, the same command resumes, and the losses equal an
    uninterrupted run's."""
    root = head_run["root"]
    overrides = {"data.path": root / "shards", "data.tokenizer_dir": root / "tokenizer",
                 "model.vocab_size": head_run["tok"].vocab_size, "train.num_iterations": 3, "train.eval_every": 0,
                 "train.checkpoint_every": 0, "train.async_checkpointing": False}
    cmd = [sys.executable, "-m", "nanojax.train", f"--config={ROOT / 'configs' / 'tiny_gpt2.py'}",
           f"--config.run_dir={tmp_path / 'parted'}", *[f"--config.{k}={v}" for k, v in overrides.items()]]
    env = {**os.environ, "NANOJAX_HOME": str(tmp_path / "home")}
    for extra in (["--config.train.stop_after_steps=2"], []):
        out = subprocess.run(cmd + extra, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed from" in out.stdout + out.stderr
    c = load_config_file("tiny_gpt2")
    c.run_dir = str(tmp_path / "full")
    for k, v in overrides.items():
        section, name = k.split(".")
        c[section][name] = type(c[section][name])(v) if not isinstance(v, pathlib.Path) else str(v)
    run(c)
    losses = [[json.loads(line)["loss"] for line in open(tmp_path / d / "metrics.jsonl") if '"loss"' in line]
              for d in ("full", "parted")]
    assert len(losses[0]) == 3 and losses[0] == losses[1]
    saved = json.loads((tmp_path / "parted" / "config.json").read_text())
    assert (saved["model"]["family"], saved["optim"]["kind"], saved["data"]["packing"]) == ("head", "head", "bestfit")
