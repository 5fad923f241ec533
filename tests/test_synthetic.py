"""Synthetic text: deterministic, the requested size, word statistics a tokenizer can learn from; the data
and tokenizer benchmarks run on it in a bare clone (no files, no $NANOJAX_HOME data, no network)."""
import collections
import json
import re

import pyarrow.parquet as pq

from nanojax.benchmarks import data as bench_data
from nanojax.benchmarks import tokenizer as bench_tokenizer
from nanojax.data.synthetic import synthetic_documents
from nanojax.tokenizer import Tokenizer


def _words(docs):
    return collections.Counter(re.findall(r"[a-z']+", "".join(docs).lower()))


def test_deterministic_per_seed_and_exact_size():
    docs = synthetic_documents(300_000)
    assert docs == synthetic_documents(300_000)
    assert sum(map(len, docs)) == 300_000
    other = synthetic_documents(300_000, seed=1)
    assert sum(map(len, other)) == 300_000 and other[0] != docs[0]
    # A smaller size gives a prefix of a larger one (the last document cut short).
    small = synthetic_documents(100_000)
    assert small[:-1] == docs[:len(small) - 1] and docs[len(small) - 1].startswith(small[-1])
    assert synthetic_documents(0) == [] and sum(map(len, synthetic_documents(17))) == 17


def test_looks_like_text():
    docs = synthetic_documents(1_000_000, mean_chars=2000)
    assert 300 < len(docs) < 700  # ~1e6 / 2000 documents, each ending at a sentence
    assert all(d[0].isupper() or d[0].isdigit() for d in docs)
    assert all(d[-1] in ".?!" for d in docs[:-1])
    text = "".join(docs)
    assert "\n\n" in text and ", " in text and "'s " in text
    assert 0.003 < sum(c.isdigit() for c in text) / len(text) < 0.03
    words = _words(docs)
    assert len(words) > 25_000  # a realistic number of distinct words for 1 MB
    ranked = [n for _, n in words.most_common()]
    assert words.most_common(1)[0][0] == "the"
    assert 5 < ranked[9] / ranked[99] < 15 and 5 < ranked[99] / ranked[999] < 15  # Zipf-like: f ~ 1/rank


def test_bpe_trains_a_few_thousand_ids_and_generalises_across_seeds():
    tok = Tokenizer.train(synthetic_documents(3_000_000), 4096)
    assert tok.vocab_size == 4096
    held_out = "\n".join(synthetic_documents(200_000, seed=1))  # same language, different text
    ids = tok.encode(held_out)
    assert tok.decode(ids) == held_out
    assert 2.8 < len(held_out) / len(ids) < 4.5  # chars per token, as for English at a 4K vocabulary


def test_tokenizer_benchmark_runs_without_files(tmp_path, capsys):
    out = tmp_path / "tok.json"
    results = bench_tokenizer.main(["--train_chars", "300000", "--encode_chars", "100000", "--vocab_size",
                                    "1024", "--threads", "1", "--repeats", "1", "--json", str(out)])
    assert results["corpus"]["source"] == "synthetic (seed 0)"
    assert results["corpus"]["unique_chars"] >= 300_000 and results["train"]["vocab_size"] == 1024
    assert all(r["tokens_per_s"] > 0 for r in results["encode"].values())
    assert json.loads(out.read_text())["corpus"] == results["corpus"]
    assert "corpus synthetic (seed 0)" in capsys.readouterr().out


def test_tokenizer_benchmark_prefers_fineweb_then_takes_corpus(tmp_path, _nanojax_home):
    fineweb = _nanojax_home / "data" / "fineweb"
    fineweb.mkdir(parents=True)
    bench_data.synthetic_shards(fineweb, None, 0.2, n_shards=2)
    assert bench_tokenizer._default_corpus() == fineweb
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(synthetic_documents(50_000, seed=3)))
    args = ["--train_chars", "60000", "--encode_chars", "20000", "--vocab_size", "512", "--threads", "1",
            "--repeats", "1"]
    assert bench_tokenizer.main(args)["corpus"]["source"] == str(fineweb)
    assert bench_tokenizer.main([*args, "--corpus", str(text)])["corpus"]["source"] == str(text)
    assert bench_tokenizer.main([*args, "--corpus", "synthetic", "--seed", "2"])["corpus"]["source"] == (
        "synthetic (seed 2)")


def test_data_benchmark_runs_without_files(tmp_path, capsys):
    out = tmp_path / "data.json"
    results = bench_data.main(["--mb", "1", "--configs", "1:1:0", "--seconds", "0.2", "--rounds", "1",
                               "--step-ms", "0", "--batch-size", "2", "--seq-len", "128", "--json", str(out)])
    assert [(r["read_threads"], r["tokenizer_threads"], r["workers"]) for r in results] == [(1, 1, 0)]
    assert results[0]["tok_s"] > 0
    saved = json.loads(out.read_text())
    assert saved["source"].startswith("synthetic 1 MB from generated text (seed 0)")
    assert saved["tokenizer"].startswith("trained on 1.0 MB of the shards")
    assert 3 < saved["baselines"]["chars_per_token"] < 7


def test_synthetic_shards_split_the_generated_text(tmp_path):
    files = bench_data.synthetic_shards(tmp_path, None, 0.5, n_shards=4)
    assert [f.rsplit("/", 1)[1] for f in files] == [f"shard_{i:05d}.parquet" for i in range(4)]
    texts = [t for f in files for t in pq.read_table(f).column("text").to_pylist()]
    assert texts == synthetic_documents(500_000)
    (tmp_path / "tiny").mkdir()
    tiny = bench_data.synthetic_shards(tmp_path / "tiny", None, 0.002, n_shards=4)  # fewer docs than shards
    assert 1 <= len(tiny) < 4 and all(pq.read_metadata(f).num_rows > 0 for f in tiny)
