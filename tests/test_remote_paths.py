"""Data and run directories given as URLs (gs:// on TPU pods). Parquet shards go through fsspec: tested on
memory://, the same code path gcsfs takes for gs://. A run directory on gs:// goes through etils.epath in
nanojax.checkpoint (never os / open) and keeps its logs local: tested on an in-memory stand-in for GCS registered
with fsspec. Orbax's array I/O (TensorStore speaks gs:// itself) needs a real bucket and is not covered here."""
import importlib
import json
import sys
import uuid

import fsspec
import ml_collections
import numpy as np
import pytest
from etils import epath
from etils.epath import backend as epath_backend
from etils.epath import gpath
from fsspec.implementations.memory import MemoryFileSystem

from nanojax import checkpoint as ckpt
from nanojax import paths
from nanojax.data import fineweb, pretrain
from nanojax.tokenizer import Tokenizer

fsspec_registry = importlib.import_module("fsspec.registry")  # the module: `fsspec.registry` is its mapping
WORDS = "the of and to in is was for on that with as by at from it an be this are".split()


def _docs(seed: int, n: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [f"doc {seed}-{i}: " + " ".join(rng.choice(WORDS, rng.integers(3, 40))) for i in range(n)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Three shards (two train, the val one) on local disk and the same bytes under a memory:// directory."""
    local = tmp_path_factory.mktemp("fineweb")
    for index, n in ((0, 30), (1, 25), (fineweb.VAL_SHARD, 12)):
        fineweb.write_shard(local / fineweb.shard_name(index), _docs(index, n), row_group_size=8)
    url = f"memory://nanojax-test-{uuid.uuid4().hex}/fineweb"
    fs, root = fsspec.core.url_to_fs(url)
    for path in sorted(local.glob("*.parquet")):
        fs.pipe_file(f"{root}/{path.name}", path.read_bytes())
    fs.pipe_file(f"{root}/.hidden.parquet", b"not listed")
    tok = Tokenizer.train(_docs(0, 30), 300)
    yield {"local": local, "url": url, "tok": tok}
    fs.rm(root.rsplit("/", 1)[0], recursive=True)


def _config(path: str):
    return ml_collections.ConfigDict({"data": {"path": path, "seed": 3, "read_threads": 2},
                                      "model": {"seq_len": 16}})


def _batches(path, tok, split, n):
    it = pretrain.make_iterator_from_config(_config(str(path)), split=split, batch_size=2, process_index=0,
                                            process_count=1, tokenizer=tok)
    try:
        return [next(it) for _ in range(n)], it.description
    finally:
        it.close()


def test_memory_url_shards_read_exactly_like_local_ones(shards):
    urls = fineweb.list_shards(shards["url"])
    assert [u.rsplit("/", 1)[1] for u in urls] == [p.name for p in sorted(shards["local"].glob("*.parquet"))]
    assert all(u.startswith("memory://") for u in urls)
    assert fineweb.train_val_split(urls)[1].endswith(fineweb.shard_name(fineweb.VAL_SHARD))
    for split in ("train", "val"):
        remote, description = _batches(shards["url"], shards["tok"], split, 3)
        local, _ = _batches(shards["local"], shards["tok"], split, 3)
        assert "2 file(s)" in description if split == "train" else "1 file(s)" in description
        for a, b in zip(remote, local):
            np.testing.assert_array_equal(a["inputs"], b["inputs"])
            np.testing.assert_array_equal(a["targets"], b["targets"])


def test_bad_urls_fail_naming_the_url_and_the_fix(monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"no \.parquet files in memory://nanojax-nothing-here"):
        fineweb.list_shards("memory://nanojax-nothing-here")
    with pytest.raises(ValueError, match=r"nosuch://bucket/x: .*nosuch"):
        fineweb.list_shards("nosuch://bucket/x")
    monkeypatch.setitem(sys.modules, "gcsfs", None)  # as where the gcs extra is not installed
    for protocol in ("gs", "gcs"):
        monkeypatch.delitem(fsspec_registry._registry, protocol, raising=False)
    shard = "gs://bucket/fineweb/shard_00000.parquet"
    with pytest.raises(ValueError, match=rf"{shard}: the filesystem for gs:// is not installed .*\[gcs\]"):
        fineweb.open_parquet(shard)


class _MemoryGCS(MemoryFileSystem):
    """GCS as gcsfs presents it (paths "bucket/key", no real directories), kept in memory."""
    protocol = ("gs", "gcs")
    store, pseudo_dirs, root_marker = {}, [""], ""

    def __init__(self, *args, **kwargs):  # epath passes gcsfs options (finalize_on_close)
        super().__init__()

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        for prefix in ("gs://", "gcs://"):
            path = path[len(prefix):] if path.startswith(prefix) else path
        return path.rstrip("/")


@pytest.fixture
def memory_gcs(monkeypatch):
    """gs:// through epath's fsspec backend, served from memory for this test only."""
    monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
    for protocol in _MemoryGCS.protocol:
        monkeypatch.setitem(fsspec_registry._registry, protocol, _MemoryGCS)
    monkeypatch.setattr(_MemoryGCS, "store", {})
    monkeypatch.setattr(_MemoryGCS, "pseudo_dirs", [""])
    epath_backend.fsspec_backend._get_filesystem.cache_clear()
    yield _MemoryGCS
    epath_backend.fsspec_backend._get_filesystem.cache_clear()


def _write_step(step_dir: epath.Path, meta: dict, committed: bool = True) -> None:
    for item in ("params", "opt_state"):
        (step_dir / item).mkdir(parents=True)
        (step_dir / item / "_METADATA").write_text(json.dumps({"tree_metadata": {}}))
    (step_dir / "meta").mkdir()
    (step_dir / "meta" / "metadata").write_text(json.dumps(meta))
    (step_dir / "data").mkdir()
    ckpt.DataStateHandler(process=(0, 1)).save(step_dir / "data", ckpt.DataStateSave({"offset": 7}))
    if committed:
        (step_dir / "commit_success.txt").write_text("Checkpoint commit was successful")


def test_a_gs_run_directory_is_read_through_epath(memory_gcs):
    run = "gs://bucket/runs/base_d20"
    ckpts = epath.Path(run) / "checkpoints"
    _write_step(ckpts / "4", {"step": 4, "config": {"run_name": "base_d20"}})
    _write_step(ckpts / "6", {"step": 6}, committed=False)  # a write the preemption cut short
    assert any(key.startswith("bucket/runs/base_d20/checkpoints/4/") for key in memory_gcs.store)
    found, step = ckpt.resolve_step_dir(run)
    assert (str(found), step) == (f"{run}/checkpoints", 4)
    assert ckpt.read_meta(run) == ({"step": 4, "config": {"run_name": "base_d20"}}, 4)
    assert ckpt.step_problem(ckpts / "6").startswith("not committed")
    assert ckpt.step_problem(ckpts / "4") is None
    assert ckpt.DataStateHandler().restore(ckpts / "4" / "data") == {"process_states": [{"offset": 7}]}
    with pytest.raises(FileNotFoundError, match="no checkpoint for step 5 under gs://bucket/runs/base_d20"):
        ckpt.resolve_step_dir(run, 5)


def test_a_gs_run_keeps_its_config_and_metrics_on_local_disk():
    from nanojax import train

    config = ml_collections.ConfigDict({"run_name": "base_d20"})
    assert train.local_log_dir("gs://bucket/runs/x", config) == str(paths.runs_dir() / "base_d20")
    assert train.local_log_dir("/data/runs/x", config) == "/data/runs/x"
    assert paths.is_url("gs://bucket/runs/x") and paths.is_url("memory://x") and not paths.is_url("/data/runs")
