"""Generation around the model's own forward: jitted prefill + single-token decode, batched sampling, the
calculator tool. No transformer arithmetic lives here: `model(tokens, cache)` does it (`nanojax.model`).

Shapes are static so nothing recompiles per token: the cache (`model.empty_cache`) is preallocated with a
length that is one of a few buckets (`nanojax.buckets`, at most `model.seq_len`), prompts are right-padded to
a bucket length, and each row keeps its own position (`cache.pos`), so rows of different lengths (a batch of
different prompts) decode side by side; padding is never attended. Jitted functions take the model as
(graphdef, params), so they compile once per model shape, and work unchanged on parameters sharded over a
mesh (jit follows their shardings).

`Engine(model, tokenizer).generate(prompt_or_prompts, num_samples, max_tokens, temperature, top_k, seed)`
streams `(token_column, mask_column)` per step like nanochat's Engine (mask 1 = sampled, 0 = forced by the
tool); `generate_batch` returns the finished sequences and masks. Decode steps are pipelined: step s+1 is
dispatched before step s's tokens are copied to the host (a row's next input is its forced token, known on
the host, or its sample, still on the device), so host bookkeeping overlaps device work.
Many samples of one prompt share one prefill (batch-1 prefill, then the cache is replicated). Sampling
takes explicit PRNG keys derived from `seed` (greedy argmax at temperature 0).
Rows finish on `<|assistant_end|>` or `<|bos|>`.
The calculator: between `<|python_start|>` and `<|python_end|>` the row's tokens are collected; on
`<|python_end|>` the text is evaluated by `use_calculator` and, if it gives a value, `<|output_start|>`,
the value's tokens and `<|output_end|>` are forced into that row one per step with mask 0.
"""
from __future__ import annotations

import signal
import threading
import warnings
from collections import deque
from functools import partial
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nanojax.buckets import bucket
from nanojax.model import KVCache


# ---------------------------------------------------------------------------------------------------
# calculator tool (nanochat's use_calculator)
class _Timeout(Exception):
    pass


def eval_with_timeout(expr: str, max_time: float = 3.0):
    """eval with no builtins; None on any error or after `max_time` s (SIGALRM, main thread only)."""
    def run():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SyntaxWarning)
            return eval(expr, {"__builtins__": {}}, {})

    use_alarm = threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")
    try:
        if not use_alarm:
            return run()

        def handler(signum, frame):
            raise _Timeout(expr)

        old = signal.signal(signal.SIGALRM, handler)
        signal.setitimer(signal.ITIMER_REAL, max_time)
        try:
            return run()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
    except Exception:
        return None


_ARITH = set("0123456789*+-/.() ")
_STRING_OP = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789'\"()._ ")
_DANGEROUS = ("__", "import", "exec", "eval", "compile", "open", "file", "input", "raw_input", "globals",
              "locals", "vars", "dir", "getattr", "setattr", "delattr", "hasattr")


def use_calculator(expr: str):
    """nanochat's calculator: commas stripped; pure arithmetic (no `**`) or a string `.count(` expression."""
    expr = expr.replace(",", "")
    if all(c in _ARITH for c in expr):
        if "**" in expr:
            return None
        return eval_with_timeout(expr)
    if not all(c in _STRING_OP for c in expr):
        return None
    low = expr.lower()
    if any(p in low for p in _DANGEROUS):
        return None
    if ".count(" not in expr:
        return None
    return eval_with_timeout(expr)


# ---------------------------------------------------------------------------------------------------
# jitted prefill and decode around the model's own forward
def sample(key, logits_BV, temperature, top_k: int | None, greedy: bool = False):
    """Greedy argmax when temperature == 0 (or `greedy`, static: skips the random draw); else softmax(logits / T)
    restricted to the top_k largest logits."""
    best = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    if greedy:
        return best
    z = logits_BV / jnp.maximum(temperature, 1e-6)
    if top_k is not None and 0 < top_k < logits_BV.shape[-1]:
        kth = jax.lax.top_k(z, top_k)[0][:, -1:]
        z = jnp.where(z >= kth, z, -jnp.inf)
    drawn = jax.random.categorical(key, z, axis=-1).astype(jnp.int32)
    return jnp.where(temperature > 0, drawn, best)


@partial(jax.jit, static_argnames=("graphdef", "cache_len", "repeat", "top_k", "greedy"))
def _prefill(graphdef, params, tokens_BT, lengths_B, key, step, temperature, *, cache_len, repeat, top_k,
             greedy=False):
    """Prompts (right-padded) into a fresh cache of `cache_len`; rows replicated `repeat` times afterwards.
    Returns (first sampled token per row, last-position logits per row, cache with pos = lengths)."""
    model = nnx.merge(graphdef, params)
    h_BTD, cache = model.hidden(tokens_BT, model.empty_cache(tokens_BT.shape[0], cache_len))
    h_BD = jnp.take_along_axis(h_BTD, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
    rep = lambda a, axis: jnp.repeat(a, repeat, axis=axis)
    cache = KVCache(rep(cache.k, 1), rep(cache.v, 1), rep(lengths_B.astype(jnp.int32), 0),
                    None if cache.tokens is None else rep(cache.tokens, 0))
    logits_BV = rep(model.logits(h_BD), 0)  # rows of the replicated batch
    return sample(jax.random.fold_in(key, step), logits_BV, temperature, top_k, greedy), logits_BV, cache


@partial(jax.jit, static_argnames=("graphdef", "top_k", "greedy"), donate_argnames=("cache",))
def _decode(graphdef, params, tokens_B, cache: KVCache, key, step, temperature, *, top_k, greedy=False):
    """One token per row at its position; returns (next sampled token per row, logits, cache)."""
    logits_B1V, cache = nnx.merge(graphdef, params)(tokens_B[:, None], cache)
    logits_BV = logits_B1V[:, 0]
    return sample(jax.random.fold_in(key, step), logits_BV, temperature, top_k, greedy), logits_BV, cache


# ---------------------------------------------------------------------------------------------------
class ToolRow:
    """One row's calculator state: tokens to force next, and the expression being written."""

    __slots__ = ("forced", "in_python", "expr", "done")

    def __init__(self):
        self.forced: deque[int] = deque()
        self.in_python = False
        self.expr: list[int] = []
        self.done = False


class Engine:
    """Generation for one model + tokenizer (the tokenizer is needed for the tool and the stop tokens)."""

    def __init__(self, model, tokenizer, *, use_tool: bool = True):
        self.model = model
        self.tokenizer = tokenizer
        self.graphdef, self.params = nnx.split(model)
        self.seq_len = model.cfg.seq_len
        self.use_tool = use_tool
        sp = tokenizer.encode_special
        self.python_start, self.python_end = sp("<|python_start|>"), sp("<|python_end|>")
        self.output_start, self.output_end = sp("<|output_start|>"), sp("<|output_end|>")
        self.stop_tokens = {sp("<|assistant_end|>"), tokenizer.bos_token_id}

    def generate(self, tokens: Sequence[int] | Sequence[Sequence[int]], num_samples: int = 1,
                 max_tokens: int | None = None, temperature: float = 1.0, top_k: int | None = None,
                 seed: int = 42) -> Iterator[tuple[list[int], list[int]]]:
        """Yields (token_column, mask_column) per step, one entry per row (prompt-major: prompt i's samples
        are rows i*num_samples ... i*num_samples+num_samples-1). Stops when every row has produced a stop
        token or after `max_tokens` steps, never past model.seq_len (the longest prompt + tokens). Sampling
        draws each row independently, the first token included (nanochat broadcast the first sample). Rows that are
        done keep receiving (ignored) tokens until the batch stops, as in nanochat."""
        prompts = [list(tokens)] if tokens and isinstance(tokens[0], (int, np.integer)) else [list(p) for p in tokens]
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        longest = max(len(p) for p in prompts)
        seq_len = self.seq_len
        if longest >= seq_len:
            raise ValueError(f"prompt of {longest} tokens leaves no room in model.seq_len={seq_len}")
        budget = seq_len - longest if max_tokens is None else min(max_tokens, seq_len - longest)
        if budget <= 0:
            return
        prompt_len = bucket(longest, cap=seq_len)
        cache_len = bucket(longest + budget, minimum=64, cap=seq_len, half_steps=True)
        cache_len = max(cache_len, prompt_len)
        pad = self.tokenizer.bos_token_id
        ids = np.full((len(prompts), prompt_len), pad, np.int32)
        for i, p in enumerate(prompts):
            ids[i, :len(p)] = p
        lengths = np.array([len(p) for p in prompts], np.int32)
        key = jax.random.key(seed)
        temp = jnp.float32(temperature)
        top_k = None if top_k is None or top_k <= 0 else int(top_k)
        greedy = temperature <= 0 or top_k == 1
        next_ids, _, cache = _prefill(self.graphdef, self.params, jnp.asarray(ids), jnp.asarray(lengths),
                                      key, 0, temp, cache_len=cache_len,
                                      repeat=num_samples, top_k=top_k, greedy=greedy)
        rows = [ToolRow() for _ in range(len(prompts) * num_samples)]
        # Pipelined: a row's next input is its forced token (known on the host before this step's sample is)
        # or its sample (still on the device), so step s+1 is dispatched before step s's tokens are read
        # back; the host's bookkeeping then overlaps the device's work. The last dispatch may go unused.
        for step in range(budget):
            forced_next = [row.forced[0] if row.forced else -1 for row in rows]
            if any(f >= 0 for f in forced_next):
                f = jnp.asarray(forced_next, jnp.int32)
                column_dev = jnp.where(f >= 0, f, next_ids)
            else:
                column_dev = next_ids
            if step + 1 < budget:
                following = _decode(self.graphdef, self.params, column_dev, cache, key, step + 1, temp,
                                    top_k=top_k, greedy=greedy)
            sampled = np.asarray(next_ids).tolist()
            column, masks = [], []
            for i, row in enumerate(rows):
                forced = bool(row.forced)
                tok = row.forced.popleft() if forced else sampled[i]
                column.append(tok)
                masks.append(0 if forced else 1)
                if tok in self.stop_tokens:
                    row.done = True
                self.tool(row, tok)
            yield column, masks
            if all(r.done for r in rows) or step + 1 == budget:
                return
            next_ids, _, cache = following

    def tool(self, row: ToolRow, tok: int) -> None:
        """After `tok` joined the row: collect a calculator call, and on its end queue the forced reply."""
        if not self.use_tool:
            return
        if tok == self.python_start:
            row.in_python, row.expr = True, []
        elif tok == self.python_end and row.in_python:
            row.in_python = False
            if row.expr:
                result = use_calculator(self.tokenizer.decode(row.expr))
                if result is not None:
                    row.forced.append(self.output_start)
                    row.forced.extend(self.tokenizer.encode(str(result)))
                    row.forced.append(self.output_end)
            row.expr = []
        elif row.in_python:
            row.expr.append(tok)

    def generate_batch(self, tokens, num_samples: int = 1, callback: Callable | None = None,
                       **kwargs) -> tuple[list[list[int]], list[list[int]]]:
        """(sequences, masks): each row's prompt + generated tokens, the stop token excluded; masks are 0 on
        the prompt and on forced tokens. `callback(token_column, mask_column)` sees every step (streaming)."""
        prompts = [list(tokens)] if tokens and isinstance(tokens[0], (int, np.integer)) else [list(p) for p in tokens]
        results = [list(p) for p in prompts for _ in range(num_samples)]
        masks = [[0] * len(p) for p in prompts for _ in range(num_samples)]
        done = [False] * len(results)
        for column, mask_column in self.generate(prompts, num_samples, **kwargs):
            if callback is not None:
                callback(column, mask_column)
            for i, (tok, m) in enumerate(zip(column, mask_column)):
                if done[i]:
                    continue
                if tok in self.stop_tokens:
                    done[i] = True
                else:
                    results[i].append(tok)
                    masks[i].append(m)
            if all(done):
                break
        return results, masks


# ---------------------------------------------------------------------------------------------------
# reference decoder without a cache (for tests and the benchmark)
@partial(jax.jit, static_argnames=("graphdef",))
def _full_logits_at(graphdef, state, tokens_BT, index):
    model = nnx.merge(graphdef, state)
    return model(tokens_BT)[:, index]  # all positions' logits, as nanochat's GPT.forward, then the last


def generate_naive(model, tokens: Sequence[int], max_tokens: int, pad_id: int = 0,
                   stop_tokens: set[int] | None = None, bucket_size: int = 64) -> list[int]:
    """Greedy decoding that recomputes the whole sequence every step (no cache): the prefix is padded to a
    multiple of `bucket_size` so only a few shapes compile. Returns the generated tokens."""
    graphdef, state = nnx.split(model)
    seq = list(tokens)
    out = []
    for _ in range(max_tokens):
        if len(seq) >= model.cfg.seq_len:
            break
        n = min(model.cfg.seq_len, -(-len(seq) // bucket_size) * bucket_size)
        ids = np.full((1, n), pad_id, np.int32)
        ids[0, :len(seq)] = seq
        tok = int(jnp.argmax(_full_logits_at(graphdef, state, jnp.asarray(ids), len(seq) - 1)[0]))
        out.append(tok)
        seq.append(tok)
        if stop_tokens and tok in stop_tokens:
            break
    return out
