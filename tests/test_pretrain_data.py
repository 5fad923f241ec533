"""nanojax.data.pretrain: BOS per document, shifted targets, exact split across processes, exact resume.

The reference stream is rebuilt independently (pyarrow + `encode_ordinary`, BOS prepended) from the row
groups in the order the pipeline promises, and every test compares the pipeline with it.
"""
import gc
import json
import random

import ml_collections
import numpy as np
import pyarrow.parquet as pq
import pytest

from nanojax.data import fineweb, pretrain
from nanojax.tokenizer import Tokenizer

ROW_GROUP = 8
EMPTY_PER_SHARD = 3


def _docs(shard: int, n: int) -> list[str]:
    rng = random.Random(shard)
    words = "the of and to in is was for on that with as by at from it an be this are".split()
    docs = [f"Doc {shard}-{i}: " + " ".join(rng.choice(words) for _ in range(rng.randint(1, 60)))
            for i in range(n)]
    docs[5] += " <|bos|> is plain text here"  # a special token written in text must stay text
    for k in range(EMPTY_PER_SHARD):
        docs.insert(7 * k + 3, "")
    return docs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    texts = []
    for s, n in enumerate((37, 29, 45)):  # uneven: 5, 4 and 6 row groups, last ones partial
        docs = _docs(s, n)
        texts += docs
        fineweb.write_shard(d / fineweb.shard_name(s), docs, row_group_size=ROW_GROUP)
    fineweb.write_shard(d / fineweb.shard_name(fineweb.VAL_SHARD), _docs(99, 20), row_group_size=ROW_GROUP)
    tok = Tokenizer.train([t for t in texts if t], 320)
    train, val = fineweb.train_val_split(fineweb.list_shards(d))
    return {"dir": d, "train": train, "val": val, "tok": tok}


def _units(files, shuffle=False, seed=0, epoch=0):
    units = pretrain.row_groups(files)
    order = np.random.default_rng([seed, epoch]).permutation(len(units)) if shuffle else range(len(units))
    return [units[i] for i in order]


def _reference(files, tok, units) -> np.ndarray:
    out = []
    for f, g in units:
        for text in pq.ParquetFile(files[f]).read_row_group(g).column("text").to_pylist():
            if text:
                out += [tok.bos_token_id] + tok.encoding.encode_ordinary(text)
    return np.array(out, np.int32)


def _stream(batches) -> np.ndarray:
    """Rows are disjoint windows of T+1 tokens: inputs plus the last target rebuild each row exactly."""
    rows = [np.concatenate([b["inputs"], b["targets"][:, -1:]], axis=1) for b in batches]
    return np.concatenate([r.reshape(-1) for r in rows]) if rows else np.zeros(0, np.int32)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _close(*its):
    for it in its:
        it.close()
    gc.collect()


def test_one_pass_matches_reference_bos_and_shift(corpus):
    tok, files = corpus["tok"], corpus["train"]
    it = pretrain.make_pretrain_iterator(files, tok, batch_size=2, seq_len=15, shuffle=False, num_epochs=1)
    batches = list(it)
    for b in batches:
        assert b["inputs"].shape == b["targets"].shape == (2, 15)
        assert b["inputs"].dtype == b["targets"].dtype == np.int32
        np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
    ref = _reference(files, tok, _units(files))
    got = _stream(batches)
    assert 0 <= len(ref) - len(got) < 2 * 16  # only the final partial batch is dropped
    np.testing.assert_array_equal(got, ref[:len(got)])
    stats = it.stats
    n_docs = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    assert stats["empty_documents"] == 3 * EMPTY_PER_SHARD and stats["documents"] == n_docs - 9
    assert stats["row_groups"] == 15 and stats["batches"] == len(batches) and stats["tokens_read"] == len(ref)
    assert (ref == tok.bos_token_id).sum() == n_docs - 9  # "<|bos|>" in text did not become a BOS
    _close(it)


@pytest.mark.parametrize("nproc", [2, 3, 4])
def test_processes_split_row_groups_exactly(corpus, nproc):
    tok, files = corpus["tok"], corpus["train"]
    units = _units(files, shuffle=True, seed=3)
    seen = []
    for p in range(nproc):
        it = pretrain.make_pretrain_iterator(files, tok, batch_size=1, seq_len=7, process_index=p,
                                             process_count=nproc, seed=3, num_epochs=1, prefetch=0)
        got = _stream(list(it))
        mine = units[p::nproc]
        ref = _reference(files, tok, mine)
        assert 0 <= len(ref) - len(got) < 8
        np.testing.assert_array_equal(got, ref[:len(got)])
        assert it.stats["row_groups"] == len(mine)
        seen += mine
        _close(it)
    assert sorted(seen) == sorted(units) and len(set(seen)) == len(units)  # none twice, none lost


def test_epochs_repeat_reshuffled_and_seed_determines_order(corpus):
    tok, files = corpus["tok"], corpus["train"]
    def mk(seed, **kw):
        return pretrain.make_pretrain_iterator(files, tok, batch_size=4, seq_len=31, seed=seed, **kw)

    a, b, c = mk(1), mk(1, read_threads=1, tokenizer_threads=1, prefetch=0), mk(2)
    ref = _reference(files, tok, _units(files, True, 1, 0) + _units(files, True, 1, 1))
    n = len(ref) // (4 * 32) - 1  # well into epoch 1
    xa, xb, xc = _take(a, n), _take(b, n), _take(c, n)
    np.testing.assert_array_equal(_stream(xa), ref[:n * 4 * 32])
    np.testing.assert_array_equal(_stream(xa), _stream(xb))  # threads and prefetch change speed, not content
    assert not np.array_equal(_stream(xa), _stream(xc))
    assert a.stats["epoch"] == 1
    _close(a, b, c)


def test_resume_gives_identical_batches(corpus):
    tok, files = corpus["tok"], corpus["train"]
    mk = lambda **kw: pretrain.make_pretrain_iterator(files, tok, batch_size=3, seq_len=20, seed=5, **kw)
    full = mk()
    want = _take(full, 60)  # crosses many row groups and the epoch boundary
    for k in (0, 1, 7, 23, 41):
        it = mk()
        _take(it, k)
        state = json.loads(json.dumps(it.get_state()))  # JSON round trip, as in the checkpoint
        stats = it.stats
        _close(it)
        again = mk(read_threads=1, prefetch=0)
        again.set_state(state)
        assert again.stats == stats
        for w in want[k:k + 12]:
            g = next(again)
            np.testing.assert_array_equal(g["inputs"], w["inputs"])
            np.testing.assert_array_equal(g["targets"], w["targets"])
        _close(again)
    _close(full)


def test_state_from_another_pipeline_is_refused(corpus):
    tok, files = corpus["tok"], corpus["train"]
    it = pretrain.make_pretrain_iterator(files, tok, batch_size=2, seq_len=16, seed=1)
    _take(it, 3)
    state = it.get_state()
    for kw, field in ((dict(seed=2), "data"), (dict(seq_len=8), "seq_len")):  # other process counts resume (layout)
        args = {"batch_size": 2, "seq_len": 16, "seed": 1, **kw}
        other = pretrain.make_pretrain_iterator(files, tok, **args)
        with pytest.raises(ValueError, match=f"different pipeline \\({field}: saved"):
            other.set_state(state)
        _close(other)
    same = pretrain.make_pretrain_iterator(files, tok, batch_size=2, seq_len=16, seed=1)
    assert same.fingerprint == it.fingerprint
    same.set_state(state)
    _close(it, same)


def test_from_config_train_and_val(corpus, monkeypatch):
    tok = corpus["tok"]
    cfg = ml_collections.ConfigDict({"model": {"seq_len": 16},
                                     "data": {"path": str(corpus["dir"]), "seed": 0, "read_threads": 2,
                                              "prefetch": 2}})
    train = pretrain.make_iterator_from_config(cfg, split="train", batch_size=2, process_index=0,
                                               process_count=1, tokenizer=tok)
    assert next(train)["inputs"].shape == (2, 16)
    val_batches = []
    for _ in range(2):  # recreated for each eval, always from the start, finite
        val = pretrain.make_iterator_from_config(cfg, split="val", batch_size=2, process_index=0,
                                                 process_count=1, tokenizer=tok)
        val_batches.append(_stream(list(val)))
        _close(val)
    np.testing.assert_array_equal(val_batches[0], val_batches[1])
    ref = _reference([corpus["val"]], tok, _units([corpus["val"]]))
    np.testing.assert_array_equal(val_batches[0], ref[:len(val_batches[0])])
    _close(train)
    cfg.data.num_shards = 2  # exactly shards 0 and 1 (+ val), though the directory holds shard 2 too
    it = pretrain.make_iterator_from_config(cfg, split="train", batch_size=2, process_index=0,
                                            process_count=1, tokenizer=tok)
    assert it.description.startswith("2 file(s), 9 units")
    _close(it)
    cfg.data.num_shards = 4  # offline (conftest): the missing shard is named with the command to fetch it
    with pytest.raises(FileNotFoundError, match=r"shard_00003\.parquet.*download -n 4 --dir"):
        pretrain.make_iterator_from_config(cfg, split="train", batch_size=2, process_index=0,
                                           process_count=1, tokenizer=tok)
    cfg.data.num_shards = -1
    cfg.data.path = str(corpus["dir"] / "missing")
    with pytest.raises(FileNotFoundError, match="missing"):
        pretrain.make_iterator_from_config(cfg, split="train", batch_size=2, process_index=0,
                                           process_count=1, tokenizer=tok)


def test_bad_inputs_are_named(corpus, tmp_path):
    tok = corpus["tok"]
    bad = tmp_path / "shard_00004.parquet"
    bad.write_bytes(b"PAR1 truncated")
    with pytest.raises(fineweb.CorruptShardError, match="shard_00004.parquet"):
        pretrain.make_pretrain_iterator([corpus["train"][0], bad], tok, batch_size=1, seq_len=8)
    empty = tmp_path / "empty.parquet"
    fineweb.write_shard(empty, [""] * 5, row_group_size=2)
    it = pretrain.make_pretrain_iterator([empty], tok, batch_size=1, seq_len=8)
    with pytest.raises(ValueError, match="hold no text"):
        next(it)  # never spins forever
    _close(it)


def test_more_processes_than_row_groups(corpus):
    """The val shard on a big pod: row groups are cut into row ranges; still each document exactly once."""
    tok, files = corpus["tok"], [corpus["val"]]  # 23 documents (3 empty) in 3 row groups
    nproc, units, docs = 7, [], 0
    for p in range(nproc):
        it = pretrain.make_pretrain_iterator(files, tok, batch_size=1, seq_len=1, process_index=p,
                                             process_count=nproc, shuffle=False, num_epochs=1, prefetch=0)
        got = _stream(list(it))
        ref = []
        for f, g, j, k in _units_parts(files, nproc)[p::nproc]:
            rows = pq.ParquetFile(files[f]).read_row_group(g).column("text").to_pylist()
            for text in rows[j * len(rows) // k:(j + 1) * len(rows) // k]:
                if text:
                    ref += [tok.bos_token_id] + tok.encoding.encode_ordinary(text)
        assert len(ref) - len(got) in (0, 1) and got.tolist() == ref[:len(got)]
        docs += it.stats["documents"] + it.stats["empty_documents"]
        units += _units_parts(files, nproc)[p::nproc]
        _close(it)
    assert docs == 23 and len(units) == 9 == len(set(units))  # 3 row groups x 3 parts, each once


def _units_parts(files, nproc):
    return pretrain._Units(pretrain.row_groups(files), process_index=0, process_count=nproc, seed=0,
                           shuffle=False, num_epochs=1).units


def test_orbax_checkpoint_roundtrip(corpus, tmp_path):
    import grain
    import orbax.checkpoint as ocp

    tok, files = corpus["tok"], corpus["train"]
    mk = lambda: pretrain.make_pretrain_iterator(files, tok, batch_size=2, seq_len=24, seed=9)
    it = mk()
    _take(it, 9)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(9, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
        want = _take(it, 5)
        fresh = mk()
        mngr.restore(9, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    for w in want:
        np.testing.assert_array_equal(next(fresh)["inputs"], w["inputs"])
    _close(it, fresh)


@pytest.mark.slow
def test_worker_processes_resume_exactly(corpus):
    tok, files = corpus["tok"], corpus["train"]
    mk = lambda: pretrain.make_pretrain_iterator(files, tok, batch_size=2, seq_len=20, worker_count=2)
    it = mk()
    _take(it, 6)
    state = it.get_state()
    want = _take(it, 8)
    assert it.stats["batches"] == 14
    again = mk()
    again.set_state(json.loads(json.dumps(state)))
    for w in want:
        np.testing.assert_array_equal(next(again)["targets"], w["targets"])
    _close(it, again)


def test_uri_paths_read_like_local_ones(corpus):
    """gs:// goes through pyarrow's filesystems; file:// exercises the same code path offline."""
    tok, d = corpus["tok"], corpus["dir"]
    uris = fineweb.list_shards(f"file://{d}")
    assert uris == [f"file://{p}" for p in fineweb.list_shards(d)]
    train, val = fineweb.train_val_split(uris)
    assert val == f"file://{corpus['val']}"
    a = pretrain.make_pretrain_iterator(train, tok, batch_size=2, seq_len=16, seed=4)
    b = pretrain.make_pretrain_iterator(corpus["train"], tok, batch_size=2, seq_len=16, seed=4)
    for x, y in zip(_take(a, 20), _take(b, 20)):
        np.testing.assert_array_equal(x["inputs"], y["inputs"])
    _close(a, b)
