import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import micro_config
from nanojax import engine as eng
from nanojax import sharding as shd
from nanojax.engine import Engine, generate_naive, use_calculator
from nanojax.model import GPT
from nanojax.tokenizer import Tokenizer

VOCAB = 265  # 256 bytes + 9 specials


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_ranks({bytes([i]): i for i in range(256)})


def _config(mesh=(1, 1, 1), seq_len=64, kv_heads=-1):
    c = micro_config(mesh=mesh)
    c.model.vocab_size = VOCAB
    c.model.seq_len = seq_len
    c.model.n_kv_head = kv_heads
    return c


def _model(c, seed=0):
    model = GPT(c.model, rngs=nnx.Rngs(seed))
    state = nnx.state(model, nnx.Param)
    keys = iter(jax.random.split(jax.random.key(seed + 1), 64))
    nnx.update(model, jax.tree.map(lambda x: 0.3 * jax.random.normal(next(keys), x.shape, x.dtype), state))
    return model


@pytest.fixture(scope="module")
def model():
    return _model(_config())


def _prompt(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, n).tolist()


def test_engine_greedy_equals_naive_recompute(model, tok):
    prompt = _prompt(9, seed=3)
    out, masks = Engine(model, tok).generate_batch(prompt, max_tokens=20, temperature=0.0)
    want = generate_naive(model, prompt, 20, stop_tokens={tok.bos_token_id, tok.encode_special("<|assistant_end|>")})
    want = [t for t in want if t not in {tok.bos_token_id, tok.encode_special("<|assistant_end|>")}]
    assert out[0][len(prompt):] == want
    assert masks[0] == [0] * len(prompt) + [1] * len(want)


def test_grouped_query_attention_cache(tok):
    c = _config(kv_heads=1)
    c.model.head_dim = 16  # 4 query heads, 1 kv head
    model = _model(c, seed=5)
    prompt = _prompt(7, seed=1)
    out, _ = Engine(model, tok).generate_batch(prompt, max_tokens=10, temperature=0.0)
    stops = {tok.bos_token_id, tok.encode_special("<|assistant_end|>")}
    want = [t for t in generate_naive(model, prompt, 10, stop_tokens=stops) if t not in stops]
    assert out[0][len(prompt):] == want


def test_batched_equals_one_at_a_time(model, tok):
    engine = Engine(model, tok)
    prompts = [_prompt(n, seed=n) for n in (3, 17, 9)]
    batched, bmasks = engine.generate_batch(prompts, max_tokens=12, temperature=0.0)
    for p, b, m in zip(prompts, batched, bmasks):
        single, smasks = engine.generate_batch(p, max_tokens=12, temperature=0.0)
        assert b == single[0]
        assert m == smasks[0]


def test_samples_share_prefill_and_are_reproducible(model, tok):
    engine = Engine(model, tok)
    prompt = _prompt(5, seed=7)
    greedy, _ = engine.generate_batch(prompt, num_samples=4, max_tokens=10, temperature=0.0)
    assert greedy[0] == greedy[1] == greedy[2] == greedy[3]
    a, _ = engine.generate_batch(prompt, num_samples=4, max_tokens=10, temperature=1.0, seed=1)
    b, _ = engine.generate_batch(prompt, num_samples=4, max_tokens=10, temperature=1.0, seed=1)
    c, _ = engine.generate_batch(prompt, num_samples=4, max_tokens=10, temperature=1.0, seed=2)
    assert a == b
    assert a != c
    assert len({tuple(r) for r in a}) > 1  # rows draw independently
    top1, _ = engine.generate_batch(prompt, num_samples=4, max_tokens=10, temperature=0.7, top_k=1, seed=3)
    assert top1[0] == top1[1] == greedy[0]


def test_streaming_yields_columns(model, tok):
    engine = Engine(model, tok)
    steps = list(engine.generate([_prompt(4), _prompt(6, 1)], num_samples=2, max_tokens=5, temperature=0.0))
    assert 1 <= len(steps) <= 5
    assert all(len(col) == 4 and len(m) == 4 for col, m in steps)
    seen = []
    engine.generate_batch(_prompt(4), max_tokens=5, temperature=0.0, callback=lambda c, m: seen.append(c))
    assert len(seen) >= 1


def test_no_recompilation_per_token_or_prompt_length(model, tok):
    engine = Engine(model, tok)
    engine.generate_batch(_prompt(5), max_tokens=20, temperature=0.0)
    n_decode, n_prefill = eng._decode._cache_size(), eng._prefill._cache_size()
    engine.generate_batch(_prompt(7, 2), max_tokens=30, temperature=0.0)  # same buckets (16, 64)
    assert eng._decode._cache_size() == n_decode
    assert eng._prefill._cache_size() == n_prefill


def test_stops_on_assistant_end(model, tok, monkeypatch):
    end = tok.encode_special("<|assistant_end|>")
    script = iter([65, 66, end, 67, 68])
    _install_script(monkeypatch, script)
    out, masks = Engine(model, tok).generate_batch([1, 2], max_tokens=10)
    assert out[0] == [1, 2, 65, 66]


def _install_script(monkeypatch, script, fed=None):
    """Replaces the jitted prefill / decode by a scripted token stream (one row)."""
    def fake_prefill(graphdef, params, tokens, lengths, key, step, temp, *, cache_len, repeat, **kw):
        return jnp.asarray([next(script, 0)] * repeat), None, None

    def fake_decode(graphdef, params, tokens, cache, key, step, temp, **kw):
        if fed is not None:
            fed.append(int(tokens[0]))
        return jnp.asarray([next(script, 0)] * tokens.shape[0]), None, None

    monkeypatch.setattr(eng, "_prefill", fake_prefill)
    monkeypatch.setattr(eng, "_decode", fake_decode)


def test_tool_forcing_inserts_output_with_mask_zero(model, tok, monkeypatch):
    sp = tok.encode_special
    call = [sp("<|python_start|>")] + tok.encode("12*(3+4)") + [sp("<|python_end|>")]
    after = tok.encode(" ok") + [sp("<|assistant_end|>")]
    forced = [sp("<|output_start|>")] + tok.encode("84") + [sp("<|output_end|>")]
    # the model keeps "sampling" junk (token 90) while the tool output is forced
    script = iter(call + [90] * len(forced) + after)
    fed = []
    _install_script(monkeypatch, script, fed)
    prompt = [tok.bos_token_id, 10, 11]
    out, masks = Engine(model, tok).generate_batch(prompt, max_tokens=40)
    gen, gmask = out[0][len(prompt):], masks[0][len(prompt):]
    assert gen == call + forced + after[:-1]
    assert gmask == [1] * len(call) + [0] * len(forced) + [1] * (len(after) - 1)
    assert fed[len(call):len(call) + len(forced)] == forced  # forced tokens are what the model sees


def test_tool_off_and_failed_calls_force_nothing(model, tok, monkeypatch):
    sp = tok.encode_special
    call = [sp("<|python_start|>")] + tok.encode("import os") + [sp("<|python_end|>")]
    script = iter(call + [65, sp("<|assistant_end|>")])
    _install_script(monkeypatch, script)
    out, masks = Engine(model, tok).generate_batch([1], max_tokens=40)
    assert out[0][1:] == call + [65]
    assert masks[0][1:] == [1] * (len(call) + 1)


def test_use_calculator():
    assert use_calculator("1,234 + 6") == 1240
    assert use_calculator("(3+4)*2/7") == 2.0
    assert use_calculator("2**100") is None
    assert use_calculator("'strawberry'.count('r')") == 3
    assert use_calculator("__import__('os')") is None
    assert use_calculator("open('x')") is None
    assert use_calculator("len('abc')") is None  # only .count() string ops
    assert use_calculator("1/0") is None
    assert use_calculator("abc") is None


def test_sharded_model_generates_the_same(tok):
    c = _config(mesh=(2, 2, 2))
    model = _model(c, seed=2)
    prompts = [_prompt(6, 4), _prompt(10, 5)]
    want, _ = Engine(model, tok).generate_batch(prompts, max_tokens=8, temperature=0.0)
    mesh = shd.make_mesh(c.mesh)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = jax.device_put(params, shd.param_shardings(params, mesh))
    sharded = nnx.merge(graphdef, params, rest)
    assert any("tensor" in str(v.sharding.spec) for v in jax.tree.leaves(nnx.state(sharded)))
    got, _ = Engine(sharded, tok).generate_batch(prompts, max_tokens=8, temperature=0.0)
    assert got == want


def test_generation_benchmark_runs():
    from nanojax.benchmarks import generation

    r = generation.main(["--depth=1", "--vocab=512", "--seq_len=64", "--prompt=8", "--new_tokens=16", "--repeats=1"])
    assert r["cached_tokens"] == 16 and r["cached_tokens_per_s"] > 0 and r["naive_tokens_per_s"] > 0
