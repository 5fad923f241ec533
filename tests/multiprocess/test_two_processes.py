"""Two processes × 4 CPU devices on one machine (jax.distributed over 127.0.0.1, gloo collectives), each running
the real `python -m nanojax.train` / `python -m nanojax.evaluate` command (`worker.py` adds the probes), against
single-process runs.

One module-scoped chain of runs, checked by several tests:
  pretraining on 2 × 4: SIGTERM to process 1 before step 5 -> both stop after step 5 with one committed checkpoint;
  the same command on 2 × 2 resumes from it and finishes step 6; one process on 8 devices resumes from the
  2 × 4 run's step-4 checkpoint and must give the same steps 5 and 6 (same losses, same rows, same parameters);
  SFT from that run's last checkpoint, on a data 2 × fsdp 4 mesh, against one process on 8 devices (pure FSDP):
  the same losses and validation loss from step 1 (a fresh pretraining run reads its text as one data stream per
  process, so only a resume can match it row for row; SFT steps hold the same conversations on any layout);
  evaluation of the pretraining run (bpb, a categorical and a generative task) on 2 × 4 against one device.
"""
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from flax import nnx

from nanojax import checkpoint as ckpt
from nanojax import evaluate as ev
from nanojax import sharding as shd
from nanojax.engine import Engine
from nanojax.tasks.registry import eval_task, parse_sources
from nanojax.tokenizer import Tokenizer

ROOT = pathlib.Path(__file__).resolve().parents[2]
WORKER = pathlib.Path(__file__).with_name("worker.py")
SEQ = 64
MODEL = ["--config.model.depth=2", "--config.model.vocab_size=320", f"--config.model.seq_len={SEQ}",
         "--config.model.aspect_ratio=32", "--config.model.head_dim=32", "--config.model.compute_dtype=float32",
         "--config.optim.ns_dtype=float32"]  # Muon in float32: layouts differ by float rounding only, not bfloat16's
RUN_TIMEOUT = 240  # seconds for one launch, all its processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(name: str, module: str, args: list[str], *, tmp: pathlib.Path, home: pathlib.Path, processes: int,
           devices: int, pause_at: int = 0, on_pause=None) -> list[str]:
    """Run `python -m module args` in `processes` worker processes of `devices` CPU devices each; their outputs.
    Probes and outputs go to tmp/probes/<name>/; with `pause_at`, `on_pause(processes)` runs once every process
    waits before that train step. A failure of one process, or the time limit, kills every process group."""
    record = tmp / "probes" / name
    record.mkdir(parents=True)
    port, procs, logs = _free_port(), [], []
    base = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "NANOJAX_TEST_", "XLA_FLAGS"))}
    try:
        for i in range(processes):
            env = {**base, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu",
                   "NANOJAX_HOME": str(home), "NANOJAX_TEST_RECORD": str(record), "JAX_PROCESS_ID": str(i)}
            if processes > 1:
                env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(processes))
            if pause_at:
                env["NANOJAX_TEST_PAUSE_AT"] = str(pause_at)
            logs.append(record / f"output_{i}.txt")
            with open(logs[-1], "w") as out:
                procs.append(subprocess.Popen([sys.executable, str(WORKER), module, *args], cwd=ROOT, env=env,
                                              stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
        deadline, paused, timed_out = time.time() + RUN_TIMEOUT, False, False
        while any(p.poll() is None for p in procs) and not any(p.poll() for p in procs):
            timed_out = time.time() > deadline
            if timed_out:
                break
            if pause_at and not paused and all((record / f"paused_{i}").exists() for i in range(processes)):
                on_pause(procs)
                (record / "go").touch()
                paused = True
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    outputs = [log.read_text() for log in logs]
    limit = f", killed after {RUN_TIMEOUT} s" if timed_out else ""
    report = "\n".join(f"--- {name} process {i} (exit {p.returncode}{limit})\n{out[-4000:]}"
                       for i, (p, out) in enumerate(zip(procs, outputs)))
    assert all(p.returncode == 0 for p in procs), report
    return outputs


def test_a_bad_process_id_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1")
    monkeypatch.setenv("JAX_PROCESS_ID", "first")
    with pytest.raises(ValueError, match="JAX_PROCESS_ID='first' is not a non-negative integer"):
        shd.start_distributed()


def records(path, key: str) -> dict[int, dict]:
    """The metrics.jsonl records that hold `key`, by step."""
    lines = (json.loads(line) for line in pathlib.Path(path, "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r for r in lines if key in r}


def probe(path: pathlib.Path, kind: str, process: int) -> list[dict]:
    f = path / f"{kind}_{process}.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines()] if f.exists() else []


def train_rows(path: pathlib.Path, process: int) -> list[list[tuple[str, str]]]:
    """Per train step, the (inputs, targets) rows this process handed to the devices."""
    feeds = [f["rows"] for f in probe(path, "feed", process) if f["ndim"] == 3]
    return [list(zip(feeds[i], feeds[i + 1])) for i in range(0, len(feeds), 2)]


# ---------------------------------------------------------------------------------------------- data
def conversations(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        a, b = (int(x) for x in rng.integers(1, 50, 2))
        rows.append({"question": f"Tom has {a} apples and gets {b} more. How many now?",
                     "answer": f"He has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}"})
    return rows


def write_text(path: pathlib.Path, docs: list[str], docs_per_group: int) -> None:
    pq.write_table(pa.table({"text": docs}), path, row_group_size=docs_per_group)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Shared inputs: NANOJAX_HOME (one compilation cache for every run), a 320-token tokenizer, two text shards
    (train: 8 row groups, val: 2), GSM8K-layout jsonl files and a categorical (ARC-layout) file."""
    tmp = tmp_path_factory.mktemp("mp")
    rows = conversations(260, 0)
    texts = [r["question"] + " " + r["answer"] for r in rows]
    Tokenizer.train(texts, 320).save(tmp / "tokenizer")
    (tmp / "text").mkdir()  # ~42 tokens a document: each process's 4 row groups last the 5 steps of `stopped`
    write_text(tmp / "text" / "a_train.parquet", texts[:72], 9)
    write_text(tmp / "text" / "b_val.parquet", texts[72:112], 20)
    (tmp / "gsm8k").mkdir()
    (tmp / "gsm8k" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[112:208]))
    (tmp / "gsm8k" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[208:]))
    arc = [{"id": str(i), "question": f"Which number is {r['answer'][-2:]}?", "answerKey": "ABCD"[i % 4],
            "choices": {"text": ["one", "two", "three", "four"], "label": list("ABCD")}} for i, r in enumerate(rows)]
    (tmp / "arc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in arc[:24]))
    return tmp


def pretrain_flags(world, run_dir) -> list[str]:
    return ["--config=configs/tiny.py", "--config.data.kind=fineweb", f"--config.data.path={world / 'text'}",
            "--config.data.num_shards=-1", f"--config.data.tokenizer_dir={world / 'tokenizer'}",
            "--config.data.read_threads=1", *MODEL, f"--config.train.total_batch_size={8 * SEQ}",
            "--config.train.device_batch_size=1", "--config.train.num_iterations=6",
            "--config.train.checkpoint_every=2", "--config.train.max_to_keep=5", "--config.train.eval_every=3",
            f"--config.train.eval_tokens={2 * 8 * SEQ}", "--config.train.log_every=1", f"--config.run_dir={run_dir}"]


@pytest.fixture(scope="module")
def pretraining(world):
    """The 2 × 4 run stopped by SIGTERM to process 1 before step 5, resumed on 2 × 2; and one process on 8 devices
    resumed from the 2 × 4 run's step 4."""
    run, home = world / "pretrain", world / "home"
    flags = pretrain_flags(world, run)
    stopped = launch("stopped", "nanojax.train", flags, tmp=world, home=home, processes=2, devices=4, pause_at=5,
                     on_pause=lambda procs: procs[1].send_signal(signal.SIGTERM))
    stopped_steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit() and
                           ckpt.is_committed(p))
    leftovers = sorted(p.name for p in (run / "checkpoints").iterdir() if not p.name.isdigit())
    resumed = launch("resumed", "nanojax.train", flags, tmp=world, home=home, processes=2, devices=2)
    single = world / "single"
    shutil.copytree(run / "checkpoints" / "4", single / "checkpoints" / "4")
    one = launch("single", "nanojax.train", pretrain_flags(world, single), tmp=world, home=home, processes=1,
                 devices=8)
    return {"run": run, "single": single, "stopped": stopped, "stopped_steps": stopped_steps,
            "leftovers": leftovers, "resumed": resumed, "one": one}


def test_sigterm_to_one_process_stops_both_with_one_committed_checkpoint(pretraining):
    first, second = pretraining["stopped"]
    assert "received SIGTERM (process 1)" in second and "received SIGTERM" not in first
    assert "stopped at step 5" in first
    assert pretraining["stopped_steps"] == [2, 4, 5] and pretraining["leftovers"] == []
    data = sorted(p.name for p in (pretraining["run"] / "checkpoints" / "6" / "data").glob("process_*"))
    assert data == ["process_0-of-2.json", "process_1-of-2.json"]


def test_resumed_on_2x2_and_on_one_process_continue_exactly(pretraining):
    run, single = pretraining["run"], pretraining["single"]
    assert f"resumed from {run}/checkpoints/5" in pretraining["resumed"][0]
    assert "finished at step 6" in pretraining["resumed"][0]
    assert f"resumed from {single}/checkpoints/4" in pretraining["one"][0]
    two, one = records(run, "loss"), records(single, "loss")
    assert sorted(two) == [1, 2, 3, 4, 5, 6] and sorted(one) == [5, 6]
    for step in (5, 6):  # 5: 2 × 4 vs 1 × 8; 6: 2 × 2 (2 micro-batches) vs 1 × 8
        assert two[step]["loss"] == pytest.approx(one[step]["loss"], rel=1e-5), step
    # the rows of each step: the two processes' shares together are the one process's batch
    world = run.parent
    assert sorted(train_rows(world / "probes" / "stopped", 0)[4] + train_rows(world / "probes" / "stopped", 1)[4]) == \
        sorted(train_rows(world / "probes" / "single", 0)[0])
    assert sorted(train_rows(world / "probes" / "resumed", 0)[0] + train_rows(world / "probes" / "resumed", 1)[0]) == \
        sorted(train_rows(world / "probes" / "single", 0)[1])


def test_checkpoint_written_by_two_processes_restores_in_one(pretraining):
    """Step 6 as the 2 × 2 processes wrote it, restored here on one device, equals the single-process run's."""
    two, _, _ = ckpt.load_model(pretraining["run"], 6)
    one, _, _ = ckpt.load_model(pretraining["single"], 6)
    a, b = nnx.state(two, nnx.Param), nnx.state(one, nnx.Param)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)


def test_each_process_reads_only_its_own_share_of_the_text(pretraining):
    world = pretraining["run"].parent
    read = [{(r["group"], r["part"]) for r in probe(world / "probes" / "stopped", "read", p)
             if r["file"] == "a_train.parquet" and r["epoch"] == 0} for p in (0, 1)]
    assert read[0] and read[1] and not read[0] & read[1]
    assert read[0] | read[1] == {(g, 0) for g in range(8)}
    fed = [{row for step in train_rows(world / "probes" / "stopped", p) for row in step} for p in (0, 1)]
    assert fed[0] and fed[1] and not fed[0] & fed[1]


def sft_flags(world, run_dir, mesh: tuple[int, int]) -> list[str]:
    return ["--config=configs/tiny_sft.py", f"--config.data.task_sources=gsm8k={world / 'gsm8k'}",
            f"--config.data.tokenizer_dir={world / 'tokenizer'}", *MODEL,
            f"--config.train.init_from={world / 'pretrain'}", f"--config.train.total_batch_size={16 * SEQ}",
            "--config.train.device_batch_size=1", "--config.train.num_iterations=3", "--config.train.eval_every=3",
            f"--config.train.eval_tokens={32 * SEQ}", "--config.train.checkpoint_every=0",
            "--config.train.log_every=1", f"--config.mesh.data={mesh[0]}", f"--config.mesh.fsdp={mesh[1]}",
            f"--config.run_dir={run_dir}"]


@pytest.fixture(scope="module")
def sft(world, pretraining):
    """SFT from the 2-process pretraining run: 2 × 4 processes on a data 2 × fsdp 4 mesh, and one process on 8
    devices (pure FSDP)."""
    home = world / "home"
    launch("sft", "nanojax.train", sft_flags(world, world / "sft", (2, 4)), tmp=world, home=home, processes=2,
           devices=4)
    launch("sft_single", "nanojax.train", sft_flags(world, world / "sft_single", (1, -1)), tmp=world, home=home,
           processes=1, devices=8)
    return world


def test_sft_on_two_processes_and_a_data_fsdp_mesh_equals_one_process(sft):
    two, one = records(sft / "sft", "loss"), records(sft / "sft_single", "loss")
    assert sorted(two) == sorted(one) == [1, 2, 3]
    for step in two:
        assert two[step]["loss"] == pytest.approx(one[step]["loss"], rel=1e-5), step
        assert two[step]["loss_tokens"] == one[step]["loss_tokens"]
    assert records(sft / "sft", "val_loss")[3]["val_loss"] == \
        pytest.approx(records(sft / "sft_single", "val_loss")[3]["val_loss"], rel=1e-5)
    # each step's conversations: the processes' shares are disjoint and together the one process's batch
    for step in range(3):
        shares = [train_rows(sft / "probes" / "sft", p)[step] for p in (0, 1)]
        assert shares[0] and shares[1] and not set(shares[0]) & set(shares[1])
        assert sorted(shares[0] + shares[1]) == sorted(train_rows(sft / "probes" / "sft_single", 0)[step])


class RecordingEngine(Engine):
    """The engine, keeping each prompt's reply (one sample per prompt): what the worker's probe records."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.replies = {}

    def generate_batch(self, tokens, *args, **kwargs):
        results, masks = super().generate_batch(tokens, *args, **kwargs)
        self.replies.update({tuple(p): row[len(p):] for p, row in zip(tokens, results)})
        return results, masks


def test_evaluate_on_two_processes_equals_one_device(pretraining):
    """`python -m nanojax.evaluate` on 2 × 4 against the functions on one device: bpb, ARC-Easy (categorical) and
    GSM8K (generative: each process decodes its own problems, the same replies as one device) from local files."""
    world = pretraining["run"].parent
    sources = f"arc_easy={world / 'arc.jsonl'},gsm8k={world / 'gsm8k'}"
    launch("evaluate", "nanojax.evaluate",
           [str(pretraining["run"]), "--tasks=bpb,arc_easy,gsm8k", "--max-per-task=12", f"--sources={sources}",
            "--max-new-tokens=12", f"--bpb-tokens={2 * 8 * SEQ}", f"--out={world / 'eval'}"],
           tmp=world, home=world / "home", processes=2, devices=4)
    two = json.loads((world / "eval" / "eval_results.json").read_text())
    model, tokenizer, config = ckpt.load_model(pretraining["run"])
    assert ev.mesh_of(model) is None
    bpb = ev.evaluate_bpb(model, tokenizer, config, tokens=2 * 8 * SEQ)
    assert two["bpb"]["tokens"] == bpb["tokens"] > 0 and two["bpb"]["bpb"] == pytest.approx(bpb["bpb"], rel=1e-5)
    tasks = {name: eval_task(name, parse_sources(sources)) for name in ("arc_easy", "gsm8k")}
    arc = ev.evaluate_categorical(model, tokenizer, tasks["arc_easy"], max_problems=12)
    assert {k: two["arc_easy"][k] for k in arc} == arc and arc["total"] == 12
    engine = RecordingEngine(model, tokenizer)
    gsm = ev.evaluate_generative(model, tokenizer, tasks["gsm8k"], engine=engine, max_problems=12, max_new_tokens=12)
    assert {k: two["gsm8k"][k] for k in gsm} == gsm and gsm["total"] == 12
    shares = [{tuple(r["prompt"]): r["reply"] for r in probe(world / "probes" / "evaluate", "generate", p)}
              for p in (0, 1)]
    assert len(shares[0]) == len(shares[1]) == 6 and not shares[0].keys() & shares[1].keys()
    assert {**shares[0], **shares[1]} == engine.replies
