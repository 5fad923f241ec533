"""What runs print: one `log` for every tool, written by the first process only (a multi-host run prints once),
and the libraries' own log lines kept to errors unless asked for."""
import logging
import os

import jax
from absl import logging as absl_logging


def log(*args) -> None:
    if jax.process_index() == 0:
        print(*args, flush=True)


def quiet_library_logs() -> None:
    """absl / Orbax / JAX log lines show only errors: their INFO and WARNING lines (compilation-cache notes,
    Orbax bookkeeping) are nothing a user of a nanojax command can act on. NANOJAX_VERBOSE=1 shows them all."""
    verbose = os.environ.get("NANOJAX_VERBOSE", "0") not in ("", "0")
    absl_logging.set_verbosity(absl_logging.INFO if verbose else absl_logging.ERROR)
    logging.getLogger("jax").setLevel(logging.INFO if verbose else logging.ERROR)
