#!/usr/bin/env bash
# Run the test suite on CPU with 8 fake devices (every sharding path), installing what it needs.
#   bash launch/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
# setuptools' build chatter (editable-install notices) goes to a log that is shown only if the install fails
.venv/bin/python -m pip install --quiet -e '.[test]' > .venv/install.log 2>&1 || { cat .venv/install.log; exit 1; }
export XLA_FLAGS="${XLA_FLAGS:---xla_force_host_platform_device_count=8}"
export JAX_PLATFORMS=cpu HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 "$@"
