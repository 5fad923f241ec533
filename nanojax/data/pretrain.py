"""Pretraining pipeline (Grain): parquet text -> BOS + tokens -> packed rows of T+1 -> (inputs, targets).

Per process, per epoch:
  1. Every (file, row group) of the split is a unit. The global unit list is permuted with (seed, epoch)
     (train; val keeps file order) and process p takes units p, p+P, p+2P, ... so no document is read by
     two processes and none is skipped. Row groups (1,024 documents in FineWeb-Edu) balance hosts far
     better than whole shards; with more processes than row groups, row groups are cut into row ranges.
  2. `grain.MapDataset` maps each unit to its tokens: pyarrow reads the row group, tiktoken tokenizes
     its documents as ordinary text (a pool of `tokenizer_threads`), BOS goes before every document,
     empty documents are skipped and counted. `to_iter_dataset` runs `read_threads` units at once.
  3. `_Pack` concatenates the token stream and cuts it into batch_size rows of seq_len + 1 tokens
     (nanochat at launch: rows may start mid-document, nothing is padded); inputs = row[:-1],
     targets = row[1:]. A finite split drops the final partial batch (jit needs fixed shapes).
     `packing="bestfit"` packs with `nanojax.data.bestfit` instead (nanochat HEAD: every row starts with BOS).
  4. A background thread keeps `prefetch` batches ready (optionally worker processes, `worker_count`).

Resume is exact: the iterator state is a small JSON dict per data stream (the position of the first row
group still in the packing buffer plus an offset into it, in tokens), so `set_state` on a fresh iterator
continues with the very next batch; the train loop saves it with each checkpoint (one JSON file per process,
`nanojax.checkpoint.DataStateHandler`). Above, "process p of P" is really "data stream s of S", S = the process
count of the run that started (`nanojax.data.layout`): a resume on another process count runs the same streams,
several per process or one shared by several, and a resume on another device count only asks the packer for
another number of rows at a time. Either way every optimizer step holds the same rows as an uninterrupted run
(except with `worker_count` > 0, whose workers interleave whole batches: that resume is refused).
The loop measures data stalls by timing `next(iterator)`; `iterator.stats` counts documents, empty
documents, row groups, batches and the epoch, consistent with the batches returned so far.

Not used, on purpose: grain.experimental.ParquetIterDataset (whole files per worker: fails with fewer
files than workers, no row-group split between hosts) and ConcatThenSplitIterDataset (adds segment and
position fields and pads the final row; nanochat's stream is plain concatenation).
"""
from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import json
import os
import sys
import threading
from typing import Any, Sequence

import grain
import numpy as np
from absl import flags

from nanojax.data import bestfit, fineweb, layout

_COUNTERS = bestfit.COUNTERS
PACKINGS = ("concat", "bestfit")


def row_groups(files: Sequence[str], threads: int = 16) -> list[tuple[int, int]]:
    """(file index, row group) for every row group of every file; footers read in parallel.

    Fails naming the file when one does not read (a truncated shard must never be skipped silently).
    """
    def count(path):
        try:
            return fineweb.open_parquet(path).metadata.num_row_groups
        except Exception as e:  # noqa: BLE001
            raise fineweb.CorruptShardError(
                f"{path}: not a readable parquet file ({type(e).__name__}: {e}); if it is a FineWeb shard, "
                "`python -m nanojax.data.fineweb download` moves a corrupt shard aside and fetches it again"
            ) from e

    with concurrent.futures.ThreadPoolExecutor(max(1, min(threads, len(files)))) as pool:
        counts = list(pool.map(lambda path: count(fineweb.require_text_column(path)), files))
    return [(f, g) for f, n in enumerate(counts) for g in range(n)]


def data_fingerprint(files: Sequence[str], units, seed: int, shuffle: bool) -> str:
    """Short hash of what decides the token stream: shard names (not their directory), row groups, seed."""
    names = [f.rstrip("/").rsplit("/", 1)[-1] for f in files]
    return hashlib.sha256(json.dumps([names, len(units), seed, bool(shuffle)]).encode()).hexdigest()[:16]


class _Units:
    """Random-access source: local index i -> (epoch, file, row group, part, parts) for one data stream
    (`process_index` of `process_count`: the streams are the processes of the run's first layout).

    Units are row groups; only when streams outnumber row groups (e.g. the single val shard on a
    64-host pod) is each row group cut into `parts` row ranges, so every stream still gets work.
    len = units per epoch x num_epochs (sys.maxsize when repeating forever). Pure function of
    (seed, epoch, process), so any index can be recomputed after a restart.
    """

    def __init__(self, row_groups, *, process_index, process_count, seed, shuffle, num_epochs):
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in 0..{process_count - 1}")
        if not row_groups:
            raise ValueError("no row groups to read")
        parts = -(-process_count // len(row_groups))
        self.units = [(f, g, j, parts) for f, g in row_groups for j in range(parts)]
        self.p, self.n_proc = process_index, process_count
        self.seed, self.shuffle, self.num_epochs = seed, shuffle, num_epochs
        self._cache = None
        self.per_epoch = len(range(process_index, len(self.units), process_count))

    def __len__(self) -> int:
        return sys.maxsize if self.num_epochs is None else self.per_epoch * self.num_epochs

    def _order(self, epoch: int) -> np.ndarray:
        cached = self._cache  # (epoch, order); one tuple read/write, so safe across reader threads
        if cached is None or cached[0] != epoch:
            n = len(self.units)
            order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._cache = cached = (epoch, order)
        return cached[1]

    def __getitem__(self, i: int) -> tuple[int, ...]:
        epoch, k = divmod(int(i), self.per_epoch)
        return (epoch, *self.units[int(self._order(epoch)[self.p + k * self.n_proc])])


_POOLS: dict[tuple[int, int], concurrent.futures.ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _pool(threads: int) -> concurrent.futures.ThreadPoolExecutor:
    """One tokenizer pool per size per process, shared by every iterator (evals recreate theirs often)."""
    key = (os.getpid(), threads)  # a forked child must not reuse its parent's (threadless) pool
    with _POOLS_LOCK:
        if key not in _POOLS:
            _POOLS[key] = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="tokenize")
        return _POOLS[key]


class _ReadTokenize:
    """(epoch, file, row group) -> {"tokens": int32[n], counters}; BOS before every non-empty document.

    Documents are encoded in 8 x `threads` contiguous chunks on one pool of `threads` threads shared
    by all reading threads (so `threads`, not read_threads x threads, bounds the encoders), with
    tiktoken's `encode_to_numpy(allowed_special=set(), disallowed_special=())`: the ids of
    `encode_ordinary` (special tokens written in the text stay plain text) without building Python int
    lists; 15-20% less CPU per token than `encode_ordinary_batch` + numpy (measured on this machine).
    """

    def __init__(self, files, encoding, bos: int, threads: int):
        self.files, self.encoding, self.bos, self.threads = list(files), encoding, int(bos), max(1, threads)
        self._bos = np.array([bos], np.int32)

    def _encode(self, texts: list[str]) -> np.ndarray:
        pieces = []
        for text in texts:
            ids = self.encoding.encode_to_numpy(text, allowed_special=set(), disallowed_special=())
            pieces += (self._bos, ids.view(np.int32))
        return np.concatenate(pieces) if pieces else np.zeros(0, np.int32)

    def __call__(self, unit) -> dict[str, Any]:
        epoch, f, g, part, parts = unit
        try:
            col = fineweb.open_parquet(self.files[f]).read_row_group(g, columns=["text"]).column(0)
        except Exception as e:  # noqa: BLE001 - name the file, never skip it
            raise fineweb.CorruptShardError(f"{self.files[f]}: row group {g} does not read "
                                            f"({type(e).__name__}: {e})") from e
        if parts > 1:
            lo, hi = part * len(col) // parts, (part + 1) * len(col) // parts
            col = col.slice(lo, hi - lo)
        texts = [t for t in col.to_pylist() if t]
        step = max(1, -(-len(texts) // (8 * self.threads)))
        chunks = [texts[i:i + step] for i in range(0, len(texts), step)]
        tokens = np.concatenate([np.zeros(0, np.int32), *_pool(self.threads).map(self._encode, chunks)])
        return {"tokens": tokens, "unit": unit, "epoch": epoch, "row_groups": 1, "documents": len(texts),
                "empty_documents": len(col) - len(texts), "tokens_read": len(tokens)}


class _Pack(grain.IterDataset):
    """Concatenate token arrays and cut batch_size x (seq_len + 1) windows; see _PackIterator."""

    def __init__(self, parent: grain.IterDataset, batch_size: int, seq_len: int, max_empty: int, meta: dict):
        super().__init__(parent)
        self.batch_size, self.seq_len, self.max_empty, self.meta = batch_size, seq_len, max_empty, meta

    def __iter__(self):
        return _PackIterator(self._parent.__iter__(), self.batch_size, self.seq_len, self.max_empty,
                             self.meta)

    def __str__(self):
        return f"_Pack(batch_size={self.batch_size}, seq_len={self.seq_len})"


class _PackIterator(grain.DatasetIterator):
    """State = parent state before the oldest row group still buffered + offset into it + counters.

    That is all a restart needs: re-reading that row group and skipping `offset` tokens rebuilds the
    buffer exactly, and the state stays a few hundred bytes however large the buffer is.
    """

    def __init__(self, parent, batch_size: int, seq_len: int, max_empty: int, meta: dict):
        super().__init__(parent)
        self._max_empty = max_empty  # a whole epoch without a token: stop rather than spin forever
        self._meta = meta  # what the state is only valid for (checked by set_state)
        self._need = batch_size * (seq_len + 1)
        self._shape = (batch_size, seq_len + 1)
        self._reset({"parent": parent.get_state(), "offset": 0, "batches": 0, "epoch": 0,
                     **{k: 0 for k in _COUNTERS}})

    def _reset(self, state):
        self._buf = collections.deque()  # [parent state before, tokens, element]
        self._offset = state["offset"]  # consumed tokens of _buf[0], or to skip in the next element
        self._base = {k: state[k] for k in ("batches", "epoch", *_COUNTERS)}  # counters before _buf[0]
        self._batches = state["batches"]

    def _available(self) -> int:
        return sum(len(b[1]) for b in self._buf) - self._offset

    def __next__(self):
        self._assert_not_closed()
        empty = 0
        while self._available() < self._need:
            before = self._parent.get_state()
            try:
                el = next(self._parent)
            except StopIteration:
                raise StopIteration from None  # finite split: the final partial batch is dropped
            self._buf.append([before, el["tokens"], el])
            empty = 0 if len(el["tokens"]) else empty + 1
            if empty >= self._max_empty:
                raise ValueError(f"{empty} row groups in a row (a whole epoch of this process's share) hold "
                                 "no text: every document is empty, or there are far more processes than "
                                 "documents")
        pieces, need = [], self._need
        while need:
            _, toks, el = self._buf[0]
            take = min(need, len(toks) - self._offset)
            pieces.append(toks[self._offset:self._offset + take])
            self._offset += take
            need -= take
            if self._offset == len(toks):  # fully consumed: fold its counters into the base
                self._buf.popleft()
                self._offset = 0
                for k in _COUNTERS:
                    self._base[k] += el[k]
                self._base["epoch"] = el["epoch"]
        self._batches += 1
        rows = np.concatenate(pieces).reshape(self._shape)
        return {"inputs": np.ascontiguousarray(rows[:, :-1]), "targets": np.ascontiguousarray(rows[:, 1:])}

    def get_state(self) -> dict[str, Any]:
        parent = self._buf[0][0] if self._buf else self._parent.get_state()
        stats = dict(self._base, batches=self._batches)  # for reporting: includes buffered row groups
        for _, _, el in self._buf:
            for k in _COUNTERS:
                stats[k] += el[k]
            stats["epoch"] = el["epoch"]
        return {"parent": parent, "offset": int(self._offset), **self._base, "batches": self._batches,
                "stats": stats, "meta": self._meta}

    def set_state(self, state: dict[str, Any]) -> None:
        saved = dict(state.get("meta", self._meta))
        if "batch" in saved:  # written before data streams: {"process": [p, P], "batch": [rows, seq_len]}
            saved["seq_len"] = saved["batch"][1]
        bestfit.require_same_pipeline(saved, self._meta)
        self._parent.set_state(state["parent"])
        self._reset(state)
        if self._offset:  # re-read the partly consumed row group now, so get_state stays exact
            before = self._parent.get_state()
            el = next(self._parent)
            self._buf.append([before, el["tokens"], el])


def _packer_states(state) -> list[dict]:
    """The packer states (concat or best-fit) inside a (possibly multi-worker) grain state, whatever its nesting."""
    if isinstance(state, dict):
        if "stats" in state and "meta" in state:
            return [state]
        return [s for v in state.values() for s in _packer_states(v)]
    if isinstance(state, (list, tuple)):
        return [s for v in state for s in _packer_states(v)]
    return []


def _legacy_stream(index: int, writers: int, state: dict) -> tuple[int, dict[int, dict]]:
    """A process's state from before data streams (its reader's state): process p of P read stream p of P."""
    packers = _packer_states(state)
    stream, count = packers[0]["meta"]["process"]
    workers = 0 if packers[0] is state else len(packers)
    return count, {stream: {"reader": state, "rows": packers[0]["meta"]["batch"][0], "workers": workers}}


class PretrainIterator(grain.DatasetIterator):
    """Yields {"inputs", "targets"}: int32 [batch_size, seq_len], this process's rows of the run's data streams
    (`nanojax.data.layout`): one reader (grain pipeline) per stream it reads. Checkpointable, closeable.

    `stats` (dict) is consistent with the batches returned so far, summed over this process's readers: epoch,
    batches, row_groups, documents, empty_documents, tokens_read (including tokens still waiting in the packing
    buffer). `set_state` takes one process's state or every process's (`DataStateHandler.restore`), re-arranges
    the readers for the stream count it names, and refuses a state saved for other shards, seed or seq_len.
    """

    def __init__(self, open_stream, *, batch_size: int, process_index: int, process_count: int, worker_count: int,
                 summary: str):
        super().__init__()
        self._readers: list[grain.DatasetIterator] = []
        self._open_stream = open_stream  # (stream, stream count, rows) -> (grain iterator, fingerprint, _Units)
        self._batch_size, self._worker_count, self._summary = batch_size, worker_count, summary
        self._process = process_index, process_count
        self._arrange(process_count)

    def _arrange(self, stream_count: int) -> None:
        """Open a reader for each stream this process reads when the run's data has `stream_count` streams."""
        p, P = self._process
        owned = layout.shares(stream_count, p, P)
        rows = layout.stream_rows(self._batch_size, P, stream_count)
        self._close_readers()
        opened = [self._open_stream(share.stream, stream_count, rows) for share in owned]
        self._readers = [reader for reader, _, _ in opened]
        self._shares, self._stream_count, self._stream_rows = owned, stream_count, rows
        _, self.fingerprint, units = opened[0]  # the same on every host of a run: the loop may assert it across hosts
        self.description = self._summary.format(units=len(units.units), per_epoch=units.per_epoch,
                                                streams=layout.describe(stream_count, owned))

    def _close_readers(self) -> None:
        for reader in self._readers:
            reader.close()

    def __next__(self):
        self._assert_not_closed()
        parts = [layout.share_rows(next(reader), share) for reader, share in zip(self._readers, self._shares)]
        if len(parts) == 1:
            return parts[0]
        return {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}

    def get_state(self) -> dict[str, Any]:
        return {"stream_count": self._stream_count,
                "streams": {str(share.stream): {"reader": reader.get_state(), "rows": self._stream_rows,
                                                "workers": self._worker_count}
                            for share, reader in zip(self._shares, self._readers)}}

    def set_state(self, state: dict[str, Any]) -> None:
        p, P = self._process
        count, saved = layout.saved_streams(state, p, P, _legacy_stream)
        owned = layout.shares(count, p, P)
        layout.require(saved, [share.stream for share in owned], count, p, P)
        rows = layout.stream_rows(self._batch_size, P, count)
        first = saved[owned[0].stream]
        was, now = (first["workers"], count, first["rows"]), (self._worker_count, P, rows)
        if (was[0] or now[0]) and was != now:
            raise ValueError(
                "data.worker_count > 0 interleaves its workers' batches, so the data order depends on the batch "
                f"layout: this state was written with worker_count={was[0]}, {was[1]} processes and {was[2]} rows per "
                f"process per micro-batch, this run has {now[0]}, {now[1]} and {now[2]}; resume with the layout it was "
                "written with, or train with data.worker_count=0 (it resumes exactly on any layout)")
        if (count, rows) != (self._stream_count, self._stream_rows):
            self._arrange(count)
        for share, reader in zip(self._shares, self._readers):
            reader.set_state(saved[share.stream]["reader"])

    @property
    def stats(self) -> dict[str, int]:
        packers = [s for reader in self._readers for s in _packer_states(reader.get_state())]  # + one per worker
        out = {k: sum(s["stats"][k] for s in packers) for k in ("batches", *_COUNTERS)}
        out["epoch"] = max(s["stats"]["epoch"] for s in packers)
        return out

    def close(self) -> None:
        self._close_readers()
        super().close()

    def __repr__(self):
        return f"PretrainIterator({self.description})"


def make_pretrain_iterator(files: Sequence, tokenizer, *, batch_size: int, seq_len: int,
                           process_index: int = 0, process_count: int = 1, seed: int = 0,
                           read_threads: int = 2, tokenizer_threads: int = 2, prefetch: int = 2,
                           worker_count: int = 0, shuffle: bool = True, num_epochs: int | None = None,
                           packing: str = "concat", bestfit_buffer: int = bestfit.HEAD_BUFFER_SIZE,
                           bestfit_chunk: int = bestfit.HEAD_CHUNK) -> PretrainIterator:
    """This process's batches from `files` (local or gs:// parquet with a `text` column).

    tokenizer: anything with `.encoding` (tiktoken.Encoding) and `.bos_token_id`.
    batch_size: rows for this process. num_epochs=None repeats forever (train); 1 for one pass (val).
    read_threads: row groups read + tokenized at once; tokenizer_threads: tiktoken threads (one pool
    shared by all read threads: about one per core the host can spare); prefetch: batches kept ready by
    a background thread; worker_count > 0 adds worker processes (each packs its own share of row groups;
    on a 2-core host they only add start-up time: `python -m nanojax.benchmarks.data`).
    packing: "concat" (nanochat at launch) or "bestfit" (HEAD: BOS-aligned best-fit over a buffer of
    `bestfit_buffer` documents, topped up `bestfit_chunk` at a time; `nanojax.data.bestfit`).
    Deterministic for (files, seed, process_index, process_count, worker_count), where a state from
    `set_state` sets the stream count (the process count of the run's start); read_threads,
    tokenizer_threads and prefetch change only speed, never content.
    """
    files = [str(f) for f in files]
    if not files:
        raise ValueError("make_pretrain_iterator: no files given")
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
    if packing not in PACKINGS:
        raise ValueError(f"data.packing={packing!r} is not a packing mode (known: {', '.join(PACKINGS)})")
    groups = row_groups(files)
    read = _ReadTokenize(files, tokenizer.encoding, tokenizer.bos_token_id, tokenizer_threads)

    def open_stream(stream: int, stream_count: int, rows: int) -> tuple[grain.DatasetIterator, str, _Units]:
        units = _Units(groups, process_index=stream, process_count=stream_count, seed=seed, shuffle=shuffle,
                       num_epochs=num_epochs)
        ds = grain.MapDataset.source(units).map(read)
        ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=max(1, read_threads),
                                                  prefetch_buffer_size=max(1, read_threads)))
        meta = {"data": data_fingerprint(files, units.units, seed, shuffle), "seq_len": seq_len}
        if packing == "bestfit":
            meta.update(packing="bestfit", bestfit=[bestfit_buffer, bestfit_chunk])
            ds = bestfit.BestFitPack(ds, read, bos=tokenizer.bos_token_id, batch_size=rows, seq_len=seq_len,
                                     buffer_size=bestfit_buffer, chunk=bestfit_chunk, max_empty=units.per_epoch,
                                     meta=meta)
        else:
            ds = _Pack(ds, rows, seq_len, max_empty=units.per_epoch, meta=meta)
        if worker_count > 0:
            if not flags.FLAGS.is_parsed():  # grain reads an absl flag in its workers
                flags.FLAGS.mark_as_parsed()
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count,
                                                             per_worker_buffer_size=max(1, prefetch)))
        elif prefetch > 0:
            ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch)
        return ds.__iter__(), meta["data"], units

    summary = (f"{len(files)} file(s), {{units}} units (row groups), process {process_index}/{process_count} "
               f"reads {{streams}} ({{per_epoch}}/epoch), batch {batch_size}x{seq_len}, seed {seed}"
               + (f", best-fit packing (buffer {bestfit_buffer} documents)" if packing == "bestfit" else ""))
    return PretrainIterator(open_stream, batch_size=batch_size, process_index=process_index,
                            process_count=process_count, worker_count=worker_count, summary=summary)


def make_iterator_from_config(config, *, split: str, batch_size: int, process_index: int,
                              process_count: int, tokenizer) -> PretrainIterator:
    """The loop's entry point. config.data: path, seed, read_threads, prefetch (+ optional keys below).

    split="train": every shard but the validation one, shuffled row groups, repeating forever.
    split="val": the validation shard (shard_01822, else the last file by name), one pass, in order;
    cheap to recreate for each eval. Optional config.data keys (defaults): num_shards (-1: every parquet
    file in the directory; N > 0: exactly shards 0..N-1 + the val shard, downloading missing ones — on
    a multi-host run with a shared directory, download once beforehand), tokenizer_threads (2),
    worker_count (0), shuffle (True), dataset ("fineweb" | "climbmix": default path, shard names, val
    shard), packing ("concat" | "bestfit"), bestfit_buffer (1000 documents).
    """
    d = config.data

    def opt(key, default):
        return d.get(key, default) if hasattr(d, "get") else getattr(d, key, default)

    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    dataset = opt("dataset", "fineweb")
    val_shard = fineweb.dataset_info(dataset).val_shard
    path, n = d.path or str(fineweb.default_dir(dataset)), opt("num_shards", -1)
    if n > 0:  # exactly shards 0..n-1 + the val shard, whatever else the directory holds
        if "://" in path:
            train = [f"{path.rstrip('/')}/{fineweb.shard_name(i, dataset)}" for i in range(n)]
            val = f"{path.rstrip('/')}/{fineweb.shard_name(val_shard, dataset)}"
        else:
            want = [*range(n), val_shard] if split == "train" else [val_shard]
            *train, val = [str(p) for p in fineweb.ensure_shards(want, path, dataset=dataset)]
    else:
        train, val = fineweb.train_val_split(fineweb.list_shards(path, dataset), dataset)
    files = train if split == "train" else [val]
    return make_pretrain_iterator(
        files, tokenizer, batch_size=batch_size, seq_len=config.model.seq_len, process_index=process_index,
        process_count=process_count, seed=d.seed, read_threads=d.read_threads,
        tokenizer_threads=opt("tokenizer_threads", 2), prefetch=opt("prefetch", 2),
        worker_count=opt("worker_count", 0) if split == "train" else 0,
        shuffle=opt("shuffle", True) and split == "train", num_epochs=None if split == "train" else 1,
        packing=opt("packing", "concat"), bestfit_buffer=opt("bestfit_buffer", bestfit.HEAD_BUFFER_SIZE))
