#!/usr/bin/env bash
# Run the test suite on CPU with 8 fake devices (every sharding path), installing what it needs.
#   bash launch/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# OS packages some tests use, installed where we are root with apt-get (never failing here): bubblewrap for the
# execution sandbox (tests/reliability/test_sandbox.py), Debian's chromium + chromedriver for the chat page's
# browser test (tests/test_serve.py), shellcheck for the launch scripts (tests/test_launch_scripts.py). Without
# them those tests skip and say why.
missing=()
command -v bwrap >/dev/null 2>&1 || missing+=(bubblewrap)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium chromium-driver)
command -v shellcheck >/dev/null 2>&1 || missing+=(shellcheck)
if [ ${#missing[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"; } \
    >/dev/null 2>&1 || true
fi
if command -v bwrap >/dev/null 2>&1 && bwrap --unshare-all --die-with-parent --ro-bind / / --proc /proc --dev /dev \
    true >/dev/null 2>&1; then
  echo "sandbox: bubblewrap works here; the sandbox tests will run"
else
  echo "sandbox: bubblewrap missing or unusable here; the sandbox isolation tests will be skipped"
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
# setuptools' build chatter (editable-install notices) goes to a log that is shown only if the install fails
.venv/bin/python -m pip install --quiet -e '.[test]' > .venv/install.log 2>&1 || { cat .venv/install.log; exit 1; }
# torch (nanochat parity, Hugging Face export loaded in transformers) only from a wheel in a local wheel directory
# (PIP_FIND_LINKS, e.g. a CPU build; its dependencies from the index): PyPI's default torch brings gigabytes of CUDA
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  wheel=""
  for d in ${PIP_FIND_LINKS:-}; do
    d=${d#file://}
    for w in "$d"/torch-*.whl; do [ -f "$w" ] && wheel=$w && break; done
    [ -n "$wheel" ] && break
  done
  if [ -n "$wheel" ]; then
    .venv/bin/python -m pip install --quiet "$wheel" >> .venv/install.log 2>&1 || echo "torch: $wheel did not install"
  else
    echo "torch: no local wheel (PIP_FIND_LINKS); the tests that need it will skip"
  fi
fi
export XLA_FLAGS="${XLA_FLAGS:---xla_force_host_platform_device_count=8}"
export JAX_PLATFORMS=cpu HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 "$@"
