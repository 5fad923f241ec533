"""Metrics sinks: metrics.jsonl always; TensorBoard event files and an offline W&B run when train.loggers asks."""
import glob
import json
import struct

import pytest

from helpers import micro_config
from nanojax import loggers
from nanojax.train import run


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _tensorboard_scalars(log_dir):
    """{(tag, step): value} and the text tags of the TensorBoard event files (TFRecord-framed Event protos)."""
    from tensorboardX.proto import event_pb2

    values, texts = {}, set()
    for path in glob.glob(str(log_dir / "tensorboard" / "events.*")):
        data, i = open(path, "rb").read(), 0
        while i < len(data):
            n = struct.unpack("<Q", data[i:i + 8])[0]
            event = event_pb2.Event()
            event.ParseFromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            for v in event.summary.value:
                if v.HasField("simple_value"):
                    values[(v.tag, event.step)] = v.simple_value
                else:
                    texts.add(v.tag)
    return values, texts


def test_scalars_flatten_nested_records_and_skip_the_step():
    assert loggers.scalars({"step": 3, "loss": 2.5, "data_stats": {"documents": 7, "epoch": 0}, "flag": True}) == {
        "loss": 2.5, "data_stats/documents": 7.0, "data_stats/epoch": 0.0}


def test_logger_names_are_checked_and_jsonl_always_comes_first():
    assert loggers.logger_names("wandb, TensorBoard") == ["jsonl", "tensorboard", "wandb"]
    assert loggers.logger_names("") == ["jsonl"]
    with pytest.raises(ValueError, match=r"unknown logger\(s\) \['mlflow'\]"):
        loggers.logger_names("jsonl,mlflow")


def test_unknown_logger_fails_before_training(tmp_path):
    c = micro_config(tmp_path / "run")
    c.train.loggers = "jsonl,tensorbord"
    with pytest.raises(ValueError, match="tensorbord"):
        run(c)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_tensorboard_gets_the_scalars_of_metrics_jsonl_and_the_config(tmp_path):
    pytest.importorskip("tensorboardX")
    c = micro_config(tmp_path / "run", steps=3)
    c.train.loggers = "jsonl,tensorboard"
    c.train.eval_every = 3
    run(c)
    values, texts = _tensorboard_scalars(tmp_path / "run")
    records = _metrics(tmp_path / "run")
    assert any("val_loss" in r for r in records)
    for r in records:
        for tag, value in loggers.scalars(r).items():
            assert values[(tag, r["step"])] == pytest.approx(value, rel=1e-6), (tag, r["step"])
    assert "config/text_summary" in texts


def test_wandb_offline_run_is_written_and_resumed_as_the_same_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    c = micro_config(tmp_path / "run", steps=4)
    c.train.loggers = "wandb"
    c.train.stop_after_steps = 2
    run(c)
    run_id = (tmp_path / "run" / "wandb_id").read_text().strip()
    c.train.stop_after_steps = -1
    run(c)  # resumes the run: the same W&B id
    files = glob.glob(str(tmp_path / "run" / "wandb" / "offline-run-*" / f"run-{run_id}.wandb"))
    assert len(files) == 2, files  # one offline record file per process start, both for the same run id
    data = b"".join(open(f, "rb").read() for f in files)
    for key in (b"loss", b"grad_norm", b"tokens_per_s", b"micro"):  # scalars and the config's run_name
        assert key in data
    assert [r["step"] for r in _metrics(tmp_path / "run") if "loss" in r] == [1, 2, 3, 4]
