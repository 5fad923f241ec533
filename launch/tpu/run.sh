#!/usr/bin/env bash
# Train on every host of the slice: bash launch/tpu/run.sh configs/base_d20.py [--config.x=y ...]
# Checkpoints go to $BUCKET/runs/<run_name> so a re-run (after preemption) resumes.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${BUCKET:?set BUCKET, e.g. gs://my-bucket}"
config=${1:?usage: run.sh configs/X.py [overrides]}; shift
name=$(basename "$config" .py)
args=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  cd nanojax && NANOJAX_DISTRIBUTED=1 .venv/bin/python -m nanojax.train --config=$config \
    --config.run_dir=$BUCKET/runs/$name $args 2>&1 | tee -a ~/train-$name.log"
