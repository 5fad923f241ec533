#!/usr/bin/env bash
# Create the TPU slice through a queued resource (SPOT=1 for spot capacity) and wait until it is ACTIVE.
set -euo pipefail
# shellcheck source=launch/tpu/common.sh
source "$(dirname "$0")/common.sh"
require TPU_NAME ZONE ACCELERATOR RUNTIME
create_slice
wait_active
