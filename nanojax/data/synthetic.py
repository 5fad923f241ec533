"""Deterministic synthetic token rows for smoke runs and benchmarks (no tokenizer, no files).

Each row starts at a random token and then follows one fixed random permutation of the vocabulary
(token t+1 = perm[token t]), so a model can learn it and the loss visibly falls; batch i of process p
is a pure function of (seed, p, i), which makes resuming trivial and exact.
"""
from __future__ import annotations

import numpy as np


class SyntheticIterator:
    def __init__(self, *, batch_size: int, seq_len: int, vocab_size: int, seed: int = 0,
                 process_index: int = 0, process_count: int = 1, split: str = "train"):
        self.batch_size, self.seq_len, self.vocab_size = batch_size, seq_len, vocab_size
        self.seed, self.process_index = seed, process_index
        self.split_id = {"train": 0, "val": 1}[split]
        self.perm = np.random.default_rng(seed).permutation(vocab_size).astype(np.int32)
        self.index = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, self.split_id, self.process_index, self.index])
        self.index += 1
        rows = np.empty((self.batch_size, self.seq_len + 1), np.int32)
        rows[:, 0] = rng.integers(0, self.vocab_size, self.batch_size)
        for t in range(self.seq_len):
            rows[:, t + 1] = self.perm[rows[:, t]]
        return {"inputs": rows[:, :-1], "targets": rows[:, 1:]}

    def get_state(self) -> dict:
        return {"index": self.index}

    def set_state(self, state: dict) -> None:
        self.index = int(state["index"])

    def close(self) -> None:
        pass
