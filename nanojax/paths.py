"""Where nanojax keeps data, tokenizers and runs: $NANOJAX_HOME (default ~/.cache/nanojax), never the repo."""
import os
import pathlib


def home() -> pathlib.Path:
    return pathlib.Path(os.environ.get("NANOJAX_HOME") or pathlib.Path.home() / ".cache" / "nanojax").expanduser()


def data_dir(*parts: str) -> pathlib.Path:
    return home().joinpath("data", *parts)


def tokenizer_dir() -> pathlib.Path:
    return home() / "tokenizer"


def runs_dir() -> pathlib.Path:
    return home() / "runs"
