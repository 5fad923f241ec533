"""Conversation pipelines for midtraining (`data.kind="mid"`) and SFT (`data.kind="sft"`; old name "chat").

Both read a task mixture (`data.train_tasks` / `data.val_tasks`, e.g. "smoltalk:train, mmlu/auxiliary_train:train,
gsm8k/main:train"; syntax in `nanojax.tasks.registry.parse_mixture`), shuffled once as nanochat's TaskMixture
(seed `data.mixture_seed`=42), render each conversation with `Tokenizer.render_conversation` and give
{"inputs", "targets"} int32 arrays of (this process's rows, T). Process p of P takes conversations p, p+P,
p+2P, ... of the mixture (nanochat's `range(rank, len, world)`): no overlap, nothing skipped. Strictly, that
is data stream s of S, S = the process count of the run's start (`nanojax.data.layout`): a resume on another
process count reads the same streams (several per process, or one shared by several processes).

SFT (nanochat launch `chat_sft.py`): each row is one conversation, cut to seq_len + 1 tokens (counted in
`stats["truncated"]`); inputs = ids[:-1], targets = ids[1:] with −1 wherever mask[1:] == 0 (user turns, tool
output, BOS) and on padding; inputs are padded with `<|assistant_end|>` (never a counted target). Rows are
padded to the longest conversation of the batch ROUNDED UP to the next length in a fixed set, so XLA
compiles a handful of shapes instead of one per batch. Default set (`data.pad_lengths=""`): powers of two
from 64 up to seq_len, plus seq_len itself (d20: 64, 128, 256, 512, 1024, 2048 = 6 shapes; tiny: 64, 128,
256). Powers of two bound the padding at < 2× the longest row of the batch, which costs little because
padded positions are cheap next to a recompile of the train step (tens of seconds at d20), and they match
the shapes the attention kernels tile well. Padding never changes the loss: padded targets are −1 and the
loss is the token-weighted mean over the whole accumulated batch (train.py). The val split is finite: the
same number of full batches on every process (len(mixture) // (P·rows)), in mixture order.

Midtraining (nanochat launch `mid_train.py`) concatenates the rendered conversations into rows of seq_len
with every token trained on: `nanojax.data.mid`. SFT with best-fit packed rows (nanochat HEAD's chat_sft.py,
`data.packing=bestfit`): `nanojax.data.sft_bestfit`.

Resume is exact: `get_state()` is a small JSON dict per stream (its position; for mid also the
conversation at the head of the token buffer, the offset into it and the rows of the current chunk already
returned), valid for the last batch returned; `set_state` on a fresh iterator continues with the very next
batch, also on another device or process count: every optimizer step holds the same rows as an
uninterrupted run (SFT pads them to other lengths, which changes no loss; midtraining cuts each stream
into the chunks of rows·T + 1 tokens of the run's first layout and hands them out in pieces). A background
thread keeps `data.prefetch` batches ready (rendering releases the GIL inside tiktoken); contents never
depend on it. Plain Python rather than Grain: the state is a few integers and rendering a batch takes
milliseconds.

Bad rows: a conversation that cannot be rendered raises, naming dataset, split and row; with
`data.skip_bad_rows=True` it is skipped, counted in `stats["bad_rows"]` and the first few are logged.

`python -m nanojax.data.chat count --config=configs/X.py` renders the train mixture once and prints its
rows, tokens and optimizer steps per epoch (for setting `train.num_iterations`).
"""
from __future__ import annotations

import copy
import queue
import sys
import threading
from typing import Any, Mapping

import numpy as np
from absl import app
from ml_collections import config_flags
from tqdm import tqdm

from nanojax.data import layout, mid, sft_bestfit
from nanojax.data.kinds import EPOCH_KINDS, canonical_kind
from nanojax.tasks.common import BadRowError, Task, TaskMixture
from nanojax.tasks.registry import build_task, parse_mixture, parse_sources, source_for
from nanojax.tokenizer import load_for_config

MIN_PAD_LENGTH = 64
MID_MAX_TOKENS = 2048  # midtraining cuts a conversation at max(this, seq_len) tokens (nanochat's render default)
_COUNTERS = ("batches", "conversations", "truncated", "bad_rows", "tokens", "target_tokens", "pad_tokens")
_MAX_LOGGED_BAD = 10


# ------------------------------------------------------------------------------------ padding lengths
def pad_lengths(seq_len: int, spec: str = "") -> list[int]:
    """The allowed row lengths: `spec` ("128,512,2048") or powers of two from 64 up to seq_len, plus seq_len."""
    if spec and spec.strip():
        lengths = sorted({int(s) for s in spec.split(",") if s.strip()})
        if not lengths or lengths[0] < 1 or lengths[-1] > seq_len:
            raise ValueError(f"data.pad_lengths={spec!r}: lengths must be in [1, seq_len={seq_len}]")
        return lengths if lengths[-1] == seq_len else lengths + [seq_len]
    lengths, n = [], MIN_PAD_LENGTH
    while n < seq_len:
        lengths.append(n)
        n *= 2
    return lengths + [seq_len]


def round_up(n: int, lengths: list[int]) -> int:
    i = int(np.searchsorted(lengths, n, side="left"))
    if i == len(lengths):
        raise ValueError(f"row of {n} tokens is longer than the largest padding length {lengths[-1]}")
    return lengths[i]


# --------------------------------------------------------------------------------------- SFT batches
def sft_batch(rendered: list[tuple[list[int], list[int]]], lengths: list[int], pad_id: int,
              length: int | None = None) -> dict[str, np.ndarray]:
    """(ids, mask) pairs -> inputs (padded with pad_id) and targets (−1 on mask 0 and on padding), rows of
    `length` or else the longest row rounded up to one of `lengths`."""
    T = length or round_up(max(len(ids) - 1 for ids, _ in rendered), lengths)
    inputs = np.full((len(rendered), T), pad_id, dtype=np.int32)
    targets = np.full((len(rendered), T), -1, dtype=np.int32)
    for r, (ids, mask) in enumerate(rendered):
        ids_n, mask_n = np.asarray(ids, np.int32), np.asarray(mask, np.int32)
        n = len(ids_n) - 1
        inputs[r, :n] = ids_n[:-1]
        targets[r, :n] = np.where(mask_n[1:] == 1, ids_n[1:], -1)
    return {"inputs": inputs, "targets": targets}


class _Stream:
    """Conversations s, s+S, ... of `dataset` (data stream s of S), epoch after epoch; rendering + bad-row rule."""

    def __init__(self, dataset: Task, tokenizer, *, stream: int, stream_count: int, max_tokens: int,
                 skip_bad_rows: bool, quiet: bool = False):
        self.dataset, self.tokenizer, self.stream, self.stream_count = dataset, tokenizer, stream, stream_count
        self.per_epoch = len(range(stream, len(dataset), stream_count))
        if self.per_epoch == 0:
            raise ValueError(f"{dataset!r} has {len(dataset)} conversations: none for data stream {stream} of "
                             f"{stream_count} (one per process)")
        self.max_tokens, self.skip_bad_rows, self.quiet = max_tokens, skip_bad_rows, quiet
        self.stats = _new_stats()

    def index(self, k: int) -> int:
        return self.stream + (k % self.per_epoch) * self.stream_count

    def render(self, k: int):
        """(ids, mask) of the stream's k-th conversation, or None for a skipped bad row."""
        i = self.index(k)
        try:
            conversation = self.dataset[i]
            ids, mask = self.tokenizer.render_conversation(conversation, max_tokens=10**9)
        except (BadRowError, ValueError) as e:
            if not self.skip_bad_rows:
                if isinstance(e, BadRowError):
                    raise
                raise BadRowError(f"{self.dataset!r} position {i}: {e} (set data.skip_bad_rows=True to skip "
                                  f"such rows)") from e
            self.stats["bad_rows"] += 1
            if self.stats["bad_rows"] <= _MAX_LOGGED_BAD and not self.quiet:
                print(f"[chat data] skipping bad row ({self.stats['bad_rows']}): {e}", file=sys.stderr, flush=True)
            return None
        self.stats["conversations"] += 1
        if len(ids) > self.max_tokens:
            self.stats["truncated"] += 1
            ids, mask = ids[: self.max_tokens], mask[: self.max_tokens]
        return ids, mask


def _process_view(streams: list, positions: list[int]) -> dict:
    """"epoch" and "stats" of this process: its streams' counters summed, the furthest epoch."""
    stats = {k: sum(s.stats[k] for s in streams) for k in _COUNTERS}
    return {"epoch": max(k // s.per_epoch for s, k in zip(streams, positions)), "stats": stats}


class _SFTSource:
    """SFT rows: one conversation per row; each micro-batch takes `stream_rows` conversations of every stream.

    Every process must pad a micro-batch to the same length (the global batch is one array), so each
    process renders every stream's conversations of the micro-batch, for their lengths: no communication,
    and cheap (SFT steps hold a few dozen conversations in all). It therefore knows every stream's position
    and counters, and its state holds them all."""

    def __init__(self, open_stream, *, batch_size: int, process_index: int, process_count: int, lengths: list[int],
                 pad_id: int, finite: bool):
        self.open_stream = open_stream  # (stream, stream count, quiet) -> _Stream
        self.batch_size, self.process_index, self.process_count = batch_size, process_index, process_count
        self.lengths, self.pad_id, self.finite = lengths, pad_id, finite
        self._arrange(process_count)

    def _arrange(self, stream_count: int) -> None:
        self.shares = layout.shares(stream_count, self.process_index, self.process_count)
        self.stream_rows = layout.stream_rows(self.batch_size, self.process_count, stream_count)
        owned = {share.stream for share in self.shares}
        self.streams = [self.open_stream(s, stream_count, s not in owned) for s in range(stream_count)]
        self.ks = [0] * stream_count
        dataset_rows = len(self.streams[0].dataset)  # finite: the same number of full batches on every process
        self.num_batches = dataset_rows // (stream_count * self.stream_rows) if self.finite else None

    def _take(self, q: int) -> list:
        stream, rendered = self.streams[q], []
        while len(rendered) < self.stream_rows:
            if self.finite and self.ks[q] >= stream.per_epoch:
                raise StopIteration  # finite split ran out (only possible with skipped bad rows)
            item = stream.render(self.ks[q])
            self.ks[q] += 1
            if item is not None and len(item[0]) >= 2:
                rendered.append(item)
        return rendered

    def next_batch(self) -> dict[str, np.ndarray]:
        if self.finite and self.streams[0].stats["batches"] >= self.num_batches:
            raise StopIteration
        per_stream = [self._take(q) for q in range(len(self.streams))]
        length = round_up(max(len(ids) - 1 for rendered in per_stream for ids, _ in rendered), self.lengths)
        for stream, rendered in zip(self.streams, per_stream):
            st, n_tokens = stream.stats, sum(len(ids) - 1 for ids, _ in rendered)
            st["batches"] += 1
            st["tokens"] += n_tokens
            st["target_tokens"] += sum(int(np.count_nonzero(np.asarray(mask[1:]) == 1)) for _, mask in rendered)
            st["pad_tokens"] += len(rendered) * length - n_tokens
        return layout.concat_rows([layout.share_rows(sft_batch(per_stream[share.stream], self.lengths, self.pad_id,
                                                               length), share) for share in self.shares])

    def get_state(self) -> dict:
        owned = [share.stream for share in self.shares]
        return {"stream_count": len(self.streams),
                "streams": {str(q): {"k": k, "stats": dict(s.stats)} for q, (s, k) in enumerate(zip(self.streams,
                                                                                                   self.ks))},
                **_process_view([self.streams[q] for q in owned], [self.ks[q] for q in owned])}

    def set_state(self, state: Mapping[str, Any]) -> None:
        def legacy(index, writers, saved):  # before streams: {"k", "ks": every process's k, "stats": its own}
            ks = saved.get("ks", [saved["k"]])
            return len(ks), {q: {"k": k, "stats": saved["stats"] if q == index else _new_stats()}
                             for q, k in enumerate(ks)}

        count, saved = layout.saved_streams(state, self.process_index, self.process_count, legacy)
        layout.require(saved, range(count), count, self.process_index, self.process_count)
        if any("buffer" in entry for entry in saved.values()):
            raise ValueError("the data state was saved by SFT with best-fit packing (data.packing='bestfit'); "
                             "resume it with that packing, or start a new run for one conversation per row")
        self._arrange(count)
        self.ks = [int(saved[q]["k"]) for q in range(count)]
        for q, stream in enumerate(self.streams):
            stream.stats.update(saved[q]["stats"])


class ChatIterator:
    """The loop-facing iterator: next() -> batch dict; get_state()/set_state(); close(); `stats`."""

    def __init__(self, source, *, prefetch: int = 2, description: str = "", announce: bool = False):
        self.source, self.prefetch, self.description = source, max(0, prefetch), description
        self.announce = announce  # print the counters when an epoch completes
        self._state = copy.deepcopy(source.get_state())
        self._thread = None
        self._queue = None
        self._stop = threading.Event()
        self._done = False

    # -- producer thread
    def _run(self, q: queue.Queue, stop: threading.Event):
        while not stop.is_set():
            try:
                item = ("batch", self.source.next_batch(), copy.deepcopy(self.source.get_state()))
            except StopIteration:
                item = ("stop", None, None)
            except BaseException as e:  # noqa: BLE001 (re-raised in the consumer)
                item = ("error", e, None)
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[0] != "batch":
                return

    def _start(self):
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=self.prefetch)
        self._thread = threading.Thread(target=self._run, args=(self._queue, self._stop), daemon=True,
                                        name="chat-data")
        self._thread.start()

    def _halt(self):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._done:
            raise StopIteration
        if self.prefetch == 0:
            try:
                batch = self.source.next_batch()
            except StopIteration:
                self._done = True
                raise
            self._set(copy.deepcopy(self.source.get_state()))
            return batch
        if self._thread is None:
            self._start()
        kind, value, state = self._queue.get()
        if kind == "stop":
            self._done = True
            self._halt()
            raise StopIteration
        if kind == "error":
            self._halt()
            raise value
        self._set(state)
        return value

    def _set(self, state: dict) -> None:
        if self.announce and state["epoch"] > self._state["epoch"]:
            print(f"[chat data] epoch {self._state['epoch']} done: "
                  + ", ".join(f"{k} {v:,}" for k, v in state["stats"].items()), flush=True)
        self._state = state

    def get_state(self) -> dict:
        return copy.deepcopy(self._state)

    def set_state(self, state: Mapping[str, Any]) -> None:
        self._halt()
        self.source.set_state(copy.deepcopy(dict(state)))
        self._state = copy.deepcopy(self.source.get_state())
        self._done = False

    @property
    def stats(self) -> dict:
        return dict(self._state["stats"], epoch=self._state["epoch"])

    def close(self) -> None:
        self._halt()

    def __del__(self):
        try:
            self._halt()
        except Exception:  # noqa: BLE001
            pass

    def __repr__(self):
        return f"ChatIterator({self.description})"


# ------------------------------------------------------------------------------------------ factories
def _new_stats() -> dict:
    return {k: 0 for k in _COUNTERS}


def make_sft_iterator(dataset: Task, tokenizer, *, batch_size: int, seq_len: int, process_index: int = 0,
                      process_count: int = 1, finite: bool = False, lengths: list[int] | None = None,
                      skip_bad_rows: bool = False, prefetch: int = 2) -> ChatIterator:
    """SFT batches of `batch_size` conversations (this process's rows); finite=True: one pass, the same
    number of batches on every process."""
    def open_stream(stream: int, stream_count: int, quiet: bool) -> _Stream:
        return _Stream(dataset, tokenizer, stream=stream, stream_count=stream_count, max_tokens=seq_len + 1,
                       skip_bad_rows=skip_bad_rows, quiet=quiet)

    if finite and len(dataset) < process_count * batch_size:
        raise ValueError(f"{dataset!r} has {len(dataset)} conversations: fewer than one batch of {batch_size} "
                         f"rows on each of {process_count} processes")
    source = _SFTSource(open_stream, batch_size=batch_size, process_index=process_index, process_count=process_count,
                        lengths=lengths or pad_lengths(seq_len), pad_id=tokenizer.encode_special("<|assistant_end|>"),
                        finite=finite)
    return ChatIterator(source, prefetch=prefetch, announce=process_index == 0 and not finite,
                        description=f"sft {dataset!r}, process {process_index}/{process_count}, {batch_size} rows, "
                                    f"T<= {seq_len}")


def make_sft_bestfit_iterator(dataset: Task, tokenizer, *, batch_size: int, seq_len: int, process_index: int = 0,
                              process_count: int = 1, finite: bool = False, buffer_size: int =
                              sft_bestfit.HEAD_SFT_BUFFER, skip_bad_rows: bool = False,
                              prefetch: int = 2) -> ChatIterator:
    """SFT batches of `batch_size` rows of seq_len tokens, conversations packed best-fit (nanochat HEAD)."""
    def open_stream(stream: int, stream_count: int, quiet: bool) -> _Stream:
        return _Stream(dataset, tokenizer, stream=stream, stream_count=stream_count,
                       max_tokens=sft_bestfit.max_conversation_tokens(seq_len), skip_bad_rows=skip_bad_rows,
                       quiet=quiet)

    source = sft_bestfit.BestFitSFTSource(open_stream, batch_size=batch_size, seq_len=seq_len,
                                          buffer_size=buffer_size, bos=tokenizer.bos_token_id, finite=finite,
                                          process_index=process_index, process_count=process_count,
                                          process_view=_process_view)
    return ChatIterator(source, prefetch=prefetch, announce=process_index == 0 and not finite,
                        description=f"sft best-fit {dataset!r}, process {process_index}/{process_count}, "
                                    f"{batch_size}x{seq_len}, buffer {buffer_size}")


def make_mid_iterator(dataset: Task, tokenizer, *, batch_size: int, seq_len: int, process_index: int = 0,
                      process_count: int = 1, skip_bad_rows: bool = False, prefetch: int = 2,
                      announce: bool = True) -> ChatIterator:
    """Midtraining batches: packed (batch_size, seq_len) rows of the rendered conversation stream."""
    def open_stream(stream: int, stream_count: int, quiet: bool) -> _Stream:
        return _Stream(dataset, tokenizer, stream=stream, stream_count=stream_count,
                       max_tokens=max(MID_MAX_TOKENS, seq_len), skip_bad_rows=skip_bad_rows, quiet=quiet)

    source = mid.MidSource(open_stream, batch_size=batch_size, seq_len=seq_len, process_index=process_index,
                           process_count=process_count, process_view=_process_view)
    return ChatIterator(source, prefetch=prefetch, announce=process_index == 0 and announce,
                        description=f"mid {dataset!r}, process {process_index}/{process_count}, "
                                    f"{batch_size}x{seq_len}")


_TASK_CACHE: dict = {}


def build_mixture(spec: str, sources: str = "", seed: int = 42) -> Task:
    """The Task a mixture spec names: one entry -> that task; several -> TaskMixture (cached per spec)."""
    key = (spec, sources, seed)
    if key not in _TASK_CACHE:
        src = parse_sources(sources)
        tasks = []
        for entry in parse_mixture(spec):
            tkey = (entry["name"], entry["subset"], entry["split"], entry["start"], entry["stop"],
                    source_for(src, entry["name"], entry["subset"]))
            if tkey not in _TASK_CACHE:
                _TASK_CACHE[tkey] = build_task(entry, src)
            tasks.append(_TASK_CACHE[tkey])
        _TASK_CACHE[key] = tasks[0] if len(tasks) == 1 else TaskMixture(tasks, seed=seed)
    return _TASK_CACHE[key]


def make_chat_iterator_from_config(config, *, split: str, batch_size: int, process_index: int,
                                   process_count: int, tokenizer) -> ChatIterator:
    """The loop's entry point for data.kind in {"sft", "mid"}; split "train" or "val"."""
    d = config.data
    kind = canonical_kind(d.kind)
    if tokenizer is None:
        raise ValueError(f"data.kind={d.kind!r} needs a tokenizer (data.tokenizer_dir)")
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    spec = d.train_tasks if split == "train" else d.val_tasks
    if not spec:
        raise ValueError(f"data.{'train' if split == 'train' else 'val'}_tasks is empty: name the task mixture, "
                         f"e.g. 'smoltalk:train, gsm8k/main:train'")
    dataset = build_mixture(spec, d.task_sources, d.mixture_seed)
    seq_len = config.model.seq_len
    common = dict(batch_size=batch_size, seq_len=seq_len, process_index=process_index,
                  process_count=process_count, skip_bad_rows=d.skip_bad_rows, prefetch=d.prefetch)
    if kind == "sft" and d.packing == "bestfit":
        return make_sft_bestfit_iterator(dataset, tokenizer, finite=split == "val", buffer_size=d.sft_bestfit_buffer,
                                         **common)
    if kind == "sft":
        return make_sft_iterator(dataset, tokenizer, finite=split == "val",
                                 lengths=pad_lengths(seq_len, d.pad_lengths), **common)
    if kind == "mid" and d.packing != "concat":
        raise ValueError(f"data.packing={d.packing!r}: midtraining packs conversations by concatenation only "
                         f"(nanochat HEAD has no midtraining; its SFT is data.kind='sft', data.packing='bestfit')")
    if kind == "mid":
        return make_mid_iterator(dataset, tokenizer, announce=split == "train", **common)
    raise ValueError(f"make_chat_iterator_from_config: data.kind={d.kind!r} is not sft|mid")


# ------------------------------------------------------------------------------------------------ CLI
def count_epoch(config, tokenizer, *, progress: bool = False) -> dict:
    """Rows, tokens and optimizer steps in one epoch of the train mixture (renders every conversation): SFT
    rows are conversations, or best-fit packed rows of one stream (`data.packing=bestfit`); midtraining steps
    are the stream's tokens over the batch."""
    d, seq_len = config.data, config.model.seq_len
    if config.train.total_batch_size == -1 and config.optim.get("kind") == "head":
        from nanojax.optim_head import fill_head_batch  # (lazy: it builds the model to count parameters)

        fill_head_batch(config)  # HEAD's automatic batch, which the epoch is cut into
    dataset = build_mixture(d.train_tasks, d.task_sources, d.mixture_seed)
    kind = canonical_kind(d.kind)
    packed = kind == "sft" and d.packing == "bestfit"
    limit = (max(MID_MAX_TOKENS, seq_len) if kind == "mid" else
             sft_bestfit.max_conversation_tokens(seq_len) if packed else seq_len + 1)
    lengths, bad, truncated = [], 0, 0
    for i in tqdm(range(len(dataset)), desc="rendering the mixture", unit="conv", disable=not progress,
                  mininterval=5):
        try:
            ids, _ = tokenizer.render_conversation(dataset[i], max_tokens=10**9)
        except ValueError:
            bad += 1
            continue
        truncated += len(ids) > limit
        lengths.append(min(len(ids), limit))
    rows_per_step = config.train.total_batch_size // seq_len
    if kind == "mid":
        rows = sum(lengths) // seq_len
        steps = sum(lengths) // config.train.total_batch_size  # each micro-batch also drops one boundary token
    elif packed:
        rows = sft_bestfit.count_rows(lengths, seq_len=seq_len, buffer_size=d.sft_bestfit_buffer)
        steps = rows // rows_per_step
    else:
        rows = len(lengths)
        steps = rows // rows_per_step
    return {"conversations": len(lengths), "rows": rows, "bad_rows": bad, "truncated": truncated,
            "tokens": sum(lengths), "steps_per_epoch": steps}


def fill_epoch_iterations(config, tokenizer) -> None:
    """train.num_iterations = -1 in a conversation stage: one epoch of the train mixture, counted here (every
    conversation rendered once; the count does not depend on the device or process count)."""
    if canonical_kind(config.data.kind) not in EPOCH_KINDS or config.train.num_iterations != -1:
        return
    stats = count_epoch(config, tokenizer, progress=True)
    if stats["steps_per_epoch"] < 1:
        raise ValueError(f"train.num_iterations=-1 (one epoch): the train mixture {config.data.train_tasks!r} fills "
                         f"no step of {config.train.total_batch_size:,} tokens ({stats})")
    config.train.num_iterations = stats["steps_per_epoch"]
    print(f"[chat data] one epoch = {stats['steps_per_epoch']:,} steps: "
          + ", ".join(f"{k} {v:,}" for k, v in stats.items() if k != "steps_per_epoch"), flush=True)


def main(argv):
    if len(argv) != 2 or argv[1] != "count" or _CONFIG.value is None:
        raise SystemExit("usage: python -m nanojax.data.chat count --config=configs/X.py [--config.a.b=v]")
    stats = count_epoch(_CONFIG.value, load_for_config(_CONFIG.value), progress=True)
    print(" | ".join(f"{k} {v:,}" for k, v in stats.items()))
    print(f"one epoch: --config.train.num_iterations={stats['steps_per_epoch']}")


if __name__ == "__main__":
    _CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.", lock_config=True)
    app.run(main)
