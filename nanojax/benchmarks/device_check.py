"""The prepared device check: everything worth measuring on a lent GPU or TPU host, within a wall-time budget.

    bash launch/device_check.sh OUT_DIR [--dry] [--budget_s 420]

In order, each in its own process with what is left of the budget (a failure or an out-of-memory is recorded
and the check goes on):
  1. versions and devices;
  2. d20 `bench train` at device batch 32 x 2048 with attention and remat on `auto` (what a user gets);
  3. the same with XLA's reference attention (the fallback), and with each remat policy (none, dots, full:
     the ones that do not fit are recorded as such);
  4. d26 and d32 compile-only (per-device memory, compile time);
  5. `bench generation` on d20 shapes (KV-cache decode tokens/s, batch 1 and 8).
Writes OUT_DIR/device_check.json (every result) and OUT_DIR/device_check.md (a table for docs/benchmarks.md).
`--dry` runs the same steps on the tiny config with small shapes: on a CPU in about a minute, and in the tests.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import time


def plan(dry: bool) -> list[tuple[str, list[str], int]]:
    """(name, command after `python -m`, its own time limit in s)."""
    base = "configs/tiny.py" if dry else "configs/base_d20.py"
    batch = [] if dry else ["--config.train.device_batch_size=32"]
    steps = ["--steps", "2" if dry else "5", "--json"]
    train = ["nanojax.bench", "train", f"--config={base}", *batch, *steps]
    items = [("train auto", train, 180)]
    items.append(("train xla attention", [*train, "--config.model.attention_impl=xla"], 150))
    for remat in ("none", "dots", "full"):
        items.append((f"train remat={remat}", [*train, f"--config.model.remat={remat}"], 150))
    for depth in ((4,) if dry else (26, 32)):
        cfg = base if dry else f"configs/base_d{depth}.py"
        items.append((f"compile-only d{depth}", ["nanojax.bench", "train", f"--config={cfg}", "--compile_only",
                                                 "--json"], 150))
    shape = (["--depth", "2", "--vocab", "512", "--seq_len", "128", "--new_tokens", "32"] if dry else
             ["--depth", "20", "--vocab", "65536", "--seq_len", "2048", "--new_tokens", "256"])
    for batch_rows in (1, 8):
        items.append((f"generation batch {batch_rows}", ["nanojax.bench", "generation", *shape, "--prompt", "16",
                                                         "--batch", str(batch_rows), "--repeats", "2",
                                                         "--skip_naive"], 150))
    return items


def versions() -> dict:
    import importlib.metadata as md

    import jax

    out = {"python": sys.version.split()[0], "devices": [str(d) for d in jax.devices()],
           "device_kind": jax.devices()[0].device_kind, "backend": jax.default_backend()}
    for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "ml-collections", "tiktoken"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def run_item(name: str, argv: list[str], limit: float) -> dict:
    t0 = time.time()
    try:
        proc = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        return {"name": name, "status": f"timed out after {limit:.0f} s", "seconds": round(time.time() - t0, 1)}
    out = proc.stdout + proc.stderr
    result = next((json.loads(line) for line in reversed(proc.stdout.splitlines()) if line.startswith("{")), None)
    status = "ok" if proc.returncode == 0 and result is not None else (
        "out of memory" if "RESOURCE_EXHAUSTED" in out or "out of device memory" in out or "Out of memory" in out
        else f"failed (exit {proc.returncode})")
    record = {"name": name, "status": status, "seconds": round(time.time() - t0, 1), "result": result}
    if status != "ok":
        record["log_tail"] = out[-2000:]
    return record


def row(r: dict) -> str:
    res = r.get("result") or {}
    if "tokens_per_s" in res or "compile_s" in res:  # bench train
        tok = f"{res['tokens_per_s']:,.0f}" if res.get("tokens_per_s") else "–"
        mfu = f"{res['mfu'] * 100:.1f} %" if res.get("mfu") else "–"
        mem = f"{res['peak_bytes_per_device'] / 2**30:.1f} GiB" if res.get("peak_bytes_per_device") else "–"
        step = f"{res['step_s'] * 1000:.0f} ms" if res.get("step_s") else "–"
        what = f"{res['config']} · {res.get('attention')} attention · remat {res.get('remat')}"
        return f"| {r['name']} | {what} | {step} | {tok} | {mfu} | {mem} | {res['compile_s']:.1f} s | {r['status']} |"
    if "cached_tokens_per_s" in res:
        return (f"| {r['name']} | depth {res['depth']} · vocab {res['vocab']} · batch {res['batch']} | – | "
                f"{res['cached_tokens_per_s']:,.0f} | – | – | {res['warmup_compile_s']:.1f} s | {r['status']} |")
    return f"| {r['name']} | – | – | – | – | – | – | {r['status']} |"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--dry", action="store_true", help="the tiny config and small shapes (CPU, tests)")
    ap.add_argument("--budget_s", type=float, default=420.0,
                    help="wall time for the whole check (what is left when it runs out is skipped, and says so)")
    args = ap.parse_args(argv)
    out = pathlib.Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    report = {"versions": versions(), "dry": args.dry, "items": []}
    print(json.dumps(report["versions"]), flush=True)
    for name, cmd, limit in plan(args.dry):
        left = args.budget_s - (time.time() - started)
        if left < 20:
            report["items"].append({"name": name, "status": "skipped: budget spent"})
            continue
        record = run_item(name, cmd, min(limit, left))
        report["items"].append(record)
        print(f"[{time.time() - started:5.0f} s] {name}: {record['status']}", flush=True)
        (out / "device_check.json").write_text(json.dumps(report, indent=1))
    device = report["versions"]["device_kind"]
    lines = [f"Device check on {len(report['versions']['devices'])}× {device} "
             f"(jax {report['versions']['jax']}, {time.strftime('%Y-%m-%d')}, {time.time() - started:.0f} s):", "",
             "| item | what | step | tokens/s | MFU | peak mem/device | compile | status |", "|" + "---|" * 8]
    lines += [row(r) for r in report["items"]]
    (out / "device_check.md").write_text("\n".join(lines) + "\n")
    (out / "device_check.json").write_text(json.dumps(report, indent=1))
    print("\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
