"""One process of a multi-process test: `python worker.py MODULE [flags ...]` runs `python -m MODULE flags ...`
(nanojax.train, nanojax.evaluate) unchanged, after installing the test's probes. jax.distributed takes its
settings from the environment (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID: nanojax.sharding).

With NANOJAX_TEST_RECORD=DIR the process writes, as JSON lines:
  DIR/feed_<process>.jsonl  every array it hands to `jax.make_array_from_process_local_data` (its rows of a
                            global batch): {"ndim", "rows": [sha1 of each row]}; a train batch is two calls,
                            inputs then targets;
  DIR/read_<process>.jsonl  every unit the pretraining pipeline reads: {"file", "epoch", "group", "part", "parts"};
  DIR/generate_<process>.jsonl  every prompt the engine decodes (one sample each): {"prompt", "reply"} (tokens).
With NANOJAX_TEST_PAUSE_AT=K the process waits before handing over the rows of train step K, after writing
DIR/paused_<process>, until DIR/go exists (the test signals a process there, at a known step).
"""
import hashlib
import json
import os
import runpy
import sys
import threading
import time

import jax
import numpy as np

from nanojax.data import pretrain
from nanojax.engine import Engine

PROCESS = os.environ.get("JAX_PROCESS_ID", "0")
RECORD = os.environ.get("NANOJAX_TEST_RECORD", "")
PAUSE_AT = int(os.environ.get("NANOJAX_TEST_PAUSE_AT", "0"))
_lock = threading.Lock()


def record(kind: str, entry: dict) -> None:
    with _lock, open(os.path.join(RECORD, f"{kind}_{PROCESS}.jsonl"), "a") as f:
        f.write(json.dumps(entry) + "\n")


def pause() -> None:
    open(os.path.join(RECORD, f"paused_{PROCESS}"), "w").close()
    while not os.path.exists(os.path.join(RECORD, "go")):
        time.sleep(0.05)


def probe_feeds() -> None:
    original = jax.make_array_from_process_local_data
    train_calls = [0]

    def recording(sharding, local_data, global_shape=None, *args, **kwargs):
        rows = np.asarray(local_data)
        if rows.ndim == 3:  # (accumulation, rows, T): a train batch, inputs then targets
            if PAUSE_AT and train_calls[0] == 2 * (PAUSE_AT - 1):
                pause()
            train_calls[0] += 1
        flat = rows.reshape(-1, rows.shape[-1])
        record("feed", {"ndim": rows.ndim, "rows": [hashlib.sha1(r.tobytes()).hexdigest()[:16] for r in flat]})
        return original(sharding, local_data, global_shape, *args, **kwargs)

    jax.make_array_from_process_local_data = recording


def probe_reads() -> None:
    original = pretrain._ReadTokenize.__call__

    def reading(self, unit):
        out = original(self, unit)
        epoch, f, g, part, parts = (int(x) for x in unit)
        record("read", {"file": os.path.basename(self.files[f]), "epoch": epoch, "group": g, "part": part,
                        "parts": parts})
        return out

    pretrain._ReadTokenize.__call__ = reading


def probe_generation() -> None:
    original = Engine.generate_batch

    def generating(self, tokens, *args, **kwargs):
        results, masks = original(self, tokens, *args, **kwargs)
        for prompt, row in zip(tokens, results):  # evaluate's generative tasks: lists of prompts, one sample each
            record("generate", {"prompt": list(prompt), "reply": row[len(prompt):]})
        return results, masks

    Engine.generate_batch = generating


if __name__ == "__main__":
    if RECORD:
        probe_feeds()
        probe_reads()
        probe_generation()
    module = sys.argv[1]
    sys.argv = [module, *sys.argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
