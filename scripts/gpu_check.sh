#!/usr/bin/env bash
# The prepared GPU check: one go, a few minutes on one GPU, one line per check, exit 1 when any check fails.
#
#   bash scripts/gpu_check.sh                 # uses .venv/bin/python when it exists, else python3
#   PYTHON=python3 bash scripts/gpu_check.sh  # a Python that has torch (CUDA build) and sparseft's dependencies
#
# What it checks:
#   - every method (full, lora, s2ft, hift, lamda, lamda_pp, squarehead) trains 20 steps on a small Llama-shaped model
#     on the GPU in bf16-mixed: the log names the CUDA device and the precision, every loss is finite, the last below
#     the first, and metrics.jsonl reports peak GPU memory;
#   - an S2FT run resumes exactly from a checkpoint in bf16-mixed on the GPU;
#   - export (merged and adapter), eval and generate on the GPU (--device $DEVICE), with and without the adapter;
#   - the tests marked `cuda` (HiFT's pinned parking and prefetch, S2FT's calibration and co-permutation on a GPU
#     model, LaMDA's merge of host adapter tensors, SparseGPT), which `make test` skips without a GPU (needs pytest:
#     the `test` extra);
#   - `sparseft bench` on the 125M shape (recipes/bench_s2ft.yaml), printing its ratio table.
# Logs of each check go to $OUT_DIR (default runs/gpu_check). The test suite never depends on this script.
# DEVICE=cpu runs the same checks on the CPU (a dry run of the script itself; SKIP_BENCH=1 leaves out the 125M bench).
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
OUT=${OUT_DIR:-runs/gpu_check}
mkdir -p "$OUT"
SPARSEFT=("$PY" -m sparseft)
DEVICE=${DEVICE:-cuda}
fails=0
began=$SECONDS

check() {  # check NAME COMMAND...: one line, ok or FAIL with the end of its log
  local name=$1 start=$SECONDS
  shift
  if "$@" >"$OUT/$name.log" 2>&1; then
    printf 'ok    %-28s %4d s\n' "$name" $((SECONDS - start))
  else
    printf 'FAIL  %-28s %4d s  %s\n' "$name" $((SECONDS - start)) "$(tail -n 3 "$OUT/$name.log" | tr '\n' ' ' | cut -c1-220)"
    fails=$((fails + 1))
  fi
}

[ "$DEVICE" = cpu ] || check cuda "$PY" -c "import torch, sys; ok = torch.cuda.is_available(); print(torch.__version__, torch.version.cuda, \
torch.cuda.get_device_name(0) if ok else 'no GPU'); sys.exit(0 if ok else 1)"
if [ "$fails" -gt 0 ]; then
  echo "no CUDA device: nothing else to check"; exit 1
fi

[ "$DEVICE" = cpu ] || check cuda-tests "$PY" -m pytest -q -p no:cacheprovider -m cuda tests/methods

SMALL=$OUT/small-llama
check small-model "$PY" scripts/make_tiny_model.py --out "$SMALL" --hidden 256 --layers 4 --heads 8 --kv-heads 2 \
  --corpus recipes/data/arith_train.jsonl

verify_run() {  # verify_run RUN_DIR LOG: 20 finite losses falling, GPU memory reported, the log names cuda + bf16-mixed
  "$PY" - "$1" "$2" "$DEVICE" <<'EOF'
import json, math, sys
run, log = sys.argv[1], open(sys.argv[2]).read()
rec = [json.loads(x) for x in open(f"{run}/metrics.jsonl")]
loss = [r["loss"] for r in rec if "loss" in r]
assert len(loss) == 20, f"{len(loss)} steps logged"
assert all(math.isfinite(x) for x in loss), loss
assert loss[-1] < loss[0], f"loss {loss[0]:.4f} -> {loss[-1]:.4f}"
mem = [r["peak_mem_mb"] for r in rec if "peak_mem_mb" in r]
assert mem and min(mem) > 0, "no peak GPU memory in metrics.jsonl"
device = sys.argv[3]
assert f"device {device}" in log and "precision bf16-mixed" in log, f"the run log does not say {device} / bf16-mixed"
print(f"loss {loss[0]:.4f} -> {loss[-1]:.4f}; peak memory {max(mem):.0f} MB; "
      f"{sum(r['tokens_per_s'] for r in rec if 'loss' in r) / len(loss):,.0f} tokens/s")
EOF
}

train_method() {  # train_method RECIPE NAME
  "${SPARSEFT[@]}" train "recipes/$1.yaml" "model.path=$SMALL" model.dtype=bfloat16 train.precision=bf16-mixed \
    train.device=$DEVICE train.max_steps=20 train.save_every=10 train.log_every=1 "train.output_dir=$OUT/runs/$2" \
    train.eval_every=null --overwrite >"$OUT/train-$2.out" 2>&1 || { tail -n 20 "$OUT/train-$2.out"; return 1; }
  verify_run "$OUT/runs/$2" "$OUT/train-$2.out"
}

for m in lora s2ft hift lamda lamda_pp squarehead; do
  check "train-$m" train_method "$m" "$m"
done
check train-full train_method quickstart full

resume_s2ft() {  # a run cut after its step-10 checkpoint and resumed gives the uninterrupted weights, bit for bit
  local a=$OUT/runs/s2ft b=$OUT/runs/s2ft-resumed
  rm -rf "$b" && cp -r "$a" "$b" && rm -rf "$b/final" && sed -i "s#$a#$b#" "$b/recipe.yaml"
  "${SPARSEFT[@]}" train recipes/s2ft.yaml "model.path=$SMALL" model.dtype=bfloat16 train.precision=bf16-mixed \
    train.device=$DEVICE train.max_steps=20 train.save_every=10 train.log_every=1 "train.output_dir=$b" \
    train.eval_every=null --resume || return 1
  "$PY" - "$a" "$b" <<'EOF'
import sys
import torch
from safetensors.torch import load_file
a, b = (load_file(f"{d}/final/trainable.safetensors") for d in sys.argv[1:])
assert a.keys() == b.keys()
bad = [k for k in a if not torch.equal(a[k], b[k])]
assert not bad, f"{len(bad)} tensors differ after resume, e.g. {bad[0]}"
print(f"{len(a)} tensors equal bit for bit")
EOF
}
check resume-s2ft resume_s2ft

check export-merged "${SPARSEFT[@]}" export "$OUT/runs/s2ft" --merged "$OUT/s2ft-merged"
check export-adapter "${SPARSEFT[@]}" export "$OUT/runs/s2ft" --adapter "$OUT/s2ft-adapter"
check eval-merged "${SPARSEFT[@]}" eval "$OUT/s2ft-merged" --task recipes/tasks/arith_ppl.yaml \
  --task recipes/tasks/arith_em.yaml --device $DEVICE --json "$OUT/eval-merged.json"
check eval-adapter "${SPARSEFT[@]}" eval "$SMALL" --adapter "$OUT/s2ft-adapter" --task recipes/tasks/arith_ppl.yaml \
  --device $DEVICE --json "$OUT/eval-adapter.json"
check eval-run-dir "${SPARSEFT[@]}" eval "$OUT/runs/lamda" --task recipes/tasks/arith_ppl.yaml --device $DEVICE
check generate "${SPARSEFT[@]}" generate "$OUT/s2ft-merged" --prompt "12 + 30 =" --max-new-tokens 8 --device $DEVICE
check generate-mixed "${SPARSEFT[@]}" generate "$SMALL" --adapter "$OUT/s2ft-adapter" --adapter "$OUT/s2ft-adapter" \
  --prompt "12 + 30 =" --max-new-tokens 8 --device $DEVICE

if [ -n "${SKIP_BENCH:-}" ]; then
  echo "gpu_check: $fails failed, $((SECONDS - began)) s in all (bench skipped); logs in $OUT"
  [ "$fails" -eq 0 ]; exit
fi
BENCH=$OUT/bench-125m
sed "s#demo/bench-125m#$BENCH#" recipes/bench_s2ft.yaml >"$OUT/bench_s2ft.yaml"
check bench-model "$PY" scripts/make_tiny_model.py --out "$BENCH" --hidden 768 --layers 12 --heads 12 --kv-heads 4 \
  --intermediate 2048 --model-vocab 32000
check bench "${SPARSEFT[@]}" bench "$OUT/bench_s2ft.yaml" --device $DEVICE --out "$OUT/bench" \
  --steps 10 --warmup 3
if [ -f "$OUT/bench.log" ]; then
  sed -n '/method/,/serving/p' "$OUT/bench.log"
fi

echo "gpu_check: $fails failed, $((SECONDS - began)) s in all; logs in $OUT"
[ "$fails" -eq 0 ]
