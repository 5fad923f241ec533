#!/usr/bin/env bash
# nanochat HEAD's "time to GPT-2" speedrun (runs/speedrun.sh at 92d63d4) on one GPU node (8×H100 class): ClimbMix
# shards, the 32,768-token tokenizer, the d24 base model (configs/gpt2_d24.py), CORE, HEAD's SFT (configs/gpt2_sft.py)
# and the chat evaluations. Every step can be re-run: downloads skip what is present, training resumes.
#   bash launch/speedrun_gpt2.sh            (set NANOJAX_HOME to put data/runs elsewhere; DRY_RUN=1 prints the steps)
set -euo pipefail
cd "$(dirname "$0")/.."
home=${NANOJAX_HOME:-$HOME/.cache/nanojax}
tok="$home/tokenizer-climbmix"  # configs/gpt2_d24.py's data.tokenizer_dir
py=.venv/bin/python
run() { if [ -n "${DRY_RUN:-}" ]; then echo "+ $*"; else "$@"; fi; }

if [ -z "${DRY_RUN:-}" ]; then
  [ -x "$py" ] || python3 -m venv .venv
  "$py" -m pip install --quiet -e '.[gpu]'
fi
run "$py" -m nanojax.data.fineweb download -n 8 --dataset climbmix         # ~2B characters for the tokenizer
rest=("$py" -m nanojax.data.fineweb download --config configs/gpt2_d24.py)  # while the tokenizer trains
download=""
if [ -n "${DRY_RUN:-}" ]; then echo "+ ${rest[*]} &"; else "${rest[@]}" & download=$!; fi
[ -f "$tok/tokenizer_meta.json" ] || run "$py" -m nanojax.tokenizer train --dataset climbmix --tokenizer_dir "$tok"
run "$py" -m nanojax.tokenizer eval --dataset climbmix --tokenizer_dir "$tok"
[ -z "$download" ] || wait "$download"
run "$py" -m nanojax.train --config=configs/gpt2_d24.py
run "$py" -m nanojax.evaluate "$home/runs/gpt2_d24" --tasks=core,bpb
run "$py" -m nanojax.train --config=configs/gpt2_sft.py
run "$py" -m nanojax.evaluate "$home/runs/gpt2_chat" --tasks=chat
run "$py" -m nanojax.report "$home/runs/gpt2_d24" "$home/runs/gpt2_chat"
