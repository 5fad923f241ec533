#!/usr/bin/env bash
# Create a TPU slice through a queued resource and wait until it is ACTIVE.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${ACCELERATOR:?set ACCELERATOR, e.g. v5p-64}" "${RUNTIME:?set RUNTIME, e.g. v2-alpha-tpuv5}"
extra=()
[ "${SPOT:-0}" = "1" ] && extra+=(--spot)
gcloud compute tpus queued-resources create "$TPU_NAME" --node-id "$TPU_NAME" --zone "$ZONE" \
  --accelerator-type "$ACCELERATOR" --runtime-version "$RUNTIME" "${extra[@]}"
until state=$(gcloud compute tpus queued-resources describe "$TPU_NAME" --zone "$ZONE" --format='value(state.state)') \
      && [ "$state" = "ACTIVE" ]; do
  echo "queued resource $TPU_NAME: ${state:-unknown}; waiting..."; sleep 30
  [ "$state" = "FAILED" ] && { echo "queued resource $TPU_NAME FAILED" >&2; exit 1; }
done
echo "$TPU_NAME is ACTIVE"
