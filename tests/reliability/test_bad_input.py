"""Bad input, one rule: every config, flag and data error is ONE `error:` line on stderr naming the key, file or
column (and the fix), exit status 2, no traceback, before the run's files change. A resume keeps the config it
replaces (`config.<n>.json`) and drops from metrics.jsonl the steps it runs again; a second signal exits quietly."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import ROOT, micro_config
from nanojax import config as C
from nanojax.data import fineweb, pretrain
from nanojax.loggers import MetricsLoggers
from nanojax.tokenizer import SPECIAL_TOKENS, Tokenizer
from nanojax.train import run

VOCAB = 256 + len(SPECIAL_TOKENS)  # bytes + specials: a tokenizer with no merges, trained in milliseconds
# the micro model through the real CLI: compiles in seconds, no tokenizer (synthetic data) unless a case sets one
SMALL = ["--config.data.kind=synthetic", "--config.model.depth=2", "--config.model.aspect_ratio=32",
         "--config.model.head_dim=32", f"--config.model.vocab_size={VOCAB}", "--config.model.seq_len=32",
         "--config.train.total_batch_size=128", "--config.train.device_batch_size=4", "--config.mesh.fsdp=1",
         "--config.train.eval_every=0", "--config.train.log_every=1", "--config.train.checkpoint_every=0"]


def _env(tmp_path):
    env = {**os.environ, "NANOJAX_HOME": str(tmp_path / "home"), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    env.pop("NANOJAX_TRACEBACK", None)
    return env


def _cli(*args, config="configs/tiny.py"):
    return [sys.executable, "-m", "nanojax.train", f"--config={config}", *SMALL, *args]


@pytest.fixture
def no_text_column(tmp_path):
    """Two parquet files (train + val) whose documents sit in a column named `body`, and a tokenizer to read them."""
    shards = tmp_path / "shards"
    shards.mkdir()
    for name in ("a.parquet", "b.parquet"):
        pq.write_table(pa.table({"body": ["some text"] * 4, "id": list(range(4))}), shards / name)
    tok_dir = Tokenizer.train(["some text"], VOCAB).save(tmp_path / "tok")
    return ["--config.data.kind=fineweb", f"--config.data.path={shards}", "--config.data.num_shards=-1",
            f"--config.data.tokenizer_dir={tok_dir}"], str(shards / "a.parquet")


# (id, extra flags or a callable(tmp fixture values) -> flags, config file, what the one error line must name)
CASES = [
    # three bad values at once: before, 0 silently meant "derive" (17,920 steps), 0 rows a ZeroDivisionError and
    # an unknown kind blamed the tokenizer; now one line names all three
    ("config_values", ["--config.train.num_iterations=0", "--config.train.device_batch_size=0",
                       "--config.data.kind=bogus"], "configs/tiny.py",
     ["config.train.num_iterations=0 must be > 0, or -1", "config.train.device_batch_size=0 must be ≥ 1",
      "config.data.kind='bogus' is not a known data pipeline"]),
    ("unknown_key", ["--config.train.num_iteration=3"], "configs/tiny.py",
     ["--config.train.num_iteration is not a config key; did you mean --config.train.num_iterations?"]),
    ("missing_config_file", [], "configs/tiy.py",
     ["--config=configs/tiy.py: no such config file; did you mean configs/tiny.py?"]),
    ("flag_value", ["--config.train.num_iterations=abc"], "configs/tiny.py",
     ["--config.train.num_iterations=abc: invalid literal for int()"]),
    ("no_text_column", "no_text_column", "configs/tiny.py",
     ["a.parquet: no 'text' column (columns: body, id); nanojax reads documents from a column named 'text'"]),
]


@pytest.mark.parametrize("args,config,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_the_run_is_untouched(args, config, expected, tmp_path, request):
    if isinstance(args, str):
        args, _ = request.getfixturevalue(args)
    run_dir = tmp_path / "run"  # an existing run: the failing command must leave its files byte-identical
    run_dir.mkdir()
    (run_dir / "config.json").write_text('{"an": "earlier run"}\n')
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n{"step": 2, "loss": 4.0}\n')
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    out = subprocess.run(_cli(f"--config.run_dir={run_dir}", "--config.train.num_iterations=4", *args,
                              config=config),
                         cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=180)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out.stderr
    for text in expected:
        assert text in errors[0], errors[0]
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before


@pytest.mark.parametrize("key,value,says", [
    ("train.num_iterations", -5, "> 0, or -1 to derive it"),
    ("train.total_batch_size", 0, "≥ 1"),
    ("model.seq_len", 0, "≥ 1"),
    ("model.depth", 0, "≥ 1"),
    ("optim.matrix_lr", -0.1, "≥ 0"),
    ("train.eval_every", -1, "≥ 0"),
    ("train.checkpoint_every", -2, "≥ 0"),
    ("train.log_every", 0, "≥ 1"),  # was a ZeroDivisionError at the first logged step
    ("mesh.fsdp", 0, "-1 (the rest of the devices)"),
    ("mesh.tensor", -3, "≥ 1"),
    ("train.warmdown_ratio", 1.5, "between 0 and 1"),
    ("model.remat", "ful", "one of auto, none, full, dots"),
    ("run_name", "", "non-empty"),
    ("data.kind", "finweb", "did you mean 'fineweb'?"),
])
def test_validate_names_the_key_and_the_rule(key, value, says):
    c = micro_config()
    group, _, leaf = key.rpartition(".")
    setattr(c[group] if group else c, leaf, value)
    with pytest.raises(ValueError) as e:
        C.validate(c)
    assert f"config.{key}={value!r}" in str(e.value) and says in str(e.value) and "\n" not in str(e.value)


def test_validate_accepts_every_shipped_config_and_an_older_saved_one():
    for f in sorted((ROOT / "configs").glob("*.py")):
        C.validate(C.load_config_file(f))
    saved = micro_config().to_dict()
    del saved["train"]["loggers"]  # as if written before the key existed
    saved["data"]["kind"] = "chat"  # SFT's old name still loads
    C.validate(saved)
    c = micro_config()
    c.train.num_iterations = -1  # -1: derive from the ratio
    C.validate(c)


def test_parquet_without_text_column_is_named_where_files_are_first_opened(no_text_column):
    _, path = no_text_column
    with pytest.raises(fineweb.CorruptShardError) as e:
        pretrain.row_groups([path])
    assert str(e.value) == (f"{path}: no 'text' column (columns: body, id); nanojax reads documents from a column "
                            "named 'text'")


def _steps(run_dir) -> list[int]:
    return [r["step"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_resume_drops_rerun_steps_and_keeps_the_replaced_config(tmp_path):
    """A run reached step 5 but its last checkpoint is step 4 (step 5's was lost, as in a crash): the resume runs
    step 5 again, and metrics.jsonl then has each step once; its changed config.json keeps the old as config.1.json."""
    run_dir = tmp_path / "run"
    c = micro_config(run_dir, steps=6)
    c.train.checkpoint_every, c.train.stop_after_steps = 2, 5
    run(c)
    first = (run_dir / "config.json").read_bytes()
    shutil.rmtree(run_dir / "checkpoints" / "5")
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"note": "no step: kept"}\n')
    assert _steps(run_dir) == [1, 2, 3, 4, 5]

    c.train.stop_after_steps = -1  # a changed config
    assert run(c)["step"] == 6
    assert _steps(run_dir) == [1, 2, 3, 4, 5, 6]
    assert '{"note": "no step: kept"}' in (run_dir / "metrics.jsonl").read_text()
    assert (run_dir / "config.1.json").read_bytes() == first
    assert json.loads((run_dir / "config.json").read_text())["train"]["stop_after_steps"] == -1

    run(c)  # the same config again (run already complete): nothing renamed or added
    assert sorted(p.name for p in run_dir.glob("config*.json")) == ["config.1.json", "config.json"]
    c.train.max_to_keep = 3
    c.train.num_iterations = 7
    run(c)  # changed again: the previous one becomes config.2.json, config.1.json stays
    assert json.loads((run_dir / "config.2.json").read_text())["train"]["stop_after_steps"] == -1
    assert (run_dir / "config.1.json").read_bytes() == first
    assert _steps(run_dir) == [1, 2, 3, 4, 5, 6, 7]


def test_drop_steps_after_keeps_stepless_records_and_drops_a_torn_line(tmp_path):
    lines = ['{"step": 1, "loss": 3.0}', '{"data_stats": {"documents": 4}}', '{"step": 2, "loss": 2.0}',
             '{"step": 2, "val_loss": 2.5}', '{"step": 3, "loss": 1.0}', '{"step": 4, "lo']
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines))
    assert MetricsLoggers.drop_steps_after(str(tmp_path), 2) == 2
    assert (tmp_path / "metrics.jsonl").read_text() == "\n".join(lines[:4]) + "\n"
    assert MetricsLoggers.drop_steps_after(str(tmp_path), 2) == 0
    assert MetricsLoggers.drop_steps_after(str(tmp_path / "nowhere"), 0) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # no temporary file left


def test_a_second_sigterm_exits_at_once_quietly(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(_cli(f"--config.run_dir={run_dir}", "--config.train.num_iterations=100000"), cwd=ROOT,
                            env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines, deadline = [], time.time() + 150
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("step      2/"):
                proc.send_signal(signal.SIGTERM)
            if line.startswith("received SIGTERM"):
                proc.send_signal(signal.SIGTERM)  # while it saves: the second one
                break
            assert time.time() < deadline, "".join(lines)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    # 143 = 128 + SIGTERM from the handler; -SIGTERM if it came after the loop put the default handler back
    assert proc.returncode in (128 + signal.SIGTERM, -signal.SIGTERM), "".join(lines) + out + err
    assert "Traceback" not in err, err
    if proc.returncode > 0:
        assert err.strip().splitlines()[-1] == ("received SIGTERM again: exiting now without saving; the same "
                                                "command resumes from the last checkpoint"), err
