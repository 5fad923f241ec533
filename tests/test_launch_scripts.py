"""The launch scripts: shellcheck-clean, DRY_RUN=1 prints instead of acting, the TPU babysitter rides out
preemptions and dead hosts against a fake `gcloud` and stops when the run is finished, the SLURM script requeues
itself on SIGTERM against fake `srun` / `scontrol`. Every fake is a small script on PATH; nothing touches a cloud."""
import json
import os
import pathlib
import re
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time

import pytest

from helpers import ROOT

LAUNCH = ROOT / "launch"
SCRIPTS = sorted([*LAUNCH.rglob("*.sh"), *LAUNCH.rglob("*.sbatch")])
RUN_DIR = "gs://bucket/runs/tiny"

FAKE_GCLOUD = r'''
"""Fake gcloud: one queued resource whose state lives in $FAKE_DIR; every call is logged to calls.jsonl.
FAKE_SCENARIO decides what the training command does on each slice generation (one per create)."""
import json, os, pathlib, sys, time

d = pathlib.Path(os.environ["FAKE_DIR"])
args = sys.argv[1:]
with open(d / "calls.jsonl", "a") as f:
    f.write(json.dumps(args) + "\n")
state_file, queue = d / "state", d / "states"
generation = int((d / "generation").read_text()) if (d / "generation").exists() else 0
scenario = os.environ.get("FAKE_SCENARIO", "finish")

def option(name):
    return next((a.split("=", 1)[1] for a in args if a.startswith(f"--{name}=")), None)

if args[:3] == ["compute", "tpus", "queued-resources"]:
    verb = args[3]
    if verb == "describe":
        if queue.exists():  # a scripted sequence of states, one per query, the last one sticking
            lines = queue.read_text().split()
            state_file.write_text(lines[0])
            queue.write_text("\n".join(lines[1:] or lines))
        state = state_file.read_text() if state_file.exists() else "NOT_FOUND"
        if state == "NOT_FOUND":
            sys.exit(print("ERROR: (gcloud) NOT_FOUND: queued resource not found", file=sys.stderr) or 1)
        print(state)
    elif verb == "create":
        state_file.write_text("ACTIVE")
        (d / "generation").write_text(str(generation + 1))
    elif verb == "delete":
        state_file.unlink(missing_ok=True)
elif args[:4] == ["compute", "tpus", "tpu-vm", "describe"]:
    print(os.environ.get("FAKE_WORKERS", "2"))
elif args[:4] == ["compute", "tpus", "tpu-vm", "ssh"] and "nanojax.train" in args[args.index("--command") + 1]:
    worker = int(option("worker"))
    print(f"worker {worker} of generation {generation}: {args[args.index('--command') + 1]}", flush=True)
    if scenario == "always_preempt" or (scenario == "preempt" and generation == 1):
        if worker == 0:
            time.sleep(0.3)
            state_file.write_text("PREEMPTED")
        time.sleep(60)  # a host that vanished: its ssh hangs until the babysitter kills it
    if scenario == "worker_dies" and generation == 1:
        if worker == 1:
            time.sleep(0.3)
            sys.exit(1)
        time.sleep(60)
    if scenario == "hang" and generation == 1:
        time.sleep(60)  # a collective waiting forever for a host that died without closing its connection
    if scenario == "bad_config":
        sys.exit(print("error: config.train.num_iterations: bad value", flush=True) or 2)
    if scenario == "stop_once" and worker == 0:
        calls = d / "train_calls"
        n = int(calls.read_text()) + 1 if calls.exists() else 1
        calls.write_text(str(n))
        if n == 1:
            sys.exit(print("stopped at step 10; checkpoint in gs://bucket/runs/tiny/checkpoints/10") or 0)
    if worker == 0:
        print("finished at step 20; checkpoint in gs://bucket/runs/tiny/checkpoints/20")
'''


def _write_tool(directory: pathlib.Path, name: str, body: str) -> None:
    path = directory / name
    path.write_text(f"#!{sys.executable}\n" + textwrap.dedent(body))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def fake_gcloud(tmp_path):
    """(environment with the fake gcloud first on PATH, its state dir, a reader of the calls made)."""
    bin_dir, state = tmp_path / "bin", tmp_path / "fake"
    bin_dir.mkdir()
    state.mkdir()
    _write_tool(bin_dir, "gcloud", FAKE_GCLOUD)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_DIR": str(state),
           "TPU_NAME": "nj-test", "ZONE": "us-east5-a", "ACCELERATOR": "v5p-16", "RUNTIME": "v2-alpha-tpuv5",
           "BUCKET": "gs://bucket", "POLL_S": "0.1", "SHARDS": "0", "LOG_DIR": str(tmp_path / "logs"),
           "NANOJAX_HOME": str(tmp_path / "home")}
    env.pop("DRY_RUN", None)

    def calls(*prefix):
        lines = (state / "calls.jsonl").read_text().splitlines() if (state / "calls.jsonl").exists() else []
        return [c for c in map(json.loads, lines) if c[:len(prefix)] == list(prefix)]

    return env, state, calls


def _babysit(env, *overrides, timeout=60):
    return subprocess.run(["bash", str(LAUNCH / "tpu" / "train.sh"), "configs/tiny.py", *overrides], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _training(calls):
    return [c for c in calls("compute", "tpus", "tpu-vm", "ssh") if "nanojax.train" in c[c.index("--command") + 1]]


def _qr(calls, verb):
    return calls("compute", "tpus", "queued-resources", verb)


def test_every_script_passes_shellcheck():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (launch/test.sh installs Debian's package where it is root)")
    assert len(SCRIPTS) >= 9, SCRIPTS
    out = subprocess.run(["shellcheck", "-x", *map(str, SCRIPTS)], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dry_run_recreates_a_preempted_slice_and_restarts_the_same_run(fake_gcloud):
    env, state, calls = fake_gcloud
    (state / "states").write_text("NOT_FOUND\nPREEMPTED\nACTIVE\n")  # none yet; preempted after the first start
    out = _babysit({**env, "DRY_RUN": "1"}, "--config.train.eval_every=100")
    assert out.returncode == 0, out.stdout + out.stderr
    printed = [line for line in out.stdout.splitlines() if line.startswith("+ gcloud")]
    kinds = [next(k for k in ("create", "delete", "nanojax.train", "scp", "pip install", "describe") if k in line)
             for line in printed]
    steps = [k for k in kinds if k in ("create", "delete", "nanojax.train")]
    assert steps == ["create", "nanojax.train", "nanojax.train", "delete", "create", "nanojax.train",
                     "nanojax.train", "delete"], out.stdout  # two hosts each time; deleted once finished
    train = [line for line in printed if "nanojax.train" in line]
    assert all(f"--config.run_dir={RUN_DIR}" in line and "--config.train.eval_every=100" in line for line in train)
    assert {line.replace("--worker=1", "--worker=0") for line in train} == {train[0]}  # the very same command
    assert "PREEMPTED: re-creating it" in out.stdout and "run finished" in out.stdout
    assert all(c[3] == "describe" for c in calls("compute", "tpus") if c[2] == "queued-resources")  # nothing changed
    assert not calls("compute", "tpus", "tpu-vm", "ssh") and not calls("compute", "tpus", "tpu-vm", "scp")


def test_babysitter_rides_out_a_preemption_then_stops_when_the_run_is_finished(fake_gcloud):
    env, state, calls = fake_gcloud
    t0 = time.time()
    out = _babysit({**env, "FAKE_SCENARIO": "preempt"})
    assert out.returncode == 0, out.stdout + out.stderr
    assert len(_qr(calls, "create")) == 2 and len(_qr(calls, "delete")) == 2  # after the preemption; at the end
    train = _training(calls)
    assert sorted(a for c in train for a in c if a.startswith("--worker=")) == ["--worker=0", "--worker=0",
                                                                                "--worker=1", "--worker=1"]
    assert len({c[c.index("--command") + 1] for c in train}) == 1 and f"--config.run_dir={RUN_DIR}" in train[0][-1]
    logs = sorted(pathlib.Path(env["LOG_DIR"]).glob("*attempt*/worker-*.log"))
    assert len(logs) == 4  # every host's output, both attempts
    assert "finished at step 20" in logs[-2].read_text() and "generation 2" in logs[-1].read_text()
    assert "PREEMPTED: re-creating it (restart 1" in out.stdout and "run finished" in out.stdout
    assert time.time() - t0 < 30  # the hung ssh sessions of the preempted slice were killed, not waited for


def test_an_exit_without_the_finished_line_is_restarted_on_the_same_slice(fake_gcloud):
    env, _, calls = fake_gcloud
    out = _babysit({**env, "FAKE_SCENARIO": "stop_once", "KEEP_SLICE": "1"})
    assert out.returncode == 0, out.stdout + out.stderr
    assert len(_qr(calls, "create")) == 1 and not _qr(calls, "delete")
    assert len(_training(calls)) == 4 and "stopped before the end" in out.stdout


@pytest.mark.parametrize("scenario,stall_s,said", [
    ("worker_dies", "1800", "worker 1 exited with status 1: re-creating the slice"),
    ("hang", "1", "no host printed anything for 1s (STALL_S): re-creating the slice"),
])
def test_a_dead_or_silent_host_gets_the_slice_re_created(fake_gcloud, scenario, stall_s, said):
    env, _, calls = fake_gcloud
    out = _babysit({**env, "FAKE_SCENARIO": scenario, "STALL_S": stall_s})
    assert out.returncode == 0, out.stdout + out.stderr
    assert said in out.stdout
    assert len(_qr(calls, "create")) == 2 and len(_training(calls)) == 4


def test_restarts_are_bounded_and_bad_input_is_not_retried(fake_gcloud):
    env, state, calls = fake_gcloud
    out = _babysit({**env, "FAKE_SCENARIO": "always_preempt", "MAX_RESTARTS": "1"})
    assert out.returncode == 1 and "giving up after 1 restarts (MAX_RESTARTS" in out.stdout, out.stdout + out.stderr
    assert len(_qr(calls, "create")) == 2
    (state / "state").write_text("ACTIVE")  # a healthy slice is there already: used as it is
    out = _babysit({**env, "FAKE_SCENARIO": "bad_config"})
    assert out.returncode == 2 and re.search(r"worker \d exited with status 2 \(a bad flag", out.stdout), out.stdout
    assert len(_qr(calls, "create")) == 2 and len(_training(calls)) == 2 + 2 + 2


@pytest.mark.parametrize("script,args,expect", [
    ("create.sh", [], "queued-resources create nj-test --node-id nj-test --zone us-east5-a"),
    ("setup.sh", [], "tpu-vm scp"),
    ("run.sh", ["configs/tiny.py", "--config.train.eval_every=5"], f"--config.run_dir={RUN_DIR}"),
    ("delete.sh", [], "queued-resources delete nj-test --zone us-east5-a --force --quiet"),
])
def test_pod_scripts_print_instead_of_acting_in_dry_run(fake_gcloud, script, args, expect):
    env, _, calls = fake_gcloud
    out = subprocess.run(["bash", str(LAUNCH / "tpu" / script), *args], env={**env, "DRY_RUN": "1", "SPOT": "1"},
                         cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr
    assert expect in out.stdout
    assert not [c for c in calls() if "describe" not in c], calls()


def test_run_dir_override_is_refused_with_the_setting_to_use(fake_gcloud):
    env, _, calls = fake_gcloud
    out = _babysit(env, "--config.run_dir=gs://elsewhere")
    assert out.returncode == 2 and "set RUN_DIR instead" in out.stderr, out.stdout + out.stderr
    assert not calls()


def test_the_babysitter_waits_for_what_the_trainers_print_at_the_end():
    """train.sh's finished test greps for the trainers' last lines (tests/test_train.py runs one and reads them)."""
    assert '"finished at step|run already complete"' in (LAUNCH / "tpu" / "train.sh").read_text()
    for trainer in ("train.py", "rl.py"):
        source = (ROOT / "nanojax" / trainer).read_text()
        assert re.search(r"else 'finished'\} at step \{step\}", source) and "run already complete: step" in source


SRUN = r'''
"""Fake srun: records its arguments and environment, then trains until SIGTERM (which it records)."""
import json, os, pathlib, signal, sys, time

d = pathlib.Path(os.environ["FAKE_DIR"])
keys = ("NANOJAX_DISTRIBUTED", "JAX_COORDINATOR_ADDRESS", "JAX_LOCAL_DEVICE_IDS")
(d / "srun.json").write_text(json.dumps({"args": sys.argv[1:], "env": {k: os.environ.get(k) for k in keys}}))
if "FAKE_SRUN_EXIT" in os.environ:  # a run that ends by itself
    sys.exit(int(os.environ["FAKE_SRUN_EXIT"]))
signal.signal(signal.SIGTERM, lambda *_: ((d / "srun_got_term").write_text("1"), sys.exit(0)))
time.sleep(60)
'''
SCONTROL = r'''
import os, pathlib, sys

if sys.argv[1:3] == ["show", "hostnames"]:
    print("node001\nnode002")
else:
    with open(pathlib.Path(os.environ["FAKE_DIR"]) / "scontrol.log", "a") as f:
        f.write(" ".join(sys.argv[1:]) + "\n")
'''


@pytest.fixture
def fake_slurm(tmp_path):
    bin_dir, state = tmp_path / "bin", tmp_path / "fake"
    bin_dir.mkdir()
    state.mkdir()
    _write_tool(bin_dir, "srun", SRUN)
    _write_tool(bin_dir, "scontrol", SCONTROL)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_DIR": str(state),
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node[001-002]", "SLURM_NNODES": "2",
           "SLURM_GPUS_ON_NODE": "8", "SLURM_SUBMIT_DIR": str(ROOT)}
    env.pop("DRY_RUN", None)
    return env, state


def test_slurm_job_requeues_itself_on_sigterm_after_the_trainer_saved(fake_slurm):
    env, state = fake_slurm
    proc = subprocess.Popen(["bash", str(LAUNCH / "slurm" / "train.sbatch"), "configs/base_d20.py",
                             "--config.train.eval_every=250"], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 20
    while not (state / "srun.json").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=20)[0]
    assert proc.returncode == 0, out
    assert (state / "srun_got_term").exists(), out  # the trainer was asked to checkpoint first
    assert (state / "scontrol.log").read_text().split("\n")[0] == "requeue 4242", out
    srun = json.loads((state / "srun.json").read_text())
    assert srun["env"] == {"NANOJAX_DISTRIBUTED": "1", "JAX_COORDINATOR_ADDRESS": f"node001:{61440 + 4242 % 4096}",
                           "JAX_LOCAL_DEVICE_IDS": "0,1,2,3,4,5,6,7"}  # the port jax itself would pick
    assert "--ntasks-per-node=1" in srun["args"] and srun["args"][-2:] == ["--config=configs/base_d20.py",
                                                                         "--config.train.eval_every=250"]


def test_slurm_job_without_a_signal_ends_with_the_trainers_status_and_dry_run_only_prints(fake_slurm):
    env, state = fake_slurm
    command = ["bash", str(LAUNCH / "slurm" / "train.sbatch"), "configs/base_d20.py"]
    out = subprocess.run(command, env={**env, "FAKE_SRUN_EXIT": "3"}, cwd=ROOT, capture_output=True, text=True,
                         timeout=20)
    assert out.returncode == 3 and not (state / "scontrol.log").exists(), out.stdout + out.stderr
    (state / "srun.json").unlink()
    out = subprocess.run(command, env={**env, "DRY_RUN": "1"}, cwd=ROOT, capture_output=True, text=True, timeout=20)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "+ srun" in out.stdout and "nanojax.train --config=configs/base_d20.py" in out.stdout
    assert not (state / "srun.json").exists() and not (state / "scontrol.log").exists()


def test_gpt2_speedrun_dry_run_lists_heads_pipeline_with_the_configs_tokenizer():
    """launch/speedrun_gpt2.sh: ClimbMix, the tokenizer where configs/gpt2_d24.py looks for it, base, SFT, evals."""
    from helpers import load_config_file
    from nanojax.tokenizer import tokenizer_dir_for

    out = subprocess.run(["bash", str(LAUNCH / "speedrun_gpt2.sh")], env={**os.environ, "DRY_RUN": "1"}, cwd=ROOT,
                         capture_output=True, text=True, timeout=30)  # conftest's private NANOJAX_HOME
    assert out.returncode == 0, out.stderr
    steps = [line for line in out.stdout.splitlines() if line.startswith("+ ")]
    assert [s.split(" -m ")[1].split()[0] for s in steps] == [
        "nanojax.data.fineweb", "nanojax.data.fineweb", "nanojax.tokenizer", "nanojax.tokenizer", "nanojax.train",
        "nanojax.evaluate", "nanojax.train", "nanojax.evaluate", "nanojax.report"]
    tokenizer_dir = tokenizer_dir_for(load_config_file("gpt2_d24"))
    assert f"train --dataset climbmix --tokenizer_dir {tokenizer_dir}" in out.stdout
    assert "--config=configs/gpt2_d24.py" in steps[4] and "--config=configs/gpt2_sft.py" in steps[6]
