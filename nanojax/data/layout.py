"""Data streams: what lets a run resume on another device count or process count with the same global batches.

A run reads its data as S streams, S = the number of processes of the run that started it (recorded in every
iterator state). Stream s reads row groups / conversations s, s+S, s+2S, ... exactly as process s of S always
has, and every global micro-batch holds the next `global rows / S` rows of each stream, in stream order. So a
layout that never changes reads exactly what it always did, and a resume with P processes finds the same rows:
  - P divides S (e.g. 2 hosts -> 1): process p runs streams p·S/P ... (p+1)·S/P − 1 and concatenates their rows;
  - S divides P (e.g. 1 host -> 2): the P/S processes of stream ⌊p·S/P⌋ each run its reader and keep their
    slice of its rows (the stream is read P/S times, the rows are exact);
  - otherwise the resume is refused, naming S, P and process counts that work.
Fewer devices (more, smaller micro-batches per optimizer step) change only how many rows each micro-batch takes
from each stream, never which rows a step holds: resumes happen between steps, and each pipeline's stream of
rows does not depend on how many rows it is asked for at a time.

Every process saves the states of the streams it reads (`nanojax.checkpoint.DataStateHandler`, one file per
process, no communication); a restore reads every process's file, and `saved_streams` turns them back into one
state per stream (also from states written before streams existed, one per process).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import numpy as np

PROCESS_STATES = "process_states"  # DataStateHandler.restore -> {PROCESS_STATES: [state of process 0, 1, ...]}


@dataclasses.dataclass(frozen=True)
class Share:
    """Rows `part` of `parts` equal slices of every micro-batch of data stream `stream` (parts=1: all of them)."""
    stream: int
    part: int = 0
    parts: int = 1


def shares(stream_count: int, process_index: int, process_count: int) -> list[Share]:
    """What process `process_index` of `process_count` reads of `stream_count` streams, in stream order."""
    S, P, p = stream_count, process_count, process_index
    if not 0 <= p < P:
        raise ValueError(f"process_index {p} not in 0..{P - 1}")
    if S % P == 0:
        return [Share(s) for s in range(p * (S // P), (p + 1) * (S // P))]
    if P % S == 0:
        return [Share(p // (P // S), p % (P // S), P // S)]
    works = [d for d in range(1, S + 1) if S % d == 0] + [2 * S, 3 * S]
    raise ValueError(f"this run reads its data as {S} streams (one per process of the run that started it), and "
                     f"{P} processes cannot share {S} streams evenly: resume on a process count that divides {S} or "
                     f"is a multiple of it ({', '.join(map(str, works))}, ...)")


def stream_rows(rows_per_process: int, process_count: int, stream_count: int) -> int:
    """Rows of each stream in one global micro-batch of `rows_per_process` x `process_count` rows."""
    total = rows_per_process * process_count
    if total % stream_count:
        raise ValueError(f"a global micro-batch of {total} rows (device_batch_size x data-parallel devices) does not "
                         f"split into this run's {stream_count} data streams (one per process of the run that started "
                         f"it): resume with a global micro-batch that is a multiple of {stream_count} rows")
    return total // stream_count


def share_rows(rows: Mapping[str, Any], share: Share) -> Mapping[str, Any]:
    """This share's slice of one stream's micro-batch (arrays with rows first)."""
    if share.parts == 1:
        return rows
    n = len(next(iter(rows.values()))) // share.parts
    return {k: v[share.part * n:(share.part + 1) * n] for k, v in rows.items()}


def concat_rows(parts: list[Mapping[str, Any]]) -> Mapping[str, Any]:
    """The rows of several streams' shares of one micro-batch, in stream order, as one micro-batch."""
    return parts[0] if len(parts) == 1 else {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def describe(stream_count: int, owned: list[Share]) -> str:
    if owned[0].parts > 1:
        return f"rows {owned[0].part + 1}/{owned[0].parts} of stream {owned[0].stream} of {stream_count}"
    first, last = owned[0].stream, owned[-1].stream
    return f"stream{'s' if last > first else ''} {first}{f'-{last}' if last > first else ''} of {stream_count}"


Legacy = Callable[[int, int, Mapping[str, Any]], tuple[int, dict[int, Any]]]


def saved_streams(state: Mapping[str, Any], process_index: int, process_count: int,
                  legacy: Legacy) -> tuple[int, dict[int, Any]]:
    """(stream count, {stream: its saved state}) from what an iterator's `set_state` received.

    `state` is DataStateHandler.restore's {PROCESS_STATES: [...]} (every process's file), or one process's own
    state (a direct call; taken as this process's). A process's state is {"stream_count": S, "streams": {"s":
    ...}, ...}; one written before streams existed is converted by `legacy(writer index, writer count, state)`
    -> (S, {stream: state}), and its entry for the writer's own stream wins over what others say of it.
    """
    if PROCESS_STATES in state:
        written = list(enumerate(state[PROCESS_STATES]))
        writers = len(written)
    else:
        written, writers = [(process_index, state)], process_count
    counts, streams = set(), {}
    for index, saved in written:
        if "stream_count" in saved:
            count, got = saved["stream_count"], {int(s): v for s, v in saved["streams"].items()}
        else:
            count, got = legacy(index, writers, saved)
        counts.add(int(count))
        for s, entry in got.items():
            if s == index or s not in streams:
                streams[s] = entry
    if len(counts) != 1:
        raise ValueError(f"the data-iterator states disagree on the number of data streams ({sorted(counts)}): "
                         "they are not from one checkpoint")
    return counts.pop(), streams


def require(streams: Mapping[int, Any], needed, stream_count: int, process_index: int, process_count: int) -> None:
    """Refuse, in one line, a state that lacks a stream this process reads."""
    missing = sorted(set(needed) - set(streams))
    if missing:
        raise ValueError(f"the data-iterator state holds streams {sorted(streams)} of {stream_count}, but process "
                         f"{process_index} of {process_count} reads {missing} too: restore every process's state "
                         "(nanojax.checkpoint.DataStateHandler.restore reads them all)")
