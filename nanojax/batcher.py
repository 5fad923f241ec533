"""Continuous batching: concurrent requests decode together over a fixed set of KV-cache slots.

A `Batcher` owns the model on one thread (the device thread). Any thread (the server's event loop) hands it
a `Request` with `submit()`, which never blocks. Each turn of the device thread admits waiting requests into
free slots (a prefill of that prompt alone, whose cache row is then written into the slot), runs ONE decode
step for every slot, and gives each active request its token. A request leaves its slot the moment it ends
(a stop token, a stop string, `max_tokens`, the context full) or is cancelled (a client that went away), so
a newcomer waits at most one decode step plus its own prefill. Idle slots ride along: their work is wasted
and their position is held at 0.

Sampling is per row: every request has its own temperature, top-k, top-p and seed, and the key of its t-th
token is fold_in(key(seed), t), so what a request gets does not depend on what else is in the batch (rows at
different positions decode as each alone: `nanojax.model`). The calculator tool runs per row as in `Engine`.
Text is decoded incrementally (never half a UTF-8 character) and held back while it could still be the start
of a stop string.
"""
from __future__ import annotations

import codecs
import dataclasses
import queue
import threading
from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nanojax.buckets import bucket
from nanojax.engine import Engine, ToolRow
from nanojax.model import KVCache


# -- jitted device work -------------------------------------------------------------------------------
def sample_rows(logits_NV, seeds_N, counts_N, temperature_N, top_k_N, top_p_N):
    """One draw per row with the row's own settings: argmax at temperature 0; else softmax(logits / T) over the
    top_k largest logits (0: all) and, of those, the smallest set whose probability reaches top_p."""
    best = jnp.argmax(logits_NV, axis=-1).astype(jnp.int32)
    V = logits_NV.shape[-1]
    z_NV = logits_NV.astype(jnp.float32) / jnp.maximum(temperature_N, 1e-6)[:, None]
    sorted_NV = -jnp.sort(-z_NV, axis=-1)  # descending
    k_N = jnp.where(top_k_N > 0, jnp.minimum(top_k_N, V), V)
    kth_N1 = jnp.take_along_axis(sorted_NV, (k_N - 1)[:, None], axis=-1)
    probs_NV = jax.nn.softmax(jnp.where(sorted_NV >= kth_N1, sorted_NV, -jnp.inf), axis=-1)
    before_NV = jnp.cumsum(probs_NV, axis=-1) - probs_NV  # probability of the larger logits
    kept_NV = (before_NV < top_p_N[:, None]) & (sorted_NV >= kth_N1)
    cut_N1 = jnp.min(jnp.where(kept_NV, sorted_NV, jnp.inf), axis=-1, keepdims=True)
    z_NV = jnp.where(z_NV >= cut_N1, z_NV, -jnp.inf)
    keys = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(seeds_N, counts_N)
    drawn = jax.vmap(jax.random.categorical)(keys, z_NV).astype(jnp.int32)
    return jnp.where(temperature_N > 0, drawn, best)


@partial(jax.jit, static_argnames=("graphdef", "cache_len"))
def _prefill_row(graphdef, params, tokens_1T, length, sampling, *, cache_len):
    """One prompt (right-padded) into a 1-row cache of `cache_len`; its first token drawn with its settings."""
    model = nnx.merge(graphdef, params)
    h_1TD, cache = model.hidden(tokens_1T, model.empty_cache(1, cache_len))
    logits_1V = model.logits(h_1TD[:, length - 1])
    cache = cache._replace(pos=jnp.reshape(length, (1,)).astype(jnp.int32))
    return sample_rows(logits_1V, *sampling), cache


@partial(jax.jit, donate_argnames=("cache",))
def _insert(cache: KVCache, row: KVCache, slot):
    return KVCache(cache.k.at[:, slot].set(row.k[:, 0]), cache.v.at[:, slot].set(row.v[:, 0]),
                   cache.pos.at[slot].set(row.pos[0]),
                   None if cache.tokens is None else cache.tokens.at[slot].set(row.tokens[0]))


@partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def _step(graphdef, params, tokens_N, cache: KVCache, active_N, sampling):
    """One token for every slot; idle slots go back to position 0 so they never run off the cache."""
    logits_N1V, cache = nnx.merge(graphdef, params)(tokens_N[:, None], cache)
    cache = cache._replace(pos=jnp.where(active_N, cache.pos, 0))
    return sample_rows(logits_N1V[:, 0], *sampling), cache


# -- requests -----------------------------------------------------------------------------------------
@dataclasses.dataclass
class Request:
    """What to generate and where the result goes. `emit(event)` is called on the device thread with
    ("text", str), then once ("done", finish_reason, completion_tokens, detail): finish_reason is "stop" (stop
    token or string), "length" (max_tokens or the context), "cancelled" or "error" (detail says what)."""
    prompt: list[int]
    emit: Callable[[tuple], None]
    max_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True  # read by the device thread at its next step


class _Slot:
    """A request in a slot: its tokens, their text so far (decoded one token at a time: a character cut
    between tokens waits in the decoder, as `Tokenizer.decode` would replace it only at the very end), the
    text already emitted, the tool state."""

    def __init__(self, request: Request):
        self.request, self.tokens, self.text, self.shown, self.tool = request, [], "", "", ToolRow()
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")


# -- the device thread --------------------------------------------------------------------------------
class Batcher:
    """`Batcher(model, tokenizer, slots=16)`; `submit(request)`; `close()`. See the module docstring."""

    def __init__(self, model, tokenizer, *, slots: int = 16, use_tool: bool = True, max_waiting: int = 256):
        self.engine = Engine(model, tokenizer, use_tool=use_tool)  # stop tokens and the calculator, shared
        self.tokenizer, self.seq_len, self.slots = tokenizer, int(model.cfg.seq_len), slots
        self.graphdef, self.params = self.engine.graphdef, self.engine.params
        self.cache = model.empty_cache(slots, self.seq_len)
        self.rows: list[_Slot | None] = [None] * slots
        self.next_input = np.zeros(slots, np.int32)
        self.waiting: queue.Queue[Request] = queue.Queue(maxsize=max_waiting)
        self.steps = 0
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="nanojax-batcher", daemon=True)
        self._thread.start()

    # -- called from any thread
    def submit(self, request: Request) -> None:
        """Queue a request (queue.Full when `max_waiting` are already waiting: the server answers 503)."""
        if not request.prompt or len(request.prompt) >= self.seq_len:
            raise ValueError(f"the prompt has {len(request.prompt)} tokens; the model's context is {self.seq_len}")
        self.waiting.put_nowait(request)
        self._wake.set()

    def load(self) -> dict:
        return {"slots": self.slots, "active": sum(r is not None for r in self.rows), "waiting": self.waiting.qsize()}

    def close(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=30)

    # -- the device thread
    def _run(self) -> None:
        while not self._stop:
            self._admit()
            if not any(self.rows):
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                self._decode_step()
            except Exception as e:  # noqa: BLE001 - every waiting client hears of it; the thread goes on
                for i, row in enumerate(self.rows):
                    if row is not None:
                        self._finish(i, "error", detail=f"{type(e).__name__}: {e}")

    def _admit(self) -> None:
        for i in range(self.slots):
            if self.rows[i] is not None:
                continue
            try:
                request = self.waiting.get_nowait()
            except queue.Empty:
                return
            if request.cancelled:
                request.emit(("done", "cancelled", 0, ""))
                continue
            try:
                self._prefill_into(i, request)
            except Exception as e:  # noqa: BLE001
                request.emit(("done", "error", 0, f"{type(e).__name__}: {e}"))

    def _sampling(self, requests: list[Request | None], counts) -> tuple:
        def col(name, default, dtype):
            return jnp.asarray([getattr(r, name) if r is not None else default for r in requests], dtype)

        return (col("seed", 0, jnp.uint32), jnp.asarray(counts, jnp.int32), col("temperature", 0.0, jnp.float32),
                col("top_k", 0, jnp.int32), col("top_p", 1.0, jnp.float32))

    def _prefill_into(self, i: int, request: Request) -> None:
        n = len(request.prompt)
        padded = np.full((1, bucket(n, cap=self.seq_len)), self.tokenizer.bos_token_id, np.int32)
        padded[0, :n] = request.prompt
        first, row_cache = _prefill_row(self.graphdef, self.params, jnp.asarray(padded), jnp.int32(n),
                                        self._sampling([request], [0]), cache_len=self.seq_len)
        self.cache = _insert(self.cache, row_cache, jnp.int32(i))
        self.rows[i] = _Slot(request)
        self._take(i, int(first[0]))

    def _decode_step(self) -> None:
        requests = [row.request if row is not None else None for row in self.rows]
        counts = [len(row.tokens) if row is not None else 0 for row in self.rows]
        active = jnp.asarray([r is not None for r in requests])
        sampled, self.cache = _step(self.graphdef, self.params, jnp.asarray(self.next_input), self.cache, active,
                                    self._sampling(requests, counts))
        self.steps += 1
        for i, tok in enumerate(np.asarray(sampled).tolist()):
            if self.rows[i] is not None:
                self._take(i, tok)

    def _take(self, i: int, sampled: int) -> None:
        """The slot's next token (a forced tool token wins over the sample): emit text, maybe finish."""
        row = self.rows[i]
        request = row.request
        if request.cancelled:
            return self._finish(i, "cancelled")
        tok = row.tool.forced.popleft() if row.tool.forced else sampled
        if tok in self.engine.stop_tokens:
            return self._finish(i, "stop")
        row.tokens.append(tok)
        self.engine.tool(row.tool, tok)
        self.next_input[i] = tok  # the model reads every token the reply holds, forced or sampled
        row.text += row.decoder.decode(self.tokenizer.encoding.decode_single_token_bytes(tok))
        text = row.text
        found = [p for p in (text.find(s, max(0, len(row.shown) - len(s) + 1)) for s in request.stop) if p >= 0]
        cut = min(found, default=-1)
        if cut >= 0:
            self._emit_text(row, text[:cut])
            return self._finish(i, "stop")
        held = max((_partial_stop(text, s) for s in request.stop), default=0)
        self._emit_text(row, text[:len(text) - held])
        if len(row.tokens) >= request.max_tokens or len(request.prompt) + len(row.tokens) >= self.seq_len:
            self._emit_text(row, text + row.decoder.decode(b"", final=True))  # a cut last character: U+FFFD
            self._finish(i, "length")

    def _emit_text(self, row: _Slot, text: str) -> None:
        if len(text) > len(row.shown):
            row.request.emit(("text", text[len(row.shown):]))
            row.shown = text

    def _finish(self, i: int, reason: str, detail: str = "") -> None:
        row = self.rows[i]
        self.rows[i] = None
        row.request.emit(("done", reason, len(row.tokens), detail))


def _partial_stop(text: str, stop: str) -> int:
    """Length of the longest end of `text` that is a proper start of `stop` (held back: it may yet match)."""
    for n in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0
