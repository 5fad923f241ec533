"""Where a run's numbers go: `metrics.jsonl` always (the report card reads it), and TensorBoard and Weights &
Biases when `train.loggers` names them ("jsonl,tensorboard,wandb"). Every sink gets the same records: the step
log's scalars, validation loss / bits per byte, data-pipeline counters; the two trackers also get the config.

TensorBoard writes event files to `<run>/tensorboard` through tensorboardX (`pip install 'nanojax[tensorboard]'`);
W&B (`pip install 'nanojax[wandb]'`) logs to project `train.wandb_project` and honours its own environment
(`WANDB_MODE=offline`, `WANDB_API_KEY`, `WANDB_ENTITY`, ...); a resumed run continues the same W&B run (its id is
kept in `<run>/wandb_id`). Only the first process logs. A resumed run first drops from metrics.jsonl the records
of the steps it is about to run again (`drop_steps_after`), so each step appears once.
"""
from __future__ import annotations

import json
import os
import secrets

LOGGERS = ("jsonl", "tensorboard", "wandb")


def scalars(record: dict, prefix: str = "") -> dict[str, float]:
    """The numbers of a record, nested dicts flattened to "data_stats/documents"; the step and flags left out."""
    out = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(scalars(value, f"{name}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
            out[name] = float(value)
    return out


def drop_steps_after(log_dir: str, step: int) -> int:
    """Drop the records of `metrics.jsonl` whose step is past `step`, the step a run resumes from: those steps
    run again and log again, and a plot must not see each of them twice. Records without a step are kept, and so
    is a line that is not JSON, unless it is a torn last line (a killed writer) that the next record would join.
    Rewritten through a temporary file and `os.replace`, so a crash leaves the old file or the new one whole.
    Returns how many records were dropped."""
    path = os.path.join(log_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        lines = f.readlines()
    kept = []
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except ValueError:
            if i < len(lines) - 1 or line.endswith("\n"):
                kept.append(line)
            continue
        if not (isinstance(record, dict) and isinstance(record.get("step"), (int, float)) and record["step"] > step):
            kept.append(line if line.endswith("\n") else line + "\n")
    if kept == lines:
        return 0
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return len(lines) - len(kept)


class JsonlLogger:
    def __init__(self, log_dir: str, config):
        self.file = open(os.path.join(log_dir, "metrics.jsonl"), "a")

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class TensorBoardLogger:
    def __init__(self, log_dir: str, config):
        try:  # optional dependency: only runs that ask for TensorBoard need it
            from tensorboardX import SummaryWriter
        except ImportError:
            raise ValueError("train.loggers names tensorboard, but tensorboardX is not installed: "
                             "pip install -e '.[tensorboard]'") from None
        self.writer = SummaryWriter(logdir=os.path.join(log_dir, "tensorboard"))
        self.writer.add_text("config", "```\n" + config.to_json_best_effort(indent=2) + "\n```", 0)

    def write(self, record: dict) -> None:
        for name, value in scalars(record).items():
            self.writer.add_scalar(name, value, record["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    def __init__(self, log_dir: str, config):
        try:  # optional dependency: only runs that ask for W&B need it
            import wandb
        except ImportError:
            raise ValueError("train.loggers names wandb, but wandb is not installed: "
                             "pip install -e '.[wandb]'") from None
        id_file = os.path.join(log_dir, "wandb_id")
        if os.path.exists(id_file):
            with open(id_file) as f:
                run_id = f.read().strip()
        else:
            run_id = f"{config.run_name}-{secrets.token_hex(4)}"
            with open(id_file, "w") as f:
                f.write(run_id + "\n")
        self.run = wandb.init(project=config.train.wandb_project, name=config.run_name, id=run_id, resume="allow",
                              dir=log_dir, config=config.to_dict())

    def write(self, record: dict) -> None:
        self.run.log(scalars(record), step=record["step"])

    def close(self) -> None:
        self.run.finish()


_CLASSES = {"jsonl": JsonlLogger, "tensorboard": TensorBoardLogger, "wandb": WandbLogger}


def logger_names(spec: str) -> list[str]:
    """The sinks a `train.loggers` string names, jsonl first and always; ValueError naming an unknown one."""
    names = [s.strip().lower() for s in (spec or "").split(",") if s.strip()]
    unknown = [n for n in names if n not in LOGGERS]
    if unknown:
        raise ValueError(f"train.loggers={spec!r}: unknown logger(s) {unknown}; known: {', '.join(LOGGERS)}")
    return ["jsonl"] + [n for n in LOGGERS[1:] if n in names]


class MetricsLoggers:
    """All the sinks of a run as one: `write(record)` to each, `close()` each (on process 0; elsewhere nothing)."""

    def __init__(self, log_dir: str, config, enabled: bool = True):
        names = logger_names(config.train.loggers)  # checked on every process: a typo fails everywhere
        self.sinks = []
        try:
            for name in names if enabled else []:
                self.sinks.append(_CLASSES[name](log_dir, config))
        except BaseException:
            self.close()
            raise

    drop_steps_after = staticmethod(drop_steps_after)  # call before opening the sinks of a resumed run

    def write(self, record: dict) -> None:
        for sink in self.sinks:
            sink.write(record)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.sinks = []
