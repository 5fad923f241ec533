"""`python -m nanojax.evaluate RUN_DIR --tasks=core,bpb,mmlu,arc_easy,arc_challenge,gsm8k,humaneval`

Base-model evals: `core` (DCLM CORE, `nanojax.tasks.core`) and `bpb` (bits per byte on the validation split
of the run's pretraining data). Chat evals (nanochat's `chat_eval.py`): `mmlu`, `arc_easy`, `arc_challenge`
are categorical (one forward of the completion prompt; logits at the last position, the
`<|assistant_start|>` token, restricted to the choice letters; argmax letter graded by the task);
`gsm8k` and `humaneval` are generative (greedy by default, <= 512 new tokens, calculator on, batched
through the KV-cache engine; HumanEval programs run in `nanojax.execution`'s sandbox; pass@1, or
pass@k as "any of k samples" with --num-samples). ChatCORE = mean over the chat tasks of
(acc - baseline) / (1 - baseline), reported when all five were evaluated (the partial mean is kept too).
Task names, their eval splits, display names and baselines come from `nanojax.tasks.registry`.

Every device of every host takes part (several hosts: the same command on each, started as `nanojax.train` is,
`nanojax.sharding.start_distributed`): the model is sharded over all of them; bpb, CORE and categorical batches
split their rows over the devices, each host putting its own devices' rows, and the results come back to every
host; generative tasks give each host its share of problems, decoded on its first device, and sum the counts.
The numbers are those of one device (bpb reads the validation split as one stream on every host for that).

Results are merged into RUN_DIR/eval_results.json (one key per task, so separate invocations add up)
and rendered to RUN_DIR/eval_results.md. `--max-per-task N` cuts every task to its first N examples
(CORE: after nanochat's seed-1337 shuffle) for quick runs.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import itertools
import json
import math
import pathlib
import time
from functools import partial
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from tqdm import tqdm

from nanojax import sharding as shd
from nanojax.buckets import bucket
from nanojax.checkpoint import load_model, read_meta
from nanojax.console import log, quiet_library_logs
from nanojax.data import make_iterator
from nanojax.data.kinds import CONVERSATION_KINDS, canonical_kind
from nanojax.engine import Engine
from nanojax.model import eval_sums
from nanojax.tasks import core
from nanojax.tasks.registry import ALIASES, EVAL_TASKS, TASKS, eval_name, eval_task, parse_sources
from nanojax.tokenizer import load_for_config, tokenizer_dir_for

BASE_TASKS = ("core", "bpb")
CHAT_TASKS = EVAL_TASKS
ALL_TASKS = BASE_TASKS + CHAT_TASKS
DISPLAY = {"core": "CORE", "bpb": "val bpb", **{t: TASKS[t].display for t in CHAT_TASKS}, "chatcore": "ChatCORE"}
# nanochat d20 at launch (v0 README): BASE CORE; SFT chat evals
NANOCHAT_D20 = {"core": 0.2219, "arc_easy": 0.3876, "arc_challenge": 0.2807, "mmlu": 0.3151, "gsm8k": 0.0455,
                "humaneval": 0.0854, "chatcore": 0.0884}


# ----------------------------------------------------------------------------------- placement
def mesh_of(model) -> Mesh | None:
    """The mesh the model's parameters are sharded over, None on one device. Batches follow it: every host puts
    the rows of its own devices (`on_devices`), the forwards return results replicated to every host."""
    sharding = getattr(jax.tree.leaves(nnx.state(model, nnx.Param))[0], "sharding", None)
    return sharding.mesh if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1 else None


def row_multiple(mesh: Mesh | None) -> int:
    """Rows of a batch must be a multiple of the data-parallel devices (data × fsdp) to split over them."""
    return 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]


def pad_rows(n: int, mesh: Mesh | None) -> int:
    m = row_multiple(mesh)
    return -(-n // m) * m


def on_devices(x: np.ndarray, mesh: Mesh | None, split_rows: bool = True) -> jax.Array:
    """A host array every host holds whole -> a global array, rows split over the mesh's data-parallel devices
    (or replicated); each host supplies only its own devices' part."""
    if mesh is None:
        return jnp.asarray(x)
    sharding = shd.batch_sharding(mesh, x.ndim) if split_rows else shd.replicated(mesh)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def _scope(mesh: Mesh | None):
    """Inside a jitted forward: the mesh whose logical axis names the model's `constrain` pins activations to."""
    return jax.sharding.use_abstract_mesh(mesh.abstract_mesh) if mesh is not None else contextlib.nullcontext()


def _gathered(x: jax.Array) -> jax.Array:
    """Replicated on every device (of every host): results each host reads whole; a no-op off a mesh."""
    return shd.constrain(x, (None,) * x.ndim)


# ----------------------------------------------------------------------------------- jitted forwards
@partial(jax.jit, static_argnames=("graphdef", "mesh"))
def _losses_and_predictions(graphdef, state, ids_BT, mesh=None):
    """Per position: cross-entropy of the next token (last column 0) and the argmax prediction. Logits are made
    one row per data-parallel device at a time (S devices: (S, T, V) float32, never (B, T, V))."""
    with _scope(mesh):
        model = nnx.merge(graphdef, state)
        h_BTD = model.hidden(ids_BT)
        targets_BT = jnp.concatenate([ids_BT[:, 1:], ids_BT[:, -1:]], axis=1)
        (B, T), S = ids_BT.shape, row_multiple(mesh)

        def rows(args):
            h_STD, y_ST = args
            z_STV = model.logits(h_STD)
            lse_ST = jax.nn.logsumexp(z_STV, axis=-1)
            picked_ST = jnp.take_along_axis(z_STV, y_ST[..., None], axis=-1)[..., 0]
            return lse_ST - picked_ST, jnp.argmax(z_STV, axis=-1).astype(jnp.int32)

        def split(a):  # (B, ...) -> (B/S, S, ...): the map runs over each device's rows, S rows at once
            a = a.reshape(S, B // S, *a.shape[1:]).swapaxes(0, 1)
            return shd.constrain(a, (None, "batch") + (None,) * (a.ndim - 2))

        losses, preds = jax.lax.map(rows, (split(h_BTD), split(targets_BT)))
        return tuple(_gathered(a.swapaxes(0, 1).reshape(B, T)) for a in (losses, preds))


@partial(jax.jit, static_argnames=("graphdef", "mesh"))
def _logits_at(graphdef, state, ids_BT, pos_B, mesh=None):
    with _scope(mesh):
        model = nnx.merge(graphdef, state)
        h_BTD = model.hidden(ids_BT)
        h_BD = jnp.take_along_axis(h_BTD, pos_B[:, None, None], axis=1)[:, 0]
        return _gathered(model.logits(h_BD))


@partial(jax.jit, static_argnames=("graphdef", "mesh"))
def _bpb_sums(graphdef, state, inputs, targets, token_bytes, mesh=None):
    with _scope(mesh):
        sums = eval_sums(nnx.merge(graphdef, state), inputs, targets, token_bytes)
        return _gathered(sums["nats_with_bytes"]), _gathered(sums["bytes"])


def core_forward(model):
    """`forward(ids_BT) -> (losses_BT, predictions_BT)` for `nanojax.tasks.core`, every host calling it with the
    same ids (rows are padded to split evenly over the devices)."""
    graphdef, state = nnx.split(model)
    mesh = mesh_of(model)

    def forward(ids):
        B = ids.shape[0]
        padded = np.pad(ids, ((0, pad_rows(B, mesh) - B), (0, 0)))
        losses, preds = _losses_and_predictions(graphdef, state, on_devices(padded, mesh), mesh=mesh)
        return np.asarray(losses)[:B], np.asarray(preds)[:B]

    return forward


# ----------------------------------------------------------------------------------- base evals
def evaluate_core(model, tokenizer, *, max_per_task=-1, bundle_dir=None, batch_rows=32) -> dict:
    bundle = core.ensure_bundle(bundle_dir)
    return core.evaluate_core(core_forward(model), tokenizer, bundle, max_per_task=max_per_task,
                              max_len=int(model.cfg.seq_len), batch_rows=batch_rows, log=log)


def evaluate_bpb(model, tokenizer, config, *, tokens: int | None = None, batch_rows: int = 8) -> dict:
    """Bits per byte over `tokens` tokens (default config.train.eval_tokens) of the validation split:
    sum of nats over targets with a byte length > 0 / (ln 2 * their bytes), as nanochat's loss_eval.

    Every host reads the split as one data stream and puts its own devices' rows of each batch: the rows scored,
    and so the number, are the same on any number of hosts and devices (batch_rows rounded up to a multiple of
    the data-parallel devices)."""
    config = ml_collections.ConfigDict(config.to_dict())
    if canonical_kind(config.data.kind) in CONVERSATION_KINDS:
        config.data.kind = "fineweb"  # bpb is measured on pretraining text, as nanochat
    seq_len, mesh = int(config.model.seq_len), mesh_of(model)
    batch_rows = pad_rows(batch_rows, mesh)
    tokens = int(tokens or config.train.eval_tokens)
    steps = max(1, tokens // (batch_rows * seq_len))
    token_bytes = on_devices(np.asarray(tokenizer.token_bytes, np.int32), mesh, split_rows=False)
    graphdef, state = nnx.split(model)
    it = make_iterator(config, split="val", batch_size=batch_rows, process_index=0, process_count=1,
                       tokenizer=tokenizer)
    nats, nbytes, n = 0.0, 0.0, 0
    try:
        for batch in _progress(itertools.islice(it, steps), total=steps, desc="bpb"):
            a, b = _bpb_sums(graphdef, state, on_devices(batch["inputs"], mesh), on_devices(batch["targets"], mesh),
                             token_bytes, mesh=mesh)
            nats, nbytes, n = nats + float(a), nbytes + float(b), n + int(np.asarray(batch["targets"]).size)
    finally:
        close = getattr(it, "close", None)
        if close:
            close()
    if nbytes == 0:
        raise RuntimeError("the validation split gave no bytes to score (empty split or a tokenizer without "
                           "token_bytes)")
    return {"bpb": nats / (math.log(2) * nbytes), "tokens": n, "bytes": nbytes}


def _progress(iterable=None, **kwargs):
    """A tqdm bar on the first process only (every host runs the same evaluation)."""
    return tqdm(iterable, leave=False, disable=jax.process_index() != 0, **kwargs)


# ----------------------------------------------------------------------------------- chat evals


def evaluate_categorical(model, tokenizer, task, *, max_problems=None, batch_size=8, desc="categorical") -> dict:
    """nanochat's run_categorical_eval: argmax over the choice letters' logits at the answer position. On a
    mesh, each batch's rows are split over the devices of every host and the logits come back to each host,
    which all score every problem alike (batch_size rounded up to a multiple of the data-parallel devices)."""
    graphdef, state = nnx.split(model)
    mesh = mesh_of(model)
    rows = pad_rows(batch_size, mesh)
    n = len(task) if max_problems is None else min(len(task), max_problems)
    letter_id = _letter_ids(tokenizer)
    passed = 0
    seq_len = int(model.cfg.seq_len)
    bar = _progress(total=n, desc=desc)
    for i0 in range(0, n, batch_size):
        convs = [task[i] for i in range(i0, min(n, i0 + batch_size))]
        prompts = [tokenizer.render_for_completion(c)[-seq_len:] for c in convs]
        T = bucket(max(len(p) for p in prompts), minimum=32, cap=seq_len)
        ids = np.full((rows, T), tokenizer.bos_token_id, np.int32)
        for j, p in enumerate(prompts):
            ids[j, :len(p)] = p
        pos = np.array([len(p) - 1 for p in prompts] + [0] * (rows - len(prompts)), np.int32)
        logits = np.asarray(_logits_at(graphdef, state, on_devices(ids, mesh), on_devices(pos, mesh), mesh=mesh))
        for j, conv in enumerate(convs):
            letters = conv["letters"]
            choice = int(np.argmax(logits[j, [letter_id(x) for x in letters]]))
            passed += int(task.evaluate(conv, letters[choice]))
        bar.update(len(convs))
    bar.close()
    return {"accuracy": passed / max(1, n), "passed": passed, "total": n}


def _letter_ids(tokenizer):
    """letter -> its one token id (cached); a letter of several tokens is an error naming it."""
    ids: dict[str, int] = {}

    def letter_id(letter: str) -> int:
        if letter not in ids:
            enc = tokenizer.encode(letter)
            if len(enc) != 1:
                raise ValueError(f"choice letter {letter!r} is {len(enc)} tokens, expected 1")
            ids[letter] = enc[0]
        return ids[letter]

    return letter_id


def host_copy(model):
    """The model with a whole copy of its state on this host's first device (itself when not on a mesh):
    generation loops on the host, differently on each, so each host decodes its own problems there with no
    collective, as one device would."""
    mesh = mesh_of(model)
    if mesh is None:
        return model
    graphdef, state = nnx.split(model)
    whole = jax.jit(lambda s: s, out_shardings=shd.replicated(mesh))(state)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a.addressable_data(0), whole))


def evaluate_generative(model, tokenizer, task, *, engine=None, max_problems=None, batch_size=8,
                        num_samples=1, max_new_tokens=512, temperature=0.0, top_k=50, seed=42,
                        desc="generative") -> dict:
    """nanochat's run_generative_eval, batched: `batch_size` problems decode together through the engine;
    a problem passes when any of its `num_samples` completions passes `task.evaluate`. Also counted, from each
    problem's first completion: replies that ended by themselves (`<|assistant_end|>`, not the token budget)
    and, for tasks with an answer format (GSM8K's `#### N`), replies in that format: whether a small model has
    learnt the format, before it gets answers right.

    Host p of P takes problems p, p + P, ... on its first device (`host_copy`) and the counts are summed over
    hosts. Greedy results do not depend on the layout; sampled ones are seeded per batch (seed + its first
    problem), so they do."""
    engine = engine or Engine(host_copy(model), tokenizer)
    n = len(task) if max_problems is None else min(len(task), max_problems)
    mine = list(range(jax.process_index(), n, jax.process_count()))
    seq_len = int(model.cfg.seq_len)
    passed = ended = well_formed = 0
    bar = _progress(total=len(mine), desc=desc)
    for b0 in range(0, len(mine), batch_size):
        numbers = mine[b0:b0 + batch_size]
        convs = [task[i] for i in numbers]
        prompts = [tokenizer.render_for_completion(c)[-(seq_len - 1):] for c in convs]
        results, _ = engine.generate_batch(prompts, num_samples=num_samples, max_tokens=max_new_tokens,
                                           temperature=temperature, top_k=top_k, seed=seed + numbers[0])
        for j, conv in enumerate(convs):
            rows = results[j * num_samples:(j + 1) * num_samples]
            completions = [tokenizer.decode(r[len(prompts[j]):]) for r in rows]
            passed += int(any(task.evaluate(conv, c) for c in completions))
            budget = min(max_new_tokens, seq_len - len(prompts[j]))
            ended += int(len(rows[0]) - len(prompts[j]) < budget)  # a stop token came before the budget ran out
            well_formed += int(bool(getattr(task, "well_formed", lambda c: True)(completions[0])))
        bar.update(len(convs))
        bar.set_postfix(acc=f"{passed / (b0 + len(convs)):.3f}")
    bar.close()
    passed, ended, well_formed = (int(v) for v in shd.process_sums([passed, ended, well_formed]))
    out = {"accuracy": passed / max(1, n), "passed": passed, "total": n, "ended": ended}
    if getattr(task, "answer_format", None):
        out["well_formed"] = well_formed
    return out


def format_note(task, r: dict) -> str:
    """' | 17/20 replies ended with <|assistant_end|>, 15/20 in the '#### N' form' for a generative eval."""
    if "ended" not in r:
        return ""
    note = f" | {r['ended']}/{r['total']} replies ended with <|assistant_end|>"
    if "well_formed" in r:
        note += f", {r['well_formed']}/{r['total']} in the {task.answer_format} form"
    return note


def chatcore(results: dict) -> dict | None:
    done = [t for t in CHAT_TASKS if t in results and "accuracy" in results[t]]
    if not done:
        return None
    chance = {t: TASKS[t].chance for t in done}
    cent = [(results[t]["accuracy"] - chance[t]) / (1 - chance[t]) for t in done]
    return {"accuracy": sum(cent) / len(cent), "tasks": done, "complete": len(done) == len(CHAT_TASKS)}


# ----------------------------------------------------------------------------------- files
def run_dir_containing(path) -> pathlib.Path:
    """The run directory for a run dir, its checkpoints/ dir or a checkpoints/<step> dir."""
    p = pathlib.Path(path).expanduser().resolve()
    for cand in (p, p.parent, p.parent.parent):
        if (cand / "checkpoints").is_dir() or (cand / "metrics.jsonl").exists() or (cand / "config.json").exists():
            return cand
    return p


def markdown_table(results: dict, title: str = "Evaluation") -> str:
    lines = [f"## {title}", "", "| Metric | this run | nanochat d20 |", "|---|---|---|"]
    for key in ("core", "bpb") + CHAT_TASKS + ("chatcore",):
        if key not in results:
            continue
        r = results[key]
        val = r.get("core_metric", r.get("bpb", r.get("accuracy")))
        ref = NANOCHAT_D20.get(key)
        extra = ""
        if "total" in r:
            extra = f" ({r['passed']}/{r['total']})"
        if key == "chatcore" and not r.get("complete", True):
            extra = f" (partial: {', '.join(DISPLAY[t] for t in r['tasks'])})"
        lines.append(f"| {DISPLAY[key]} | {val:.4f}{extra} | {'-' if ref is None else f'{ref:.4f}'} |")
    if "core" in results and results["core"].get("centered_results"):
        lines += ["", "### CORE tasks", "", "| task | accuracy | centred |", "|---|---|---|"]
        for label, acc in results["core"]["results"].items():
            lines.append(f"| {label} | {acc:.4f} | {results['core']['centered_results'][label]:.4f} |")
    meta = results.get("_meta", {})
    if meta:
        lines += ["", f"Checkpoint step {meta.get('step')}, evaluated {meta.get('time')}; "
                      f"max_per_task={meta.get('max_per_task')}."]
    return "\n".join(lines) + "\n"


def write_results(run_dir: pathlib.Path, new: dict) -> tuple[pathlib.Path, pathlib.Path]:
    run_dir.mkdir(parents=True, exist_ok=True)
    jpath, mpath = run_dir / "eval_results.json", run_dir / "eval_results.md"
    merged = json.loads(jpath.read_text()) if jpath.exists() else {}
    merged.update(new)
    cc = chatcore(merged)
    if cc:
        merged["chatcore"] = cc
    jpath.write_text(json.dumps(merged, indent=2))
    mpath.write_text(markdown_table(merged))
    return jpath, mpath


# ----------------------------------------------------------------------------------- several tasks
@dataclasses.dataclass(frozen=True)
class EvalOptions:
    """How `evaluate_tasks` runs: the CLI's flags, or the training loop's in-run evaluations (train_evals)."""
    max_per_task: int = -1  # first N examples of every task (-1: all)
    max_categorical: int | None = None  # overrides max_per_task for categorical chat tasks (HEAD's SFT: -1)
    max_generative: int | None = None  # ... for generative ones (HEAD's SFT: 24)
    bundle_dir: str | None = None  # CORE's eval bundle (None: download to $NANOJAX_HOME/data/eval_bundle)
    sources: Mapping[str, str] = dataclasses.field(default_factory=dict)  # local task data
    batch_size: int = 8
    core_batch_rows: int = 32
    max_new_tokens: int = 512
    num_samples: int = 1
    temperature: float = 0.0
    top_k: int = 50
    bpb_tokens: int | None = None

    def limit(self, kind: str) -> int | None:
        """Problems of a chat task of this eval type: None for all."""
        n = {"categorical": self.max_categorical, "generative": self.max_generative}.get(kind)
        n = self.max_per_task if n is None else n
        return None if n is None or n < 0 else n


def evaluate_tasks(model, tokenizer, config, tasks: Sequence[str], opts: EvalOptions = EvalOptions(),
                   built: Mapping | None = None) -> dict:
    """{task: result} for canonical task names (`parse_tasks`), each result with its "seconds"; `built` holds
    chat tasks already read ({name: task}), which a caller evaluating again and again passes."""
    results: dict = {}
    engine = None
    for name in tasks:
        t = time.time()
        if name == "core":
            r = evaluate_core(model, tokenizer, max_per_task=opts.max_per_task, bundle_dir=opts.bundle_dir,
                              batch_rows=opts.core_batch_rows)
            log(f"CORE {r['core_metric']:.4f}")
        elif name == "bpb":
            r = evaluate_bpb(model, tokenizer, config, tokens=opts.bpb_tokens)
            log(f"val bpb {r['bpb']:.4f}")
        else:
            task = (built or {}).get(name) or eval_task(name, opts.sources)
            if task.eval_type == "categorical":
                r = evaluate_categorical(model, tokenizer, task, max_problems=opts.limit("categorical"),
                                         batch_size=opts.batch_size, desc=DISPLAY[name])
            else:
                if engine is None:  # one for every generative task: each host's own whole copy of the model
                    engine = Engine(host_copy(model), tokenizer)
                r = evaluate_generative(model, tokenizer, task, engine=engine, max_problems=opts.limit("generative"),
                                        batch_size=opts.batch_size, num_samples=opts.num_samples,
                                        max_new_tokens=opts.max_new_tokens, temperature=opts.temperature,
                                        top_k=opts.top_k, desc=DISPLAY[name])
            log(f"{DISPLAY[name]}: {r['accuracy']:.4f} ({r['passed']}/{r['total']})" + format_note(task, r))
        r["seconds"] = time.time() - t
        results[name] = r
    return results


# ----------------------------------------------------------------------------------- CLI
def parse_tasks(spec: str) -> list[str]:
    """Canonical names of a --tasks list: base evals, chat evals in either spelling, or 'all' / 'chat'."""
    names = [t.strip() for t in spec.split(",") if t.strip()]
    if [t.lower() for t in names] in (["all"], ["chat"]):
        return list(ALL_TASKS if names[0].lower() == "all" else CHAT_TASKS)
    out, bad = [], []
    for t in names:
        try:
            out.append(t.lower() if t.lower() in BASE_TASKS else eval_name(t))
        except ValueError:
            bad.append(t)
    if bad:
        raise SystemExit(f"unknown task(s) {bad}; known: {', '.join(ALL_TASKS)} (or 'all', 'chat'; aliases: "
                         f"{', '.join(ALIASES)})")
    return out


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m nanojax.evaluate", description=__doc__.split("\n")[0])
    ap.add_argument("run", help="run directory (or checkpoints dir / checkpoint step dir)")
    ap.add_argument("--tasks", default="auto", help=f"comma list of {', '.join(ALL_TASKS)}; 'all'; 'chat'; "
                                                    "'auto' (default): core,bpb for a base run, the chat tasks for "
                                                    "a mid/SFT run")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    ap.add_argument("--max-per-task", type=int, default=-1, help="first N examples per task (-1: all)")
    ap.add_argument("--eval-bundle", default=None, help="local CORE eval bundle dir (default: download to "
                                                        "$NANOJAX_HOME/data/eval_bundle)")
    ap.add_argument("--sources", default="", help="local task data, e.g. 'gsm8k=/data/gsm8k,humaneval=/data/he,"
                                                  "mmlu=...,arc_easy=...,arc_challenge=...'")
    ap.add_argument("--tokenizer-dir", default=None, help="tokenizer, if the checkpoint does not name one")
    ap.add_argument("--batch-size", type=int, default=8, help="problems per batch (categorical and generative)")
    ap.add_argument("--core-batch-rows", type=int, default=32, help="sequences per CORE forward")
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--num-samples", type=int, default=1)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-k", type=int, default=50)
    ap.add_argument("--bpb-tokens", type=int, default=None, help="validation tokens for bpb "
                                                                 "(default: train.eval_tokens)")
    ap.add_argument("--out", default=None, help="directory for eval_results.{json,md} (default: the run dir)")
    args = ap.parse_args(argv)
    quiet_library_logs()
    tasks = parse_tasks(args.tasks) if args.tasks != "auto" else None
    try:
        sources = parse_sources(args.sources)
    except ValueError as e:
        raise SystemExit(f"--sources: {e}") from None

    t0 = time.time()
    shd.start_distributed()  # NANOJAX_DISTRIBUTED=1 or JAX_COORDINATOR_ADDRESS: every host runs this command
    mesh = shd.make_mesh(ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1, "num_devices": -1}))
    try:
        model, tokenizer, config = load_model(args.run, args.step, mesh=mesh)
        if tokenizer is None:  # the checkpoint names none, or it is not on this machine
            tokenizer = load_for_config(config, args.tokenizer_dir or tokenizer_dir_for(config))
        _, step = read_meta(args.run, args.step)
    except (FileNotFoundError, ValueError) as e:  # a missing or damaged checkpoint, a missing tokenizer
        ap.exit(2, f"error: {e}\n")
    if tasks is None:
        tasks = list(CHAT_TASKS if canonical_kind(config.data.kind) in CONVERSATION_KINDS else BASE_TASKS)
    log(f"loaded {args.run} step {step} in {time.time() - t0:.1f}s on {mesh.size} device(s), "
        f"{jax.process_count()} process(es); tasks: {', '.join(tasks)}")
    opts = EvalOptions(max_per_task=args.max_per_task, bundle_dir=args.eval_bundle, sources=sources,
                       batch_size=args.batch_size, core_batch_rows=args.core_batch_rows,
                       max_new_tokens=args.max_new_tokens, num_samples=args.num_samples,
                       temperature=args.temperature, top_k=args.top_k, bpb_tokens=args.bpb_tokens)
    results = evaluate_tasks(model, tokenizer, config, tasks, opts)
    results["_meta"] = {"step": step, "time": datetime.datetime.now().isoformat(timespec="seconds"),
                        "max_per_task": args.max_per_task, "backend": jax.default_backend()}
    if jax.process_index() == 0:  # every host holds the same results
        out = pathlib.Path(args.out) if args.out else run_dir_containing(args.run)
        jpath, mpath = write_results(out, results)
        log(f"wrote {jpath} and {mpath}")
        log(mpath.read_text())
    return results


if __name__ == "__main__":
    main()
