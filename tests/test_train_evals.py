"""CORE and ChatCORE inside a training run (train.core_every, train.chatcore_every): logged on schedule and at
the last step, equal to `python -m nanojax.evaluate` on the checkpoint (the loop's numbers come from the training
mesh's sharded parameters, the CLI's from a fresh load), and missing data fails before the run starts."""
import json

import pytest

from helpers import micro_config
from nanojax import evaluate as ev
from nanojax.tokenizer import Tokenizer
from nanojax.train import run
from test_evaluate import make_bundle

QUESTIONS = [{"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = <<{i}+{i}={2 * i}>>{2 * i}.\n#### {2 * i}"}
             for i in range(40)]


@pytest.fixture()
def sources(tmp_path):
    gsm = tmp_path / "gsm"
    gsm.mkdir()
    for split, rows in (("train", QUESTIONS[:32]), ("test", QUESTIONS[32:])):
        (gsm / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    mmlu = tmp_path / "mmlu.jsonl"
    mmlu.write_text("".join(json.dumps({"question": f"q{i}", "choices": ["a", "b", "c", "d"], "answer": i % 4,
                                        "subject": "x"}) + "\n" for i in range(5)))
    tok = Tokenizer.train([r["question"] + " " + r["answer"] for r in QUESTIONS] + ["a b c d q0 q1 q2"], 320)
    tok.save(tmp_path / "tok")
    return {"gsm": gsm, "mmlu": mmlu, "tok": tmp_path / "tok", "bundle": make_bundle(tmp_path / "bundle")}


def _config(tmp_path, sources, steps=4):
    c = micro_config(tmp_path / "run", steps=steps)
    c.model.vocab_size, c.model.seq_len = 320, 128
    c.data.kind, c.data.tokenizer_dir = "sft", str(sources["tok"])
    c.data.train_tasks, c.data.val_tasks = "gsm8k/main:train", "gsm8k/main:test"
    c.data.task_sources = f"gsm8k={sources['gsm']}, mmlu={sources['mmlu']}"
    c.train.total_batch_size = 8 * 128
    t = c.train
    t.core_every, t.core_max_per_task, t.eval_bundle = 2, 3, str(sources["bundle"])
    t.chatcore_every, t.chatcore_tasks = 3, "mmlu, gsm8k"
    t.chatcore_max_categorical, t.chatcore_max_generative = 4, 2
    return c


def test_core_and_chatcore_on_schedule_equal_the_evaluate_cli(tmp_path, sources):
    c = _config(tmp_path, sources)
    c.mesh.data, c.mesh.fsdp, c.mesh.num_devices = 2, 4, 8  # the loop evaluates on the training mesh
    c.train.device_batch_size = 1
    run(c)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    core = {r["step"]: r["core"] for r in records if "core" in r}
    chat = {r["step"]: r for r in records if "chatcore_partial" in r}  # two of ChatCORE's five tasks
    assert sorted(core) == [2, 4] and sorted(chat) == [3, 4]  # every N steps and at the last one
    last = chat[4]
    assert {"chatcore_partial", "chatcore_cat_partial", "chat_mmlu", "chat_gsm8k"} <= set(last)
    assert last["chatcore_cat_partial"] == pytest.approx((last["chat_mmlu"] - 0.25) / 0.75)
    cli = ev.main([str(tmp_path / "run"), "--tasks=core", "--max-per-task=3", f"--eval-bundle={sources['bundle']}"])
    assert core[4] == pytest.approx(cli["core"]["core_metric"], abs=1e-6)
    mmlu = ev.main([str(tmp_path / "run"), "--tasks=mmlu", "--max-per-task=4", f"--sources=mmlu={sources['mmlu']}"])
    assert last["chat_mmlu"] == pytest.approx(mmlu["mmlu"]["accuracy"])


def test_missing_eval_data_fails_before_the_run_starts(tmp_path, sources):
    c = _config(tmp_path, sources)
    c.train.eval_bundle = str(tmp_path / "no_bundle")
    with pytest.raises(FileNotFoundError, match="not a CORE eval bundle"):
        run(c)
    c = _config(tmp_path, sources)
    c.train.core_every, c.train.chatcore_tasks = 0, "arc_easy"  # no local ARC, and the hub is offline
    with pytest.raises(FileNotFoundError, match="allenai/ai2_arc"):
        run(c)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_synthetic_data_run_skips_them_with_a_note(tmp_path, capsys):
    c = micro_config(tmp_path / "run", steps=2)
    c.train.core_every = c.train.chatcore_every = 1  # a base config's settings on a smoke run
    assert run(c)["step"] == 2
    assert "core_every / train.chatcore_every skipped" in capsys.readouterr().out
    assert not any('"core"' in line for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
