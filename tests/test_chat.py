import jax
import pytest
from flax import nnx

from helpers import micro_config
from nanojax import chat_cli
from nanojax.chat_session import ChatSession
from nanojax.model import GPT
from nanojax.tokenizer import Tokenizer

TEXT = ["The quick brown fox jumps over the lazy dog. " * 20, "Hello there, how are you today? " * 20,
        "Numbers 123 and 4567 and symbols !?; " * 20]


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(TEXT, 320)


@pytest.fixture(scope="module")
def model(tokenizer):
    c = micro_config()
    c.model.vocab_size = tokenizer.vocab_size
    c.model.seq_len = 64
    m = GPT(c.model, rngs=nnx.Rngs(0))
    state = nnx.state(m, nnx.Param)
    keys = iter(jax.random.split(jax.random.key(1), 16))
    nnx.update(m, jax.tree.map(lambda x: 0.5 * jax.random.normal(next(keys), x.shape), state))
    return m


def _chat(n_pairs):
    msgs = []
    for i in range(n_pairs):
        msgs += [{"role": "user", "content": f"hello there {i}"}, {"role": "assistant", "content": "the fox"}]
    return msgs + [{"role": "user", "content": "how are you"}]


def test_prompt_drops_oldest_turns_to_fit(model, tokenizer):
    session = ChatSession(model, tokenizer)
    ids, dropped = session.prompt(_chat(1), 16)
    assert dropped == 0 and ids[0] == tokenizer.bos_token_id
    assert ids[-1] == tokenizer.encode_special("<|assistant_start|>")
    ids, dropped = session.prompt(_chat(12), 16)
    assert dropped > 0 and dropped % 2 == 0
    assert len(ids) + 16 <= 64
    with pytest.raises(ValueError, match="does not fit"):
        session.prompt([{"role": "user", "content": "fox " * 200}], 16)
    with pytest.raises(ValueError, match="end with a user message"):
        session.prompt(_chat(1)[:-1], 16)


def test_stream_equals_greedy_engine_output(model, tokenizer):
    session = ChatSession(model, tokenizer)
    msgs = _chat(1)
    text = "".join(session.stream(msgs, temperature=0.0, max_tokens=12))
    ids, _ = session.prompt(msgs, 12)
    tokens = []
    for column, _ in session.engine.generate(ids, max_tokens=12, temperature=0.0):
        if column[0] in session.engine.stop_tokens:
            break
        tokens.append(column[0])
    assert text == tokenizer.decode(tokens)
    assert session.finish_reason == ("stop" if len(tokens) < 12 else "length")


def test_default_reply_budget_fits_the_context_and_an_explicit_overflow_names_the_numbers(model, tokenizer):
    # the model's context is 64 tokens: the old default of 512 never fit
    session = ChatSession(model, tokenizer)
    ids, dropped, budget = session.plan(_chat(1))
    assert dropped == 0 and budget == 64 - len(ids) and budget >= 1
    ids, dropped, budget = session.plan(_chat(12))  # too long: the oldest turns make room for a reply of 64 // 8
    assert dropped > 0 and budget == 64 - len(ids) >= 8
    with pytest.raises(ValueError, match=r"max_tokens=100 does not fit: the model's context is 64 tokens"):
        session.plan(_chat(1), 100)


def test_cli_single_prompt(model, tokenizer, tmp_path, capsys):
    from nanojax.checkpoint import Checkpointer

    tok_dir = tmp_path / "tok"
    tokenizer.save(tok_dir)
    config = micro_config()
    config.model.vocab_size, config.model.seq_len = tokenizer.vocab_size, 64
    ck = Checkpointer(tmp_path / "run", async_save=False)
    ck.save(1, nnx.state(model, nnx.Param), None, None,
            {"step": 1, "config": config.to_dict(), "tokenizer_dir": str(tok_dir)}, force=True)
    ck.close()
    assert chat_cli.main([str(tmp_path / "run"), "-p", "hello there", "--temperature", "0", "--max-tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert "Assistant: " in out
    assert ("(reply cut at --max-tokens 6)" in out) != ("ended its reply with <|assistant_end|>" in out)
    assert chat_cli.main([str(tmp_path / "missing"), "-p", "x"]) == 2
