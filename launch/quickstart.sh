#!/usr/bin/env bash
# The tiny end-to-end pipeline on CPU, in a few minutes: data -> tokenizer -> base model -> inspect.
#   bash launch/quickstart.sh                    # downloads FineWeb-Edu shard 0 + the validation shard
#   bash launch/quickstart.sh --text FILE.parquet   # offline: any parquet file with a `text` column
# Extra arguments after `--` go to the trainer, e.g. `-- --config.train.num_iterations=50`.
set -euo pipefail
cd "$(dirname "$0")/.."
text=""
train_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --text) text="$2"; shift 2 ;;
    --) shift; train_args=("$@"); break ;;
    *) echo "unknown argument: $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install --quiet -e .
py=.venv/bin/python
home=${NANOJAX_HOME:-$HOME/.cache/nanojax}
data="$home/data/fineweb"

echo "== 1/4 data"
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
  "$py" -m nanojax.data.fineweb download -n 1
fi

echo "== 2/4 tokenizer (8,192 tokens)"
tok="$home/tokenizer-8k"
if [ ! -f "$tok/tokenizer_meta.json" ]; then
  "$py" -m nanojax.tokenizer train --data_dir "$data" --vocab_size 8192 --max_chars 200000000 --tokenizer_dir "$tok"
fi

echo "== 3/4 base model (configs/tiny.py; re-running resumes)"
"$py" -m nanojax.train --config=configs/tiny.py --config.data.path="$data" --config.data.tokenizer_dir="$tok" \
  ${train_args[@]+"${train_args[@]}"}

echo "== 4/4 the checkpoint"
"$py" -m nanojax.inspect "$home/runs/tiny"
