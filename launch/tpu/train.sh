#!/usr/bin/env bash
# Babysit one training run on a TPU slice until it finishes, through preemptions and dead hosts:
#   bash launch/tpu/train.sh configs/base_d20.py [--config.x=y ...]
# Creates the queued resource when there is none (SPOT=1 for spot capacity), installs this checkout on every host,
# starts the same training command on all of them (one ssh per host, its output collected in
# $LOG_DIR/<attempt>/worker-<i>.log) and watches the slice every POLL_S seconds. When the slice leaves ACTIVE
# (preempted, suspended, failed), a host's command fails or no host has printed anything for STALL_S seconds, it
# deletes the slice, creates it again and restarts the same command, which resumes from the run's last checkpoint
# in RUN_DIR (default $BUCKET/runs/<config name>).
# The run is finished when every host exits with status 0 and the trainer said so ("finished at step N" or "run
# already complete"); an exit without that (stopped by a signal, train.stop_after_steps) starts it again on the
# same slice. Exit status 2 on a host (bad flag, config or data) stops at once: retrying cannot help.
# Settings (plus those of common.sh): MAX_RESTARTS (default 30), STALL_S (default 1800; 0: never), LOG_DIR,
# KEEP_SLICE=1 (leave the slice up at the end; by default it is deleted), SHARDS (setup; 0 when the data is on gs://).
set -euo pipefail
# shellcheck source=launch/tpu/common.sh
source "$(dirname "$0")/common.sh"

config=${1:?usage: train.sh configs/X.py [--config.x=y ...]}
shift
require TPU_NAME ZONE ACCELERATOR RUNTIME
scope
MAX_RESTARTS=${MAX_RESTARTS:-30}
STALL_S=${STALL_S:-1800}
LOG_DIR=${LOG_DIR:-${NANOJAX_HOME:-$HOME/.cache/nanojax}/tpu_logs/$TPU_NAME}
run_dir=$(run_dir_for "$config")
command=$(train_command "$config" "$@")
restarts=0
attempt_dir=""
OUTCOME=""  # of the last attempt: finished, stopped, lost:STATE, failed:WHY or fatal:WHY
worker_pids=()

stop_workers() {  # the local ssh sessions of the current attempt (the slice is deleted or reused after)
  local pid
  for pid in "${worker_pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${worker_pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  worker_pids=()
}

on_signal() {  # STATUS
  stop_workers
  say "babysitter stopped; the slice $TPU_NAME is left as it is (launch/tpu/delete.sh deletes it); the same" \
      "command resumes the run"
  exit "$1"
}
trap 'on_signal 130' INT
trap 'on_signal 143' TERM

ensure_active() {  # STATE: bring the slice to ACTIVE from that state, creating or re-creating it as needed
  local state=$1 create_failures=0
  while [ "$state" != ACTIVE ]; do
    case "$state" in
      DELETING | UNKNOWN) sleep "$POLL_S" ;;
      *)
        if ! is_pending "$state"; then
          if [ "$state" != NOT_FOUND ]; then say "$TPU_NAME is $state: deleting it to create it again"; delete_slice; fi
          if ! create_slice; then
            create_failures=$((create_failures + 1))
            if [ "$create_failures" -ge 3 ]; then say "creating $TPU_NAME failed 3 times (gcloud said why above)"; exit 1; fi
            sleep "$POLL_S"
          fi
        fi
        if wait_active; then return 0; fi ;;
    esac
    state=$(qr_state)
  done
}

run_finished() {  # the trainer's own last words on process 0 (nanojax/train.py, nanojax/rl.py)
  grep -Eqs "finished at step|run already complete" "$attempt_dir"/worker-*.log
}

log_bytes() {  # all output of this attempt so far
  local f total=0
  for f in "$attempt_dir"/worker-*.log; do total=$((total + $(wc -c <"$f"))); done
  echo "$total"
}

launch_workers() {  # one ssh per host, in the background, output to the attempt's logs
  local n i
  n=$(worker_count) || n=""
  if ! [[ "$n" =~ ^[1-9][0-9]*$ ]]; then say "could not count the hosts of $TPU_NAME (got '$n')"; return 1; fi
  attempt_dir="$LOG_DIR/$(date +%Y%m%d-%H%M%S)-attempt$((restarts + 1))"
  say "attempt $((restarts + 1)): training on $n host(s) -> $run_dir; logs in $attempt_dir"
  dry || mkdir -p "$attempt_dir"
  for ((i = 0; i < n; i++)); do
    if dry; then
      ssh_workers "$i" "$command"
    else
      ssh_workers "$i" "$command" </dev/null >"$attempt_dir/worker-$i.log" 2>&1 &
      worker_pids+=($!)
    fi
  done
}

watch_workers() {  # until every host is done or something broke; sets OUTCOME
  local i pid status running state size last_size=-1 last_change=$SECONDS
  local -a exit_status=()
  while :; do
    running=0
    for i in "${!worker_pids[@]}"; do
      [ -n "${exit_status[$i]:-}" ] && continue
      pid=${worker_pids[$i]}
      if kill -0 "$pid" 2>/dev/null; then running=$((running + 1)); continue; fi
      status=0
      wait "$pid" || status=$?
      exit_status[i]=$status
      if [ "$status" = 2 ]; then
        OUTCOME="fatal:worker $i exited with status 2 (a bad flag, config value or data file)"; return 0
      elif [ "$status" != 0 ]; then
        OUTCOME="failed:worker $i exited with status $status"; return 0
      fi
    done
    state=$(qr_state)
    if [ "$state" != ACTIVE ] && [ "$state" != UNKNOWN ]; then OUTCOME="lost:$state"; return 0; fi
    if [ "$running" = 0 ]; then
      if run_finished; then OUTCOME=finished; else OUTCOME=stopped; fi
      return 0
    fi
    size=$(log_bytes)
    if [ "$size" != "$last_size" ]; then
      last_size=$size last_change=$SECONDS
    elif [ "$STALL_S" -gt 0 ] && [ $((SECONDS - last_change)) -ge "$STALL_S" ]; then
      OUTCOME="failed:no host printed anything for ${STALL_S}s (STALL_S)"; return 0
    fi
    sleep "$POLL_S"
  done
}

attempt() {  # one training attempt on an ACTIVE slice; sets OUTCOME
  local state
  if dry; then
    setup_slice
  elif ! setup_slice >>"$LOG_DIR/setup.log" 2>&1; then
    OUTCOME="failed:setup did not complete ($LOG_DIR/setup.log says why)"
    return 0
  fi
  launch_workers || { OUTCOME="failed:no hosts to start"; return 0; }
  if dry; then  # nothing ran: the slice's state alone decides
    state=$(qr_state)
    if [ "$state" = ACTIVE ]; then OUTCOME=finished; else OUTCOME="lost:$state"; fi
    return 0
  fi
  watch_workers
}

dry || mkdir -p "$LOG_DIR"
say "babysitting $config on $TPU_NAME ($ACCELERATOR) -> $run_dir (poll every ${POLL_S}s, at most $MAX_RESTARTS restarts)"
state=$(qr_state)
while :; do
  ensure_active "$state"
  attempt
  stop_workers
  case "$OUTCOME" in
    finished)
      say "run finished: $run_dir"
      if [ "${KEEP_SLICE:-0}" = 1 ]; then say "KEEP_SLICE=1: $TPU_NAME stays up"; else delete_slice; fi
      exit 0 ;;
    fatal:*)
      say "${OUTCOME#fatal:}: not restarting; the logs are in $attempt_dir, the slice stays up" \
          "(launch/tpu/delete.sh deletes it)"
      exit 2 ;;
  esac
  restarts=$((restarts + 1))
  if [ "$restarts" -gt "$MAX_RESTARTS" ]; then
    say "giving up after $MAX_RESTARTS restarts (MAX_RESTARTS; the last attempt: $OUTCOME). The checkpoints stay" \
        "in $run_dir: the same command resumes the run; launch/tpu/delete.sh deletes the slice"
    exit 1
  fi
  of_at_most="restart $restarts of at most $MAX_RESTARTS"
  case "$OUTCOME" in
    lost:*) state=${OUTCOME#lost:}; say "slice $TPU_NAME is $state: re-creating it ($of_at_most)" ;;
    stopped) state=$(qr_state); say "training stopped before the end: starting it again ($of_at_most)" ;;
    *) state=FAILED; say "${OUTCOME#failed:}: re-creating the slice ($of_at_most)" ;;
  esac
done
