"""data.dataset="climbmix" (nanochat HEAD's karpathy/climbmix-400b-shuffle) through the same download and reader code.

The Hub is a local server on 127.0.0.1 (test_fineweb.HubServer) that answers only for the ClimbMix repo.
"""
import math
import pathlib

import ml_collections
import pytest

from nanojax import paths
from nanojax.data import fineweb, pretrain
from test_bestfit_packing import IntTokenizer
from test_fineweb import serve_hub

CLIMBMIX = "karpathy/climbmix-400b-shuffle"
VAL = 6542


def _shard_bytes(tmp, index, n_docs=30):
    path = tmp / f"src_{index}.parquet"
    fineweb.write_shard(path, [" ".join(str(1 + (index * 7 + j * k) % 97) for k in range(1 + j % 9))
                               for j in range(n_docs)], row_group_size=8)
    return path.read_bytes()


@pytest.fixture
def hub(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    server = serve_hub(monkeypatch, {fineweb.shard_name(i, "climbmix"): _shard_bytes(src, i) for i in (0, 1, 2, VAL)},
                       repo_id=CLIMBMIX)
    yield server
    server.close()


def test_layout_matches_nanochat_head():
    info = fineweb.DATASETS["climbmix"]
    assert (info.repo_id, info.num_shards, info.val_shard) == (CLIMBMIX, 6543, VAL)  # HEAD: MAX_SHARD = 6542
    assert fineweb.shard_name(VAL, "climbmix") == "shard_06542.parquet"
    with pytest.raises(ValueError, match="out of range 0..6542"):
        fineweb.shard_name(6543, "climbmix")
    with pytest.raises(ValueError, match="out of range 0..1822"):
        fineweb.shard_name(1823)  # FineWeb-Edu unchanged
    with pytest.raises(ValueError, match="data.dataset='c4'"):
        fineweb.default_dir("c4")
    assert fineweb.default_dir("climbmix") == paths.data_dir("climbmix")


def test_download_status_and_split(hub, capsys):
    assert fineweb.main(["download", "-n", "3", "--dataset", "climbmix", "--workers", "3"]) == 0
    d = fineweb.default_dir("climbmix")
    for i in (0, 1, 2, VAL):
        name = fineweb.shard_name(i, "climbmix")
        assert (d / name).read_bytes() == hub.files[name]
    assert {n for m, n, _ in hub.log if m == "GET"} == set(hub.files)  # every file came from the ClimbMix repo
    out = capsys.readouterr().out
    assert "shards: 0..2, 6542" in out and "val: shard_06542.parquet" in out
    assert f"(~{3 * 250e6 / 5.36 / 1e9:.3g}B tokens if climbmix shards, 5.36 chars/token)" in out  # not 4.8's
    n_requests = len(hub.log)
    assert fineweb.main(["status", "--dataset", "climbmix"]) == 0  # reads the local copy only
    assert len(hub.log) == n_requests
    train, val = fineweb.train_val_split(fineweb.list_shards(d), "climbmix")
    assert val.endswith("shard_06542.parquet") and len(train) == 3


def test_val_shard_is_climbmix_last_even_next_to_fineweb_val_name(tmp_path):
    for i in (0, 1822, VAL):  # 1822 is FineWeb-Edu's val shard but an ordinary ClimbMix training shard
        fineweb.write_shard(tmp_path / fineweb.shard_name(i, "climbmix"), ["1 2"])
    train, val = fineweb.train_val_split(fineweb.list_shards(tmp_path), "climbmix")
    assert val.endswith("shard_06542.parquet") and train[-1].endswith("shard_01822.parquet")


def test_offline_error_names_the_dataset(tmp_path):
    with pytest.raises(FileNotFoundError, match="download -n 2 --dataset climbmix --dir"):
        fineweb.ensure_shards([0, 1, VAL], tmp_path / "d", dataset="climbmix")


def test_config_reads_climbmix_shards_with_bestfit(hub):
    cfg = ml_collections.ConfigDict({"model": {"seq_len": 12}, "data": {
        "path": "", "seed": 0, "read_threads": 1, "prefetch": 0, "num_shards": 2, "dataset": "climbmix",
        "packing": "bestfit", "bestfit_buffer": 16}})
    tok = IntTokenizer(bos=999)
    it = pretrain.make_iterator_from_config(cfg, split="train", batch_size=2, process_index=0, process_count=1,
                                            tokenizer=tok)  # fetches shards 0, 1 and 6542 into data/climbmix
    assert it.description.startswith("2 file(s)")
    assert sorted(p.name for p in fineweb.default_dir("climbmix").glob("*.parquet")) == [
        "shard_00000.parquet", "shard_00001.parquet", "shard_06542.parquet"]
    batch = next(it)
    assert batch["inputs"].shape == (2, 12) and (batch["inputs"][:, 0] == 999).all()
    it.close()
    val = pretrain.make_iterator_from_config(cfg, split="val", batch_size=2, process_index=0, process_count=1,
                                             tokenizer=tok)
    assert val.description.startswith("1 file(s)") and len(list(val)) >= 1


CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def _tiny_config(tmp_path, dataset, vocab, iters=10):
    path = tmp_path / f"tiny_{dataset}_{vocab}.py"
    path.write_text("from nanojax.config import default_config, use_nanochat_head\n\n\n"
                    "def get_config():\n"
                    "    c = use_nanochat_head(default_config())\n"
                    f"    c.model.depth, c.model.vocab_size, c.data.dataset = 2, {vocab}, {dataset!r}\n"
                    f"    c.train.num_iterations = {iters}\n"
                    "    return c\n")
    return path


def test_shards_needed_follows_the_configs_dataset(capsys):
    """gpt2_d24 (HEAD: ClimbMix, automatic 1M batch, ratio 8) vs base_d20 (launch: FineWeb-Edu)."""
    d24, d20 = str(CONFIGS / "gpt2_d24.py"), str(CONFIGS / "base_d20.py")
    assert fineweb.config_tokens(d24) == 5568 * 2**20  # HEAD's horizon: 8 x scaling params // 1M tokens
    cm, fw = fineweb.DATASETS["climbmix"], fineweb.DATASETS["fineweb"]
    expected = {d24: ("climbmix", math.ceil(5568 * 2**20 * cm.chars_per_token / cm.chars_per_shard)),
                d20: ("fineweb", math.ceil(21400 * 2**19 * fw.chars_per_token / fw.chars_per_shard))}
    assert expected[d24][1] == 126 and expected[d20][1] == 216
    for config, (dataset, n) in expected.items():
        assert fineweb.main(["shards-needed", "--config", config]) == 0
        out = capsys.readouterr().out
        assert f"= {n} training shard(s) of {dataset}" in out and "Note:" not in out
        assert out.rstrip().endswith(f"download -n {n}" + (" --dataset climbmix" if dataset == "climbmix" else ""))
    assert fineweb.shard_plan(config=d24)[:2] == (126, "climbmix")
    assert fineweb.shard_plan(config=d24, dataset="climbmix")[:2] == (126, "climbmix")
    assert fineweb.main(["shards-needed", "--config", d20, "--dataset", "climbmix"]) == 1
    err = capsys.readouterr().err
    assert "--dataset climbmix but" in err and "has data.dataset='fineweb'" in err


def test_shards_needed_config_errors_and_vocab_note(tmp_path, capsys):
    assert fineweb.main(["shards-needed", "--config", str(_tiny_config(tmp_path, "c4", 32768))]) == 1
    assert "data.dataset='c4' is not a known pretraining dataset (known: fineweb, climbmix)" in capsys.readouterr().err
    assert fineweb.main(["shards-needed", "--config", str(_tiny_config(tmp_path, "fineweb", 32768))]) == 0
    out = capsys.readouterr().out
    assert "of fineweb" in out and "this config's vocab is 32,768; pass --chars-per-token" in out
    config = str(_tiny_config(tmp_path, "climbmix", 32768, iters=100_000))
    tokens = fineweb.config_tokens(config)
    assert fineweb.main(["shards-needed", "--config", config, "--chars-per-token", "2"]) == 0
    out = capsys.readouterr().out
    assert f"= {math.ceil(tokens * 2 / 250e6)} training shard(s) of climbmix" in out and "Note:" not in out


def test_download_config_fetches_the_configs_dataset(hub, tmp_path, capsys):
    config = _tiny_config(tmp_path, "climbmix", 32768)  # a few steps: 1 training shard + val
    assert fineweb.main(["download", "--config", str(config), "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "= 1 training shard(s) of climbmix" in out
    assert sorted(p.name for p in fineweb.default_dir("climbmix").glob("*.parquet")) == [
        "shard_00000.parquet", "shard_06542.parquet"]
    assert not fineweb.default_dir("fineweb").exists()
    assert fineweb.main(["download", "--config", str(config), "--dataset", "fineweb"]) == 1
    assert "--dataset fineweb but" in capsys.readouterr().err
