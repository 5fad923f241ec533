"""Best-fit packing of SFT conversations (nanochat HEAD 92d63d4, `scripts/chat_sft.py`
`sft_data_generator_bos_bestfit`): `data.kind="sft"` with `data.packing="bestfit"`.

Every row holds seq_len + 1 tokens and starts with a conversation's BOS. A buffer of `data.sft_bestfit_buffer`
rendered conversations (HEAD: 100) is topped up before every placement; a row takes the largest buffered
conversation that fits the space left (the first of equal lengths), again and again; when none fits, the rest
of the row is padded with BOS and never trained on, so no token is ever cropped. inputs = row[:-1], targets =
row[1:] with −1 wherever the render mask is 0 (user turns, tool output, special tokens) and on padding.
Every row has the same length: one compiled step shape, and far fewer padded positions than one conversation
per row.

Conversations longer than a row are cut to min(2048, seq_len + 1) tokens (HEAD renders with its 2048-token
default; a longer one could never be placed), counted in `stats["truncated"]`.

Streams are those of `nanojax.data.chat`: stream s of S packs conversations s, s+S, ... with its own buffer,
as HEAD's rank s of world size S does, so with S streams the rows of stream s are HEAD's rows of rank s.
(HEAD's cursor wraps modulo the dataset size, which shifts its ranks' residues in the second epoch; here a
stream keeps its conversations epoch after epoch.) The val split (finite) reads each conversation once: when
a stream runs dry its remaining rows of a micro-batch are empty (all targets −1) and the split ends when
every stream this process reads is dry.

State per stream: the next position to render, the positions of the buffered conversations in buffer order
(the buffer only loses conversations, never reorders them) and the counters. `set_state` re-renders those
conversations: exact resume, on any device or process count that `nanojax.data.layout` allows.
"""
from __future__ import annotations

import collections
from typing import Any, Mapping

import numpy as np

from nanojax.data import layout

HEAD_SFT_BUFFER = 100  # conversations (chat_sft.py's buffer_size)
HEAD_RENDER_MAX_TOKENS = 2048  # HEAD's render_conversation default


def max_conversation_tokens(seq_len: int) -> int:
    return min(HEAD_RENDER_MAX_TOKENS, seq_len + 1)


class BestFitRows:
    """One data stream's rows, packed best-fit. `stream` is a `nanojax.data.chat._Stream` (render(k) -> (ids,
    mask) or None for a skipped bad row; `per_epoch`; `stats`)."""

    def __init__(self, stream, *, seq_len: int, buffer_size: int, bos: int, finite: bool):
        self.stream, self.capacity, self.buffer_size = stream, seq_len + 1, buffer_size
        self.bos, self.finite = bos, finite
        self.buffer: list[tuple[int, list[int], list[int]]] = []  # (position, ids, mask), buffer order
        self.k = 0  # next stream position to render

    def _refill(self) -> None:
        misses = 0
        while len(self.buffer) < self.buffer_size and not (self.finite and self.k >= self.stream.per_epoch):
            item = self.stream.render(self.k)
            if item is not None and len(item[0]):
                self.buffer.append((self.k, list(item[0]), list(item[1])))
                misses = 0
            elif (misses := misses + 1) >= self.stream.per_epoch:
                raise ValueError(f"data stream {self.stream.stream} of {self.stream.dataset!r} has no conversation "
                                 f"that renders: every one of its {self.stream.per_epoch} was skipped as a bad row")
            self.k += 1

    def _best(self, space: int) -> int:
        best, best_len = -1, 0
        for i, (_, ids, _) in enumerate(self.buffer):
            if best_len < len(ids) <= space:
                best, best_len = i, len(ids)
        return best

    def row(self) -> tuple[list[int], list[int]] | None:
        """The next row's (ids, mask), seq_len + 1 of each; None when a finite stream has nothing left."""
        ids: list[int] = []
        mask: list[int] = []
        while len(ids) < self.capacity:
            self._refill()
            i = self._best(self.capacity - len(ids))
            if i < 0:
                if not ids:
                    return None  # finite and dry (a non-finite buffer always holds one that fits an empty row)
                self.stream.stats["pad_tokens"] += self.capacity - len(ids)
                ids += [self.bos] * (self.capacity - len(ids))
                mask += [0] * (self.capacity - len(mask))
                break
            _, conv, conv_mask = self.buffer.pop(i)
            ids += conv
            mask += conv_mask
            self.stream.stats["tokens"] += len(conv)
        return ids, mask

    def take(self, n: int) -> dict[str, np.ndarray]:
        """n rows as inputs / targets (T each); rows past the end of a finite stream are empty (targets −1)."""
        T = self.capacity - 1
        inputs = np.full((n, T), self.bos, np.int32)
        targets = np.full((n, T), -1, np.int32)
        for r in range(n):
            got = self.row()
            if got is None:
                break
            ids, mask = np.asarray(got[0], np.int32), np.asarray(got[1], np.int32)
            inputs[r] = ids[:-1]
            targets[r] = np.where(mask[1:] == 1, ids[1:], -1)
        self.stream.stats["batches"] += 1
        self.stream.stats["target_tokens"] += int(np.count_nonzero(targets != -1))
        return {"inputs": inputs, "targets": targets}

    @property
    def dry(self) -> bool:
        return self.finite and not self.buffer and self.k >= self.stream.per_epoch

    def position(self) -> int:
        """The oldest conversation still buffered (or the next one): how far the stream has come, for the epoch."""
        return self.buffer[0][0] if self.buffer else self.k

    def get_state(self) -> dict:
        return {"k": self.k, "buffer": [pos for pos, _, _ in self.buffer], "stats": dict(self.stream.stats)}

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Re-render the buffered conversations (their counters are in the saved ones)."""
        self.buffer = []
        for pos in state["buffer"]:
            item = self.stream.render(int(pos))
            if item is None:
                raise ValueError(f"the data state buffers conversation {pos} of data stream {self.stream.stream}, "
                                 "which no longer renders: the task data changed since the checkpoint")
            self.buffer.append((int(pos), list(item[0]), list(item[1])))
        self.k = int(state["k"])
        self.stream.stats.clear()
        self.stream.stats.update(state["stats"])


class BestFitSFTSource:
    """SFT micro-batches of fixed-length best-fit rows: `stream_rows` rows of each stream this process reads."""

    def __init__(self, open_stream, *, batch_size: int, seq_len: int, buffer_size: int, bos: int, finite: bool,
                 process_index: int, process_count: int, process_view):
        self.open_stream = open_stream  # (stream, stream count, quiet) -> chat._Stream
        self.batch_size, self.seq_len, self.buffer_size, self.bos, self.finite = (batch_size, seq_len,
                                                                                 buffer_size, bos, finite)
        self.process_index, self.process_count, self.process_view = process_index, process_count, process_view
        self._arrange(process_count)

    def _arrange(self, stream_count: int) -> None:
        self.stream_count = stream_count
        self.shares = layout.shares(stream_count, self.process_index, self.process_count)
        self.stream_rows = layout.stream_rows(self.batch_size, self.process_count, stream_count)
        self.packers = {share.stream: BestFitRows(self.open_stream(share.stream, stream_count, share.part > 0),
                                                  seq_len=self.seq_len, buffer_size=self.buffer_size, bos=self.bos,
                                                  finite=self.finite)
                        for share in self.shares}

    def next_batch(self) -> dict[str, np.ndarray]:
        if self.finite and all(p.dry for p in self.packers.values()):
            raise StopIteration
        return layout.concat_rows([layout.share_rows(self.packers[share.stream].take(self.stream_rows), share)
                                   for share in self.shares])

    def get_state(self) -> dict:
        packers = list(self.packers.values())
        return {"packing": "bestfit", "stream_count": self.stream_count,
                "streams": {str(s): p.get_state() for s, p in self.packers.items()},
                **self.process_view([p.stream for p in packers], [p.position() for p in packers])}

    def set_state(self, state: Mapping[str, Any]) -> None:
        def legacy(index, writers, saved):
            raise ValueError("the data state was saved by SFT with one conversation per row (data.packing="
                             "'concat'); resume it with that packing, or start a new run for data.packing='bestfit'")

        count, saved = layout.saved_streams(state, self.process_index, self.process_count, legacy)
        owned = [share.stream for share in layout.shares(count, self.process_index, self.process_count)]
        layout.require(saved, owned, count, self.process_index, self.process_count)
        for s in owned:
            if "buffer" not in saved[s]:
                legacy(s, count, saved[s])
        self._arrange(count)
        for s, packer in self.packers.items():
            packer.set_state(saved[s])


class _Lengths:
    """A stream of placeholder conversations of the given lengths: what `count_rows` packs."""
    stream, dataset = 0, "conversation lengths"

    def __init__(self, lengths):
        self.lengths, self.per_epoch = lengths, len(lengths)
        self.stats = collections.Counter()

    def render(self, k: int) -> tuple[list[int], list[int]]:
        return [0] * self.lengths[k], [0] * self.lengths[k]


def count_rows(lengths, *, seq_len: int, buffer_size: int) -> int:
    """Rows one stream packs from conversations of these lengths (already cut), read once: `BestFitRows` itself
    on placeholder tokens, for counting an epoch without holding every conversation's tokens."""
    packer = BestFitRows(_Lengths(list(lengths)), seq_len=seq_len, buffer_size=buffer_size, bos=0, finite=True)
    rows = 0
    while packer.row() is not None:
        rows += 1
    return rows
