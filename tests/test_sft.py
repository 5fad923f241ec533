"""Stage 2 end to end: a tiny base run -> SFT run through `nanojax.train.run` (init_from, masked loss,
validation, exact resume), and the stage-2 configs."""
import json
import os

import numpy as np
import pytest

from helpers import load_config_file, micro_config
from nanojax import checkpoint as ckpt
from nanojax.config import derive
from nanojax.data import make_iterator
from nanojax.tasks.registry import parse_mixture
from nanojax.tokenizer import Tokenizer
from nanojax.train import run, stack_micro_batches


def _records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def gsm_like(tmp_path_factory):
    """Small GSM8K-layout jsonl files and a tokenizer trained on their text."""
    d = tmp_path_factory.mktemp("gsm")
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(160):
        a, b = (int(x) for x in rng.integers(1, 50, 2))
        rows.append({"question": f"Tom has {a} apples and gets {b} more. How many now?",
                     "answer": f"He has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}"})
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:128]))
    (d / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[128:]))
    tok = Tokenizer.train([r["question"] + " " + r["answer"] for r in rows], 320)
    tok.save(d / "tokenizer")
    return d


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A 3-step micro base run (synthetic data) with the test tokenizer's vocabulary; shared by the tests."""
    c = micro_config(tmp_path_factory.mktemp("base") / "run", steps=3)
    c.model.vocab_size, c.model.seq_len = 320, 64
    run(c)
    return c


def _sft(tmp_path, gsm_like, base_dir, name="sft", steps=12):
    c = micro_config(tmp_path / name, steps=steps)
    c.model.vocab_size, c.model.seq_len = 320, 64
    c.data.kind = "sft"
    c.data.tokenizer_dir = str(gsm_like / "tokenizer")
    c.data.train_tasks, c.data.val_tasks = "gsm8k/main:train", "gsm8k/main:test"
    c.data.task_sources = f"gsm8k={gsm_like}"
    c.train.init_from = str(base_dir)
    c.train.total_batch_size, c.train.device_batch_size = 8 * 64, 4  # 8 conversations per step, 2 micro-steps
    c.train.warmdown_ratio = 1.0
    c.train.eval_every, c.train.eval_tokens = 6, 2 * 4 * 64
    c.optim.embedding_lr = 0.1
    return c


def test_base_run_then_sft_run(tmp_path, gsm_like, base):
    sft = _sft(tmp_path, gsm_like, base.run_dir)
    run(sft)
    records = _records(sft.run_dir)
    losses = [r["loss"] for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    assert len(losses) == 12 and [r["step"] for r in evals] == [6, 12]
    assert np.mean(losses[-3:]) < losses[0] - 1.0, losses
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] and "val_bpb" in evals[0]
    meta, _ = ckpt.read_meta(sft.run_dir)
    assert meta["init_from"] == {"path": base.run_dir, "step": 3}
    # the first SFT step's loss is the *base* model's loss on the first SFT batch (so the base parameters
    # were loaded, not re-initialised), and differs from a fresh model's
    import jax
    from flax import nnx

    from nanojax.model import GPT

    tok = Tokenizer.load(gsm_like / "tokenizer")
    it = make_iterator(sft, split="train", batch_size=4, process_index=0, process_count=1, tokenizer=tok)
    batch = stack_micro_batches([next(it), next(it)])
    it.close()
    assert (batch["targets"] == -1).any()

    def step_loss(model):
        f = nnx.jit(lambda m, x, y: m.loss(x, y))
        s, n = zip(*[f(model, batch["inputs"][k], batch["targets"][k]) for k in range(2)])
        return float(sum(s) / sum(n))

    base_model, _, _ = ckpt.load_model(base.run_dir)
    np.testing.assert_allclose(losses[0], step_loss(base_model), rtol=1e-4)
    fresh = GPT(sft.model, rngs=nnx.Rngs(sft.seed))
    assert abs(step_loss(fresh) - losses[0]) > 1e-3
    # the run's tokenizer is recorded with it
    _, tokenizer, _ = ckpt.load_model(sft.run_dir)
    assert tokenizer is None or tokenizer.vocab_size == 320
    del jax


def test_sft_resume_is_exact(tmp_path, gsm_like, base):
    full = _sft(tmp_path, gsm_like, base.run_dir, "full", steps=6)
    full.train.eval_every = 0
    run(full)
    parted = _sft(tmp_path, gsm_like, base.run_dir, "parted", steps=6)
    parted.train.eval_every = 0
    parted.train.stop_after_steps = 2
    assert run(parted)["step"] == 2
    parted.train.stop_after_steps = -1
    assert run(parted)["step"] == 6
    want = [r["loss"] for r in _records(full.run_dir) if "loss" in r]
    got = [r["loss"] for r in _records(parted.run_dir) if "loss" in r]
    assert got == want


def test_init_from_missing_run_fails_before_training(tmp_path, gsm_like):
    sft = _sft(tmp_path, gsm_like, tmp_path / "no_such_run")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run(sft)
    assert not os.path.exists(os.path.join(sft.run_dir, "metrics.jsonl")) or not _records(sft.run_dir)


def test_stage2_configs_are_valid():
    sft = load_config_file("sft_d20")
    d = derive(sft, 8)
    assert d.grad_accum_steps == 1 and d.global_micro_batch == 32 and d.num_iterations == 651
    assert derive(sft, 1).grad_accum_steps == 8  # 32 conversations per step on one device too
    assert sft.optim.lr_scale == 0.02 and sft.train.warmdown_ratio == 1.0 and sft.run_name == "chat_d20"
    t = sft.train  # chat_sft.py's in-run evaluations
    assert (t.chatcore_every, t.chatcore_max_categorical, t.chatcore_max_generative) == (200, 1024, 64)
    assert [s.strip() for s in t.chatcore_tasks.split(",")] == ["mmlu", "arc_easy", "gsm8k", "humaneval"]
    assert sft.train.init_from.endswith(os.path.join("runs", "mid_d20"))
    assert sft.data.kind == "sft" and parse_mixture(sft.data.train_tasks) == parse_mixture(  # as before the rename
        "arc/ARC-Easy:train, arc/ARC-Challenge:train, gsm8k/main:train, smoltalk:train[:10000]")
    mid = load_config_file("mid_d20")
    assert derive(mid, 8).grad_accum_steps == 1 and mid.data.kind == "mid" and mid.train.warmdown_ratio == 0.2
    assert mid.train.init_from.endswith(os.path.join("runs", "base_d20"))
    for name in ("tiny_mid", "tiny_sft"):
        c = load_config_file(name)
        assert c.model.vocab_size == 8192 and c.model.seq_len == 256
        derive(c, 1)
    assert derive(load_config_file("tiny_sft"), 1).grad_accum_steps == 8


def test_base_mid_chat_chain(tmp_path, gsm_like, base):
    """base -> mid (packed rows, every token trained) -> chat, each stage loading the one before."""
    mid = _sft(tmp_path, gsm_like, base.run_dir, "mid", steps=3)
    mid.data.kind = "mid"
    mid.train.eval_every, mid.train.eval_tokens = 3, 2 * 4 * 64
    mid.train.warmdown_ratio = 0.2
    run(mid)
    evals = [r for r in _records(mid.run_dir) if "val_loss" in r]
    assert [r["step"] for r in evals] == [3]
    chat = _sft(tmp_path, gsm_like, mid.run_dir, "chat", steps=2)
    chat.train.eval_every = 0
    run(chat)
    meta, _ = ckpt.read_meta(chat.run_dir)
    assert meta["init_from"] == {"path": mid.run_dir, "step": 3}
    assert ckpt.read_meta(mid.run_dir)[0]["init_from"] == {"path": base.run_dir, "step": 3}


def test_sft_on_an_8_device_mesh(tmp_path, gsm_like, base):
    """SFT batches (varying padded lengths) shard over a 2×2×2 mesh; the run loads the 1-device base run."""
    c = _sft(tmp_path, gsm_like, base.run_dir, "sft8", steps=2)
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor, c.mesh.num_devices = 2, 2, 2, 8
    c.train.device_batch_size = 1  # 4 rows per micro-step, 2 micro-steps
    c.train.eval_every = 2
    out = run(c)
    assert out["step"] == 2 and np.isfinite(out["loss"]) and "val_loss" in out


# -- nanochat HEAD's SFT (configs/gpt2_sft.py): best-fit rows, one counted epoch, warm-started momenta ----------
@pytest.fixture(scope="module")
def head_base(tmp_path_factory):
    """A 3-step micro base run of HEAD's model family and optimizer (synthetic data)."""
    from nanojax.config import use_nanochat_head

    c = use_nanochat_head(micro_config(tmp_path_factory.mktemp("head_base") / "run", steps=3))
    c.model.vocab_size, c.model.seq_len = 320, 128  # rows of ~2.5 conversations
    c.train.total_batch_size, c.train.num_iterations, c.optim.warmup_steps = 4 * 128, 3, 1
    c.data.kind = "synthetic"
    run(c)
    return c


def _head_sft(tmp_path, gsm_like, head_base, name):
    from nanojax.config import use_nanochat_head_sft

    c = use_nanochat_head_sft(_sft(tmp_path, gsm_like, head_base.run_dir, name))
    c.model = head_base.model
    c.optim.kind, c.train.grad_clip = "head", 0.0
    c.train.num_iterations, c.train.eval_every, c.train.chatcore_every = -1, 0, 0  # (ChatCORE: test_train_evals)
    c.data.sft_bestfit_buffer = 16
    return c


def test_head_sft_counts_its_epoch_warm_starts_and_resumes_exactly(tmp_path, gsm_like, head_base, monkeypatch):
    from nanojax.data import chat
    from nanojax.data.chat import count_epoch

    full = _head_sft(tmp_path, gsm_like, head_base, "head_full")
    run(full)
    tok = Tokenizer.load(gsm_like / "tokenizer")
    epoch = count_epoch(full, tok)
    assert full.train.num_iterations == epoch["steps_per_epoch"] >= 3  # filled in, and recorded in config.json
    assert epoch["rows"] < epoch["conversations"]  # packed: several conversations per row
    auto = _head_sft(tmp_path, gsm_like, head_base, "head_auto")
    auto.train.total_batch_size = -1  # HEAD's automatic batch: resolved before the epoch is cut into steps
    counted = count_epoch(auto, tok)
    tokens = auto.train.total_batch_size
    assert tokens > 0 and tokens & (tokens - 1) == 0 and counted["rows"] == epoch["rows"]
    assert counted["steps_per_epoch"] == epoch["rows"] // (tokens // 128)
    records = _records(full.run_dir)
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == epoch["steps_per_epoch"] and losses[-1] < losses[0]
    first = next(r for r in records if "loss" in r)
    assert first["lr_matrix"] == pytest.approx(0.02 * 0.8) and first["muon_momentum"] == pytest.approx(0.85)
    with open(os.path.join(full.run_dir, "config.json")) as f:
        assert json.load(f)["train"]["num_iterations"] == epoch["steps_per_epoch"]
    parted = _head_sft(tmp_path, gsm_like, head_base, "head_parted")
    parted.train.stop_after_steps = 2
    assert run(parted)["step"] == 2
    parted = _head_sft(tmp_path, gsm_like, head_base, "head_parted")

    def no_recount(*args, **kwargs):
        raise AssertionError("a resumed run keeps the epoch length it started with")

    monkeypatch.setattr(chat, "count_epoch", no_recount)
    assert run(parted)["step"] == epoch["steps_per_epoch"] == parted.train.num_iterations
    assert [r["loss"] for r in _records(parted.run_dir) if "loss" in r] == losses


def test_head_sft_configs():
    sft = load_config_file("gpt2_sft")
    assert (sft.data.kind, sft.data.packing, sft.data.sft_bestfit_buffer) == ("sft", "bestfit", 100)
    assert parse_mixture(sft.data.train_tasks) == parse_mixture(
        "smoltalk:train, " + ", ".join(["mmlu/auxiliary_train:train"] * 3 + ["gsm8k/main:train"] * 4))
    o, t = sft.optim, sft.train
    assert (o.kind, o.lr_scale, o.scale_lr_by_batch, o.warmup_steps, o.weight_decay) == ("head", 0.8, False, 0, 0.0)
    assert (o.muon_momentum_start, o.muon_momentum_end, o.muon_momentum_final) == (0.85, 0.95, 0.95)
    assert (t.num_iterations, t.warmdown_ratio, t.final_lr_frac, t.init_optimizer_state) == (-1, 0.5, 0.0, True)
    assert (t.core_every, t.chatcore_every, t.chatcore_max_categorical, t.chatcore_max_generative) == (0, 200, -1, 24)
    assert load_config_file("gpt2_d24").train.core_every == load_config_file("base_d20").train.core_every == 2000
    base = load_config_file("gpt2_d24")
    for key in ("model", "mesh"):
        assert sft[key].to_dict() == base[key].to_dict()
    assert (t.device_batch_size, t.total_batch_size) == (base.train.device_batch_size, base.train.total_batch_size)
    assert t.init_from.endswith(os.path.join("runs", "gpt2_d24"))
    with pytest.raises(ValueError, match="counted when training starts"):
        derive(sft, 8)
    tiny = load_config_file("tiny_gpt2_sft")
    assert tiny.model.to_dict() == load_config_file("tiny_gpt2").model.to_dict()
    assert tiny.train.init_from.endswith(os.path.join("runs", "tiny_gpt2")) and tiny.data.packing == "bestfit"
