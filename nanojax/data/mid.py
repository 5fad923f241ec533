"""Midtraining rows (nanochat launch `mid_train.py`, `data.kind="mid"`): conversations rendered (cut at
max(2048, seq_len) tokens, nanochat's render default) and concatenated into one stream; each micro-batch takes
rows·T + 1 tokens, inputs = stream[:-1], targets = stream[1:] reshaped to (rows, T): no mask, every token is
trained on (BOS included), conversations may span rows and batches. Both splits wrap around (train: a second
epoch if num_iterations asks for more).

Each data stream (`nanojax.data.layout`) is cut into chunks of its share of a micro-batch when the run started,
so the rows of a step stay the same when a resume asks for more or fewer rows at a time. The state of a stream:
the conversation at the head of the token buffer, the offset into it, the next conversation to render and the
rows of the current chunk already handed out. Streams, rendering and the loop-facing iterator are
`nanojax.data.chat`'s.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from nanojax.data import layout


class MidStream:
    """One stream's conversation tokens cut into `chunk_rows`·T + 1 tokens at a time (nanochat's micro-batch:
    the last token is only a target), handed out `take(n)` rows at a time.

    The chunk is the stream's share of a micro-batch when the run started, so the rows of a step stay the same
    when a resume asks for more or fewer rows at a time. Packer state: `head` = stream position of the
    conversation at the front of the token buffer, `offset` = tokens of it already used, `k` = next conversation
    to render (everything between head and k is buffered); the state also names the rows of the current chunk
    already handed out (`rows_used`; the packer state is then the one before that chunk)."""

    def __init__(self, stream, *, chunk_rows: int, seq_len: int):
        self.stream, self.chunk_rows, self.seq_len = stream, chunk_rows, seq_len
        self.buffer: list[tuple[int, np.ndarray]] = []  # (position, ids) in stream order
        self.offset = 0  # tokens of buffer[0] already used
        self.k = 0
        self.chunk, self.rows_used, self.chunk_start = None, 0, self._position()

    def _position(self) -> dict:
        return {"k": self.k, "head": self.position(), "offset": self.offset if self.buffer else 0,
                "stats": dict(self.stream.stats)}

    def _fill(self, needed: int) -> None:
        have = sum(len(ids) for _, ids in self.buffer) - self.offset
        while have < needed:
            item = self.stream.render(self.k)
            if item is not None:
                ids = np.asarray(item[0], np.int32)
                self.buffer.append((self.k, ids))
                have += len(ids)
            self.k += 1

    def _next_chunk(self) -> dict[str, np.ndarray]:
        needed = self.chunk_rows * self.seq_len + 1
        self._fill(needed)
        out, take = [], needed
        while take:
            pos, ids = self.buffer[0]
            piece = ids[self.offset: self.offset + take]
            out.append(piece)
            take -= len(piece)
            self.offset += len(piece)
            if self.offset == len(ids):
                self.buffer.pop(0)
                self.offset = 0
        flat = np.concatenate(out)
        st = self.stream.stats
        st["batches"] += 1
        st["tokens"] += needed - 1
        st["target_tokens"] += needed - 1
        return {"inputs": flat[:-1].reshape(self.chunk_rows, self.seq_len),
                "targets": flat[1:].reshape(self.chunk_rows, self.seq_len)}

    def take(self, n: int) -> dict[str, np.ndarray]:
        parts = []
        while n:
            if self.chunk is None or self.rows_used == self.chunk_rows:
                self.chunk_start = self._position()
                self.chunk, self.rows_used = self._next_chunk(), 0
            m = min(n, self.chunk_rows - self.rows_used)
            parts.append({k: v[self.rows_used:self.rows_used + m] for k, v in self.chunk.items()})
            self.rows_used, n = self.rows_used + m, n - m
        return layout.concat_rows(parts)

    def position(self) -> int:
        """The stream position of the conversation at the front of the token buffer (for the epoch)."""
        return self.buffer[0][0] if self.buffer else self.k

    def get_state(self) -> dict:
        if self.chunk is None or self.rows_used == self.chunk_rows:
            return {**self._position(), "rows_used": 0, "chunk_rows": self.chunk_rows}
        return {**self.chunk_start, "rows_used": self.rows_used, "chunk_rows": self.chunk_rows}

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Re-render the buffered conversations head..k-1 (their counters were saved already), skip `offset`,
        then re-cut the chunk that was being handed out."""
        saved = dict(state["stats"])
        self.buffer = []
        for pos in range(int(state["head"]), int(state["k"])):
            item = self.stream.render(pos)
            if item is not None:
                self.buffer.append((pos, np.asarray(item[0], np.int32)))
        self.k, self.offset = int(state["k"]), int(state["offset"])
        self.stream.stats.clear()
        self.stream.stats.update(saved)
        self.chunk_rows = int(state.get("chunk_rows") or self.chunk_rows)  # None: written before streams
        self.chunk, self.rows_used, self.chunk_start = None, 0, self._position()
        if state.get("rows_used"):
            self.chunk, self.rows_used = self._next_chunk(), int(state["rows_used"])


class MidSource:
    """Midtraining rows: `stream_rows` rows of each stream this process reads per micro-batch."""

    def __init__(self, open_stream, *, batch_size: int, seq_len: int, process_index: int, process_count: int,
                 process_view):
        self.open_stream = open_stream  # (stream, stream count, quiet) -> nanojax.data.chat._Stream
        self.process_view = process_view  # (streams, positions) -> {"epoch", "stats"} of this process
        self.batch_size, self.seq_len = batch_size, seq_len
        self.process_index, self.process_count = process_index, process_count
        self._arrange(process_count)

    def _arrange(self, stream_count: int) -> None:
        self.stream_count = stream_count
        self.shares = layout.shares(stream_count, self.process_index, self.process_count)
        self.stream_rows = layout.stream_rows(self.batch_size, self.process_count, stream_count)
        self.streams = {share.stream: MidStream(self.open_stream(share.stream, stream_count, share.part > 0),
                                                 chunk_rows=self.stream_rows, seq_len=self.seq_len)
                        for share in self.shares}

    def next_batch(self) -> dict[str, np.ndarray]:
        return layout.concat_rows([layout.share_rows(self.streams[share.stream].take(self.stream_rows), share)
                        for share in self.shares])

    def get_state(self) -> dict:
        streams = list(self.streams.values())
        return {"stream_count": self.stream_count,
                "streams": {str(s): stream.get_state() for s, stream in self.streams.items()},
                **self.process_view([m.stream for m in streams], [m.position() for m in streams])}

    def set_state(self, state: Mapping[str, Any]) -> None:
        def legacy(index, writers, saved):  # before streams: process p of P packed stream p, chunks of its rows
            return writers, {index: {**saved, "rows_used": 0, "chunk_rows": None}}

        count, saved = layout.saved_streams(state, self.process_index, self.process_count, legacy)
        owned = [share.stream for share in layout.shares(count, self.process_index, self.process_count)]
        layout.require(saved, owned, count, self.process_index, self.process_count)
        self._arrange(count)
        for s, stream in self.streams.items():
            stream.set_state(saved[s])
