#!/usr/bin/env bash
# Sourced by the TPU scripts: every gcloud call on the queued resource, in one place.
# Settings (environment): TPU_NAME, ZONE, PROJECT (optional: gcloud's default project otherwise), ACCELERATOR and
# RUNTIME (create), SPOT=1 (spot capacity), BUCKET or RUN_DIR (where the run lives), POLL_S (seconds between state
# queries, default 30), DRY_RUN=1: what changes something (create, delete, copy, ssh) is printed, not run; the
# read-only queries (describe) still run.

TPU_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$TPU_DIR/../.." && pwd)
POLL_S=${POLL_S:-30}
PENDING_STATES="CREATING ACCEPTED PROVISIONING WAITING_FOR_RESOURCES"

say() { echo "[$(date +%H:%M:%S)] $*"; }

require() {  # VAR...: stop, naming the first unset one
  local v
  for v in "$@"; do
    [ -n "${!v:-}" ] || { echo "error: set $v (launch/tpu/README.md lists the settings)" >&2; exit 2; }
  done
}

dry() { [ "${DRY_RUN:-0}" = 1 ]; }

act() {  # run a command that changes something; under DRY_RUN=1 print it instead
  if dry; then
    printf '+'
    printf ' %q' "$@"
    printf '\n'
    return 0
  fi
  "$@"
}

scope() {  # the flags that name where the slice is
  require TPU_NAME ZONE
  SCOPE=(--zone "$ZONE")
  if [ -n "${PROJECT:-}" ]; then SCOPE+=(--project "$PROJECT"); fi
}

qr_state() {  # the queued resource's state (ACTIVE, SUSPENDED, ...), NOT_FOUND, or UNKNOWN when gcloud failed
  local err out
  scope
  err=$(mktemp)
  if out=$(gcloud compute tpus queued-resources describe "$TPU_NAME" "${SCOPE[@]}" \
             --format='value(state.state)' 2>"$err"); then
    echo "${out:-UNKNOWN}"
  elif grep -q NOT_FOUND "$err"; then
    echo NOT_FOUND
  else
    echo "gcloud describe failed: $(tr '\n' ' ' <"$err")" >&2
    echo UNKNOWN
  fi
  rm -f "$err"
}

is_pending() { case " $PENDING_STATES " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

create_slice() {
  require ACCELERATOR RUNTIME
  scope
  local tier=()
  if [ "${SPOT:-0}" = 1 ]; then tier=(--spot); fi
  say "creating queued resource $TPU_NAME ($ACCELERATOR${tier[*]:+, spot})"
  act gcloud compute tpus queued-resources create "$TPU_NAME" --node-id "$TPU_NAME" "${SCOPE[@]}" \
    --accelerator-type "$ACCELERATOR" --runtime-version "$RUNTIME" "${tier[@]}"
}

wait_active() {  # until ACTIVE (0), or 1 when the request failed or the slice went away meanwhile
  local state
  if dry; then say "(dry run) would wait until $TPU_NAME is ACTIVE"; return 0; fi
  while :; do
    state=$(qr_state)
    if [ "$state" = ACTIVE ]; then say "$TPU_NAME is ACTIVE"; return 0; fi
    if ! is_pending "$state" && [ "$state" != UNKNOWN ]; then
      say "queued resource $TPU_NAME is $state while waiting for it"
      return 1
    fi
    say "queued resource $TPU_NAME: $state; waiting"
    sleep "$POLL_S"
  done
}

delete_slice() {  # delete, asking again until it is gone (a new one of the same name cannot be created before)
  local state=""
  scope
  say "deleting queued resource $TPU_NAME"
  while :; do
    if [ "$state" != DELETING ] && [ "$state" != UNKNOWN ]; then
      act gcloud compute tpus queued-resources delete "$TPU_NAME" "${SCOPE[@]}" --force --quiet || true
    fi
    dry && return 0
    state=$(qr_state)
    [ "$state" = NOT_FOUND ] && return 0
    sleep "$POLL_S"
  done
}

worker_count() {  # hosts of the slice: NUM_WORKERS, or what gcloud says
  if [ -n "${NUM_WORKERS:-}" ]; then echo "$NUM_WORKERS"; return 0; fi
  scope
  gcloud compute tpus tpu-vm describe "$TPU_NAME" "${SCOPE[@]}" --format='value(networkEndpoints.len())'
}

run_dir_for() {  # CONFIG: RUN_DIR, or $BUCKET/runs/<config name>; the same on every restart
  if [ -n "${RUN_DIR:-}" ]; then echo "$RUN_DIR"; return 0; fi
  require BUCKET
  echo "${BUCKET%/}/runs/$(basename "$1" .py)"
}

train_command() {  # CONFIG [OVERRIDES...]: the command every host runs (it resumes from the run's last checkpoint)
  local config=$1 arg
  shift
  for arg in "$@"; do
    case "$arg" in
      --config.run_dir=*) echo "error: $arg: set RUN_DIR instead (the TPU scripts pass --config.run_dir)" >&2; exit 2 ;;
    esac
  done
  printf 'cd ~/nanojax && NANOJAX_DISTRIBUTED=1 PYTHONUNBUFFERED=1 exec .venv/bin/python -m nanojax.train'
  printf ' %q' "--config=$config" "--config.run_dir=$(run_dir_for "$config")" "$@"
  printf '\n'
}

ssh_workers() {  # WORKER COMMAND: run COMMAND on one host (a number) or on every host (all); no prompts
  scope
  act gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${SCOPE[@]}" --worker="$1" --quiet --command "$2"
}

setup_slice() {  # this checkout and the tokenizer onto every host, nanojax[tpu,gcs] installed, SHARDS downloaded
  local shards=${SHARDS:-240} src tok home
  scope
  home=${NANOJAX_HOME:-$HOME/.cache/nanojax}
  src=$(mktemp -t nanojax-src.XXXXXX)
  act tar czf "$src" -C "$REPO_DIR" --exclude=.venv --exclude=.git .
  act gcloud compute tpus tpu-vm scp "$src" "$TPU_NAME:~/nanojax-src.tgz" "${SCOPE[@]}" --worker=all --quiet
  if [ -d "$home/tokenizer" ]; then
    tok=$(mktemp -t nanojax-tok.XXXXXX)
    act tar czf "$tok" -C "$home" tokenizer
    act gcloud compute tpus tpu-vm scp "$tok" "$TPU_NAME:~/nanojax-tok.tgz" "${SCOPE[@]}" --worker=all --quiet
    rm -f "$tok"
  fi
  rm -f "$src"
  ssh_workers all "set -e; mkdir -p ~/nanojax ~/.cache/nanojax; tar xzf ~/nanojax-src.tgz -C ~/nanojax
    if [ -f ~/nanojax-tok.tgz ]; then tar xzf ~/nanojax-tok.tgz -C ~/.cache/nanojax; fi
    cd ~/nanojax && { [ -x .venv/bin/python ] || python3 -m venv .venv; } && .venv/bin/pip install -q -e '.[tpu,gcs]'
    if [ $shards -gt 0 ]; then .venv/bin/python -m nanojax.data.fineweb download -n $shards; fi"
}
