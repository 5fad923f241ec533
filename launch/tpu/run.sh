#!/usr/bin/env bash
# Train once on every host of the slice: bash launch/tpu/run.sh configs/base_d20.py [--config.x=y ...]
# Checkpoints go to RUN_DIR (default $BUCKET/runs/<config name>), so re-running it (after a preemption) resumes.
# launch/tpu/train.sh does that by itself: it watches the slice and re-creates it when it is preempted.
set -euo pipefail
# shellcheck source=launch/tpu/common.sh
source "$(dirname "$0")/common.sh"
config=${1:?usage: run.sh configs/X.py [--config.x=y ...]}
shift
command=$(train_command "$config" "$@")
ssh_workers all "$command"
