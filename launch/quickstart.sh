#!/usr/bin/env bash
# The tiny end-to-end pipeline on CPU: data -> tokenizer -> base model -> SFT -> evaluation -> RL -> chat.
#   bash launch/quickstart.sh          # downloads FineWeb-Edu shard 0 + the validation shard, and GSM8K
#   bash launch/quickstart.sh --text FILE.parquet --gsm8k DIR    # offline: any parquet file with a `text`
#                                      # column, and a folder with GSM8K's train.jsonl / test.jsonl
# BASE_STEPS (default 150), SFT_STEPS (default 100) and RL_STEPS (default 10; 0 skips the RL stage) shorten or
# lengthen the three training runs.
# Extra arguments after `--` go to the base trainer, e.g. `-- --config.train.eval_every=25`.
set -euo pipefail
cd "$(dirname "$0")/.."
text=""
gsm8k=""
train_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --text) text="$2"; shift 2 ;;
    --gsm8k) gsm8k="$2"; shift 2 ;;
    --) shift; train_args=("$@"); break ;;
    *) echo "unknown argument: $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
started=$SECONDS
offline_hint() {  # after a step that downloads failed
  echo "error: getting $1 failed (the message above says why). Without network, run the offline form:" >&2
  echo "  bash launch/quickstart.sh --text FILE.parquet --gsm8k DIR" >&2
  echo "(FILE.parquet: any parquet file with a 'text' column, >= 20 documents; DIR: GSM8K's train.jsonl and" >&2
  echo " test.jsonl, or its Hugging Face parquet files)" >&2
  exit 1
}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# setuptools' build chatter goes to a log that is shown only if the install fails
.venv/bin/python -m pip install --quiet -e . > .venv/install.log 2>&1 || { cat .venv/install.log; exit 1; }
py=.venv/bin/python
home=${NANOJAX_HOME:-$HOME/.cache/nanojax}
data="$home/data/fineweb"

echo "== 1/8 data"
if [ -n "$text" ]; then
  data="$home/data/quickstart"
  "$py" - "$text" "$data" <<'PYEOF'
import pathlib, sys
import pyarrow.parquet as pq
src, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
if not src.is_file():
    sys.exit(f"--text {src}: no such file")
table = pq.read_table(src, columns=["text"])
n = table.num_rows
if n < 20:
    sys.exit(f"--text {src}: only {n} rows; need at least 20 documents")
out.mkdir(parents=True, exist_ok=True)
cut = max(1, n // 20)  # last 5% of the documents are the validation shard
pq.write_table(table.slice(0, n - cut), out / "shard_00000.parquet", row_group_size=64)
pq.write_table(table.slice(n - cut), out / "shard_01822.parquet", row_group_size=64)
print(f"{src}: {n - cut} training and {cut} validation documents in {out}")
PYEOF
else
  "$py" -m nanojax.data.fineweb download -n 1 || offline_hint "FineWeb-Edu (shard 0 and the validation shard)"
fi

echo "== 2/8 tokenizer (8,192 tokens)"
tok="$home/tokenizer-8k"
if [ ! -f "$tok/tokenizer_meta.json" ]; then
  "$py" -m nanojax.tokenizer train --data_dir "$data" --vocab_size 8192 --max_chars 200000000 --tokenizer_dir "$tok"
fi

echo "== 3/8 base model (configs/tiny.py; re-running resumes)"
"$py" -m nanojax.train --config=configs/tiny.py --config.data.path="$data" --config.data.tokenizer_dir="$tok" \
  --config.train.num_iterations="${BASE_STEPS:-150}" ${train_args[@]+"${train_args[@]}"}
"$py" -m nanojax.inspect "$home/runs/tiny"

echo "== 4/8 base model evaluation (bits per byte on the validation shard)"
"$py" -m nanojax.evaluate "$home/runs/tiny" --tasks=bpb --bpb-tokens=131072

echo "== 5/8 SFT on GSM8K conversations (configs/tiny_sft.py, straight from the base run)"
sources=()
[ -n "$gsm8k" ] && sources=(--config.data.task_sources="gsm8k=$gsm8k")
"$py" -m nanojax.train --config=configs/tiny_sft.py --config.train.init_from="$home/runs/tiny" \
  --config.data.tokenizer_dir="$tok" --config.train.num_iterations="${SFT_STEPS:-100}" \
  --config.train.eval_every=0 ${sources[@]+"${sources[@]}"} || { [ -n "$gsm8k" ] && exit 1; offline_hint GSM8K; }
"$py" - "$home/runs/tiny_chat/metrics.jsonl" <<'PYEOF'
import json, sys
losses = [r["loss"] for r in map(json.loads, open(sys.argv[1])) if "loss" in r]
print(f"SFT loss on assistant tokens: {losses[0]:.3f} at the first step -> {losses[-1]:.3f} at step {len(losses)}")
PYEOF
echo "== 6/8 chat model evaluation (GSM8K, 20 problems, calculator on)"
eval_sources=()
[ -n "$gsm8k" ] && eval_sources=(--sources "gsm8k=$gsm8k")
"$py" -m nanojax.evaluate "$home/runs/tiny_chat" --tasks=gsm8k --max-per-task=20 --max-new-tokens=128 \
  ${eval_sources[@]+"${eval_sources[@]}"} || { [ -n "$gsm8k" ] && exit 1; offline_hint GSM8K; }

rl_steps=${RL_STEPS:-10}
echo "== 7/8 RL on GSM8K (configs/tiny_rl.py: $rl_steps steps of 8 questions × 8 sampled replies, reward = right answer)"
if [ "$rl_steps" -gt 0 ]; then
  "$py" -m nanojax.train --config=configs/tiny_rl.py --config.train.init_from="$home/runs/tiny_chat" \
    --config.data.tokenizer_dir="$tok" --config.train.num_iterations="$rl_steps" ${sources[@]+"${sources[@]}"}
  "$py" - "$home/runs/tiny_rl/metrics.jsonl" <<'PYEOF'
import json, sys
records = [json.loads(line) for line in open(sys.argv[1])]
rewards = [r["reward"] for r in records if "reward" in r]
passk = [r for r in records if "pass@1" in r]
print("RL mean reward per step: " + " ".join(f"{x:.3f}" for x in rewards))
if passk:
    print(f"pass@1 / pass@4 on GSM8K test: {passk[0]['pass@1']:.3f} / {passk[0]['pass@4']:.3f} at step "
          f"{passk[0]['step']} -> {passk[-1]['pass@1']:.3f} / {passk[-1]['pass@4']:.3f} at step {passk[-1]['step']}")
PYEOF
else
  echo "(skipped: RL_STEPS=0)"
fi

echo "== 8/8 chat (a 7M-parameter model after minutes on a CPU: expect the assistant format, not right answers)"
"$py" -m nanojax.chat_cli "$home/runs/tiny_chat" -p "What is 12 times 7?" --max-tokens 64
echo "done in $(( (SECONDS - started) / 60 )) min $(( (SECONDS - started) % 60 )) s: runs in $home/runs;" \
  "report card: python -m nanojax.report $home/runs/tiny $home/runs/tiny_chat$([ "$rl_steps" -gt 0 ] && echo " $home/runs/tiny_rl")"
echo "serve it (OpenAI API + chat page at http://127.0.0.1:8000/; pip install -e '.[serve]'):" \
  "python -m nanojax.serve $home/runs/tiny_chat --port 8000"
