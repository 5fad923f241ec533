"""Deterministic synthetic data for smoke runs and benchmarks: no files, no network.

`SyntheticIterator` yields token rows (no tokenizer either): each row starts at a random token and then
follows one fixed random permutation of the vocabulary (token t+1 = perm[token t]), so a model can learn
it and the loss visibly falls; batch i of process p is a pure function of (seed, p, i), which makes
resuming trivial and exact (on another device or process count too: see `SyntheticIterator`).

`synthetic_documents` writes English-like text (an invented Zipfian vocabulary in sentences and
paragraphs) for what needs text rather than tokens: tokenizer training and throughput, the data-pipeline
benchmark, tests.
"""
from __future__ import annotations

import functools
import random

import numpy as np

from nanojax.data import layout


class SyntheticIterator:
    """Rows of data stream s come in chunks: chunk c is a pure function of (seed, split, s, c) with `chunk_rows`
    rows, the stream's share of a micro-batch when the run started (`nanojax.data.layout`), so a resume on
    other device or process counts hands out the very same rows, only in other numbers at a time."""

    def __init__(self, *, batch_size: int, seq_len: int, vocab_size: int, seed: int = 0,
                 process_index: int = 0, process_count: int = 1, split: str = "train"):
        self.batch_size, self.seq_len, self.vocab_size = batch_size, seq_len, vocab_size
        self.seed, self.process_index, self.process_count = seed, process_index, process_count
        self.split_id = {"train": 0, "val": 1}[split]
        self.perm = np.random.default_rng(seed).permutation(vocab_size).astype(np.int32)
        self._arrange(process_count, None)
        self.rows = 0  # rows read from each stream so far
        self._cached = {}  # stream -> (chunk index, rows)

    def _arrange(self, stream_count: int, chunk_rows: int | None) -> None:
        self.stream_count = stream_count
        self.shares = layout.shares(stream_count, self.process_index, self.process_count)
        self.stream_rows = layout.stream_rows(self.batch_size, self.process_count, stream_count)
        self.chunk_rows = chunk_rows or self.stream_rows

    def _chunk(self, stream: int, c: int) -> np.ndarray:
        if self._cached.get(stream, (None,))[0] != c:
            rng = np.random.default_rng([self.seed, self.split_id, stream, c])
            rows = np.empty((self.chunk_rows, self.seq_len + 1), np.int32)
            rows[:, 0] = rng.integers(0, self.vocab_size, self.chunk_rows)
            for t in range(self.seq_len):
                rows[:, t + 1] = self.perm[rows[:, t]]
            self._cached[stream] = (c, rows)
        return self._cached[stream][1]

    def _rows(self, stream: int, start: int, n: int) -> np.ndarray:
        pieces = []
        while n:
            c, i = divmod(start, self.chunk_rows)
            piece = self._chunk(stream, c)[i:i + n]
            pieces.append(piece)
            start, n = start + len(piece), n - len(piece)
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        pieces = []
        for share in self.shares:
            n = self.stream_rows // share.parts
            pieces.append(self._rows(share.stream, self.rows + share.part * n, n))
        self.rows += self.stream_rows
        rows = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
        return {"inputs": rows[:, :-1], "targets": rows[:, 1:]}

    def get_state(self) -> dict:
        return {"stream_count": self.stream_count,
                "streams": {str(share.stream): {"rows": self.rows, "chunk_rows": self.chunk_rows}
                            for share in self.shares}}

    def set_state(self, state: dict) -> None:
        def legacy(index, writers, saved):  # before streams: {"index": batches of its stream}, rows not recorded
            rows = layout.stream_rows(self.batch_size, self.process_count, writers)  # taken as unchanged
            return writers, {index: {"rows": int(saved["index"]) * rows, "chunk_rows": rows}}

        count, saved = layout.saved_streams(state, self.process_index, self.process_count, legacy)
        owned = [share.stream for share in layout.shares(count, self.process_index, self.process_count)]
        layout.require(saved, owned, count, self.process_index, self.process_count)
        self._arrange(count, int(saved[owned[0]]["chunk_rows"]))
        self.rows, self._cached = int(saved[owned[0]]["rows"]), {}

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------- text
# An invented language: English function words, then stems built from syllables with a few suffixes.
_FUNCTION_WORDS = (
    "the of and to a in is that it was for on with as he his be at by this had not are but from or have an "
    "they which one you were her all she there would their we him been has when who will more no if out so "
    "said what up its about into than them can only other new some could time these two may then do first "
    "any my now such like our over man me even most made after also did many before must through back years "
    "where much your way well down should because each just those people how too little state good very make "
    "world still own see men work long get here between both life being under never day same another know "
    "while last might us great old year off come since against go came right used take three don't it's "
    "isn't can't I'm you're we've they'll"
).split()
_ONSETS = ("", "", "", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w",
           "y", "z", "bl", "br", "ch", "cl", "cr", "dr", "fl", "fr", "gl", "gr", "pl", "pr", "qu", "sc", "sh",
           "sk", "sl", "sm", "sn", "sp", "st", "str", "sw", "th", "tr", "wh", "wr")
_NUCLEI = ("a", "a", "e", "e", "e", "i", "i", "o", "o", "u", "ai", "ea", "ee", "ie", "oa", "oo", "ou", "y")
_CODAS = ("", "", "", "", "n", "n", "r", "r", "s", "t", "l", "m", "d", "nd", "st", "ng", "ck", "ld", "nt",
          "rt", "sh", "th", "x", "ll", "ss")
_SUFFIXES = ("s", "ed", "ing", "er", "ly", "ion", "ness", "ment", "able", "ous", "al", "est", "ity", "ful")
# What follows each word, with its probability: one sentence in ~17 words, one paragraph in ~5 sentences.
_SEPARATORS = (" ", ", ", "; ", ": ", "-", "'s ", ". ", "? ", "! ", ".\n\n", "?\n\n", "!\n\n")
_SEPARATOR_P = (0.8615, 0.065, 0.004, 0.003, 0.004, 0.004, 0.0455, 0.003, 0.0015, 0.008, 0.0005, 0.0005)
_SENTENCE_ENDS = 6  # separators from this index on end a sentence
_NUMBER_P = 0.015  # share of words that are numbers instead
_CHUNK_WORDS = 1 << 17  # words drawn per chunk; chunk k depends only on (seed, k)


@functools.lru_cache(maxsize=2)
def _lexicon(n_words: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(forms inside a sentence, forms starting one, their lengths, numbers), most frequent word first.

    The same for every seed (one language): a tokenizer trained on one seed's text fits another's."""
    rng = random.Random(20261127)
    words, ranked = list(_FUNCTION_WORDS), []
    seen = set(words)
    while len(seen) < n_words:
        syllables = 1 + min(int(rng.expovariate(0.9)), 4)
        stem = "".join(rng.choice(_ONSETS) + rng.choice(_NUCLEI) + rng.choice(_CODAS) for _ in range(syllables))
        if len(stem) < 2:
            continue
        base = len(stem) + rng.gauss(0, 2.5)  # frequent words tend to be short, as in real languages
        for i, form in enumerate([stem] + [stem + s for s in rng.sample(_SUFFIXES, rng.randint(0, 4))]):
            if form not in seen and len(seen) < n_words:
                seen.add(form)
                ranked.append((base + 2 * i + rng.random(), form))
    words += [w for _, w in sorted(ranked)]
    # About 8% of the content words are names: capitalised wherever they occur.
    name = [i > len(_FUNCTION_WORDS) + 50 and rng.random() < 0.08 for i in range(len(words))]
    inner = np.array([w.capitalize() if n else w for w, n in zip(words, name)], dtype=object)
    first = np.array([w[0].upper() + w[1:] for w in words], dtype=object)
    lengths = np.array([len(w) for w in words], dtype=np.int64)
    numbers = []
    for _ in range(20_000):  # small counts, years, thousands, decimals, percentages, plain integers
        v, kind = rng.randrange(100_000), rng.randrange(6)
        numbers.append((str(v % 100), str(1500 + v % 530), f"{v:,}", f"{v % 100}.{v % 97}", f"{v % 101}%",
                        str(v))[kind])
    return inner, first, lengths, np.array(numbers, dtype=object)


def synthetic_documents(n_chars: int, seed: int = 0, mean_chars: int = 4700, *, n_words: int = 50_000,
                        zipf_offset: float = 2.7) -> list[str]:
    """Deterministic English-like documents totalling exactly `n_chars` characters (the last one is cut).

    For tokenizer training and throughput, data-pipeline benchmarks and anything else that needs text
    without a file or the network. Words are drawn from a lexicon of `n_words` invented words (English
    function words first, then syllable-built stems with suffixes, about 8% capitalised names) with a
    Zipf-Mandelbrot frequency (rank r has probability ~ 1/(r + zipf_offset)); sentences are capitalised and
    end in . ? or !, with commas, semicolons, hyphens, possessives and 1.5% numbers in between; paragraphs
    are separated by blank lines and documents (mean `mean_chars`, exponentially distributed) end at a
    sentence. Every seed uses the same lexicon, so a tokenizer trained on seed 0 fits seed 1; a smaller
    `n_chars` gives a prefix of the documents of a larger one.

    Measured on one core of a 2-core AMD EPYC (2026-11-26): 53-55 MB/s for 50 MB (20 MB/s for 1 MB), plus
    0.17 s once per process for the lexicon. 50 MB hold ~60k distinct lower-cased words and support a BPE
    vocabulary of up to ~148k ids (1 MB: ~49k); see docs/benchmarks.md.
    """
    inner, first, lengths, numbers = _lexicon(n_words)
    sep_strings = np.array(_SEPARATORS, dtype=object)
    sep_lengths = np.array([len(s) for s in _SEPARATORS], dtype=np.int64)
    sep_cdf = np.cumsum(_SEPARATOR_P) / sum(_SEPARATOR_P)
    log_span = np.log1p(len(inner) / zipf_offset)
    docs: list[str] = []
    total, chunk = 0, 0
    while total < n_chars:
        rng = np.random.default_rng([seed, chunk])
        chunk += 1
        # Inverse CDF of the continuous Zipf-Mandelbrot law with exponent 1: one exp per word.
        ranks = (zipf_offset * np.expm1(rng.random(_CHUNK_WORDS) * log_span)).astype(np.int64)
        ranks = np.minimum(ranks, len(inner) - 1)
        seps = np.minimum(np.searchsorted(sep_cdf, rng.random(_CHUNK_WORDS), side="right"), len(sep_cdf) - 1)
        starts = np.ones(_CHUNK_WORDS, bool)  # a chunk starts a sentence, like every word after an end
        starts[1:] = seps[:-1] >= _SENTENCE_ENDS
        words = np.where(starts, first[ranks], inner[ranks])
        piece_lengths = lengths[ranks] + sep_lengths[seps]
        is_number = rng.random(_CHUNK_WORDS) < _NUMBER_P
        drawn = numbers[rng.integers(0, len(numbers), int(is_number.sum()))]
        words[is_number] = drawn
        piece_lengths[is_number] += np.array([len(s) for s in drawn], dtype=np.int64) - lengths[ranks[is_number]]
        pieces = np.empty(2 * _CHUNK_WORDS, dtype=object)
        pieces[0::2], pieces[1::2] = words, sep_strings[seps]
        # Documents end at sentence ends, at the first one past each exponentially drawn target length.
        ends = np.flatnonzero(seps >= _SENTENCE_ENDS)
        ends_at = np.cumsum(piece_lengths)[ends]
        targets = np.cumsum(rng.exponential(mean_chars, size=int(ends_at[-1] / mean_chars * 2) + 16))
        cuts = np.unique(np.searchsorted(ends_at, targets[targets <= ends_at[-1]]))
        if len(cuts) == 0:
            cuts = np.array([len(ends) - 1])
        start = 0
        for end in ends[cuts]:
            doc = "".join(pieces[2 * start:2 * end + 2].tolist()).rstrip()
            if total + len(doc) >= n_chars:
                docs.append(doc[:n_chars - total])
                return docs
            docs.append(doc)
            total += len(doc)
            start = end + 1
    return docs
