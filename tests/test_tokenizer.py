"""Tokenizer: exact vocabulary, lossless round trips, no special-token injection, nanochat's chat masks."""
import pickle
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiktoken
import tiktoken.load

from nanojax import paths
from nanojax.config import default_config
from nanojax import tokenizer as tokenizer_mod
from nanojax.tokenizer import SPECIAL_TOKENS, Tokenizer

VOCAB = 600


def synthetic_corpus(n_docs=300, seed=0):
    """Deterministic, varied text (words, numbers, punctuation, some CJK and emoji), no files needed."""
    rng = random.Random(seed)
    syllables = ["ka", "to", "ri", "men", "sha", "lo", "qu", "ble", "ith", "an", "er", "ous", "ple", "str"]
    words = ["".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(400)]
    extras = ["你好", "世界", "🙂", "naïve", "Zürich", "don't", "it's", "3.14", "2025", "(x)", "a+b=c"]
    docs = []
    for _ in range(n_docs):
        sentences = []
        for _ in range(rng.randint(2, 8)):
            ws = [rng.choice(words if rng.random() < 0.9 else extras) for _ in range(rng.randint(4, 14))]
            if rng.random() < 0.3:
                ws.append(str(rng.randint(0, 10**6)))
            sentences.append(" ".join(ws).capitalize() + rng.choice([".", "!", "?", ";"]))
        docs.append(" ".join(sentences) + rng.choice(["\n", "\n\n", ""]))
    return docs


CORPUS = synthetic_corpus()


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(CORPUS, VOCAB)


def sp(tok, name):
    return tok.encode_special(name)


# ---------------------------------------------------------------------------- training
def test_vocab_is_exact_with_specials_on_top(tok):
    assert tok.vocab_size == VOCAB == tok.encoding.n_vocab
    assert [tok.encode_special(s) for s in SPECIAL_TOKENS] == list(range(VOCAB - 9, VOCAB))
    assert tok.bos_token_id == VOCAB - 9
    assert tok.token_bytes.shape == (VOCAB,) and tok.token_bytes.dtype == np.int32
    assert (tok.token_bytes[VOCAB - 9:] == 0).all() and (tok.token_bytes[:VOCAB - 9] >= 1).all()
    assert tok.encoding._pat_str == tokenizer_mod.SPLIT_PATTERN


def test_training_is_deterministic(tok):
    again = Tokenizer.train(iter(CORPUS), VOCAB)  # any iterable, e.g. a generator
    ranks = [tok.encoding.decode_single_token_bytes(i) for i in range(VOCAB - 9)]
    assert ranks == [again.encoding.decode_single_token_bytes(i) for i in range(VOCAB - 9)]


def test_training_errors():
    with pytest.raises(ValueError, match="at least 265"):
        Tokenizer.train(CORPUS, 264)
    with pytest.raises(ValueError, match="supports only .* merges"):
        Tokenizer.train(["abab abab"] * 10, 1000)  # runs out of pairs long before 1000
    with pytest.raises(TypeError, match="training text 1 is bytes"):
        Tokenizer.train(["ok", b"bytes"], 300)


def test_layout_is_checked(tok):
    ranks = {bytes([b]): b for b in range(256)}
    with pytest.raises(ValueError, match="exactly 0..256"):
        Tokenizer.from_ranks({**ranks, b"ab": 300})
    with pytest.raises(ValueError, match="lack 1 single bytes"):
        Tokenizer.from_ranks({**{k: v for k, v in ranks.items() if v != 7}, b"ab": 7})
    shifted = tiktoken.Encoding("x", pat_str=tokenizer_mod.SPLIT_PATTERN, mergeable_ranks=ranks,
                                special_tokens={name: 300 + i for i, name in enumerate(SPECIAL_TOKENS)})
    with pytest.raises(ValueError, match="must have BPE ranks 0..V-10 and exactly"):
        Tokenizer(shifted)


def test_digits_split_in_pairs(tok):
    # \p{N}{1,2}: no token ever holds 3 digits, however often the corpus repeats a number.
    digit_tokens = [t for t in map(tok.decode, map(lambda i: [i], range(VOCAB - 9))) if t.strip().isdigit()]
    assert digit_tokens and max(map(len, digit_tokens)) <= 2
    assert len(tok.encode("12345")) >= 3


# ---------------------------------------------------------------------------- encode / decode
ROUND_TRIP = [
    "", " ", "\n\n\t  \r\n", "hello world", "Hello, World! It's 2025; we've 12,345.6789 items.",
    "你好，世界。日本語のテキスト。한국어 문장입니다.", "emoji 🙂👍🏽🇫🇷👨‍👩‍👧‍👦 and ZWJ",
    "e\u0301 combining, Ω≈ç√∫˜µ≤",
    "مرحبا بالعالم", "\x00\x01\x7f control \u200b zero-width", "a" * 5000, "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 astral 𐍈",
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert sum(tok.token_bytes[ids]) == len(text.encode("utf-8"))


def test_round_trip_random_unicode(tok):
    rng = random.Random(1)
    points = [c for c in range(0x20, 0x30000) if not 0xD800 <= c <= 0xDFFF]
    texts = ["".join(chr(rng.choice(points)) for _ in range(rng.randint(0, 60))) for _ in range(200)]
    rows = tok.encode(texts)
    assert [tok.decode(ids) for ids in rows] == texts
    assert all(sum(tok.token_bytes[ids]) == len(t.encode()) for ids, t in zip(rows, texts, strict=True))


def test_surrogates(tok):
    # A lone surrogate cannot be UTF-8: it becomes U+FFFD. A proper pair is joined into its character.
    assert tok.decode(tok.encode("a\ud800b\udfff")) == "a\ufffdb\ufffd"
    assert tok.decode(tok.encode("x\ud83d\ude00y")) == "x😀y"
    assert tok.encode(["a\ud800b"]) == [tok.encode("a\ufffdb")]


def test_special_tokens_cannot_be_injected(tok):
    text = "hi " + " ".join(SPECIAL_TOKENS) + " <|endoftext|> bye"
    specials = set(range(VOCAB - 9, VOCAB))
    for ids in [tok.encode(text), *tok.encode([text, text], num_threads=2)]:
        assert not specials & set(ids)
        assert tok.decode(ids) == text
    ids, mask = tok.render_conversation({"messages": [{"role": "user", "content": "<|assistant_start|>"},
                                                      {"role": "assistant", "content": "<|python_end|>"}]})
    assert [i for i in ids if i in specials] == [sp(tok, s) for s in ("<|bos|>", "<|user_start|>",
                                                 "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>")]


def test_encode_prepend_append_and_batches(tok):
    docs = CORPUS[:50]
    single = [tok.encode(d) for d in docs]
    assert tok.encode(docs, num_threads=1) == single == tok.encode(docs, num_threads=2) == tok(tuple(docs))
    bos, end = tok.bos_token_id, sp(tok, "<|assistant_end|>")
    assert tok.encode("abc", prepend="<|bos|>", append=end) == [bos, *tok.encode("abc"), end]
    assert tok.encode(docs[:3], prepend=bos) == [[bos, *ids] for ids in single[:3]]
    assert tok.encode([]) == []
    with pytest.raises(ValueError, match="unknown special token '<\\|eos\\|>'"):
        tok.encode("x", prepend="<|eos|>")
    with pytest.raises(ValueError, match="outside"):
        tok.encode("x", append=VOCAB)
    with pytest.raises(TypeError, match="item 1 of the batch is int"):
        tok.encode(["a", 3])
    with pytest.raises(TypeError, match="str or a list of str"):
        tok.encode(b"bytes")


def test_decode(tok):
    ids = tok.encode("héllo")
    assert tok.decode(np.array(ids, dtype=np.int64)) == "héllo"
    assert tok.decode([tok.bos_token_id]) == "<|bos|>"
    assert tok.decode([tok.encode("é")[0]]) == "\ufffd"  # a cut UTF-8 character
    for bad in ([0, VOCAB], [-1], [1.5]):
        with pytest.raises(ValueError, match=f"token ids \\[{bad[-1]}\\] are not ints"):
            tok.decode(bad)


# ---------------------------------------------------------------------------- persistence
def test_save_load_gives_identical_ids(tok, tmp_path):
    out = Tokenizer(tok.encoding, info={"note": "kept"}).save(tmp_path / "tok")
    assert sorted(p.name for p in out.iterdir()) == [
        "ranks.tiktoken", "token_bytes.npy", "tokenizer_meta.json"]
    back = Tokenizer.load(out)
    assert back.vocab_size == tok.vocab_size and back.bos_token_id == tok.bos_token_id
    assert back.encode(CORPUS) == tok.encode(CORPUS)
    assert np.array_equal(back.token_bytes, tok.token_bytes) and back.info == {"note": "kept"}
    assert np.array_equal(np.load(out / "token_bytes.npy"), tok.token_bytes)
    # The ranks file is tiktoken's own format, readable without nanojax.
    ranks = tiktoken.load.load_tiktoken_bpe(str(out / "ranks.tiktoken"))
    assert len(ranks) == VOCAB - 9 and ranks[b"a"] == tok.encode("a")[0]


def test_default_directory_and_load_errors(tok):
    assert tok.save() == paths.tokenizer_dir()  # under the per-test NANOJAX_HOME
    assert Tokenizer.load().encode("abc") == tok.encode("abc")
    ranks = paths.tokenizer_dir() / "ranks.tiktoken"
    ranks.write_bytes(ranks.read_bytes().replace(b" 300\n", b" 301\n"))
    with pytest.raises(ValueError, match="checksum"):
        Tokenizer.load()
    with pytest.raises(FileNotFoundError, match="nanojax.tokenizer train"):
        Tokenizer.load(paths.home() / "nowhere")


def test_the_tokenizer_of_a_run_config(tok, tmp_path):
    c = default_config()
    c.model.vocab_size = VOCAB
    c.data.kind = "sft"
    assert tokenizer_mod.tokenizer_dir_for(c) == str(paths.tokenizer_dir())  # data.tokenizer_dir "" -> the default
    c.data.dataset = "climbmix"  # HEAD's 32,768-token tokenizer has its own place
    assert tokenizer_mod.tokenizer_dir_for(c) == str(paths.home() / "tokenizer-climbmix")
    c.data.dataset = "fineweb"
    c.data.tokenizer_dir = str(tok.save(tmp_path / "tok"))
    assert tokenizer_mod.tokenizer_dir_for(c) == str(tmp_path / "tok")
    assert tokenizer_mod.load_for_config(c).encode("abc") == tok.encode("abc")
    c.data.kind = "synthetic"  # no text, no tokenizer ...
    assert tokenizer_mod.load_for_config(c) is None
    assert tokenizer_mod.load_for_config(c, tmp_path / "tok").vocab_size == VOCAB  # ... unless one is named
    c.model.vocab_size = 512
    with pytest.raises(ValueError, match=f"tokenizer at {tmp_path / 'tok'} has 600 tokens but model.vocab_size=512; "
                                         "set --config.model.vocab_size=600"):
        tokenizer_mod.load_for_config(c, tmp_path / "tok")
    c.data.kind, c.data.tokenizer_dir = "fineweb", str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nanojax.tokenizer train"):
        tokenizer_mod.load_for_config(c)


def test_pickles(tok):  # grain's worker processes receive the tokenizer by pickle
    back = pickle.loads(pickle.dumps(tok))
    assert back.encode(CORPUS[:5]) == tok.encode(CORPUS[:5]) and back.bos_token_id == tok.bos_token_id


# ---------------------------------------------------------------------------- conversations
def test_multi_turn_mask_with_tool_parts(tok):
    conv = {"messages": [
        {"role": "user", "content": "What is 12*7?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me compute. "},
            {"type": "python", "text": "12*7"},
            {"type": "python_output", "text": "84"},
            {"type": "text", "text": " So 84."}]},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "You're welcome."},
    ]}
    e, s = tok.encode, lambda name: [sp(tok, name)]
    expected = [
        (s("<|bos|>"), 0), (s("<|user_start|>"), 0), (e("What is 12*7?"), 0), (s("<|user_end|>"), 0),
        (s("<|assistant_start|>"), 0), (e("Let me compute. "), 1),
        (s("<|python_start|>"), 1), (e("12*7"), 1), (s("<|python_end|>"), 1),
        (s("<|output_start|>"), 0), (e("84"), 0), (s("<|output_end|>"), 0),
        (e(" So 84."), 1), (s("<|assistant_end|>"), 1),
        (s("<|user_start|>"), 0), (e("Thanks!"), 0), (s("<|user_end|>"), 0),
        (s("<|assistant_start|>"), 0), (e("You're welcome."), 1), (s("<|assistant_end|>"), 1),
    ]
    ids, mask = tok.render_conversation(conv)
    assert ids == [i for part, _ in expected for i in part]
    assert mask == [m for part, m in expected for _ in part]
    assert "<|python_start|>" in tok.visualize(ids, mask)


def test_system_message_is_merged_into_first_user(tok):
    with_system = {"messages": [{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    merged = {"messages": [{"role": "user", "content": "Be brief.\n\nHi"},
                           {"role": "assistant", "content": "Hello"}]}
    assert tok.render_conversation(with_system) == tok.render_conversation(merged)
    assert with_system["messages"][1]["content"] == "Hi"  # the input is not mutated


def test_truncation(tok):
    conv = {"messages": [{"role": "user", "content": CORPUS[0]}, {"role": "assistant", "content": CORPUS[1]}]}
    ids, mask = tok.render_conversation(conv)
    short_ids, short_mask = tok.render_conversation(conv, max_tokens=20)
    assert len(ids) > 20 and (short_ids, short_mask) == (ids[:20], mask[:20])


def test_render_for_completion(tok):
    conv = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                         {"role": "assistant", "content": "A"}]}
    prompt = tok.render_for_completion(conv)
    head, _ = tok.render_conversation({"messages": conv["messages"][:2]})
    assert prompt == head + [sp(tok, "<|assistant_start|>")]
    assert len(conv["messages"]) == 3
    with pytest.raises(ValueError, match="last message \\(index 1\\) must be from the assistant"):
        tok.render_for_completion({"messages": conv["messages"][:2]})


def _msgs(*pairs):
    return {"messages": [{"role": r, "content": c} for r, c in pairs]}


@pytest.mark.parametrize("conversation, error", [
    ({}, "'messages' list"),
    ({"messages": []}, "no messages"),
    ([{"role": "user", "content": "x"}], "'messages' list"),
    (_msgs(("assistant", "x")), "message 0 has role 'assistant' but should be 'user'"),
    (_msgs(("user", "a"), ("user", "b")), "message 1 has role 'user' but should be 'assistant'"),
    (_msgs(("system", "s"), ("user", "a"), ("assistant", "b"), ("system", "c")),
     "message 3 has role 'system' but should be 'user'"),
    (_msgs(("user", "a"), ("tool", "b")), "message 1 has role 'tool'"),
    (_msgs(("system", "s")), "message 1 must be from the user, got nothing"),
    (_msgs(("system", "s"), ("assistant", "b")), "message 1 must be from the user, got role 'assistant'"),
    (_msgs(("user", "a"), ("assistant", "")), "message 1 \\(assistant\\) has empty content"),
    (_msgs(("user", "")), "message 0 \\(user\\) has empty content"),
    (_msgs(("user", "a"), ("assistant", [])), "message 1 \\(assistant\\) has an empty list of parts"),
    (_msgs(("user", [{"type": "text", "text": "a"}])), "message 0 \\(user\\) content must be a str"),
    (_msgs(("user", "a"), ("assistant", 5)), "message 1 \\(assistant\\) content must be a str or a list"),
    (_msgs(("user", "a"), ("assistant", [{"type": "text", "text": "ok"}, {"type": "image", "text": "b"}])),
     "message 1, part 1: unknown part type 'image'"),
    (_msgs(("user", "a"), ("assistant", [{"type": "python"}])), "message 1, part 0: .* str 'text'"),
    ({"messages": [{"role": "user"}]}, "message 0 must be a dict with 'role' and 'content'"),
])
def test_malformed_conversations_name_the_message(tok, conversation, error):
    with pytest.raises(ValueError, match=error):
        tok.render_conversation(conversation)


def test_visualize_colours_follow_the_mask(tok):
    ids, mask = tok.render_conversation(_msgs(("user", "hi"), ("assistant", "yo")))
    out = tok.visualize(ids, mask, show_ids=True)
    assert out.count("\033[92m") == sum(mask) and out.count("\033[91m") == len(mask) - sum(mask)
    assert f"({tok.bos_token_id})" in out
    with pytest.raises(ValueError, match="ids but"):
        tok.visualize(ids, mask[:-1])


# ---------------------------------------------------------------------------- CLI and real text
def test_cli_train_and_eval(tmp_path, monkeypatch, capsys):
    data = tmp_path / "fineweb"
    data.mkdir()
    for i in range(3):  # FineWeb layout: the last shard is validation
        pq.write_table(pa.table({"text": synthetic_corpus(100, seed=i)}), data / f"shard_{i:05d}.parquet")
    tokenizer_mod.main(["train", "--data_dir", str(data), "--vocab_size", "500", "--max_chars", "30000",
                        "--doc_cap", "200"])
    tok = Tokenizer.load()  # saved to $NANOJAX_HOME/tokenizer by default
    assert tok.vocab_size == 500
    assert tok.info["train_files"] == ["shard_00000.parquet", "shard_00001.parquet"]
    assert 30000 < tok.info["chars"] <= 30200 and tok.info["peak_rss_mb"] > 0

    def offline(name):
        raise ConnectionError("offline")
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    results = tokenizer_mod.main(["eval", "--data_dir", str(data), "--timeout", "5"])
    out = capsys.readouterr().out
    assert "skipping the gpt2 column" in out and "| fwe-val |" in out and "| multilingual |" in out
    assert set(results) == {"fwe-train", "fwe-val", *tokenizer_mod.EVAL_SAMPLES}
    assert set(results["code"]) == {"nanojax"} and results["fwe-val"]["nanojax"] > 1.5
    # When tiktoken can load the reference encodings they become comparison columns.
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: tok.encoding)
    extra = data / "shard_00001.parquet"
    row = tokenizer_mod.main(["eval", "--data_dir", str(data), "--text", str(extra)])["shard_00001"]
    assert row["gpt2"] == row["nanojax"] == row["cl100k_base"] > 1.5
    with pytest.raises(FileNotFoundError, match="no .parquet files"):
        tokenizer_mod.main(["train", "--data_dir", str(tmp_path / "empty")])


def test_real_text_kjv(shared_dir):
    docs = pq.read_table(shared_dir / "data/text/kjv.parquet").column("text").to_pylist()
    tok = Tokenizer.train(docs[::4], 2048)
    held_out = "\n".join(docs[1::40])
    ids = tok.encode(held_out)
    assert tok.decode(ids) == held_out
    assert sum(tok.token_bytes[ids]) == len(held_out.encode())
    assert 3.5 < len(held_out.encode()) / len(ids) < 6  # English prose at a 2K vocabulary


def test_cli_dataset_picks_data_dir_and_vocab():
    from nanojax.data import fineweb

    defaults = {name: tokenizer_mod.parse_args(["train", "--dataset", name]) for name in ("fineweb", "climbmix")}
    assert tokenizer_mod.parse_args(["train"]).data_dir == defaults["fineweb"].data_dir
    assert defaults["fineweb"].data_dir == str(fineweb.default_dir("fineweb")) == str(paths.data_dir("fineweb"))
    assert defaults["climbmix"].data_dir == str(fineweb.default_dir("climbmix")) == str(paths.data_dir("climbmix"))
    assert (defaults["fineweb"].vocab_size, defaults["climbmix"].vocab_size) == (65536, 32768)
    assert (defaults["fineweb"].tokenizer_dir, defaults["climbmix"].tokenizer_dir) == (
        str(paths.home() / "tokenizer"), str(paths.home() / "tokenizer-climbmix"))
    # HEAD's scripts/tok_train.py keeps launch's 2B characters and 10,000-character documents
    assert {(a.max_chars, a.doc_cap) for a in defaults.values()} == {(2_000_000_000, 10_000)}
    ev = tokenizer_mod.parse_args(["eval", "--dataset", "climbmix"])
    assert ev.data_dir == str(paths.data_dir("climbmix")) and not hasattr(ev, "vocab_size")
    explicit = tokenizer_mod.parse_args(["train", "--dataset", "climbmix", "--data_dir", "/x", "--vocab_size", "1e3"])
    assert (explicit.data_dir, explicit.vocab_size) == ("/x", 1000)
    with pytest.raises(SystemExit):
        tokenizer_mod.parse_args(["train", "--dataset", "c4"])


def test_cli_train_and_eval_climbmix_default_dir(capsys):
    from nanojax.data import fineweb

    data = fineweb.default_dir("climbmix")
    with pytest.raises(FileNotFoundError, match=r"no \.parquet files in .*climbmix.*download -n 8 --dataset climbmix"):
        tokenizer_mod.main(["train", "--dataset", "climbmix", "--vocab_size", "400"])
    data.mkdir(parents=True)
    for i in (0, 6542):  # ClimbMix's val shard is 6542
        fineweb.write_shard(data / fineweb.shard_name(i, "climbmix"), synthetic_corpus(60, seed=i))
    tokenizer_mod.main(["train", "--dataset", "climbmix", "--vocab_size", "400", "--max_chars", "20000"])
    tok = Tokenizer.load(paths.tokenizer_dir("climbmix"))  # its own place, beside the FineWeb tokenizer's
    assert not paths.tokenizer_dir().exists()
    assert tok.vocab_size == 400 and tok.info["dataset"] == "climbmix" and tok.info["data_dir"] == str(data)
    assert tok.info["train_files"] == ["shard_00000.parquet"]
    results = tokenizer_mod.main(["eval", "--dataset", "climbmix", "--timeout", "0.01"])
    assert {"climbmix-train", "climbmix-val"} <= set(results)
    with pytest.raises(FileNotFoundError, match=r"no \.parquet files in \S*fineweb "):
        tokenizer_mod.main(["train", "--vocab_size", "400"])  # the default dataset's directory is still empty
    assert "training on 1 climbmix parquet file(s)" in capsys.readouterr().out
