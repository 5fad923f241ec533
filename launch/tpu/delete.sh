#!/usr/bin/env bash
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
gcloud compute tpus queued-resources delete "$TPU_NAME" --zone "$ZONE" --force --quiet
