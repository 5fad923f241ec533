#!/usr/bin/env bash
# Copy this checkout (and $NANOJAX_HOME/tokenizer) to every host, install nanojax[tpu,gcs], download SHARDS
# FineWeb-Edu shards on each host (default 240; SHARDS=0 when --config.data.path points at a gs:// directory).
set -euo pipefail
# shellcheck source=launch/tpu/common.sh
source "$(dirname "$0")/common.sh"
setup_slice
