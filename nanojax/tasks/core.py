"""DCLM CORE (nanochat's `core_eval.py` + `base_eval.py`): 22 in-context tasks, centred by random baselines.

The eval bundle (`core.yaml`, `eval_meta_data.csv`, `eval_data/**.jsonl`) is nanochat's
`eval_bundle.zip`, downloaded on demand into `$NANOJAX_HOME/data/eval_bundle` (`ensure_bundle`), or any
local copy. Per task: rows are shuffled with `random.Random(1337)` and cut to `max_per_task`; each
example gets `num_fewshot` examples drawn with `random.Random(1234 + idx)` from the other rows; prompts
are rendered with nanochat's Jinja templates and encoded with BOS prepended. Scoring:
- `multiple_choice` (one context, several continuations) and `schema` (several contexts, one
  continuation): the option with the lowest mean cross-entropy over its continuation tokens wins;
- `language_modeling`: correct when greedy argmax reproduces every continuation token.
Sequences longer than the model's context keep their last `max_len` tokens (nanochat does this for models
with a maximum length). Task accuracy `a` is centred as `(a - b/100) / (1 - b/100)` with the bundle's random
baseline `b` (in %), and CORE is the mean centred accuracy.

This module knows no model: `evaluate_task` takes `forward(tokens_BT) -> (losses_BT, predictions_BT)`
where `losses[b, t]` is the cross-entropy of token t+1 given tokens <= t and `predictions[b, t]` the
argmax at t (numpy arrays); `nanojax.evaluate` supplies a jitted one.
"""
from __future__ import annotations

import csv
import functools
import json
import os
import pathlib
import random
import shutil
import tempfile
import time
import urllib.request
import zipfile
from typing import Callable, Iterable, Sequence

import numpy as np
import yaml
from jinja2 import Template
from tqdm import tqdm

from nanojax import paths
from nanojax.buckets import bucket

BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")

Forward = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


# ------------------------------------------------------------------------------------------ bundle
def ensure_bundle(bundle_dir: str | os.PathLike | None = None, url: str = BUNDLE_URL) -> pathlib.Path:
    """The bundle directory: `bundle_dir` if given (must exist), else $NANOJAX_HOME/data/eval_bundle,
    downloading and unzipping `url` there first if it is not present."""
    if bundle_dir is not None:
        path = pathlib.Path(bundle_dir).expanduser()
        if not (path / "core.yaml").exists():
            raise FileNotFoundError(f"{path} is not a CORE eval bundle (no core.yaml)")
        return path
    path = paths.data_dir("eval_bundle")
    if (path / "core.yaml").exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    print(f"downloading the CORE eval bundle (~162 MB) from {url} to {path}", flush=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        zpath = pathlib.Path(tmp) / "eval_bundle.zip"
        try:
            with urllib.request.urlopen(url, timeout=60) as r, open(zpath, "wb") as f:
                shutil.copyfileobj(r, f, length=1 << 20)
        except OSError as e:
            raise RuntimeError(f"could not download the CORE eval bundle from {url} ({e}); download it elsewhere "
                               f"and pass its unzipped directory with --eval-bundle") from e
        with zipfile.ZipFile(zpath) as z:
            z.extractall(tmp)
        found = next(pathlib.Path(tmp).rglob("core.yaml"), None)
        if found is None:
            raise RuntimeError(f"{url} holds no core.yaml")
        os.replace(found.parent, path)
    return path


def load_task_specs(bundle_dir: pathlib.Path) -> list[dict]:
    """[{label, task_type, dataset_uri, num_fewshot, continuation_delimiter, random_baseline}] from the bundle."""
    bundle_dir = pathlib.Path(bundle_dir)
    config = yaml.safe_load((bundle_dir / "core.yaml").read_text())
    baselines = {}
    with open(bundle_dir / "eval_meta_data.csv", newline="") as f:
        for row in csv.DictReader(f):
            baselines[row["Eval Task"]] = float(row["Random baseline"])
    specs = []
    for t in config["icl_tasks"]:
        shots = t["num_fewshot"]
        specs.append({
            "label": t["label"], "task_type": t["icl_task_type"], "dataset_uri": t["dataset_uri"],
            "num_fewshot": int(shots[0] if isinstance(shots, (list, tuple)) else shots),
            "continuation_delimiter": t.get("continuation_delimiter", " "),
            "random_baseline": baselines[t["label"]],
        })
    return specs


def load_task_data(bundle_dir: pathlib.Path, spec: dict, max_per_task: int = -1) -> list[dict]:
    path = pathlib.Path(bundle_dir) / "eval_data" / spec["dataset_uri"]
    with open(path) as f:
        data = [json.loads(line) for line in f if line.strip()]
    random.Random(1337).shuffle(data)
    return data[:max_per_task] if max_per_task and max_per_task > 0 else data


# ------------------------------------------------------------------------------------------ prompts
_MC = """
{%- for example in fewshot_examples -%}
{{ example.query }}{{ continuation_delimiter }}{{ example.choices[example.gold] }}

{% endfor -%}
{{ item.query }}{{ continuation_delimiter }}{{ choice }}""".strip()

_SCHEMA = """
{%- for example in fewshot_examples -%}
{{ example.context_options[example.gold] }}{{ continuation_delimiter }}{{ example.continuation }}

{% endfor -%}
{{ context }}{{ continuation_delimiter }}{{ item.continuation }}""".strip()

_LM = """
{%- for example in fewshot_examples -%}
{{ example.context | trim }}{{ continuation_delimiter }}{{ example.continuation }}

{% endfor -%}
{{ item.context | trim }}{{ continuation_delimiter }}""" \
    """{% if include_continuation %}{{ item.continuation }}{% endif %}""".strip()

@functools.cache
def _template(src: str) -> Template:
    return Template(src)


def render_prompts(task_type: str, item: dict, delimiter: str, fewshot: Sequence[dict]) -> list[str]:
    ctx = {"fewshot_examples": list(fewshot), "continuation_delimiter": delimiter, "item": item}
    if task_type == "multiple_choice":
        return [_template(_MC).render(choice=c, **ctx) for c in item["choices"]]
    if task_type == "schema":
        return [_template(_SCHEMA).render(context=c, **ctx) for c in item["context_options"]]
    if task_type == "language_modeling":
        t = _template(_LM)
        return [t.render(include_continuation=False, **ctx).strip(), t.render(include_continuation=True, **ctx)]
    raise ValueError(f"unsupported CORE task type {task_type!r} (known: {', '.join(TASK_TYPES)})")


def common_length(seqs: Sequence[Sequence[int]], direction: str = "left") -> int:
    n = min(len(s) for s in seqs)
    idx = range(n) if direction == "left" else range(-1, -n - 1, -1)
    for i, j in enumerate(idx):
        if any(s[j] != seqs[0][j] for s in seqs):
            return i
    return n


def example_sequences(tokenizer, data: Sequence[dict], idx: int, spec: dict,
                      max_len: int | None) -> list[tuple[list[int], int, int]]:
    """[(tokens, start, end)] for example `idx`: the scored continuation is tokens[start:end]."""
    k = min(spec["num_fewshot"], len(data) - 1)  # tiny --max-per-task runs have fewer rows than shots
    fewshot = []
    if k > 0:
        rng = random.Random(1234 + idx)
        fewshot = [data[i] for i in rng.sample([i for i in range(len(data)) if i != idx], k)]
    task_type = spec["task_type"]
    prompts = render_prompts(task_type, data[idx], spec["continuation_delimiter"], fewshot)
    toks = tokenizer.encode(prompts, prepend=tokenizer.bos_token_id)
    if task_type == "multiple_choice":
        start = common_length(toks, "left")
        out = [(t, start, len(t)) for t in toks]
    elif task_type == "schema":
        suffix = common_length(toks, "right")
        out = [(t, len(t) - suffix, len(t)) for t in toks]
    else:
        without, with_ = toks
        if not (len(without) < len(with_) and with_[:len(without)] == without):
            # BPE merged across the context/continuation boundary (nanochat asserts here): score the
            # continuation tokenised on its own after the context's tokens instead
            if not prompts[1].startswith(prompts[0]) or len(prompts[1]) == len(prompts[0]):
                raise ValueError(f"{spec['label']} example {idx}: prompt without continuation is not a prefix")
            with_ = without + tokenizer.encode(prompts[1][len(prompts[0]):])
        out = [(with_, len(without), len(with_))]
    if max_len is not None:
        cropped = []
        for t, s, e in out:
            if len(t) > max_len:
                cut = len(t) - max_len
                t, s, e = t[cut:], max(1, s - cut), e - cut
            cropped.append((t, s, e))
        out = cropped
    return out


# ------------------------------------------------------------------------------------------ scoring
def evaluate_task(forward: Forward, tokenizer, data: Sequence[dict], spec: dict, *, max_len: int | None,
                  batch_rows: int = 32, progress: Callable[[int], None] | None = None) -> float:
    """Accuracy on `data` (already shuffled/truncated). Rows of all examples are packed into batches of
    `batch_rows` sequences, right-padded with BOS to a power-of-two length (few shapes to compile)."""
    rows = []  # (example index, tokens, start, end)
    for i in range(len(data)):
        for t, s, e in example_sequences(tokenizer, data, i, spec, max_len):
            rows.append((i, t, s, e))
    order = sorted(range(len(rows)), key=lambda r: len(rows[r][1]))  # similar lengths share a batch
    mean_loss = np.zeros(len(rows))
    exact = np.zeros(len(rows), bool)
    pad = tokenizer.bos_token_id
    for b0 in range(0, len(order), batch_rows):
        chunk = order[b0:b0 + batch_rows]
        T = bucket(max(len(rows[r][1]) for r in chunk), minimum=32, cap=max_len)
        ids = np.full((batch_rows, T), pad, np.int32)
        for j, r in enumerate(chunk):
            ids[j, :len(rows[r][1])] = rows[r][1]
        losses, preds = forward(ids)
        for j, r in enumerate(chunk):
            _, t, s, e = rows[r]
            mean_loss[r] = float(np.mean(losses[j, s - 1:e - 1]))
            exact[r] = bool(np.all(preds[j, s - 1:e - 1] == np.asarray(t[s:e])))
        if progress:
            progress(len({rows[r][0] for r in chunk}))
    by_example: dict[int, list[int]] = {}
    for r, (i, *_rest) in enumerate(rows):
        by_example.setdefault(i, []).append(r)
    correct = 0
    for i, rs in by_example.items():
        if spec["task_type"] == "language_modeling":
            correct += int(exact[rs[0]])
        else:
            losses = [mean_loss[r] for r in rs]
            correct += int(int(np.argmin(losses)) == int(data[i]["gold"]))
    return correct / max(1, len(data))


def centered(accuracy: float, random_baseline_pct: float) -> float:
    b = 0.01 * random_baseline_pct
    return (accuracy - b) / (1.0 - b)


def evaluate_core(forward: Forward, tokenizer, bundle_dir, *, max_per_task: int = -1, max_len: int | None = None,
                  batch_rows: int = 32, tasks: Iterable[str] | None = None, log=print) -> dict:
    """{"results": {label: acc}, "centered_results": {label: centred}, "core_metric": mean centred, ...}."""
    bundle_dir = pathlib.Path(bundle_dir)
    specs = load_task_specs(bundle_dir)
    if tasks is not None:
        wanted = set(tasks)
        specs = [s for s in specs if s["label"] in wanted]
    results, cent, timing = {}, {}, {}
    for spec in specs:
        t0 = time.time()
        data = load_task_data(bundle_dir, spec, max_per_task)
        with tqdm(total=len(data), desc=f"CORE {spec['label']}", leave=False) as bar:
            acc = evaluate_task(forward, tokenizer, data, spec, max_len=max_len, batch_rows=batch_rows,
                                progress=bar.update)
        results[spec["label"]] = acc
        cent[spec["label"]] = centered(acc, spec["random_baseline"])
        timing[spec["label"]] = time.time() - t0
        log(f"{spec['label']:<36} ({spec['num_fewshot']}-shot, {spec['task_type']}): accuracy {acc:.4f} | "
            f"centred {cent[spec['label']]:.4f} | {timing[spec['label']]:.1f}s | n={len(data)}")
    core = sum(cent.values()) / len(cent) if cent else float("nan")
    return {"results": results, "centered_results": cent, "core_metric": core, "task_seconds": timing,
            "max_per_task": max_per_task}
