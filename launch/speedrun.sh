#!/usr/bin/env bash
# nanochat's "$100" d20 speedrun on one GPU node (8×H100 class): data, tokenizer, base, eval, chat stages.
# Every step can be re-run: downloads skip what is present, training resumes from its last checkpoint.
#   bash launch/speedrun.sh            (set NANOJAX_HOME to put data/runs elsewhere)
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install --quiet -e '.[gpu]'
py=.venv/bin/python
home=${NANOJAX_HOME:-$HOME/.cache/nanojax}

$py -m nanojax.data.fineweb download -n 240          # d20 needs ~216 shards; the tokenizer reads the first 8
[ -f "$home/tokenizer/tokenizer_meta.json" ] || $py -m nanojax.tokenizer train
$py -m nanojax.tokenizer eval
$py -m nanojax.train --config=configs/base_d20.py
$py -m nanojax.inspect "$home/runs/base_d20"
if [ -f nanojax/evaluate.py ]; then $py -m nanojax.evaluate "$home/runs/base_d20" --tasks=core,bpb; fi
if [ -f configs/mid_d20.py ]; then
  $py -m nanojax.train --config=configs/mid_d20.py
  $py -m nanojax.train --config=configs/sft_d20.py
  $py -m nanojax.evaluate "$home/runs/chat_d20" --tasks=mmlu,arc_easy,arc_challenge,gsm8k,humaneval
fi
if [ -f nanojax/report.py ]; then $py -m nanojax.report "$home/runs/base_d20" "$home/runs/chat_d20"; fi
