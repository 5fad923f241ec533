"""Resume onto another device count or process count (issue 15): every data pipeline continues with the same
global batches, the same rows in every optimizer step, as an uninterrupted run.

A layout is (processes, rows per process per micro-batch); with a fixed number of rows per optimizer step it
sets the micro-batches per step (8 devices: 32 rows x 1, 4 devices: 16 x 2, 1 device: 4 x 8). Processes are
simulated at the iterator level: one iterator per process index, their states written through DataStateHandler
as "process i of n" and read back the way a restore does. The end-to-end test trains the text pipeline on 8,
then 4, then 1 device(s) through `nanojax.train.run`."""
import functools
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from helpers import micro_config
from nanojax import checkpoint as ckpt
from nanojax.data import chat, fineweb, pretrain
from nanojax.data.synthetic import SyntheticIterator
from nanojax.tasks.gsm8k import GSM8K
from nanojax.tokenizer import Tokenizer
from nanojax.train import run

STEP_ROWS = 32  # rows per optimizer step
DEVICES_8, DEVICES_4, DEVICES_1 = (1, 32), (1, 16), (1, 4)  # one process: rows per micro-batch
SFT_LEN, MID_LEN, TEXT_LEN = 256, 64, 64


@functools.lru_cache(maxsize=1)
def _tokenizer(kjv: str) -> Tokenizer:
    chapters = pq.ParquetFile(kjv).read_row_group(0).column("text").to_pylist()[:60]
    return Tokenizer.train(chapters, 320)


@pytest.fixture
def kjv(shared_dir):
    return str(shared_dir / "data" / "text" / "kjv.parquet")


@pytest.fixture
def text(kjv):
    """Pretraining iterators on the KJV (5 row groups), shuffled, and their rows: windows of T+1 tokens."""
    tok = _tokenizer(kjv)

    def make(p, n, rows):
        return pretrain.make_pretrain_iterator([kjv], tok, batch_size=rows, seq_len=TEXT_LEN, process_index=p,
                                               process_count=n, seed=3, read_threads=1, prefetch=0)

    return make, lambda b: [r.tobytes() for r in np.concatenate([b["inputs"], b["targets"][:, -1:]], axis=1)]


@pytest.fixture
def gsm8k(shared_dir, kjv):
    return GSM8K(subset="main", split="train", source=shared_dir / "data" / "gsm8k", stop=600), _tokenizer(kjv)


@pytest.fixture
def sft(gsm8k):
    """SFT iterators on GSM8K; a row is its conversation whatever length the micro-batch was padded to."""
    data, tok = gsm8k
    pad = tok.encode_special("<|assistant_end|>")

    def make(p, n, rows):
        return chat.make_sft_iterator(data, tok, batch_size=rows, seq_len=SFT_LEN, process_index=p, process_count=n,
                                      prefetch=0)

    def rows(b):
        width = ((0, 0), (0, SFT_LEN - b["inputs"].shape[1]))
        inputs, targets = np.pad(b["inputs"], width, constant_values=pad), np.pad(b["targets"], width,
                                                                                   constant_values=-1)
        return [i.tobytes() + t.tobytes() for i, t in zip(inputs, targets)]

    return make, rows


@pytest.fixture
def mid(gsm8k):
    data, tok = gsm8k

    def make(p, n, rows):
        return chat.make_mid_iterator(data, tok, batch_size=rows, seq_len=MID_LEN, process_index=p, process_count=n,
                                      prefetch=0)

    return make, lambda b: [i.tobytes() + t.tobytes() for i, t in zip(b["inputs"], b["targets"])]


@pytest.fixture
def synthetic():
    def make(p, n, rows):
        return SyntheticIterator(batch_size=rows, seq_len=16, vocab_size=256, seed=1, process_index=p,
                                 process_count=n)

    return make, lambda b: [i.tobytes() + t.tobytes() for i, t in zip(b["inputs"], b["targets"])]


def _save(its, directory) -> dict:
    """Every process's state written as in a checkpoint, then read back as a restore does (all files)."""
    directory.mkdir(parents=True)
    for p, it in enumerate(its):
        ckpt.DataStateHandler(process=(p, len(its))).save(directory, ckpt.DataStateSave(it.get_state()))
    return ckpt.DataStateHandler().restore(directory)


def _steps(pipeline, chain, tmp_path) -> list[list[bytes]]:
    """The global rows of each optimizer step through `chain` = [((processes, rows), steps), ...], saving every
    process's state and resuming on the next layout in between. A step's rows: micro-batch by micro-batch,
    process by process."""
    make, rows = pipeline
    out, state = [], None
    for i, ((n, per_process), steps) in enumerate(chain):
        its = [make(p, n, per_process) for p in range(n)]
        if state is not None:
            for it in its:
                it.set_state(state)
        for _ in range(steps):
            out.append([r for _ in range(STEP_ROWS // (n * per_process)) for it in its for r in rows(next(it))])
        state = _save(its, tmp_path / f"save{i}")
        for it in its:
            it.close()
    return out


def _assert_same_steps(got, want, ordered=False):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert len(g) == len(w) == STEP_ROWS
        assert (g if ordered else sorted(g)) == (w if ordered else sorted(w)), f"step {i + 1} holds other rows"
    assert len({r for step in want for r in step}) > STEP_ROWS * len(want) // 2  # real, varied data


PIPELINES = ["text", "sft", "mid", "synthetic"]


@pytest.mark.parametrize("name", PIPELINES)
def test_8_then_4_then_1_devices_give_the_uninterrupted_steps(name, request, tmp_path):
    pipeline = request.getfixturevalue(name)
    want = _steps(pipeline, [(DEVICES_8, 7)], tmp_path / "whole")
    got = _steps(pipeline, [(DEVICES_8, 2), (DEVICES_4, 2), (DEVICES_1, 2), (DEVICES_8, 1)], tmp_path / "parts")
    _assert_same_steps(got, want, ordered=True)  # one stream: even the order of the rows is unchanged


@pytest.mark.parametrize("name", PIPELINES)
def test_2_processes_then_1_then_2_give_the_uninterrupted_steps(name, request, tmp_path):
    """Two streams (the run started on 2 processes): 1 process reads both, with 1 or 4 devices."""
    pipeline = request.getfixturevalue(name)
    want = _steps(pipeline, [((2, 8), 7)], tmp_path / "whole")
    got = _steps(pipeline, [((2, 8), 2), ((1, 16), 2), ((1, 4), 1), ((2, 2), 2)], tmp_path / "parts")
    _assert_same_steps(got, want)


@pytest.mark.parametrize("name", PIPELINES)
def test_1_process_then_2_then_1_give_the_uninterrupted_steps(name, request, tmp_path):
    """One stream (the run started on 1 process): 2 processes each read it and keep half of its rows."""
    pipeline = request.getfixturevalue(name)
    want = _steps(pipeline, [((1, 16), 6)], tmp_path / "whole")
    got = _steps(pipeline, [((1, 16), 2), ((2, 8), 2), ((2, 4), 1), ((1, 32), 1)], tmp_path / "parts")
    _assert_same_steps(got, want, ordered=True)


@pytest.mark.parametrize("name", PIPELINES)
def test_a_state_saved_between_micro_batches_resumes_exactly(name, request, tmp_path):
    """Mid-step (not what the train loop does): 12 rows into a 32-row chunk of the first layout, then 8 at a time."""
    make, rows = request.getfixturevalue(name)
    whole = make(0, 1, 32)
    want = [r for _ in range(3) for r in rows(next(whole))]
    it = make(0, 1, 32)
    got = rows(next(it))
    it.set_state(_save([it], tmp_path / "a"))
    small = make(0, 1, 4)
    small.set_state(_save([it], tmp_path / "b"))
    got += [r for _ in range(3) for r in rows(next(small))]
    medium = make(0, 1, 8)
    medium.set_state(_save([small], tmp_path / "c"))
    got += [r for _ in range(5) for r in rows(next(medium))]
    assert got == want[:len(got)] and len(got) == 84
    for i in (whole, it, small, medium):
        i.close()


@pytest.mark.parametrize("name", PIPELINES)
def test_layouts_that_cannot_be_exact_are_refused_in_one_line(name, request, tmp_path):
    make, _ = request.getfixturevalue(name)
    its = [make(p, 2, 8) for p in range(2)]
    for it in its:
        next(it)
    state = _save(its, tmp_path / "two")
    with pytest.raises(ValueError, match=r"reads its data as 2 streams .* 3 processes cannot share 2 streams evenly: "
                                         r"resume on a process count that divides 2 or is a multiple of it \(1, 2, 4"):
        make(0, 3, 8).set_state(state)
    with pytest.raises(ValueError, match=r"global micro-batch of 3 rows .* does not split into this run's 2 data "
                                         r"streams"):
        make(0, 1, 3).set_state(state)
    one = make(0, 1, 16)
    lone = json.loads(json.dumps(its[1].get_state()))
    if name == "sft":  # every SFT process renders every stream (for the padding length), so it saves them all
        one.set_state(lone)
    else:
        with pytest.raises(ValueError, match=r"holds streams \[1\] of 2, but process 0 of 1 reads \[0\] too"):
            one.set_state(lone)  # one process's file is not enough
    one.close()
    for it in its:
        it.close()


def _legacy(name, state: dict, process: int) -> dict:
    """Process `process`'s state as nanojax wrote it before data streams (stream p = process p, no count)."""
    streams = state["streams"]
    if name == "sft":  # every process's position, its own counters
        ks = [streams[str(q)]["k"] for q in range(state["stream_count"])]
        return {"k": ks[process], "ks": ks, "epoch": 0, "stats": streams[str(process)]["stats"]}
    saved = streams[str(process)]
    if name == "text":
        old = json.loads(json.dumps(saved["reader"]))
        old["meta"] = {"data": old["meta"]["data"], "process": [process, state["stream_count"]],
                       "batch": [saved["rows"], old["meta"]["seq_len"]]}
        return old
    if name == "mid":
        assert saved["rows_used"] == 0  # old states never stopped inside a chunk
        return {k: saved[k] for k in ("k", "head", "offset", "stats")} | {"epoch": 0}
    return {"index": saved["rows"] // saved["chunk_rows"]}


@pytest.mark.parametrize("name", PIPELINES)
def test_states_written_before_streams_still_resume(name, request, tmp_path):
    """A 2-host checkpoint of the old format (one state per process) resumes exactly on 2 hosts, and on 1 host
    with the same rows per stream (old mid and synthetic states do not record the rows of the run's start)."""
    pipeline = make, rows = request.getfixturevalue(name)
    want = _steps(pipeline, [((2, 8), 4)], tmp_path / "whole")
    its = [make(p, 2, 8) for p in range(2)]
    for _ in range(2 * 2):
        for it in its:
            next(it)
    states = [_legacy(name, it.get_state(), p) for p, it in enumerate(its)]
    directory = tmp_path / "old"
    directory.mkdir()
    for p, s in enumerate(states):
        (directory / f"process_{p}-of-2.json").write_text(json.dumps(s))
    again = [make(p, 2, 8) for p in range(2)]
    for p, it in enumerate(again):
        it.set_state(states[p])  # a lone state is this process's own, as before
    _assert_same_steps([[r for _ in range(2) for it in again for r in rows(next(it))] for _ in range(2)], want[2:])
    one = make(0, 1, 16)
    one.set_state(ckpt.DataStateHandler().restore(directory))
    _assert_same_steps([[r for _ in range(2) for r in rows(next(one))] for _ in range(2)], want[2:])
    for it in (*its, *again, one):
        it.close()


def test_restore_reads_every_process_and_names_what_is_missing(tmp_path):
    for p in (0, 2):
        ckpt.DataStateHandler(process=(p, 3)).save(tmp_path, ckpt.DataStateSave({"index": p}))
    with pytest.raises(FileNotFoundError, match=r"of 3 processes in .* lacks \['process_1-of-3.json'\]"):
        ckpt.DataStateHandler().restore(tmp_path)
    ckpt.DataStateHandler(process=(1, 3)).save(tmp_path, ckpt.DataStateSave({"index": 1}))
    assert ckpt.DataStateHandler().restore(tmp_path) == {"process_states": [{"index": i} for i in range(3)]}
    empty = tmp_path / "empty"
    empty.mkdir()
    ckpt.DataStateHandler(process=(0, 1)).save(empty, ckpt.DataStateSave({}))
    assert ckpt.DataStateHandler().restore(empty) == {}  # saved without an iterator: nothing to restore


def _text_run(tmp_path, kjv, name, mesh, steps, stop=-1):
    data = tmp_path / "text"
    if not data.exists():  # FineWeb layout: a train shard and the val shard (the same book; val is not used)
        data.mkdir()
        for i in (0, fineweb.VAL_SHARD):
            os.symlink(kjv, data / fineweb.shard_name(i))
        _tokenizer(kjv).save(tmp_path / "tokenizer")
    c = micro_config(tmp_path / name, mesh=mesh, steps=steps)
    c.data.kind, c.data.path, c.data.tokenizer_dir = "fineweb", str(data), str(tmp_path / "tokenizer")
    c.data.read_threads, c.data.prefetch = 1, 0
    c.model.vocab_size = 320
    c.train.device_batch_size = 1  # 8 rows per step: 8 devices 8 x 1 micro-batch, 4 devices 4 x 2, 1 device 1 x 8
    c.train.stop_after_steps = stop
    return c


def _losses(run_dir) -> dict:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def _data_position(run_dir, step) -> dict:
    """Where the text stream stands: the packer's row group, token offset and token counters (not its batch
    count, which counts micro-batches of whatever size)."""
    (state,) = ckpt.DataStateHandler().restore(ckpt.checkpoints_dir(run_dir) / str(step) / "data")["process_states"]
    (reader,) = state["streams"].values()
    keep = ("parent", "offset", "row_groups", "documents", "empty_documents", "tokens_read")
    return {k: reader["reader"][k] for k in keep}


@pytest.mark.slow
def test_training_on_8_then_4_then_1_devices_matches_the_8_device_run(tmp_path, kjv):
    whole = _text_run(tmp_path, kjv, "whole", (1, 8, 1), steps=6)
    run(whole)
    for mesh, reached in (((1, 8, 1), 2), ((1, 4, 1), 4), ((1, 1, 1), 6)):
        assert run(_text_run(tmp_path, kjv, "parts", mesh, steps=6, stop=2))["step"] == reached
    want, got = _losses(whole.run_dir), _losses(tmp_path / "parts")
    assert sorted(got) == sorted(want) == list(range(1, 7))
    assert got[3] == pytest.approx(want[3], rel=1e-6)  # the same step-3 rows on 4 devices as on 8
    # float32 sums differ with the mesh and the number of micro-batches (measured: up to 1.0e-5 at step 4)
    np.testing.assert_allclose([got[s] for s in range(1, 7)], [want[s] for s in range(1, 7)], rtol=3e-5)
    assert _data_position(tmp_path / "parts", 6) == _data_position(whole.run_dir, 6)
