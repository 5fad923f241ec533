"""Where nanojax keeps data, tokenizers and runs: $NANOJAX_HOME (default ~/.cache/nanojax), never the repo."""
import os
import pathlib

import fsspec


def home() -> pathlib.Path:
    return pathlib.Path(os.environ.get("NANOJAX_HOME") or pathlib.Path.home() / ".cache" / "nanojax").expanduser()


def data_dir(*parts: str) -> pathlib.Path:
    return home().joinpath("data", *parts)


def tokenizer_dir(dataset: str = "fineweb") -> pathlib.Path:
    """Each pretraining dataset's tokenizer has its own place (nanochat's vocabularies differ: 65,536 for
    FineWeb-Edu, 32,768 for HEAD's ClimbMix): tokenizer/ for fineweb, tokenizer-<dataset>/ otherwise."""
    return home() / ("tokenizer" if dataset == "fineweb" else f"tokenizer-{dataset}")


def runs_dir() -> pathlib.Path:
    return home() / "runs"


def is_url(path) -> bool:
    """gs://bucket/..., memory://..., file://...: a location opened through fsspec, not a local path."""
    return "://" in str(path)


def url_filesystem(url: str):
    """(fsspec filesystem, path inside it) for a URL. A scheme whose backend is not installed (gs:// needs gcsfs)
    or that fsspec does not know is a ValueError naming the URL, so a run fails in one line before it starts."""
    try:
        return fsspec.core.url_to_fs(str(url))
    except ImportError as e:
        raise ValueError(f"{url}: the filesystem for {str(url).split('://', 1)[0]}:// is not installed ({e}); "
                         "for gs:// run pip install -e '.[gcs]'") from e
    except ValueError as e:
        raise ValueError(f"{url}: {e}") from e
