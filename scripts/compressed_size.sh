#!/usr/bin/env bash
# Size on disk of SquareHead's merged export, dense against --format compressed-tensors, for 50% unstructured and
# 2:4 sparsity in float32 and bfloat16, on a Llama of hidden 256 and 4 layers built from config (3.4M weights; the
# embeddings and LM head, 8% of them, stay dense). Run from the repo root after `make install`:
#   bash scripts/compressed_size.sh [WORKDIR]
set -euo pipefail
B=${1:-runs/compressed-size}
mkdir -p "$B"
.venv/bin/python scripts/make_tiny_model.py --out "$B/base" --hidden 256 --layers 4 >/dev/null
for dtype in float32 bfloat16; do
  for pat in unstructured 2:4; do
    name=$dtype-${pat/:/}
    .venv/bin/sparseft train recipes/squarehead.yaml model.path="$B/base" model.dtype=$dtype method.pattern=$pat \
      method.pruner=magnitude train.max_steps=1 train.eval_every=null train.output_dir="$B/$name" --overwrite \
      >/dev/null 2>&1
    .venv/bin/sparseft export "$B/$name" --merged "$B/$name-dense" >/dev/null
    .venv/bin/sparseft export "$B/$name" --merged "$B/$name-ct" --format compressed-tensors >/dev/null
    .venv/bin/python - "$B/$name" "$dtype" "$pat" <<'PY'
import json, os, sys
run, dtype, pat = sys.argv[1:]
dense, ct = (os.path.getsize(f"{run}-{d}/model.safetensors") for d in ("dense", "ct"))
fmt = json.load(open(f"{run}-ct/config.json"))["quantization_config"]["sparsity_config"]["format"]
print(f"{dtype:9} {pat:13} {fmt:18} dense {dense:>10,} B  compressed {ct:>10,} B  ratio {ct / dense:.3f}")
PY
  done
done
