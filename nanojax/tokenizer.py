"""Byte-level BPE tokenizer: rustbpe trains it, tiktoken runs it; nanochat's specials and chat rendering.

Matches nanochat at launch (commit 3a5e0bc): GPT-4 split pattern with digit groups of at most 2, the BPE
ranks at ids 0..V-10 and the 9 special tokens at the top 9 ids, conversation rendering with the
assistant loss mask. Text never produces special tokens: only `prepend`/`append`, `encode_special` and
the renderers insert them, so user data cannot inject `<|bos|>` or a tool call.

On-disk format (a directory, default `$NANOJAX_HOME/tokenizer`), no pickles:
  tokenizer_meta.json  {"format": "nanojax-bpe", "version": 1, "pattern": str, "vocab_size": V,
                        "num_ranks": N, "special_tokens": {name: id}, "ranks_sha256": hex, "training": {...}}
  ranks.tiktoken       tiktoken's own BPE file: one line per token, `base64(token bytes) rank`, ranks 0..N-1
                       (readable by `tiktoken.load.load_tiktoken_bpe` and Hugging Face's tiktoken converter)
  token_bytes.npy      int32 [V]: raw byte length of every id, 0 for special tokens (for bits per byte)
A run's tokenizer (training, evaluation, checkpoints, data tools) is `load_for_config(config)`.

CLI: `python -m nanojax.tokenizer train [--dataset fineweb|climbmix --vocab_size V --max_chars 2e9 --doc_cap 10000
--data_dir DIR]` and `python -m nanojax.tokenizer eval [--dataset D]` (bytes per token on validation, code, maths
and multilingual text). --dataset picks the default shard directory and vocabulary: fineweb 65,536 (nanochat at
launch), climbmix 32,768 (HEAD's scripts/tok_train.py); explicit --data_dir / --vocab_size win.
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import os
import pathlib
import resource
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import tiktoken
from tqdm import tqdm

from nanojax import paths
from nanojax.conversation import messages_of, validate

SPECIAL_TOKENS = (
    "<|bos|>",  # starts every document
    "<|user_start|>", "<|user_end|>",
    "<|assistant_start|>", "<|assistant_end|>",
    "<|python_start|>", "<|python_end|>",  # assistant calls the python tool
    "<|output_start|>", "<|output_end|>",  # the tool's output, fed back (never trained on)
)
# GPT-4 (cl100k) pre-split, except numbers split into groups of at most 2 digits (nanochat's choice).
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
)
FORMAT, FORMAT_VERSION = "nanojax-bpe", 1
META_FILE, RANKS_FILE, TOKEN_BYTES_FILE = "tokenizer_meta.json", "ranks.tiktoken", "token_bytes.npy"


class Tokenizer:
    """A tiktoken Encoding with nanochat's special tokens; see the module docstring for the format.

    Lone UTF-16 surrogates (invalid in UTF-8) are encoded as U+FFFD, as tiktoken does; properly paired
    surrogates are joined into their character first, so `decode(encode(s)) == s` for every valid string.
    """

    def __init__(self, encoding: tiktoken.Encoding, info: Mapping[str, Any] | None = None):
        """Wraps an Encoding whose top 9 ids are SPECIAL_TOKENS in order (use `from_ranks` or `load`)."""
        top = {name: encoding.n_vocab - len(SPECIAL_TOKENS) + i for i, name in enumerate(SPECIAL_TOKENS)}
        if encoding._special_tokens != top or len(encoding._mergeable_ranks) != min(top.values()):
            raise ValueError(f"encoding {encoding.name!r} must have BPE ranks 0..V-10 and exactly the "
                             f"special tokens {top}, got {encoding._special_tokens}")
        self.encoding = encoding
        self.vocab_size = encoding.n_vocab
        self.info = dict(info or {})  # how it was trained (data, sizes, time), saved with it
        self._special = top
        self.bos_token_id = top["<|bos|>"]
        self.token_bytes = _token_byte_lengths(encoding, set(top.values()))

    # ------------------------------------------------------------------ construction, persistence
    @classmethod
    def from_ranks(cls, mergeable_ranks: Mapping[bytes, int], pattern: str = SPLIT_PATTERN,
                   info: Mapping[str, Any] | None = None) -> Tokenizer:
        """Builds the Encoding from BPE ranks 0..N-1 (each byte a token); specials get ids N..N+8."""
        n = len(mergeable_ranks)
        if sorted(mergeable_ranks.values()) != list(range(n)):
            raise ValueError(f"mergeable ranks must be exactly 0..{n - 1}, each once")
        missing = [b for b in range(256) if bytes([b]) not in mergeable_ranks]
        if missing:
            raise ValueError(f"mergeable ranks lack {len(missing)} single bytes, "
                             f"e.g. {bytes([missing[0]])!r}")
        encoding = tiktoken.Encoding(
            name="nanojax", pat_str=pattern, mergeable_ranks=dict(mergeable_ranks),
            special_tokens={name: n + i for i, name in enumerate(SPECIAL_TOKENS)})
        return cls(encoding, info=info)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, *, pattern: str = SPLIT_PATTERN,
              buffer_size: int = 8192) -> Tokenizer:
        """Trains BPE with rustbpe (threaded Rust) so the vocabulary is exactly `vocab_size` ids.

        rustbpe stops early when the text runs out of pairs to merge; that is an error here because the
        model's embedding size is the vocabulary size, so a silently smaller vocabulary would be a bug.
        """
        try:
            import rustbpe  # training-only dependency: run time needs only tiktoken
        except ImportError as err:
            raise ImportError("training needs the rustbpe package: pip install rustbpe") from err

        num_ranks = vocab_size - len(SPECIAL_TOKENS)
        if num_ranks < 256:
            raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} "
                             f"(256 bytes + {len(SPECIAL_TOKENS)} specials), got {vocab_size}")
        bpe = rustbpe.Tokenizer()
        bpe.train_from_iterator(_checked_texts(texts), num_ranks, buffer_size=buffer_size, pattern=pattern)
        ranks = {bytes(token): rank for token, rank in bpe.get_mergeable_ranks()}
        if len(ranks) != num_ranks:
            raise ValueError(
                f"the training text supports only {len(ranks) - 256} merges but vocab_size={vocab_size} "
                f"needs {num_ranks - 256}: train on more (or more varied) text, or use vocab_size <= "
                f"{len(ranks) + len(SPECIAL_TOKENS)}")
        return cls.from_ranks(ranks, bpe.get_pattern())

    def save(self, directory: str | os.PathLike | None = None) -> pathlib.Path:
        """Writes the three files, each atomically and the metadata (with the ranks checksum) last: an
        interrupted save leaves the old tokenizer or one that `load` rejects, never a silently mixed one."""
        directory = pathlib.Path(directory) if directory is not None else paths.tokenizer_dir()
        directory.mkdir(parents=True, exist_ok=True)
        num_ranks = self.vocab_size - len(SPECIAL_TOKENS)
        lines = [base64.b64encode(self.encoding.decode_single_token_bytes(i)) + b" %d\n" % i
                 for i in range(num_ranks)]
        ranks_blob = b"".join(lines)
        meta = {
            "format": FORMAT, "version": FORMAT_VERSION, "pattern": self.encoding._pat_str,
            "vocab_size": self.vocab_size, "num_ranks": num_ranks, "special_tokens": self._special,
            "ranks_sha256": hashlib.sha256(ranks_blob).hexdigest(), "training": self.info,
        }
        _atomic_write(directory / RANKS_FILE, ranks_blob)
        with _atomic_open(directory / TOKEN_BYTES_FILE) as f:
            np.save(f, self.token_bytes)
        _atomic_write(directory / META_FILE, (json.dumps(meta, indent=2) + "\n").encode())
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike | None = None) -> Tokenizer:
        directory = pathlib.Path(directory) if directory is not None else paths.tokenizer_dir()
        meta_path = directory / META_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"no tokenizer at {directory} ({META_FILE} missing): train one with "
                                    "`python -m nanojax.tokenizer train` or pass the right directory")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
            raise ValueError(f"{meta_path}: format {meta.get('format')!r} v{meta.get('version')}, "
                             f"expected {FORMAT!r} v{FORMAT_VERSION}")
        missing = {"pattern", "num_ranks", "special_tokens", "ranks_sha256"} - set(meta)
        if missing:
            raise ValueError(f"{meta_path} lacks the keys {sorted(missing)}")
        blob = (directory / RANKS_FILE).read_bytes()
        if hashlib.sha256(blob).hexdigest() != meta["ranks_sha256"]:
            raise ValueError(f"{directory / RANKS_FILE} does not match the checksum in {META_FILE}")
        ranks = {}
        for line in blob.splitlines():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
        if len(ranks) != meta["num_ranks"]:
            raise ValueError(f"{RANKS_FILE} holds {len(ranks)} tokens, {META_FILE} says {meta['num_ranks']}")
        expected = {name: meta["num_ranks"] + i for i, name in enumerate(SPECIAL_TOKENS)}
        if meta["special_tokens"] != expected:
            raise ValueError(f"{META_FILE}: special tokens {meta['special_tokens']} differ from {expected}")
        tok = cls.from_ranks(ranks, meta["pattern"], info=meta.get("training"))
        tb_path = directory / TOKEN_BYTES_FILE
        if tb_path.is_file() and not np.array_equal(np.load(tb_path), tok.token_bytes):
            raise ValueError(f"{tb_path} does not match the ranks (stale file from another tokenizer?)")
        return tok

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, bos_token_id={self.bos_token_id})"

    # ------------------------------------------------------------------ encode / decode
    def encode_special(self, name: str) -> int:
        try:
            return self._special[name]
        except KeyError:
            raise ValueError(f"unknown special token {name!r}; known: {', '.join(SPECIAL_TOKENS)}") from None

    def _token_id(self, token: int | str) -> int:
        if isinstance(token, str):
            return self.encode_special(token)
        if not 0 <= int(token) < self.vocab_size:
            raise ValueError(f"token id {token} is outside [0, {self.vocab_size})")
        return int(token)

    def encode(self, text: str | Sequence[str], prepend: int | str | None = None,
               append: int | str | None = None, num_threads: int = 2) -> list[int] | list[list[int]]:
        """Ordinary-text ids of a string, or of each string in a list (threaded).

        `prepend`/`append` add one token (an id or a special token's name) to each result. Special-token
        strings inside the text are ordinary text. Batches use `num_threads` threads: tiktoken releases
        the GIL, but more threads than cores slows it down, hence the default of 2.
        """
        pre = None if prepend is None else self._token_id(prepend)
        post = None if append is None else self._token_id(append)
        if isinstance(text, str):
            return _wrap(self.encoding.encode_ordinary(text), pre, post)
        if isinstance(text, (list, tuple)):
            return self._encode_batch(text, pre, post, num_threads)
        raise TypeError(f"encode takes a str or a list of str, got {type(text).__name__}")

    __call__ = encode

    def _encode_batch(self, texts: Sequence[str], pre: int | None, post: int | None,
                      num_threads: int) -> list[list[int]]:
        bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
        if bad is not None:
            raise TypeError(f"encode: item {bad} of the batch is {type(texts[bad]).__name__}, expected str")
        encode = self.encoding.encode_ordinary

        def encode_chunk(chunk: Sequence[str]) -> list[list[int]]:
            return [_wrap(encode(t), pre, post) for t in chunk]

        if num_threads <= 1 or len(texts) < 2:
            return encode_chunk(texts)  # tiktoken is fastest on the main thread
        # A few contiguous chunks per thread: cheaper than one future per text (tiktoken's batch
        # API), and still balanced when document lengths vary.
        n_chunks = min(len(texts), 4 * num_threads)
        bounds = np.linspace(0, len(texts), n_chunks + 1).astype(int)
        chunks = [texts[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        with ThreadPoolExecutor(num_threads) as pool:
            return [ids for rows in pool.map(encode_chunk, chunks) for ids in rows]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of `ids`; bytes that are not valid UTF-8 on their own (a cut character) become U+FFFD."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        try:
            return self.encoding.decode(ids)
        except (KeyError, OverflowError, TypeError):  # tiktoken's errors do not say which id
            bad = [i for i in ids if not (isinstance(i, int) and 0 <= i < self.vocab_size)]
            raise ValueError(f"decode: token ids {bad[:5]} are not ints in [0, {self.vocab_size})") from None

    # ------------------------------------------------------------------ conversations
    def render_conversation(self, conversation: Mapping[str, Any],
                            max_tokens: int = 2048) -> tuple[list[int], list[int]]:
        """Token ids and loss mask (1 = assistant-written, trained on) of one conversation, as nanochat.

        `<|bos|>`, then per message: user `<|user_start|> text <|user_end|>` all mask 0; assistant
        `<|assistant_start|>` mask 0, then its content and `<|assistant_end|>` mask 1. Assistant content
        may be a list of parts: `text` mask 1, `python` wrapped in python start/end mask 1 (the model
        writes the tool call), `python_output` wrapped in output start/end mask 0 (the tool writes it).
        A leading system message is merged into the first user message as `system + "\\n\\n" + user`.
        The result is cut to `max_tokens`.
        """
        ids: list[int] = []
        mask: list[int] = []

        def add(tokens: int | list[int], value: int) -> None:
            tokens = [tokens] if isinstance(tokens, int) else tokens
            ids.extend(tokens)
            mask.extend([value] * len(tokens))

        sp = self._special
        add(self.bos_token_id, 0)
        for _, role, content in validate(conversation):
            if role == "user":
                add(sp["<|user_start|>"], 0)
                add(self.encode(content), 0)
                add(sp["<|user_end|>"], 0)
                continue
            add(sp["<|assistant_start|>"], 0)
            if isinstance(content, str):
                add(self.encode(content), 1)
            else:
                for part in content:
                    text_ids = self.encode(part["text"])
                    if part["type"] == "text":
                        add(text_ids, 1)
                    elif part["type"] == "python":
                        add(sp["<|python_start|>"], 1)
                        add(text_ids, 1)
                        add(sp["<|python_end|>"], 1)
                    else:  # python_output: comes from the tool at inference time, never supervised
                        add(sp["<|output_start|>"], 0)
                        add(text_ids, 0)
                        add(sp["<|output_end|>"], 0)
            add(sp["<|assistant_end|>"], 1)
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation: Mapping[str, Any], max_tokens: int = 2048) -> list[int]:
        """Prompt ids for sampling the final assistant turn: that turn dropped, `<|assistant_start|>` added.

        As nanochat, truncation to `max_tokens` happens before the appended token.
        """
        messages = messages_of(conversation)
        if messages[-1].get("role") != "assistant":
            raise ValueError(f"render_for_completion: the last message (index {len(messages) - 1}) must be "
                             f"from the assistant, got role {messages[-1].get('role')!r}")
        ids, _ = self.render_conversation({**conversation, "messages": list(messages[:-1])}, max_tokens)
        return ids + [self._special["<|assistant_start|>"]]

    def visualize(self, ids: Sequence[int], mask: Sequence[int], show_ids: bool = False) -> str:
        """Tokens joined by '|', green where mask=1 (trained on) and red where mask=0; for debugging."""
        if len(ids) != len(mask):
            raise ValueError(f"visualize: {len(ids)} ids but {len(mask)} mask values")
        green, red, dim, reset = "\033[92m", "\033[91m", "\033[2m", "\033[0m"
        out = []
        for token, m in zip(ids, mask, strict=True):
            text = self.decode([token]).replace("\n", "\\n")
            out.append(f"{green if m else red}{text}{f'{dim}({token})' if show_ids else ''}{reset}")
        return f"{dim}|{reset}".join(out)


# ---------------------------------------------------------------------- the tokenizer of a run
def tokenizer_dir_for(config) -> str:
    """Where a run with `config` keeps its tokenizer: data.tokenizer_dir, else its dataset's default place
    ($NANOJAX_HOME/tokenizer for FineWeb-Edu, tokenizer-climbmix for ClimbMix)."""
    return str(config.data.tokenizer_dir or paths.tokenizer_dir(config.data.get("dataset", "fineweb")))


def load_for_config(config, directory: str | os.PathLike | None = None) -> Tokenizer | None:
    """The tokenizer of a run with `config`, loaded from `directory` (a checkpoint's record, a command-line
    flag) or else `tokenizer_dir_for(config)`; None for data.kind synthetic (no text) unless `directory`
    names one. Its size must be model.vocab_size: the embedding table is that big, and a mismatch would
    otherwise surface as silently wrong tokens."""
    if directory is None:
        if config.data.kind == "synthetic":
            return None
        directory = tokenizer_dir_for(config)
    tok = Tokenizer.load(directory)
    if tok.vocab_size != config.model.vocab_size:
        raise ValueError(
            f"tokenizer at {directory} has {tok.vocab_size:,} tokens but model.vocab_size="
            f"{config.model.vocab_size:,}; set --config.model.vocab_size={tok.vocab_size} or point "
            "data.tokenizer_dir at the right tokenizer")
    return tok


# ---------------------------------------------------------------------- helpers
def _wrap(ids: list[int], pre: int | None, post: int | None) -> list[int]:
    if pre is not None:
        ids = [pre] + ids
    if post is not None:
        ids.append(post)
    return ids


def _token_byte_lengths(encoding: tiktoken.Encoding, specials: set[int]) -> np.ndarray:
    """Raw byte length per id (not via str, which would turn partial UTF-8 into 3-byte U+FFFD)."""
    return np.array([0 if i in specials else len(encoding.decode_single_token_bytes(i))
                     for i in range(encoding.n_vocab)], dtype=np.int32)


def _checked_texts(texts: Iterable[str]) -> Iterable[str]:
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"training text {i} is {type(text).__name__}, expected str")
        yield text


@contextlib.contextmanager
def _atomic_open(path: pathlib.Path):
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            yield f
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _atomic_write(path: pathlib.Path, data: bytes) -> None:
    with _atomic_open(path) as f:
        f.write(data)


# ---------------------------------------------------------------------- command line
# Short hand-written samples for `eval`: compression differs a lot between kinds of text, and a
# tokenizer trained on English web text should be checked where it is weak (code, maths, other scripts).
EVAL_SAMPLES = {
    "news": (
        "The city council voted on Tuesday to extend the night bus service for another two years, after a "
        "six-month trial carried more than 410,000 passengers. Officials said the routes would cost about "
        "$3.2 million a year, roughly 15% less than first estimated, because fuel prices fell and two depots "
        "were merged. Critics argued that the money should go to repairing the 1960s-era tram line instead. "
        "\"We can't keep patching the old network,\" said one councillor, who voted against the plan. The "
        "transport department will publish ridership figures every quarter, starting in March 2025.\n"),
    "science": (
        "Photosynthesis converts light energy into chemical energy stored in glucose. In the light-dependent "
        "reactions, photosystem II splits water molecules, releasing oxygen and passing electrons along the "
        "thylakoid membrane; the resulting proton gradient drives ATP synthase. The Calvin cycle then fixes "
        "carbon dioxide with the enzyme RuBisCO, which is so slow (about three reactions per second) that it "
        "makes up as much as half of the soluble protein in a leaf. C4 and CAM plants concentrate CO2 around "
        "RuBisCO to limit photorespiration in hot, dry climates.\n"),
    "code": (
        "import heapq\nfrom dataclasses import dataclass, field\n\n\n@dataclass(order=True)\nclass Job:\n"
        "    priority: int\n    name: str = field(compare=False)\n    retries: int = field(default=0, "
        "compare=False)\n\n\ndef run_all(jobs: list[Job], max_retries: int = 3) -> dict[str, bool]:\n"
        "    \"\"\"Runs jobs by priority; a failed job is queued again until max_retries.\"\"\"\n"
        "    heap = list(jobs)\n    heapq.heapify(heap)\n    results = {}\n    while heap:\n"
        "        job = heapq.heappop(heap)\n        try:\n            execute(job.name)\n"
        "            results[job.name] = True\n        except RuntimeError as err:\n"
        "            if job.retries < max_retries:\n                job.retries += 1\n"
        "                heapq.heappush(heap, job)\n            else:\n"
        "                print(f\"giving up on {job.name!r}: {err}\")\n"
        "                results[job.name] = False\n    return results\n"),
    "math": (
        "\\begin{theorem}[Cauchy--Schwarz]\nFor all $x, y \\in \\mathbb{R}^n$ we have "
        "$\\left|\\sum_{i=1}^{n} x_i y_i\\right| \\le \\|x\\|_2 \\, \\|y\\|_2$.\n\\end{theorem}\n"
        "\\begin{proof}\nIf $y = 0$ there is nothing to prove. Otherwise, for every $t \\in \\mathbb{R}$,\n"
        "\\[ 0 \\le \\|x - t y\\|_2^2 = \\|x\\|_2^2 - 2t\\langle x, y\\rangle + t^2 \\|y\\|_2^2. \\]\n"
        "Choosing $t = \\langle x, y \\rangle / \\|y\\|_2^2$ gives "
        "$\\langle x, y\\rangle^2 \\le \\|x\\|_2^2 \\|y\\|_2^2$.\n\\end{proof}\n"
        "Hence $\\int_0^1 f(t) g(t)\\,dt \\le \\sqrt{\\int_0^1 f^2} \\sqrt{\\int_0^1 g^2}$ and "
        "$e^{i\\pi} + 1 = 0$, $\\frac{d}{dx} \\ln x = x^{-1}$ for $x > 0$.\n"),
    "multilingual": (
        "오늘 아침에 도서관에 가서 한국 역사에 관한 책을 두 권 빌렸습니다. 날씨가 좋아서 공원에서 읽었어요.\n"
        "我们明天早上八点在火车站见面，然后一起去博物馆参观新的展览。\n"
        "週末は友達と一緒に山に登って、頂上でお弁当を食べました。\n"
        "Вчера вечером мы долго гуляли по набережной и говорили о планах на лето.\n"
        "ذهبت إلى السوق صباح اليوم واشتريت الخبز والفواكه الطازجة.\n"
        "मैं हर सुबह अपने बगीचे में पौधों को पानी देता हूँ।\n"
        "El próximo año quiero aprender a tocar la guitarra y viajar por Sudamérica.\n"
        "Die Straßenbahn fährt heute wegen Bauarbeiten nur bis zum Hauptbahnhof. 🚋🙂\n"),
}


def _take_chars(texts: Iterable[str], n: int) -> str:
    out, total = [], 0
    for text in texts:
        out.append(text)
        total += len(text)
        if total >= n:
            break
    return "\n".join(out)[:n]


def _int(value: str) -> int:
    return int(float(value)) if any(c in value for c in ".eE") else int(value)


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def cmd_train(args) -> Tokenizer:
    from nanojax.data import fineweb  # CLI only: data depends on the tokenizer, never the reverse

    files = fineweb.list_shards(args.data_dir, args.dataset)
    train_files = files[:-1] if len(files) > 1 else files
    note = " (the only shard: no held-out validation shard)" if len(files) == 1 else ", last shard held out"
    print(f"training on {len(train_files)} {args.dataset} parquet file(s) in {args.data_dir}{note}")
    print(f"vocab_size {args.vocab_size:,}  max_chars {args.max_chars:,}  doc_cap {args.doc_cap:,}")
    stats = {"chars": 0, "docs": 0}
    t0 = time.perf_counter()

    def texts():
        with tqdm(total=args.max_chars, unit="char", unit_scale=True, desc="reading text") as bar:
            for text in fineweb.iter_parquet_texts(train_files):
                text = text[:args.doc_cap]
                stats["chars"] += len(text)
                stats["docs"] += 1
                bar.update(len(text))
                yield text
                if stats["chars"] > args.max_chars:  # as nanochat: the crossing document is kept
                    break
        print(f"read {stats['chars']:,} chars in {stats['docs']:,} documents "
              f"({time.perf_counter() - t0:.1f} s); computing merges...", flush=True)

    tok = Tokenizer.train(texts(), args.vocab_size)
    seconds = time.perf_counter() - t0
    tok.info = {"dataset": args.dataset, "data_dir": str(args.data_dir),
                "train_files": [pathlib.PurePath(f).name for f in train_files],
                "max_chars": args.max_chars, "doc_cap": args.doc_cap, **stats,
                "seconds": round(seconds, 2), "peak_rss_mb": round(_peak_rss_mb(), 1)}
    out = tok.save(args.tokenizer_dir)
    sample = "Hello world! It's 2025: 12345 items, 3.14159.\n\tUnicode: 你好世界 🌍 <|bos|>"
    if tok.decode(tok.encode(sample)) != sample:
        raise RuntimeError(f"the saved tokenizer does not round-trip {sample!r}")
    nonzero = tok.token_bytes[tok.token_bytes > 0]
    print(f"trained in {seconds:.1f} s, peak memory {tok.info['peak_rss_mb']:,.0f} MiB; saved to {out}")
    print(f"vocab {tok.vocab_size:,} (bos {tok.bos_token_id}); token bytes min {nonzero.min()} max "
          f"{nonzero.max()} mean {nonzero.mean():.2f} std {nonzero.std():.2f}")
    return tok


def _reference_encodings(names: Sequence[str], timeout: float) -> dict[str, Any]:
    """tiktoken's published encodings, or why not: they download on first use, which fails offline.

    Loaded in a daemon thread so a network that hangs (instead of failing) cannot stall the eval.
    """
    found: dict[str, Any] = {}

    def load():
        for name in names:
            try:
                found[name] = tiktoken.get_encoding(name)
            except Exception as err:  # noqa: BLE001 - any failure just means "no comparison row"
                found[name] = f"{type(err).__name__}: {err}"[:120]

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(timeout)
    return {name: found.get(name, f"timed out after {timeout:.0f} s") for name in names}


def cmd_eval(args) -> dict[str, dict[str, float]]:
    from nanojax.data import fineweb  # CLI only: data depends on the tokenizer, never the reverse

    tok = Tokenizer.load(args.tokenizer_dir)
    samples: dict[str, str] = {}
    label = "fwe" if args.dataset == "fineweb" else args.dataset
    try:
        files = fineweb.list_shards(args.data_dir, args.dataset)
    except FileNotFoundError as err:
        print(f"note: no {args.dataset} rows ({err})")
    else:
        if len(files) > 1:
            samples[f"{label}-train"] = _take_chars(fineweb.iter_parquet_texts(files[:1]), args.sample_chars)
            samples[f"{label}-val"] = _take_chars(fineweb.iter_parquet_texts(files[-1:]), args.sample_chars)
        else:  # a single shard is also what `train` used, so it is not held out
            samples[f"{label}-train (only shard)"] = _take_chars(fineweb.iter_parquet_texts(files),
                                                                 args.sample_chars)
    for path in map(pathlib.Path, args.text):
        samples[path.stem] = (_take_chars(fineweb.iter_parquet_texts([path]), args.sample_chars)
                              if path.suffix == ".parquet" else path.read_text()[:args.sample_chars])
    samples.update(EVAL_SAMPLES)
    encoders = {"nanojax": tok.encoding}
    for name, enc in _reference_encodings(["gpt2", "cl100k_base"], args.timeout).items():
        if isinstance(enc, str):
            print(f"note: skipping the {name} column, tiktoken could not load it ({enc})")
        else:
            encoders[name] = enc
    results = {}
    print(f"\nbytes per token (higher is better), nanojax vocab {tok.vocab_size:,}\n")
    print("| text | bytes | " + " | ".join(encoders) + " |")
    print("|---|---:|" + "---:|" * len(encoders))
    for label, text in samples.items():
        n_bytes = len(text.encode("utf-8", "replace"))
        results[label] = {name: n_bytes / max(1, len(enc.encode_ordinary(text)))
                          for name, enc in encoders.items()}
        print(f"| {label} | {n_bytes:,} | " + " | ".join(f"{v:.2f}" for v in results[label].values()) + " |")
    return results


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The CLI's arguments with --dataset's defaults filled in: its shard directory (the one the download
    CLI fills, `fineweb.default_dir`), its tokenizer's place (`paths.tokenizer_dir`) and, for train, nanochat's
    vocabulary for it (`Dataset.vocab_size`).
    HEAD's tok_train.py:17-18 keeps launch's --max-chars 2e9 and --doc-cap 10,000, so those are shared."""
    from nanojax.data import fineweb  # CLI only: data depends on the tokenizer, never the reverse

    parser = argparse.ArgumentParser(prog="python -m nanojax.tokenizer", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in (("train", "train a BPE tokenizer on parquet text"),
                        ("eval", "bytes per token on validation text, code, maths, other languages")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--dataset", default="fineweb", choices=sorted(fineweb.DATASETS),
                       help="pretraining shards: fineweb (FineWeb-Edu, nanochat at launch) or climbmix (ClimbMix, "
                            "HEAD); sets the default --data_dir" + (" and --vocab_size" if name == "train" else "")
                            + " (default: %(default)s)")
        p.add_argument("--data_dir", "--data-dir", default=None,
                       help="directory of .parquet shards with a 'text' column, or one .parquet file "
                            f"(default: the dataset's download directory, e.g. {fineweb.default_dir()})")
        p.add_argument("--tokenizer_dir", "--tokenizer-dir", default=None,
                       help="where the tokenizer is saved / loaded (default: the dataset's, "
                            f"{paths.tokenizer_dir()} for fineweb, {paths.tokenizer_dir('climbmix')} for climbmix)")
    train = sub.choices["train"]
    train.add_argument("--vocab_size", "--vocab-size", type=_int, default=None,
                       help="including the 9 special tokens (default: nanochat's for --dataset: " + ", ".join(
                           f"{k} {v.vocab_size}" for k, v in fineweb.DATASETS.items()) + ")")
    train.add_argument("--max_chars", "--max-chars", type=_int, default=2_000_000_000,
                       help="stop reading after this many characters (default: %(default)s)")
    train.add_argument("--doc_cap", "--doc-cap", type=_int, default=10_000,
                       help="crop each document to this many characters (default: %(default)s)")
    ev = sub.choices["eval"]
    ev.add_argument("--sample_chars", "--sample-chars", type=_int, default=2_000_000,
                    help="characters read from each FineWeb split / extra file (default: %(default)s)")
    ev.add_argument("--text", action="append", default=[], metavar="FILE",
                    help="extra text to measure: a .parquet file ('text' column) or a text file; repeatable")
    ev.add_argument("--timeout", type=float, default=10.0,
                    help="seconds to wait for tiktoken's GPT-2/GPT-4 encodings (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.data_dir is None:
        args.data_dir = str(fineweb.default_dir(args.dataset))
    if args.tokenizer_dir is None:
        args.tokenizer_dir = str(paths.tokenizer_dir(args.dataset))
    if args.command == "train" and args.vocab_size is None:
        args.vocab_size = fineweb.dataset_info(args.dataset).vocab_size
    return args


def main(argv: Sequence[str] | None = None) -> Tokenizer | dict[str, dict[str, float]]:
    """CLI entry point; returns the trained tokenizer (train) or bytes per token per text and encoding."""
    args = parse_args(argv)
    return cmd_train(args) if args.command == "train" else cmd_eval(args)


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as err:  # user errors: the message says what to do
        raise SystemExit(f"error: {err}") from None
