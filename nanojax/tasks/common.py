"""Task base class, mixtures, multiple-choice rendering and the dataset reader every task uses.

A Task is a dataset of conversations (nanochat's format, checked by `nanojax.conversation.validate`) plus,
for eval tasks, a way to score a completion.
As nanochat (launch, commit 3a5e0bc): `Task(start, stop, step)` is a lightweight view (`len`, `task[i]`),
every dataset is shuffled once with seed 42 (the same permutation Hugging Face `datasets.shuffle(seed=42)`
draws: `np.random.default_rng(42).permutation(n)`), and `TaskMixture` interleaves several tasks with one
deterministic shuffle (`random.Random(42)`); pass a task twice to oversample it.

Rows come from the Hugging Face dataset's own parquet files, read with pyarrow (no `datasets` library):
`source=None` downloads them through `huggingface_hub` (honouring HF_HUB_OFFLINE, HF_ENDPOINT, HF_HOME)
or uses the cached copy; `source=PATH` reads a local .parquet / .jsonl / .jsonl.gz file, or a directory
holding `<split>*.{parquet,jsonl,jsonl.gz}` files (also under a `<subset>/` subdirectory), in the dataset's
own column layout.

Bad rows (role order, empty content, unknown part type, malformed fields, no complete user/assistant
exchange) raise `BadRowError`, which names the dataset, split and row (the row number in the file, before
shuffling). `skip_bad_rows=True` instead checks every row once at construction, drops the bad ones and counts
them in `task.num_skipped`.
"""
from __future__ import annotations

import glob
import gzip
import json
import os
import random
from typing import Any, Mapping, Sequence

import huggingface_hub
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from nanojax.conversation import validate

DATA_EXTENSIONS = (".parquet", ".jsonl", ".jsonl.gz", ".json")
KNOWN_SPLITS = ("train", "test", "validation", "dev", "auxiliary_train")


class BadRowError(ValueError):
    """A dataset row that cannot become a valid conversation; the message names dataset, split and row."""


# ---------------------------------------------------------------------------------------------- tasks
class Task:
    """A sliceable view over a dataset of conversations: `Task(start=0, stop=None, step=1)`."""

    def __init__(self, start: int = 0, stop: int | None = None, step: int = 1):
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        if stop is not None and stop < start:
            raise ValueError(f"stop must be >= start, got start={start}, stop={stop}")
        if step < 1:
            raise ValueError(f"step must be >= 1, got {step}")
        self.start, self.stop, self.step = start, stop, step

    @property
    def eval_type(self) -> str:
        """'generative' (sample a completion, then `evaluate`) or 'categorical' (argmax over `letters`)."""
        raise NotImplementedError

    def num_examples(self) -> int:
        raise NotImplementedError

    def get_example(self, index: int) -> dict:
        raise NotImplementedError

    def evaluate(self, conversation: Mapping[str, Any], completion: str) -> bool:
        raise NotImplementedError

    def __len__(self) -> int:
        stop = self.num_examples() if self.stop is None else min(self.stop, self.num_examples())
        return max(0, -(-(stop - self.start) // self.step))

    def __getitem__(self, index: int) -> dict:
        if not isinstance(index, (int, np.integer)):
            raise TypeError(f"task index must be an int, got {type(index).__name__}")
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {self!r} of length {n}")
        index = int(index) % n
        return self.get_example(self.start + index * self.step)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __repr__(self) -> str:
        view = "" if (self.start, self.stop, self.step) == (0, None, 1) else f"[{self.start}:{self.stop}:{self.step}]"
        return f"{type(self).__name__}{view}"


class TaskMixture(Task):
    """All conversations of `tasks`, in one deterministic shuffle (nanochat: `random.Random(42)`)."""

    def __init__(self, tasks: Sequence[Task], seed: int = 42, **kwargs):
        super().__init__(**kwargs)
        self.tasks = list(tasks)
        self.lengths = [len(t) for t in self.tasks]
        self.offsets = np.cumsum([0] + self.lengths)
        # nanochat shuffles a list of (task, local index) pairs in task order; shuffling their flat
        # positions with the same generator gives the same permutation.
        order = list(range(int(self.offsets[-1])))
        random.Random(seed).shuffle(order)
        self.order = np.asarray(order, dtype=np.int64)

    def num_examples(self) -> int:
        return int(self.offsets[-1])

    def locate(self, index: int) -> tuple[int, int]:
        """(task number, index inside that task) of mixture position `index` (before start/stop/step)."""
        flat = int(self.order[index])
        t = int(np.searchsorted(self.offsets, flat, side="right")) - 1
        return t, flat - int(self.offsets[t])

    def get_example(self, index: int) -> dict:
        t, i = self.locate(index)
        return self.tasks[t][i]

    def __repr__(self) -> str:
        return f"TaskMixture({', '.join(f'{t!r}×{n}' for t, n in zip(self.tasks, self.lengths))})"


def render_mc(question: str, letters: Sequence[str], choices: Sequence[str]) -> str:
    """nanochat's multiple-choice prompt. The letter comes *after* its choice and with no space before it:
    small models bind "=A" to the answer token "A" (the assistant replies with the bare letter)."""
    query = f"Multiple Choice question: {question}\n"
    query += "".join(f"- {choice}={letter}\n" for letter, choice in zip(letters, choices))
    return query + "\nRespond only with the letter of the correct answer."


# -------------------------------------------------------------------------------------- row datasets
class DatasetTask(Task):
    """A Task backed by rows of a Hugging Face dataset. Subclasses declare the dataset (`dataset`, `splits`,
    `subsets`, defaults, `eval_type`) and write `make_conversation` (and `evaluate` for eval tasks).

    The rows are read once (pyarrow), permuted with `shuffle_seed` (None: file order) and, with
    `skip_bad_rows`, filtered. `task.row_of(i)` is the file row behind `task[i]`.
    """

    dataset: str = ""  # Hugging Face repo id
    hub_subset: str | None = None  # the repo's folder for the split files when the task has no subset
    columns: Sequence[str] | None = None  # columns to read (None: all)
    splits: Sequence[str] = ()  # the dataset's splits
    subsets: Sequence[str] = ()  # its subsets, the default first; () when it has none
    default_split: str = "test"
    eval_type: str = "generative"  # or "categorical": argmax over the conversation's `letters`
    answer_format: str | None = None  # how a reply states its answer (GSM8K: "'#### N'"), if the task fixes one

    def __init__(self, split: str | None = None, subset: str | None = None, *,
                 source: str | os.PathLike | None = None, shuffle_seed: int | None = 42,
                 skip_bad_rows: bool = False, **kwargs):
        split = split or self.default_split
        subset = subset or (self.subsets[0] if self.subsets else None)
        self.check_split(split, subset)
        super().__init__(**kwargs)
        self.split, self.subset, self.source = split, subset, source
        self.rows = read_rows(self.dataset, subset or self.hub_subset, split, source=source, columns=self.columns)
        n = len(self.rows)
        self.index = (np.random.default_rng(shuffle_seed).permutation(n) if shuffle_seed is not None
                      else np.arange(n))
        self.num_skipped = 0
        if skip_bad_rows:
            good = []
            for row in self.index:
                try:
                    self._example_at(int(row))
                    good.append(row)
                except BadRowError:
                    self.num_skipped += 1
            self.index = np.asarray(good, dtype=np.int64)

    def well_formed(self, completion: str) -> bool:
        """Whether a reply states its answer in `answer_format` (right or wrong); True when there is none."""
        return True

    def check_split(self, split: str, subset: str | None) -> None:
        """ValueError naming the task and the valid choices for a split or subset it does not have."""
        cls = type(self).__name__
        if self.subsets and subset not in self.subsets:
            raise ValueError(f"{cls} subset must be {'|'.join(self.subsets)}, got {subset!r}")
        if not self.subsets and subset is not None:
            raise ValueError(f"{cls} has no subsets, got {subset!r}")
        if split not in self.splits:
            raise ValueError(f"{cls} split must be {'|'.join(self.splits)}, got {split!r}")

    @property
    def name(self) -> str:
        return self.dataset + (f"/{self.subset}" if self.subset else "")

    def num_examples(self) -> int:
        return len(self.index)

    def row_of(self, index: int) -> int:
        return int(self.index[index])

    def get_example(self, index: int) -> dict:
        return self._example_at(self.row_of(index))

    def _example_at(self, row: int) -> dict:
        where = f"{self.name} split {self.split!r} row {row}"
        try:
            conversation = self.make_conversation(self.rows[row])
        except BadRowError:
            raise
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
            raise BadRowError(f"{where}: malformed row ({type(e).__name__}: {e})") from e
        try:
            validate(conversation, complete=True)
        except ValueError as e:
            raise BadRowError(f"{where}: {e}") from None
        return conversation

    def make_conversation(self, row: Mapping[str, Any]) -> dict:
        raise NotImplementedError

    def __repr__(self) -> str:
        view = super().__repr__()[len(type(self).__name__):]
        return f"{type(self).__name__}({self.subset + ', ' if self.subset else ''}{self.split}){view}"


class Rows:
    """Random access to the rows of a pyarrow Table as Python dicts (converted on access, not up front)."""

    def __init__(self, table):
        self.table = table
        self._columns = {name: table.column(name) for name in table.column_names}
        self._chunk_starts = {name: np.cumsum([0] + [len(c) for c in col.chunks])
                              for name, col in self._columns.items()}

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, i: int) -> dict:
        out = {}
        for name, col in self._columns.items():
            starts = self._chunk_starts[name]
            k = int(np.searchsorted(starts, i, side="right")) - 1
            out[name] = col.chunks[k][i - int(starts[k])].as_py()
        return out


def read_rows(dataset: str, subset: str | None, split: str, *, source=None, columns=None) -> Rows:
    """The rows of `dataset` (`subset`, `split`) from `source` (file or directory) or the Hugging Face hub."""
    files = local_files(source, subset, split) if source is not None else hub_files(dataset, subset, split)
    tables = [_read_file(f, columns) for f in files]
    try:
        table = pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise ValueError(f"{dataset}: the files {files} do not share one column layout: {e}") from e
    return Rows(table)


def _read_file(path: str, columns):
    if path.endswith(".parquet"):
        table = pq.read_table(path)
    else:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            if path.endswith(".json") or path.endswith(".json.gz"):
                text = f.read().strip()
                rows = (json.loads(text) if text.startswith("[")
                        else [json.loads(line) for line in text.splitlines() if line.strip()])
            else:
                rows = [json.loads(line) for line in f if line.strip()]
        if not rows:
            raise ValueError(f"{path}: no rows")
        table = pa.Table.from_pylist(rows)
    if columns:
        missing = [c for c in columns if c not in table.column_names]
        if missing:
            raise ValueError(f"{path}: lacks the column(s) {missing} (has {table.column_names}); is it the right "
                             f"dataset, in the Hugging Face dataset's own column layout?")
        table = table.select(list(columns))
    return table


def _has_data_ext(path: str) -> bool:
    return path.endswith(DATA_EXTENSIONS) or path.endswith(".json.gz")


def _split_matches(name: str, split: str) -> bool:
    base = os.path.basename(name)
    return base == split or (base.startswith(split) and base[len(split)] in "-._")


def local_files(source, subset: str | None, split: str) -> list[str]:
    """A file is used as is; a directory gives its `<split>*` data files (preferring a `<subset>/` subdirectory)."""
    source = os.fspath(source)
    if os.path.isfile(source):
        return [source]
    if not os.path.isdir(source):
        raise FileNotFoundError(f"source {source!r} does not exist")
    roots = [os.path.join(source, subset)] if subset and os.path.isdir(os.path.join(source, subset)) else []
    roots.append(source)
    for root in roots:
        files = sorted(p for p in glob.glob(os.path.join(root, "**", "*"), recursive=True)
                       if os.path.isfile(p) and _has_data_ext(p))
        found = [p for p in files if _split_matches(p, split)
                 or _split_matches(os.path.dirname(os.path.relpath(p, root)) or "-", split)]
        if found:
            return found
        # A lone file named after the dataset (e.g. HumanEval.jsonl.gz, whose only split is `test`).
        if len(files) == 1 and not any(_split_matches(files[0], s) for s in KNOWN_SPLITS):
            return files
    listing = sorted(os.path.relpath(p, source) for p in glob.glob(os.path.join(source, "**", "*"), recursive=True)
                     if os.path.isfile(p))[:20]
    raise FileNotFoundError(f"source {source!r} has no {split!r} data files ({split}*.parquet / .jsonl / "
                            f".jsonl.gz{f' under {subset}/' if subset else ''}); it holds {listing}")


def hub_files(dataset: str, subset: str | None, split: str) -> list[str]:
    """The split's parquet files of a Hugging Face dataset repo, downloaded (or found in the HF cache)."""
    prefix = f"{subset}/" if subset else ""
    patterns = [f"{prefix}{split}-*.parquet", f"{prefix}{split}/*.parquet", f"data/{split}-*.parquet",
                f"{prefix}data/{split}-*.parquet"]
    try:
        local = huggingface_hub.snapshot_download(dataset, repo_type="dataset", allow_patterns=patterns)
    except Exception as e:  # noqa: BLE001 (offline / not cached / network: one clear message)
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
        raise FileNotFoundError(
            f"could not get the Hugging Face dataset {dataset!r} (subset {subset!r}, split {split!r})"
            f"{' in offline mode (HF_HUB_OFFLINE=1) and it is not in the cache' if offline else ''}: "
            f"{type(e).__name__}: {str(e).strip().rstrip('.')}. Download it where there is network, or pass "
            f"source=<a local .parquet/.jsonl(.gz) file or directory in the dataset's own column layout> (in configs: "
            f"config.data.task_sources)") from e
    files = sorted(p for pattern in patterns for p in glob.glob(os.path.join(local, pattern)))
    files = sorted(set(files))
    if not files:
        raise FileNotFoundError(f"the Hugging Face dataset {dataset!r} has no parquet files for subset {subset!r}, "
                                f"split {split!r} (looked for {patterns} in {local})")
    return files
