"""data.packing="bestfit": rows equal to nanochat HEAD's own dataloader on the same documents; exact resume.

The golden rows (tests/fixtures/nanochat_head_data, README.md there) come from HEAD's unchanged
`tokenizing_distributed_data_loader_with_state_bos_bestfit` over parquet files whose texts are token ids;
here the same texts go through nanojax's whole pipeline (parquet -> row groups -> BOS + ids -> packing).
"""
import json
import pathlib

import ml_collections
import numpy as np
import pytest

from nanojax import config as cfglib
from nanojax.data import bestfit, fineweb, pretrain

GOLDEN = pathlib.Path(__file__).parent / "fixtures" / "nanochat_head_data" / "golden.npz"


class _IdsEncoding:
    """A text is its token ids, space-separated (as in make_golden.py)."""

    def encode_to_numpy(self, text, allowed_special=(), disallowed_special=()):
        return np.array([int(t) for t in text.split()], np.uint32)


class IntTokenizer:
    encoding = _IdsEncoding()

    def __init__(self, bos):
        self.bos_token_id = bos


def _scenario(tmp_path, name):
    """The golden scenario's documents written as nanojax shards; (train files, tokenizer, setup, golden)."""
    g = np.load(GOLDEN)
    B, T, buffer_size, chunk, per_group, groups_per_file, train_files, bos = g[f"{name}/setup"].tolist()
    docs = np.split(g[f"{name}/doc_tokens"], np.cumsum(g[f"{name}/doc_lengths"])[:-1])
    per_file = per_group * groups_per_file
    files = []
    for f in range(train_files):  # the val file (the last one) is never read by HEAD's train split
        path = tmp_path / fineweb.shard_name(f)
        fineweb.write_shard(path, [" ".join(map(str, d)) for d in docs[f * per_file:(f + 1) * per_file]],
                            row_group_size=per_group)
        files.append(str(path))
    setup = dict(batch_size=B, seq_len=T, bestfit_buffer=buffer_size, bestfit_chunk=chunk)
    return files, IntTokenizer(bos), setup, (g[f"{name}/inputs"], g[f"{name}/targets"])


def _bestfit(files, tok, setup, **kw):
    return pretrain.make_pretrain_iterator(files, tok, packing="bestfit", **{**setup, **kw})


def _take(it, n):
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("name", ["small", "head_defaults"])
def test_rows_equal_nanochat_head_dataloader(tmp_path, name):
    files, tok, setup, (inputs, targets) = _scenario(tmp_path, name)
    it = _bestfit(files, tok, setup, shuffle=False)  # HEAD reads files and row groups in order, every epoch
    for k, got in enumerate(_take(it, len(inputs))):
        np.testing.assert_array_equal(got["inputs"], inputs[k], err_msg=f"batch {k} inputs")
        np.testing.assert_array_equal(got["targets"], targets[k], err_msg=f"batch {k} targets")
    assert (inputs[:, :, 0] == tok.bos_token_id).all()  # every row starts with BOS
    if name == "small":
        assert it.stats["epoch"] >= 2  # the golden run crosses epoch boundaries
    it.close()


def test_resume_gives_identical_batches(tmp_path):
    files, tok, setup, _ = _scenario(tmp_path, "small")
    mk = lambda **kw: _bestfit(files, tok, setup, seed=3, **kw)  # noqa: E731 - shuffled row groups this time
    full = mk()
    want = _take(full, 60)
    for k in (0, 1, 9, 37):
        it = mk()
        _take(it, k)
        state = json.loads(json.dumps(it.get_state()))  # JSON round trip, as in the checkpoint
        assert len(json.dumps(state)) < 4000  # document references, not tokens
        stats = it.stats
        it.close()
        again = mk(read_threads=1, prefetch=0)
        again.set_state(state)
        assert again.stats == stats
        for w in want[k:k + 15]:
            got = next(again)
            np.testing.assert_array_equal(got["inputs"], w["inputs"])
            np.testing.assert_array_equal(got["targets"], w["targets"])
        again.close()
    full.close()


def test_packing_modes_refuse_each_others_state(tmp_path):
    files, tok, setup, _ = _scenario(tmp_path, "small")
    concat_setup = dict(batch_size=setup["batch_size"], seq_len=setup["seq_len"])
    fit, cat = _bestfit(files, tok, setup), pretrain.make_pretrain_iterator(files, tok, **concat_setup)
    _take(fit, 2), _take(cat, 2)
    with pytest.raises(ValueError, match="packing: saved 'concat', now 'bestfit'"):
        _bestfit(files, tok, setup).set_state(cat.get_state())
    with pytest.raises(ValueError, match="packing: saved 'bestfit', now 'concat'"):
        pretrain.make_pretrain_iterator(files, tok, **concat_setup).set_state(fit.get_state())
    with pytest.raises(ValueError, match="bestfit: saved \\[24, 10\\], now \\[50, 10\\]"):
        _bestfit(files, tok, {**setup, "bestfit_buffer": 50}).set_state(fit.get_state())
    fit.close(), cat.close()


def test_val_split_is_finite_and_rows_are_bos_aligned(tmp_path):
    files, tok, setup, _ = _scenario(tmp_path, "small")
    val = list(_bestfit(files[-1:], tok, setup, shuffle=False, num_epochs=1))
    assert 3 <= len(val) < 100
    rows = np.stack([b["inputs"] for b in val])
    assert (rows[:, :, 0] == tok.bos_token_id).all()
    np.testing.assert_array_equal(np.stack([b["targets"] for b in val])[:, :, :-1], rows[:, :, 1:])


def test_config_keys_and_bad_values_are_named(tmp_path):
    files, tok, setup, _ = _scenario(tmp_path, "small")
    with pytest.raises(ValueError, match="data.packing='best'"):
        pretrain.make_pretrain_iterator(files, tok, batch_size=2, seq_len=8, packing="best")
    c = cfglib.default_config()
    assert (c.data.dataset, c.data.packing, c.data.bestfit_buffer) == ("fineweb", "concat", 1000)  # today's
    for key, bad in (("packing", "greedy"), ("dataset", "c4"), ("bestfit_buffer", 0)):
        c = cfglib.default_config()
        c.data[key] = bad
        with pytest.raises(ValueError, match=f"data.{key}"):
            cfglib.validate(c)
    cfg = ml_collections.ConfigDict({"model": {"seq_len": 16}, "data": {
        "path": str(tmp_path), "seed": 0, "read_threads": 1, "prefetch": 0, "packing": "bestfit",
        "bestfit_buffer": 30}})
    fineweb.write_shard(tmp_path / fineweb.shard_name(fineweb.VAL_SHARD), ["1 2 3"] * 40, row_group_size=8)
    it = pretrain.make_iterator_from_config(cfg, split="train", batch_size=2, process_index=0, process_count=1,
                                            tokenizer=tok)
    assert "best-fit packing (buffer 30 documents)" in it.description
    assert (next(it)["inputs"][:, 0] == tok.bos_token_id).all()
    it.close()


def test_split_documents_needs_bos_first():
    parts = bestfit.split_documents(np.array([9, 1, 2, 9, 3], np.int32), 9)
    assert [p.tolist() for p in parts] == [[9, 1, 2], [9, 3]]
    with pytest.raises(ValueError, match="do not start with BOS"):
        bestfit.split_documents(np.array([1, 9], np.int32), 9)
