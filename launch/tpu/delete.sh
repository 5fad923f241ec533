#!/usr/bin/env bash
# Delete the queued resource (and its slice), and wait until it is gone.
set -euo pipefail
# shellcheck source=launch/tpu/common.sh
source "$(dirname "$0")/common.sh"
delete_slice
