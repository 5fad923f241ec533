#!/usr/bin/env bash
# The prepared device check (nanojax/benchmarks/device_check.py): d20 training speed/MFU/memory with each
# attention and remat choice, d26/d32 compile-only memory, KV-cache decode speed; JSON + markdown in OUT_DIR.
#   bash launch/device_check.sh OUT_DIR [--dry] [--budget_s 420]
#   bash launch/device_check.sh --prepare-wheels     (here, with network: pure-Python packages a device image
#                                                    lacks, into .whl/ for the device tool to carry)
# Needs only what the accelerator images have (jax, flax, optax, orbax, tiktoken, pyarrow) plus the wheels in
# .whl/ when present; nanojax itself runs from this checkout (no install).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}
WHEELS="ml-collections==1.1.0"  # py3-none-any; everything else bench train/generation import is in the images
if [ "${1:-}" = "--prepare-wheels" ]; then
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  exec "$PY" -m pip download --no-deps --only-binary=:all: -d .whl $WHEELS
fi
if ! "$PY" -c "import ml_collections" >/dev/null 2>&1 && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/nanojax_site .whl/*.whl \
    && export PYTHONPATH="/tmp/nanojax_site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
exec "$PY" -m nanojax.benchmarks.device_check "$@"
