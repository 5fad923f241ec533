"""What runs print: one `log` for every tool, written by the first process only (a multi-host run prints once)."""
import jax


def log(*args) -> None:
    if jax.process_index() == 0:
        print(*args, flush=True)
