#!/usr/bin/env bash
# Copy this checkout (and the tokenizer) to every host, install nanojax[tpu], download the shards.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
SHARDS=${SHARDS:-240}
cd "$(dirname "$0")/../.."
tar czf /tmp/nanojax-src.tgz --exclude=.venv --exclude=.git .
gcloud compute tpus tpu-vm scp /tmp/nanojax-src.tgz "$TPU_NAME":~/ --zone "$ZONE" --worker=all
tok="${NANOJAX_HOME:-$HOME/.cache/nanojax}/tokenizer"
if [ -d "$tok" ]; then
  tar czf /tmp/nanojax-tok.tgz -C "$(dirname "$tok")" tokenizer
  gcloud compute tpus tpu-vm scp /tmp/nanojax-tok.tgz "$TPU_NAME":~/ --zone "$ZONE" --worker=all
fi
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  set -e; mkdir -p nanojax ~/.cache/nanojax && tar xzf nanojax-src.tgz -C nanojax
  [ -f nanojax-tok.tgz ] && tar xzf nanojax-tok.tgz -C ~/.cache/nanojax
  cd nanojax && python3 -m venv .venv && .venv/bin/pip install -q -e '.[tpu]'
  .venv/bin/python -m nanojax.data.fineweb download -n $SHARDS"
