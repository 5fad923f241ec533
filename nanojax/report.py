"""`python -m nanojax.report RUN [RUN ...] [--out report.md]`: a markdown report card for a pipeline.

One page for the runs given in pipeline order (e.g. base_d20 mid_d20 chat_d20): the environment (time, git
commit, host, CPUs, memory, JAX version, devices), then per run the stage (from `data.kind`), where it
started (`init_from`), model/batch config, parameter count, FLOPs per token, tokens trained, wall time
(sum of logged step times), mean MFU (from `metrics.jsonl`; absent on CPU), first/last/min loss and
min/final validation bits per byte, its tokenizer (vocab size and how it was trained, when known), loss
and bpb curves as PNG (needs matplotlib: `pip install matplotlib`; without it the page says so), and its
evaluation results (`eval_results.json` written by `nanojax.evaluate`). It ends with a summary table of
every run's evals next to nanochat's published d20 numbers.

The page goes to `--out` (default: RUN/report.md of the last run); plots sit next to it.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import platform
import subprocess
import sys
from typing import Sequence

import jax

from nanojax import config as cfglib
from nanojax.checkpoint import read_meta
from nanojax.data.kinds import canonical_kind
from nanojax.evaluate import CHAT_TASKS, DISPLAY, NANOCHAT_D20

STAGES = {"fineweb": "base", "synthetic": "base (synthetic data)", "mid": "mid", "sft": "sft", "rl": "rl"}  # data.kind


def _cmd(args: list[str], cwd=None) -> str | None:
    try:
        r = subprocess.run(args, capture_output=True, text=True, timeout=5, cwd=cwd)
        return r.stdout.strip() if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict:
    repo = pathlib.Path(__file__).resolve().parents[1]
    env = {
        "time": datetime.datetime.now().isoformat(timespec="seconds"),
        "git_commit": _cmd(["git", "rev-parse", "--short", "HEAD"], repo) or "unknown",
        "git_branch": _cmd(["git", "rev-parse", "--abbrev-ref", "HEAD"], repo) or "unknown",
        "git_dirty": bool(_cmd(["git", "status", "--porcelain"], repo)),
        "host": platform.node(), "platform": platform.platform(), "python": sys.version.split()[0],
        "cpus": os.cpu_count(), "jax": jax.__version__, "backend": jax.default_backend(),
        "devices": f"{jax.device_count()} × {jax.devices()[0].device_kind}",
    }
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        env["memory_gb"] = round(pages * size / 1024**3, 1)
    except (ValueError, OSError, AttributeError):
        pass
    return env


def read_metrics(run_dir: pathlib.Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a crash
    return out


def read_config(run_dir: pathlib.Path) -> dict:
    path = run_dir / "config.json"
    if path.exists():
        return json.loads(path.read_text())
    try:
        return read_meta(run_dir)[0].get("config", {})
    except Exception:
        return {}


def stage(kind: str | None) -> str:
    """The pipeline stage a run's data.kind means (old spellings too); the kind itself if none is known."""
    try:
        return STAGES[canonical_kind(kind)]
    except ValueError:
        return kind or "?"


def run_summary(run_dir: pathlib.Path) -> dict:
    """Everything the report says about one run, as plain data."""
    cfg = read_config(run_dir)
    metrics = read_metrics(run_dir)
    train = [m for m in metrics if "loss" in m]
    evals = [m for m in metrics if "val_bpb" in m or "val_loss" in m]
    s: dict = {"name": run_dir.name, "dir": str(run_dir), "config": cfg}
    s["stage"] = stage(cfg.get("data", {}).get("kind"))
    s["init_from"] = cfg.get("train", {}).get("init_from") or None
    if cfg.get("model"):
        m = cfglib.ModelConfig.of(cfg["model"])
        s["num_params"], s["num_embedding_params"] = m.param_counts()
        s["flops_per_token"] = m.flops_per_token()
        s["model"] = dataclasses.asdict(m)
    tb = cfg.get("train", {}).get("total_batch_size")
    if train:
        s["steps"] = train[-1]["step"]
        if tb:
            s["tokens"] = int(s["steps"] * tb)
            if s.get("flops_per_token"):
                s["total_flops"] = s["tokens"] * s["flops_per_token"]
        s["train_time_s"] = sum(m.get("step_time_s", 0.0) for m in train)
        s["first_loss"], s["final_loss"] = train[0]["loss"], train[-1]["loss"]
        s["min_loss"] = min(m["loss"] for m in train)
        mfu = [m["mfu"] for m in train[min(len(train) - 1, 5):] if "mfu" in m]  # skip compile-dominated steps
        if mfu:
            s["mfu"] = sum(mfu) / len(mfu)
        tps = [m["tokens_per_s"] for m in train[min(len(train) - 1, 5):] if "tokens_per_s" in m]
        if tps:
            s["tokens_per_s"] = sum(tps) / len(tps)
    bpbs = [m["val_bpb"] for m in evals if "val_bpb" in m]
    if bpbs:
        s["final_val_bpb"], s["min_val_bpb"] = bpbs[-1], min(bpbs)
    s["train_curve"] = [(m["step"], m["loss"]) for m in train]
    s["bpb_curve"] = [(m["step"], m["val_bpb"]) for m in evals if "val_bpb" in m]
    s["reward_curve"] = []
    if s["stage"] == "rl":
        rl_summary(s, metrics)
    ev_path = run_dir / "eval_results.json"
    s["evals"] = json.loads(ev_path.read_text()) if ev_path.exists() else {}
    s["tokenizer"] = tokenizer_info(run_dir)
    return s


def rl_summary(s: dict, metrics: list[dict]) -> None:
    """An RL run's numbers: its loss is a policy-gradient loss (kept off the cross-entropy plot), its curve is the
    mean reward, its tokens are the sampled sequences', its evaluations pass@k (`nanojax.rl`)."""
    steps = [m for m in metrics if "reward" in m]
    s["train_curve"] = []
    s["reward_curve"] = [(m["step"], m["reward"]) for m in steps]
    if steps:
        rewards = [m["reward"] for m in steps]
        s["reward_first"], s["reward_final"], s["reward_max"] = rewards[0], rewards[-1], max(rewards)
        s["tokens"] = int(sum(m.get("sequence_tokens", 0) for m in steps))
        if s.get("flops_per_token"):
            s["total_flops"] = s["tokens"] * s["flops_per_token"]  # the policy-gradient steps; sampling is extra
        later = steps[min(len(steps) - 1, 5):]  # skip compile-dominated steps
        s["sample_tokens_per_s"] = sum(m["sample_tokens_per_s"] for m in later) / len(later)
        s["train_tokens_per_s"] = sum(m["train_tokens_per_s"] for m in later) / len(later)
    passk = [m for m in metrics if "pass@1" in m]
    if passk:
        s["pass_at_k_first"], s["pass_at_k"] = passk[0], passk[-1]


def _batch(c: dict) -> str | None:
    t, r = c.get("train", {}), c.get("rl", {})
    if stage(c.get("data", {}).get("kind")) == "rl" and r:
        return (f"{r['examples_per_step'] * r['num_samples']:,} sequences/step ({r['examples_per_step']} questions × "
                f"{r['num_samples']} replies), device batch {t.get('device_batch_size')}")
    if t.get("total_batch_size"):
        return f"{t['total_batch_size']:,} tokens/step, device batch {t.get('device_batch_size')}"
    return None


def _pass_at_k(record: dict) -> str:
    ks = sorted(int(k[5:]) for k in record if k.startswith("pass@"))
    return ", ".join(f"@{k} {record[f'pass@{k}']:.4f}" for k in ks) + f" (step {record['step']})"


def tokenizer_info(run_dir: pathlib.Path) -> dict | None:
    try:
        tok_dir = read_meta(run_dir)[0].get("tokenizer_dir")
    except Exception:
        return None
    if not tok_dir:
        return None
    meta = pathlib.Path(tok_dir) / "tokenizer_meta.json"
    if not meta.exists():
        return {"dir": tok_dir}
    info = json.loads(meta.read_text())
    return {"dir": tok_dir, "vocab_size": info.get("vocab_size"), "training": info.get("training") or info.get("info")}


def plot_curves(summaries: list[dict], out_dir: pathlib.Path) -> dict[str, str] | None:
    """loss.png and val_bpb.png (one line per run); None when matplotlib is not installed."""
    try:  # optional dependency (pip install matplotlib): imported here so the report works without it
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    files = {}
    for key, fname, ylabel in (("train_curve", "loss.png", "train loss"), ("bpb_curve", "val_bpb.png", "val bpb"),
                               ("reward_curve", "reward.png", "mean reward (RL)")):
        if not any(s[key] for s in summaries):
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        for s in summaries:
            if s[key]:
                xs, ys = zip(*s[key])
                ax.plot(xs, ys, label=s["name"], marker="." if len(xs) < 30 else None)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / fname, dpi=110)
        plt.close(fig)
        files[key] = fname
    return files


def _fmt(x, spec=",") -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and spec == ",":
        return f"{x:.4g}"
    return format(x, spec)


def _duration(s: float) -> str:
    h, rem = divmod(int(s), 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else f"{m}m{sec:02d}s"


def render(summaries: list[dict], env: dict, plots: dict | None) -> str:
    L = ["# nanojax report card", "",
         f"Generated {env['time']} · git {env['git_commit']} "
         f"({env['git_branch']}{', dirty' if env['git_dirty'] else ''})",
         "", "## Environment", "", "| | |", "|---|---|"]
    for k in ("host", "platform", "python", "jax", "backend", "devices", "cpus", "memory_gb"):
        if k in env:
            L.append(f"| {k} | {env[k]} |")
    L += ["", "(the machine that wrote this report; training devices are in each run's config mesh)"]
    for s in summaries:
        c = s["config"]
        m = s.get("model") or c.get("model", {})
        L += ["", f"## {s['name']} ({s['stage']})", "", f"Run directory `{s['dir']}`"
              + (f"; started from `{s['init_from']}`" if s["init_from"] else "") + ".", "",
              "| | |", "|---|---|"]
        rows = [
            ("model", f"depth {m.get('depth')}, width {m.get('width')}, {m.get('n_head')} heads of "
                      f"{m.get('head_dim')}, vocab {m.get('vocab_size'):,}, context {m.get('seq_len')}"
                      + (f"; nanochat HEAD family, windows {m.get('window_pattern')}" if m.get("family") == "head"
                         else "") if m else None),
            ("parameters", _fmt(s.get("num_params"))),
            ("FLOPs per token", f"{s['flops_per_token']:.4e}" if s.get("flops_per_token") else None),
            ("batch", _batch(c)),
            ("iterations", _fmt(s.get("steps"))),
            ("tokens trained", _fmt(s.get("tokens"))),
            ("tokens : params",
             f"{s['tokens'] / s['num_params']:.3g}" if s.get("tokens") and s.get("num_params") else None),
            ("total FLOPs", f"{s['total_flops']:.4e}" if s.get("total_flops") else None),
            ("training time (sum of step times)", _duration(s["train_time_s"]) if s.get("train_time_s") else None),
            ("throughput", f"{s['tokens_per_s']:,.0f} tokens/s" if s.get("tokens_per_s") else None),
            ("MFU", f"{100 * s['mfu']:.1f}%" if s.get("mfu") is not None
             else "- (no peak FLOPs known for this device)"),
            ("loss first / final / min", " / ".join(f"{s[k]:.4f}" for k in ("first_loss", "final_loss", "min_loss"))
             if s.get("final_loss") is not None else None),
            ("val bpb final / min",
             f"{s['final_val_bpb']:.4f} / {s['min_val_bpb']:.4f}" if s.get("final_val_bpb") else None),
            ("reward first / final / max", " / ".join(f"{s[k]:.4f}" for k in ("reward_first", "reward_final",
                                                                                "reward_max"))
             if s.get("reward_final") is not None else None),
            ("rollouts sampled / trained on", f"{s['sample_tokens_per_s']:,.0f} / {s['train_tokens_per_s']:,.0f} "
             "tokens/s" if s.get("sample_tokens_per_s") else None),
            ("pass@k first", _pass_at_k(s["pass_at_k_first"]) if s.get("pass_at_k_first") else None),
            ("pass@k last", _pass_at_k(s["pass_at_k"]) if s.get("pass_at_k") else None),
        ]
        tok = s.get("tokenizer")
        if tok:
            rows.append(("tokenizer", f"vocab {tok.get('vocab_size')}, `{tok['dir']}`"
                         + (f", trained: {json.dumps(tok['training'])[:200]}" if tok.get("training") else "")))
        L += [f"| {k} | {v} |" for k, v in rows if v is not None]
        if s["evals"]:
            L += ["", "### Evaluation", "", "| metric | value |", "|---|---|"]
            for key in ("core", "bpb") + CHAT_TASKS + ("chatcore",):
                r = s["evals"].get(key)
                if r:
                    val = r.get("core_metric", r.get("bpb", r.get("accuracy")))
                    L.append(f"| {DISPLAY[key]} | {val:.4f} |")
    L += ["", "## Curves", ""]
    if plots is None:
        L.append("(matplotlib is not installed: `pip install matplotlib` to get loss.png and val_bpb.png)")
    else:
        for key, title in (("train_curve", "training loss"), ("bpb_curve", "validation bits per byte"),
                           ("reward_curve", "RL mean reward")):
            if key in plots:
                L.append(f"![{title}]({plots[key]})")
        if not plots:
            L.append("(no curves: metrics.jsonl is empty)")
    # summary: runs as columns, nanochat d20 last
    keys = [k for k in ("core",) + CHAT_TASKS + ("chatcore",) if any(k in s["evals"] for s in summaries)]
    L += ["", "## Summary", "", "| Metric | " + " | ".join(s["name"] for s in summaries) + " | nanochat d20 |",
          "|---|" + "---|" * (len(summaries) + 1)]
    if any("bpb" in s["evals"] for s in summaries):
        L.append("| val bpb | " + " | ".join(f"{s['evals']['bpb']['bpb']:.4f}" if "bpb" in s["evals"] else "-"
                                             for s in summaries) + " | - |")
    for k in keys:
        vals = []
        for s in summaries:
            r = s["evals"].get(k)
            vals.append("-" if not r else f"{r.get('core_metric', r.get('accuracy')):.4f}")
        L.append(f"| {DISPLAY[k]} | " + " | ".join(vals) + f" | {NANOCHAT_D20.get(k, '-')} |")
    total = sum(s.get("train_time_s", 0.0) for s in summaries)
    L += ["", f"Total training time (sum of logged step times): {_duration(total)}",
          "", "nanochat d20 numbers: v0 README (8×H100, 2025-10-13): CORE of the base model, chat metrics after SFT."]
    return "\n".join(L) + "\n"


def main(argv: Sequence[str] | None = None) -> pathlib.Path:
    ap = argparse.ArgumentParser(prog="python -m nanojax.report", description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", help="run directories, in pipeline order")
    ap.add_argument("--out", default=None, help="markdown file (default: <last run>/report.md)")
    args = ap.parse_args(argv)
    runs = [pathlib.Path(r).expanduser().resolve() for r in args.runs]
    missing = [str(r) for r in runs if not r.is_dir()]
    if missing:
        raise SystemExit(f"not a directory: {', '.join(missing)}")
    out = pathlib.Path(args.out) if args.out else runs[-1] / "report.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    summaries = [run_summary(r) for r in runs]
    plots = plot_curves(summaries, out.parent)
    out.write_text(render(summaries, environment(), plots))
    print(f"wrote {out}" + ("" if plots is not None else " (no plots: matplotlib not installed)"))
    return out


if __name__ == "__main__":
    main()
