"""Continuous batching: a request gets the same tokens alone or among others, joins and leaves a running batch,
and honours its own sampling settings, stop strings, token budget and cancellation."""
import queue
import threading
import time

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import CHAT_TEXT, micro_chat_model

from nanojax.batcher import Batcher, Request, sample_rows
from nanojax.engine import Engine
from nanojax.tokenizer import Tokenizer



@pytest.fixture(scope="module")
def setup():
    tok = Tokenizer.train(CHAT_TEXT, 300)
    model = micro_chat_model(tok.vocab_size, 64)
    batcher = Batcher(model, tok, slots=4, use_tool=False)
    yield model, tok, batcher
    batcher.close()


def run(batcher, prompts, **kwargs):
    """Submit every prompt at once; (text, finish_reason, completion tokens) per prompt."""
    results, done = [None] * len(prompts), threading.Semaphore(0)

    def emit_for(i):
        pieces = []

        def emit(event):
            if event[0] == "text":
                pieces.append(event[1])
            else:
                results[i] = ("".join(pieces), event[1], event[2])
                done.release()
        return emit

    requests = [Request(prompt=p, emit=emit_for(i), **{"max_tokens": 20, **kwargs}) for i, p in enumerate(prompts)]
    for r in requests:
        batcher.submit(r)
    for _ in prompts:
        assert done.acquire(timeout=60)
    return results


def wait_idle(batcher, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while (batcher.load()["active"] or batcher.load()["waiting"]) and time.time() < deadline:
        time.sleep(0.01)


def prompts(tok, n):
    return [[tok.bos_token_id] + tok.encode(CHAT_TEXT[i % 3])[: 3 + i] for i in range(n)]


def test_alone_equals_the_engine_and_equals_in_a_crowd(setup):
    model, tok, batcher = setup
    ps = prompts(tok, 10)  # more than the 4 slots: requests queue, join as others leave
    engine = Engine(model, tok, use_tool=False)
    expected = []
    for p in ps:
        seqs, _ = engine.generate_batch(p, max_tokens=20, temperature=0.0)
        expected.append(tok.decode(seqs[0][len(p):]))
    alone = [run(batcher, [p], temperature=0.0)[0] for p in ps[:3]]
    crowd = run(batcher, ps, temperature=0.0)
    assert [a[0] for a in alone] == expected[:3]
    assert [c[0] for c in crowd] == expected
    assert all(c[1] in ("stop", "length") for c in crowd)


def test_sampling_is_per_request_and_reproducible(setup):
    _, tok, batcher = setup
    p = prompts(tok, 1)[0]
    a = run(batcher, [p], temperature=1.0, seed=7)[0]
    crowd = run(batcher, [p, p, p], temperature=1.0, seed=7)
    assert all(c[0] == a[0] for c in crowd)  # same seed, same tokens, whatever shares the batch
    others = {run(batcher, [p], temperature=1.0, seed=s)[0][0] for s in range(8)}
    assert len(others) > 1
    greedy = run(batcher, [p], temperature=0.0)[0][0]
    assert run(batcher, [p], temperature=1.0, top_k=1, seed=3)[0][0] == greedy
    assert run(batcher, [p], temperature=1.0, top_p=1e-6, seed=3)[0][0] == greedy


def test_max_tokens_stop_strings_and_cancel(setup):
    _, tok, batcher = setup
    p = prompts(tok, 1)[0]
    text, reason, n = run(batcher, [p], temperature=0.0, max_tokens=5)[0]
    assert reason == "length" and n == 5
    full = run(batcher, [p], temperature=0.0, max_tokens=20)[0][0]
    stop = full[3:6]
    text, reason, _ = run(batcher, [p], temperature=0.0, max_tokens=20, stop=(stop,))[0]
    assert reason == "stop" and text == full[:full.index(stop)]
    events, go = queue.Queue(), threading.Event()

    def emit(event):  # holds the device thread at the first text until the test has cancelled
        events.put(event)
        if event[0] == "text":
            go.wait(10)

    request = Request(prompt=p, emit=emit, max_tokens=10_000, temperature=1.0)
    batcher.submit(request)
    assert events.get(timeout=30)[0] == "text"
    request.cancel()
    go.set()
    while (event := events.get(timeout=30))[0] != "done":
        pass
    assert event[1] == "cancelled" and event[2] <= 2
    wait_idle(batcher)
    assert batcher.load() == {"slots": 4, "active": 0, "waiting": 0}


def test_sample_rows_respects_each_rows_top_k_and_top_p():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 4))
    draws = np.stack([np.asarray(sample_rows(logits, jnp.asarray([s] * 4, jnp.uint32), jnp.arange(4),
                                             jnp.asarray([1.0, 1.0, 1.0, 0.0]), jnp.asarray([2, 0, 0, 0]),
                                             jnp.asarray([1.0, 0.7, 1.0, 1.0]))) for s in range(200)])
    assert set(draws[:, 0]) == {0, 1}  # top_k 2
    assert set(draws[:, 1]) == {0, 1}  # top_p 0.7: 0.5 + 0.3 reaches it
    assert set(draws[:, 2]) == {0, 1, 2, 3}  # no restriction
    assert set(draws[:, 3]) == {0}  # temperature 0: argmax
