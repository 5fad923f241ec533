"""BOS-aligned best-fit packing (nanochat HEAD 92d63d4, `dataloader.py`) as a Grain iterator that resumes exactly.

Every row of seq_len + 1 tokens starts with a document's BOS. A buffer of `buffer_size` documents is topped
up before every placement, `chunk` documents at a time (chunks cut within each row group, as HEAD tokenizes
128 documents at a time). Each row takes the largest buffered document that fits the space left (the first
of equal lengths), again and again; when none fits, the shortest buffered document (the first of equal
lengths) is cropped to fill the row exactly and the rest of it is dropped. No padding; HEAD measures ~35% of
tokens cropped at T=2048. inputs = row[:-1], targets = row[1:], as with concatenation.

Differences from HEAD, on purpose: empty documents are skipped (HEAD packs them as a lone BOS); a finite
split (val) stops when the buffer runs dry instead of cycling forever; the state is exact, not "skip to the
next row group".

State: the parent's state (next row group to read) plus, for each buffered document, where it came from:
(row-group unit, document index), in buffer order, and the unread rest of the newest row group. The buffer
only ever loses documents, never reorders them, so that list rebuilds it exactly: `set_state` re-reads those
row groups (at most one per buffered document) and keeps the listed documents. A few KB of JSON.
"""
from __future__ import annotations

from typing import Any, Callable

import grain
import numpy as np

COUNTERS = ("row_groups", "documents", "empty_documents", "tokens_read")
HEAD_BUFFER_SIZE = 1000  # documents (HEAD's buffer_size)
HEAD_CHUNK = 128  # documents tokenized at a time (HEAD's tokenizer_batch_size)


def require_same_pipeline(saved: dict, now: dict) -> None:
    """Refuse a state written for other data, seq_len or packing (it would silently feed other batches)."""
    keys = [*now, *(["packing"] if "packing" not in now else [])]
    default = {"packing": "concat"}  # states from before packing modes were concatenation
    diff = [f"{k}: saved {saved.get(k, default.get(k))!r}, now {now.get(k, default.get(k))!r}"
            for k in keys if saved.get(k, default.get(k)) != now.get(k, default.get(k))]
    if diff:
        raise ValueError("the data-iterator state was saved for a different pipeline (" + "; ".join(diff)
                         + "). Resume with the same shards, seed, seq_len and data.packing.")


def split_documents(tokens: np.ndarray, bos: int) -> list[np.ndarray]:
    """A row group's token stream (BOS + document, ...) back into its documents, each starting with BOS."""
    if not len(tokens):
        return []
    starts = np.flatnonzero(tokens == bos)
    if not len(starts) or starts[0] != 0:
        raise ValueError(f"a row group's tokens do not start with BOS ({bos}); cannot split its documents")
    return np.split(tokens, starts[1:])


class BestFitPack(grain.IterDataset):
    """Rows of `batch_size` x (seq_len + 1) packed best-fit from `parent`'s row groups; see the module doc.

    parent yields {"tokens", "unit", counters} per row group; `read(unit)` re-reads one (for `set_state`).
    """

    def __init__(self, parent: grain.IterDataset, read: Callable, *, bos: int, batch_size: int, seq_len: int,
                 buffer_size: int, chunk: int, max_empty: int, meta: dict):
        super().__init__(parent)
        if buffer_size < 1 or chunk < 1:
            raise ValueError(f"data.bestfit_buffer and the chunk must be >= 1, got {buffer_size}, {chunk}")
        self.read, self.bos, self.batch_size, self.seq_len = read, bos, batch_size, seq_len
        self.buffer_size, self.chunk, self.max_empty, self.meta = buffer_size, chunk, max_empty, meta

    def __iter__(self):
        return _BestFitIterator(self._parent.__iter__(), self)

    def __str__(self):
        return f"BestFitPack(batch_size={self.batch_size}, seq_len={self.seq_len}, buffer={self.buffer_size})"


class _BestFitIterator(grain.DatasetIterator):

    def __init__(self, parent, spec: BestFitPack):
        super().__init__(parent)
        self._spec = spec
        self._capacity = spec.seq_len + 1
        self._reset({"batches": 0, "epoch": 0, "tokens_cropped": 0, **dict.fromkeys(COUNTERS, 0)})

    def _reset(self, counters: dict) -> None:
        self._counts = {k: int(counters[k]) for k in ("batches", "epoch", "tokens_cropped", *COUNTERS)}
        self._sources: dict[int, tuple] = {}  # source id (read order) -> row-group unit
        self._keys: list[tuple[int, int]] = []  # (source id, document index) of each buffered document
        self._docs: list[np.ndarray] = []
        self._lens = np.zeros(0, np.int64)
        self._pending: list[np.ndarray] = []  # documents of the newest row group not yet buffered
        self._pending_at = (0, 0)  # (source id, index of _pending[0] in that row group)
        self._next_source, self._exhausted, self._empty_run = 0, False, 0

    def _pull(self) -> bool:
        """Read the next row group into _pending; False when a finite parent is done."""
        try:
            el = next(self._parent)
        except StopIteration:
            self._exhausted = True
            return False
        docs = split_documents(el["tokens"], self._spec.bos)
        for k in COUNTERS:
            self._counts[k] += int(el[k])
        self._counts["epoch"] = int(el["epoch"])
        self._empty_run = 0 if docs else self._empty_run + 1
        if self._empty_run >= self._spec.max_empty:
            raise ValueError(f"{self._empty_run} row groups in a row (a whole epoch of this process's share) hold "
                             "no text: every document is empty, or there are far more processes than documents")
        self._sources[self._next_source] = tuple(int(u) for u in el["unit"])
        self._pending, self._pending_at = docs, (self._next_source, 0)
        self._next_source += 1
        return True

    def _refill(self) -> bool:
        """Move the next chunk of the newest row group into the buffer; False when nothing is left to read."""
        while not self._pending:
            if self._exhausted or not self._pull():
                return False
        take, (source, first) = self._pending[:self._spec.chunk], self._pending_at
        self._pending = self._pending[self._spec.chunk:]
        self._pending_at = (source, first + len(take))
        self._keys += [(source, first + j) for j in range(len(take))]
        self._docs += take
        self._lens = np.concatenate([self._lens, [len(d) for d in take]])
        return True

    def _pop(self, i: int) -> np.ndarray:
        self._keys.pop(i)
        self._lens = np.delete(self._lens, i)
        return self._docs.pop(i)

    def _fill_row(self, row: np.ndarray) -> None:
        pos = 0
        while pos < self._capacity:
            while len(self._docs) < self._spec.buffer_size and self._refill():
                pass
            if not self._docs:
                raise StopIteration  # finite split ran dry: the partial batch is dropped
            remaining = self._capacity - pos
            fitting = np.where(self._lens <= remaining, self._lens, 0)
            best = int(np.argmax(fitting))  # largest that fits; the first of equals (lengths are >= 1)
            if not fitting[best]:
                best = int(np.argmin(self._lens))  # none fits: crop the shortest to fill the row exactly
            doc = self._pop(best)
            take = min(len(doc), remaining)
            row[pos:pos + take] = doc[:take]
            self._counts["tokens_cropped"] += len(doc) - take
            pos += take

    def __next__(self):
        self._assert_not_closed()
        rows = np.empty((self._spec.batch_size, self._capacity), np.int32)
        for r in range(self._spec.batch_size):
            self._fill_row(rows[r])
        self._counts["batches"] += 1
        self._forget_unused_sources()
        return {"inputs": np.ascontiguousarray(rows[:, :-1]), "targets": np.ascontiguousarray(rows[:, 1:])}

    def _forget_unused_sources(self) -> None:
        used = {s for s, _ in self._keys} | ({self._pending_at[0]} if self._pending else set())
        self._sources = {s: u for s, u in self._sources.items() if s in used}

    def get_state(self) -> dict[str, Any]:
        self._forget_unused_sources()
        ids = sorted(self._sources)
        position = {s: i for i, s in enumerate(ids)}
        pending = [position[self._pending_at[0]], self._pending_at[1]] if self._pending else None
        return {"parent": self._parent.get_state(), "sources": [list(self._sources[s]) for s in ids],
                "buffer": [[position[s], j] for s, j in self._keys], "pending": pending,
                "exhausted": self._exhausted, "stats": dict(self._counts), "meta": self._spec.meta}

    def set_state(self, state: dict[str, Any]) -> None:
        require_same_pipeline(state.get("meta", {}), self._spec.meta)
        self._parent.set_state(state["parent"])
        self._reset(state["stats"])
        docs = [split_documents(self._spec.read(tuple(unit))["tokens"], self._spec.bos) for unit in state["sources"]]
        self._sources = {s: tuple(unit) for s, unit in enumerate(state["sources"])}
        self._next_source = len(docs)
        self._keys = [(int(s), int(j)) for s, j in state["buffer"]]
        self._docs = [docs[s][j] for s, j in self._keys]
        self._lens = np.array([len(d) for d in self._docs], np.int64)
        if state["pending"] is not None:
            s, j = state["pending"]
            self._pending, self._pending_at = docs[s][j:], (s, j)
        self._exhausted = bool(state["exhausted"])
