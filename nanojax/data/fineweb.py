"""Pretraining shards (FineWeb-Edu-100B, ClimbMix-400B): index, on-demand resumable download, integrity checks, cache.

The dataset is nanochat's `karpathy/fineweb-edu-100b-shuffle`: 1,823 parquet files `shard_{i:05d}.parquet`
(one `text` column, row groups of 1,024 documents, ~250M characters each, globally shuffled). The last
shard (1822) is the validation split, as in nanochat: `download -n N` fetches shards 0..N-1 plus 1822.
nanochat HEAD's `karpathy/climbmix-400b-shuffle` (`--dataset climbmix`, config `data.dataset`) has the same
layout and naming with 6,543 shards, validation shard 6542; `DATASETS` holds what differs, including the
characters per shard and per training token that `shards-needed`, `download --config` and `status` use.

A shard only ever appears under its final name after it has been downloaded completely and its parquet
footer has been read back (row count > 0), so a partial file is never mistaken for a complete one.
Downloads go through `huggingface_hub.hf_hub_download` (it honours HF_ENDPOINT, HF_TOKEN, HF_HOME and
HF_HUB_OFFLINE; Xet-backed when hf_xet is installed) into a staging folder `<dir>/.partial/`, then are
renamed into place. Resuming: a dropped connection resumes inside the transfer (HTTP Range, by
huggingface_hub); a killed or failed run keeps every finished shard, and rerunning the same command
fetches only the missing ones (a shard is ~100 MB, so at most that is fetched twice).

    python -m nanojax.data.fineweb download -n 8            # shards 0..7 + the val shard
    python -m nanojax.data.fineweb status                   # what is present and whether it reads
    python -m nanojax.data.fineweb download --config configs/base_d20.py   # 216 + val
    python -m nanojax.data.fineweb shards-needed --tokens 11.2e9
    python -m nanojax.data.fineweb download -n 170 --dataset climbmix   # HEAD's speedrun: 170 + val
    python -m nanojax.data.fineweb download --config configs/gpt2_d24.py   # its data.dataset: climbmix, 126 + val
"""
from __future__ import annotations

import argparse
import concurrent.futures
import copy
import dataclasses
import logging
import math
import os
import pathlib
import re
import sys
import time
from typing import Iterable, Sequence

import huggingface_hub
import huggingface_hub.constants
import huggingface_hub.utils
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from nanojax import config as cfglib
from nanojax import paths

REPO_ID = "karpathy/fineweb-edu-100b-shuffle"
NUM_SHARDS = 1823
VAL_SHARD = NUM_SHARDS - 1
SHARD_RE = re.compile(r"shard_(\d{5})\.parquet$")
STAGING = ".partial"

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Dataset:
    """What differs between the pretraining datasets; both use `shard_{i:05d}.parquet`, last shard = val.

    The sizing figures turn a token budget into shards: ceil(tokens x chars_per_token / chars_per_shard).
    chars_per_token is per token trained on with `vocab_size`, nanochat's tokenizer for the dataset (also
    `python -m nanojax.tokenizer train --dataset`'s default), so it holds only for that vocabulary.
    """
    repo_id: str
    num_shards: int
    dir_name: str  # under $NANOJAX_HOME/data
    vocab_size: int
    chars_per_token: float
    chars_per_shard: float = 250e6  # HEAD dev/repackage_data_reference.py:78: a shard closes at >= 250M chars

    @property
    def val_shard(self) -> int:
        return self.num_shards - 1


DATASETS = {
    # nanochat at launch (3a5e0bc): speedrun.sh:87-88 "Assume our tokenizer is 4.8 chars/token", 250M chars/shard.
    "fineweb": Dataset(REPO_ID, NUM_SHARDS, "fineweb", vocab_size=65536, chars_per_token=4.8),
    # nanochat HEAD (92d63d4): dataset.py:23-24 repo and MAX_SHARD = 6542; tok_train.py:19 vocab 32768;
    # repackage_data_reference.py:36,78 cut ClimbMix at 250M chars/shard too (speedrun.sh:46 "~250M chars").
    # HEAD states no chars/token for ClimbMix, so it is derived from dev/LOG.md:120 "approx 150 data shards
    # (~7B tokens) are now needed for GPT-2 capability" (d24 at ratio 9.5, dev/LEADERBOARD.md:155-173):
    # 150 x 250M / 7B = 5.36 characters per *trained* token. That is above the tokenizer's compression
    # because HEAD's best-fit packing discards ~34% of tokens (dev/LOG.md:797). Check: speedrun.sh:67's
    # d24 at ratio 8 (5.84B tokens) -> 126 shards, within the 170 it downloads (speedrun.sh:52-54).
    "climbmix": Dataset("karpathy/climbmix-400b-shuffle", 6543, "climbmix", vocab_size=32768,
                        chars_per_token=5.36),
}


def dataset_info(name: str) -> Dataset:
    if name not in DATASETS:
        raise ValueError(f"data.dataset={name!r} is not a known pretraining dataset (known: {', '.join(DATASETS)})")
    return DATASETS[name]


class CorruptShardError(ValueError):
    """A parquet file whose footer does not read, has no rows, or has no `text` column."""


def shard_name(index: int, dataset: str = "fineweb") -> str:
    count = dataset_info(dataset).num_shards
    if not 0 <= index < count:
        raise ValueError(f"shard index {index} out of range 0..{count - 1}")
    return f"shard_{index:05d}.parquet"


def default_dir(dataset: str = "fineweb") -> pathlib.Path:
    return paths.data_dir(dataset_info(dataset).dir_name)


def _resolve_dir(directory, dataset: str = "fineweb") -> str:
    """A local dir (as str, `~` expanded) or a URI such as gs://bucket/path, unchanged."""
    if directory is None or str(directory) == "":
        return str(default_dir(dataset))
    s = str(directory)
    return s if "://" in s else str(pathlib.Path(s).expanduser())


def _is_remote(path: str) -> bool:
    return paths.is_url(path)


def download_command(n: int | None = None, directory=None, dataset: str = "fineweb") -> str:
    cmd = f"python -m nanojax.data.fineweb download -n {n if n is not None else 'N'}"
    if dataset != "fineweb":
        cmd += f" --dataset {dataset}"
    if directory is not None and pathlib.Path(str(directory)) != default_dir(dataset):
        cmd += f" --dir {directory}"
    return cmd


def list_shards(directory=None, dataset: str = "fineweb") -> list[str]:
    """All `*.parquet` files directly in `directory` (local or gs://), sorted by name, or the one local
    .parquet file given. Every reader of parquet text lists its files here (training, tokenizer CLI).

    Hidden files, the staging folder and `.corrupt` files are ignored. Raises FileNotFoundError saying
    where it looked when there are none, so a wrong path fails at start-up rather than at step 0.
    """
    d = _resolve_dir(directory, dataset)
    if not _is_remote(d) and d.endswith(".parquet") and pathlib.Path(d).is_file():
        return [d]
    if _is_remote(d):
        fs, root = paths.url_filesystem(d)
        infos = fs.ls(root, detail=True) if fs.isdir(root) else []
        names = [i["name"] for i in infos if i["type"] == "file"]
        found = sorted(fs.unstrip_protocol(n) for n in names
                       if n.endswith(".parquet") and not n.rsplit("/", 1)[-1].startswith("."))
    else:
        p = pathlib.Path(d)
        found = sorted(str(f) for f in p.glob("*.parquet") if f.is_file() and not f.name.startswith(".")) \
            if p.is_dir() else []
    if not found:
        raise FileNotFoundError(
            f"no .parquet files in {d} (looked for *.parquet"
            f"{'' if _is_remote(d) or pathlib.Path(d).is_dir() else '; the directory does not exist'}). "
            f"Download {dataset} shards with: {download_command(8, d, dataset)} (8 shards are 2B characters), "
            "or point at a directory of parquet files with a 'text' column")
    return found


def open_parquet(path: str) -> pq.ParquetFile:
    """A local path or a URL (gs:// through gcsfs, memory://, ...: any fsspec filesystem)."""
    if _is_remote(path):
        fs, p = paths.url_filesystem(path)
        return pq.ParquetFile(fs.open(p, "rb"))
    return pq.ParquetFile(path)


def require_text_column(path, column: str = "text"):
    """`path`, once its parquet schema is seen to have the column nanojax reads documents from; otherwise
    CorruptShardError naming the file and the columns it has. A file whose footer does not read is passed
    through for the caller to report (`pretrain.row_groups` names it, with the re-download hint)."""
    try:
        names = open_parquet(str(path)).schema_arrow.names
    except Exception:  # noqa: BLE001 - unreadable: the caller's error, not this one
        return path
    if column not in names:
        raise CorruptShardError(f"{path}: no {column!r} column (columns: {', '.join(names) or 'none'}); nanojax "
                                f"reads documents from a column named {column!r}")
    return path


def iter_parquet_texts(files: Sequence[str | os.PathLike], column: str = "text") -> Iterable[str]:
    """Non-empty texts of the files, one row group at a time (memory stays flat on large shards)."""
    for path in files:
        pf = open_parquet(str(path))
        if column not in pf.schema_arrow.names:
            raise ValueError(f"{path} has no {column!r} column (columns: {pf.schema_arrow.names})")
        for group in range(pf.num_row_groups):
            yield from filter(None, pf.read_row_group(group, columns=[column]).column(0).to_pylist())


def train_val_split(files: Sequence[str], dataset: str = "fineweb") -> tuple[list[str], str]:
    """(train files, val file). Val is the dataset's last shard (FineWeb-Edu: shard_01822) when present, else
    the last file by name (nanochat v0).

    Needs at least two files so that no document is both trained on and used for validation.
    """
    files = sorted(str(f) for f in files)
    if len(files) < 2:
        raise ValueError(f"need at least 2 parquet files (train + val), got {len(files)}: {files}. "
                         f"Download more with: {download_command(1, dataset=dataset)}")
    val_name = shard_name(dataset_info(dataset).val_shard, dataset)
    val = next((f for f in files if f.endswith(val_name)), files[-1])
    return [f for f in files if f != val], val


def check_shard(path) -> int:
    """Read the parquet footer; return the row count. Raises CorruptShardError naming the file."""
    try:
        md = open_parquet(str(path)).metadata
        names = md.schema.names
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for truncated or foreign files
        raise CorruptShardError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from e
    if md.num_rows <= 0:
        raise CorruptShardError(f"{path}: parquet file has no rows")
    if "text" not in names:
        raise CorruptShardError(f"{path}: no 'text' column (columns: {names})")
    return md.num_rows


def shards_needed(tokens: float, chars_per_token: float | None = None, dataset: str = "fineweb") -> int:
    """Training shards for a token budget (one pass), val shard excluded, with the dataset's figures:
    ceil(tokens x chars/token / chars/shard); `chars_per_token` overrides the dataset's (another vocabulary)."""
    info = dataset_info(dataset)
    return max(1, math.ceil(tokens * (chars_per_token or info.chars_per_token) / info.chars_per_shard))


def config_tokens(config) -> int:
    """Training tokens of a config (file path or ConfigDict): iterations x total_batch_size, as config.derive,
    including HEAD's automatic batch size and horizon (optim.kind="head", total_batch_size=-1)."""
    c = cfglib.load_config_file(config) if isinstance(config, (str, os.PathLike)) else copy.deepcopy(config)
    if c.optim.get("kind", "launch") == "head":
        from nanojax.optim_head import fill_head_batch  # lazy: it imports the model (JAX)

        fill_head_batch(c)
    total, _ = cfglib.count_params(c.model)
    t = c.train
    iters = t.num_iterations
    if iters <= 0:
        iters = int(t.target_param_data_ratio * total) // t.total_batch_size
    return iters * t.total_batch_size


def shard_plan(tokens: float | None = None, config=None, dataset: str | None = None,
               chars_per_token: float | None = None) -> tuple[int, str, str]:
    """(training shards, dataset, one-line explanation) for a token budget or a config file.

    A config brings its budget, its data.dataset (an explicit, different `dataset` is an error rather than
    a silent guess) and its model.vocab_size, noted when the dataset's chars/token was measured for another.
    """
    vocab = None
    if config is not None:
        c = cfglib.load_config_file(config) if isinstance(config, (str, os.PathLike)) else config
        if dataset is not None and dataset != c.data.dataset:
            raise ValueError(f"--dataset {dataset} but {config} has data.dataset={c.data.dataset!r}; "
                             "drop --dataset or change data.dataset in the config")
        tokens, dataset, vocab = config_tokens(c), c.data.dataset, c.model.vocab_size
    dataset = dataset or "fineweb"
    info = dataset_info(dataset)
    cpt = chars_per_token or info.chars_per_token
    n = shards_needed(tokens, cpt, dataset)
    line = (f"{tokens:.4g} tokens x {cpt} chars/token / {info.chars_per_shard:.3g} chars/shard = {n} training "
            f"shard(s) of {dataset} (+1 validation shard)")
    if vocab is not None and vocab != info.vocab_size and not chars_per_token:
        line += (f". Note: {info.chars_per_token} chars/token is for {dataset}'s {info.vocab_size:,}-token "
                 f"tokenizer, this config's vocab is {vocab:,}; pass --chars-per-token to correct it")
    return n, dataset, line


def write_shard(path, texts: Iterable[str], row_group_size: int = 1024) -> None:
    """Write texts in the dataset's own layout (tests, benchmarks): one `text` column, zstd, no stats."""
    table = pa.table({"text": pa.array(list(texts), type=pa.string())})
    tmp = f"{path}.tmp"
    pq.write_table(table, tmp, row_group_size=row_group_size, compression="zstd", use_dictionary=False,
                   write_statistics=False)
    os.replace(tmp, path)


def _offline() -> bool:
    return bool(huggingface_hub.constants.HF_HUB_OFFLINE)


def _move_aside(path: pathlib.Path) -> pathlib.Path:
    """Rename a bad file to `<name>.corrupt[.k]` (never delete what may be the user's only copy)."""
    dest = path.with_name(path.name + ".corrupt")
    k = 1
    while dest.exists():
        dest, k = path.with_name(f"{path.name}.corrupt.{k}"), k + 1
    os.replace(path, dest)
    return dest


_FATAL = ("RepositoryNotFoundError", "GatedRepoError", "RevisionNotFoundError", "EntryNotFoundError",
          "RemoteEntryNotFoundError", "LocalEntryNotFoundError", "OfflineModeIsEnabled", "DisabledRepoError")


def _fetch(name: str, d: pathlib.Path, *, repo_id: str, revision: str, retries: int, backoff: float) -> int:
    """Download one file into the staging dir (resumable), verify it, rename it into place. Returns bytes.

    Transient errors are retried `retries` times with exponential backoff; a file that downloads but does
    not read as parquet is re-downloaded once from scratch, then reported.
    """
    if (d / name).exists():  # another process sharing the directory may have fetched it meanwhile
        try:
            check_shard(d / name)
            return 0
        except CorruptShardError:
            pass
    staging = d / STAGING
    endpoint = os.environ.get("HF_ENDPOINT") or None  # read now: huggingface_hub reads it once at import
    force = False
    for corrupt_try in range(2):
        for attempt in range(retries + 1):
            try:
                staged = pathlib.Path(huggingface_hub.hf_hub_download(
                    repo_id, name, repo_type="dataset", revision=revision,
                    local_dir=staging, endpoint=endpoint, force_download=force))
                break
            except Exception as e:  # noqa: BLE001 - classify below
                status = getattr(getattr(e, "response", None), "status_code", None)
                client_error = isinstance(status, int) and 400 <= status < 500 and status not in (408, 429)
                if type(e).__name__ in _FATAL or client_error or attempt == retries:
                    raise RuntimeError(f"downloading {name} from {endpoint or 'the Hugging Face Hub'} "
                                       f"({repo_id}) failed after {attempt + 1} attempt(s): "
                                       f"{type(e).__name__}: {e}") from e
                wait = backoff * 2 ** attempt
                log.warning("%s: %s: %s; retrying in %.1fs", name, type(e).__name__, e, wait)
                time.sleep(wait)
        try:
            check_shard(staged)
        except CorruptShardError as e:
            staged.unlink(missing_ok=True)  # our own staging copy, not user data
            if corrupt_try == 1:
                raise CorruptShardError(f"{name} from {repo_id} is corrupt twice in a row: {e}") from e
            log.warning("downloaded %s does not read (%s); re-downloading once", name, e)
            force = True
            continue
        size = staged.stat().st_size
        os.replace(staged, d / name)
        return size
    raise AssertionError("unreachable")


def ensure_shards(indices: Iterable[int], directory=None, *, download: bool = True, workers: int = 8,
                  retries: int = 5, backoff: float = 2.0, repo_id: str | None = None, revision: str = "main",
                  progress: bool = True, dataset: str = "fineweb") -> list[pathlib.Path]:
    """Make shards `indices` present and readable in `directory`; return their paths in index order.

    Present files are footer-checked; a bad one is renamed `*.corrupt` and downloaded again. Missing ones
    are downloaded in parallel (or, offline / with download=False, a FileNotFoundError names them and the
    command to fetch them). `dataset` names the shards and the Hub repo (unless `repo_id` is given).
    """
    info = dataset_info(dataset)
    repo_id = repo_id or info.repo_id
    d_str = _resolve_dir(directory, dataset)
    indices = sorted(set(int(i) for i in indices))
    if _is_remote(d_str):
        raise ValueError(f"cannot download into {d_str}: download to a local directory, then copy it "
                         f"(e.g. `gcloud storage cp -r DIR {d_str}`); readers accept gs:// paths directly")
    d = pathlib.Path(d_str)
    names = [shard_name(i, dataset) for i in indices]
    missing, corrupt = [], []
    for name in names:
        if not (d / name).exists():
            missing.append(name)
            continue
        try:
            check_shard(d / name)
        except CorruptShardError as e:
            corrupt.append((name, e))
    if (missing or corrupt) and (not download or _offline()):
        why = "HF_HUB_OFFLINE is set" if download else "downloading is disabled"
        bad = missing + [f"{n} (corrupt: {e})" for n, e in corrupt]
        raise FileNotFoundError(
            f"{len(bad)} shard(s) missing or unreadable in {d} and {why}: {', '.join(bad[:5])}"
            f"{' ...' if len(bad) > 5 else ''}. On a machine with internet run: "
            f"{download_command(max((i for i in indices if i != info.val_shard), default=-1) + 1, d, dataset)}")
    for name, e in corrupt:
        moved = _move_aside(d / name)
        log.warning("%s; moved it to %s and downloading it again", e, moved)
        missing.append(name)
    if missing:
        d.mkdir(parents=True, exist_ok=True)
        _download_all(missing, d, workers=workers, retries=retries, backoff=backoff, repo_id=repo_id,
                      revision=revision, progress=progress)
    return [d / n for n in names]


def _download_all(names, d, *, workers, retries, backoff, repo_id, revision, progress) -> None:
    t0, total_bytes, failures = time.time(), 0, []
    was_disabled = huggingface_hub.utils.are_progress_bars_disabled()
    huggingface_hub.utils.disable_progress_bars()  # one overall bar instead of one per concurrent file
    pool = concurrent.futures.ThreadPoolExecutor(max(1, workers))
    try:
        with tqdm(total=len(names), unit="shard", desc=f"{repo_id} -> {d}", disable=not progress) as bar:
            futs = {pool.submit(_fetch, n, d, repo_id=repo_id, revision=revision, retries=retries,
                                backoff=backoff): n for n in names}
            for fut in concurrent.futures.as_completed(futs):
                try:
                    total_bytes += fut.result()
                except Exception as e:  # noqa: BLE001 - keep the others going, report all at the end
                    failures.append((futs[fut], e))
                bar.update(1)
                bar.set_postfix_str(f"{total_bytes / 1e6:,.0f} MB")
    finally:  # on Ctrl-C: drop queued files at once; in-flight ones finish or resume next time
        pool.shutdown(wait=False, cancel_futures=True)
        if not was_disabled:
            huggingface_hub.utils.enable_progress_bars()
    dt = time.time() - t0
    log.info("downloaded %d shard(s), %.1f MB in %.1fs", len(names) - len(failures), total_bytes / 1e6, dt)
    if failures:
        lines = "\n".join(f"  {n}: {e}" for n, e in sorted(failures, key=lambda x: x[0]))
        raise RuntimeError(f"{len(failures)} of {len(names)} shard(s) failed to download into {d} "
                           f"(completed ones are kept; rerun the same command to resume):\n{lines}")


def status(directory=None, verify: bool = True, dataset: str = "fineweb") -> dict:
    """Summary of a shard directory: shard files, bytes, rows, corrupt/partial leftovers, train/val split."""
    d = _resolve_dir(directory, dataset)
    out = {"dir": d, "files": [], "bytes": 0, "rows": 0, "corrupt": [], "leftovers": []}
    try:
        files = list_shards(d)
    except FileNotFoundError:
        files = []
    for f in files:
        if verify:
            try:
                out["rows"] += check_shard(f)
            except CorruptShardError as e:
                out["corrupt"].append(str(e))
        if not _is_remote(f):
            out["bytes"] += os.path.getsize(f)
    out["files"] = files
    if not _is_remote(d) and pathlib.Path(d).is_dir():
        out["leftovers"] = sorted(str(p) for p in pathlib.Path(d).glob("*.corrupt*"))
        partial = list((pathlib.Path(d) / STAGING).rglob("*.incomplete"))
        if partial:
            out["leftovers"].append(
                f"{pathlib.Path(d) / STAGING}: {len(partial)} partial file(s), "
                f"{sum(p.stat().st_size for p in partial) / 1e6:.0f} MB, left by killed downloads "
                "(delete them when no download is running)")
    idx = sorted(int(m.group(1)) for f in files if (m := SHARD_RE.search(f)))
    out["indices"] = idx
    if len(files) >= 2:
        train, val = train_val_split(files, dataset)
        out["train_files"], out["val_file"] = len(train), val
    return out


def _ranges(idx: list[int]) -> str:
    parts, start = [], None
    for k, i in enumerate(idx):
        if start is None:
            start = i
        if k + 1 == len(idx) or idx[k + 1] != i + 1:
            parts.append(f"{start}" if start == i else f"{start}..{i}")
            start = None
    return ", ".join(parts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nanojax.data.fineweb", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    dl = sub.add_parser("download", help="download shards 0..N-1 plus the validation shard")
    how_many = dl.add_mutually_exclusive_group(required=True)
    how_many.add_argument("-n", "--num-shards", type=int,
                          help="training shards to fetch (shards 0..N-1; max: the dataset's val shard - 1)")
    how_many.add_argument("--config", help="as many as this config file trains on, of its data.dataset "
                                           "(see shards-needed)")
    dl.add_argument("--dir", default=None, help=f"target directory (default {default_dir()})")
    dl.add_argument("--workers", type=int, default=8, help="parallel downloads")
    dl.add_argument("--retries", type=int, default=5)
    dl.add_argument("--no-val", action="store_true", help="skip the validation shard")
    st = sub.add_parser("status", help="what is present, whether it reads")
    st.add_argument("--dir", default=None)
    st.add_argument("--no-verify", action="store_true", help="skip reading each parquet footer")
    sn = sub.add_parser("shards-needed", help="training shards a token budget needs, with the dataset's figures")
    what = sn.add_mutually_exclusive_group(required=True)
    what.add_argument("--tokens", type=float, help="training tokens, e.g. 11.2e9 for d20")
    what.add_argument("--config", help="a config file, e.g. configs/base_d20.py (its budget and data.dataset)")
    for p in (dl, sn):
        p.add_argument("--chars-per-token", type=float, default=None,
                       help="override the dataset's characters per training token (another vocabulary)")
    for p in (dl, st, sn):
        p.add_argument("--dataset", default=None, choices=sorted(DATASETS),
                       help="fineweb: FineWeb-Edu-100B (nanochat at launch); climbmix: ClimbMix-400B (HEAD). "
                            "Default: a --config's data.dataset, else fineweb")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    if args.cmd == "shards-needed" or (args.cmd == "download" and args.config):
        try:
            n, args.dataset, line = shard_plan(args.tokens if args.cmd == "shards-needed" else None, args.config,
                                               args.dataset, args.chars_per_token)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        if args.cmd == "shards-needed":
            print(f"{line}. Fetch them with: {download_command(n, dataset=args.dataset)}")
            return 0
        print(line)
        args.num_shards = n
    args.dataset = args.dataset or "fineweb"
    if args.cmd == "download":
        val_shard = DATASETS[args.dataset].val_shard
        if not 0 <= args.num_shards <= val_shard:
            ap.error(f"-n must be in 0..{val_shard}")
        idx = list(range(args.num_shards)) + ([] if args.no_val else [val_shard])
        try:
            got = ensure_shards(idx, args.dir, workers=args.workers, retries=args.retries, dataset=args.dataset)
        except (RuntimeError, FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"{len(got)} shard(s) present in {got[0].parent if got else _resolve_dir(args.dir, args.dataset)}")
        args.dir, args.no_verify = str(got[0].parent) if got else args.dir, True
    s = status(args.dir, verify=not args.no_verify, dataset=args.dataset)
    if not s["files"]:
        print(f"no parquet shards in {s['dir']}. Download some with: {download_command(8, s['dir'], args.dataset)}")
        return 1
    print(f"{s['dir']}: {len(s['files'])} parquet file(s), {s['bytes'] / 1e9:.2f} GB"
          + (f", {s['rows']:,} documents" if not args.no_verify else ""))
    if s["indices"]:
        print(f"  shards: {_ranges(s['indices'])}")
    if "val_file" in s:
        info = DATASETS[args.dataset]
        tokens = s['train_files'] * info.chars_per_shard / info.chars_per_token
        print(f"  train: {s['train_files']} file(s) (~{tokens / 1e9:.3g}B tokens if {args.dataset} shards, "
              f"{info.chars_per_token} chars/token); val: {pathlib.PurePath(s['val_file']).name}")
    for c in s["corrupt"]:
        print(f"  CORRUPT: {c}")
    for c in s["leftovers"]:
        print(f"  leftover: {c}")
    return 1 if s["corrupt"] else 0


if __name__ == "__main__":
    sys.exit(main())
