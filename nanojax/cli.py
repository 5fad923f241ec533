"""Command-line errors, one rule for every tool: one `error:` line naming the flag, key or file (with the
nearest spelling when one is close), exit status 2, no traceback unless NANOJAX_TRACEBACK=1."""
from __future__ import annotations

import difflib
import os
import pathlib
import re
import sys
import traceback

from absl import flags

from nanojax.config import load_config_file, unknown_key


def one_line(error) -> str:
    """An exception (or text) as one line: a KeyError without its quotes, a message that carries a traceback
    (ml_collections wraps a config file's own error in one) cut to its first and last lines."""
    text = error.args[0] if isinstance(error, KeyError) and len(error.args) == 1 else str(error)
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    if any(line.startswith("Traceback (most recent call last)") for line in lines):
        lines = [lines[0], lines[-1]] if len(lines) > 1 else lines
    return " ".join(lines) or type(error).__name__


def fail(message, status: int = 2):
    """The one line `error: <message>` on stderr, then exit (2: bad input; NANOJAX_TRACEBACK=1 shows where)."""
    print(f"error: {one_line(message)}", file=sys.stderr)
    sys.exit(status)


def _config_arg(argv, name: str) -> str | None:
    """The value of --<name> in argv (either `--name=value` or `--name value`), None when absent."""
    for i, arg in enumerate(argv[1:], 1):
        flag, eq, value = arg.lstrip("-").partition("=")
        if arg.startswith("-") and flag == name:
            return value if eq else (argv[i + 1] if i + 1 < len(argv) else "")
    return None


def _missing_file(path: str) -> str:
    """`path` does not exist: say so, with the nearest config of the same directory when one is close."""
    p = pathlib.Path(path)
    near = sorted(f.name for f in p.parent.glob("*.py")) if p.parent.is_dir() else []
    close = difflib.get_close_matches(p.name, near, n=1)
    hint = (f"; did you mean {p.parent / close[0]}?" if close else
            f" (configs in {p.parent}: {', '.join(near)})" if near else "")
    return f"--config={path}: no such config file{hint}"


def _where_in(path: str, error: BaseException) -> str:
    """" (<file>:<line>)" for the deepest frame of `error` in the config file `path`, "" if none."""
    target = os.path.abspath(path)
    frames = [f for f in traceback.extract_tb(error.__traceback__) if os.path.abspath(f.filename) == target]
    return f" ({frames[-1].filename}:{frames[-1].lineno})" if frames else ""


def parse_flags(argv, flag_values=None, name: str = "config"):
    """absl `app.run(main, flags_parser=parse_flags)` for tools that take `--config=file.py [--config.a.b=v]`:
    a missing or broken config file, an unknown key (with the nearest spelling) or a value of the wrong type is
    one `error:` line and exit status 2 instead of a traceback (NANOJAX_TRACEBACK=1 shows it)."""
    flag_values = flags.FLAGS if flag_values is None else flag_values
    path = _config_arg(argv, name)
    file = (path or "").split(":", 1)[0]
    try:
        if path is not None and not os.path.isfile(file):
            fail(_missing_file(file))
        return flag_values(argv)
    except SystemExit:
        raise
    except Exception as e:  # noqa: BLE001 - everything that goes wrong while reading the command line
        if os.environ.get("NANOJAX_TRACEBACK"):
            raise
        overrides = [m.group(2) for a in argv[1:]
                     if (m := re.match(rf"-{{1,2}}(no)?{re.escape(name)}\.([^=]+)", a))]
        config = None
        try:
            config = load_config_file(file) if overrides and path else None
        except Exception:  # noqa: BLE001 - the file's own error is reported below
            pass
        for key in overrides if config is not None else []:
            problem = unknown_key(config, key, f"--{name}")
            if problem:
                fail(problem)
        if isinstance(e, flags.Error):
            fail(e)
        where = f"--{name}={path}: " if path else ""
        fail(f"{where}{type(e).__name__}: {one_line(e)}{_where_in(file, e) if path else ''}")
